"""Client-Server endpoints of end-to-end encryption.

Spec: client-server-api "End-to-End Encryption" (POST /keys/upload,
/keys/query, /keys/claim, GET /keys/changes) and "Send-to-Device
messaging" (PUT /sendToDevice/{eventType}/{txnId}). Parsing and rendering
only; the services hold the protocol.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.web.server import Request

from zhome.e2ee.cross_signing import CrossSigningService
from zhome.e2ee.device_lists import DeviceListService
from zhome.e2ee.keys import DEFAULT_TIMEOUT_MS, E2eKeysService, parse_device_keys_request
from zhome.e2ee.to_device import ToDeviceService
from zhome.http.auth import Auth
from zhome.http.errors import bad_json, missing_param
from zhome.http.server import JsonResource, query_arg, read_json_body
from zhome.storage.events import EventsStore
from zhome.sync.notifier import Notifier, StreamToken

CS = r"/_matrix/client/(?:r0|v3)"
CS_OR_UNSTABLE = r"/_matrix/client/(?:r0|v3|unstable)"


class E2eeServlets:
    def __init__(self, auth: Auth, keys: E2eKeysService, to_device: ToDeviceService,
                 device_lists: DeviceListService, events: EventsStore, notifier: Notifier,
                 cross_signing: Optional[CrossSigningService] = None) -> None:
        self.auth = auth
        self.cross_signing = cross_signing
        self.keys = keys
        self.to_device = to_device
        self.device_lists = device_lists
        self.events = events
        self.notifier = notifier

    def register_routes(self, r: JsonResource) -> None:
        # Upload, query, claim and send-to-device are in the Guest Access module's list.
        r.register("POST", CS + r"/keys/upload", self.on_upload, "keys_upload", guests=True)
        r.register("POST", CS + r"/keys/upload/(?P<device_id>[^/]+)", self.on_upload, "keys_upload", guests=True)
        r.register("POST", CS + r"/keys/query", self.on_query, "keys_query", guests=True)
        r.register("POST", CS + r"/keys/claim", self.on_claim, "keys_claim", guests=True)
        r.register("GET", CS + r"/keys/changes", self.on_changes, "keys_changes")
        if self.cross_signing is not None:
            # Clients written before Matrix 1.1 (and sytest) use the unstable prefix.
            r.register("POST", CS_OR_UNSTABLE + r"/keys/device_signing/upload", self.on_device_signing_upload,
                       "keys_device_signing_upload")
            r.register("POST", CS_OR_UNSTABLE + r"/keys/signatures/upload", self.on_signatures_upload,
                       "keys_signatures_upload")
        r.register("PUT", CS + r"/sendToDevice/(?P<event_type>[^/]+)/(?P<txn_id>[^/]+)", self.on_send_to_device,
                   "send_to_device", guests=True)

    async def on_upload(self, request: Request, device_id: str | None = None) -> tuple[int, Any]:
        req = await self.auth.get_user_by_req(request)
        body = read_json_body(request, allow_empty=True)
        return 200, await self.keys.upload(req.user_id, req.device_id, body)

    async def on_query(self, request: Request) -> tuple[int, Any]:
        req = await self.auth.get_user_by_req(request)
        body = read_json_body(request)
        wanted = parse_device_keys_request(body.get("device_keys"))
        result = await self.keys.query(wanted, _timeout(body))
        if self.cross_signing is not None:
            await self.cross_signing.add_to_query(req.user_id, list(wanted), result)
        return 200, result

    async def on_device_signing_upload(self, request: Request) -> tuple[int, Any]:
        assert self.cross_signing is not None
        req = await self.auth.get_user_by_req(request)
        body = read_json_body(request)
        return 200, await self.cross_signing.upload_keys(req.user_id, body)

    async def on_signatures_upload(self, request: Request) -> tuple[int, Any]:
        assert self.cross_signing is not None
        req = await self.auth.get_user_by_req(request)
        body = read_json_body(request)
        return 200, await self.cross_signing.upload_signatures(req.user_id, body)

    async def on_claim(self, request: Request) -> tuple[int, Any]:
        await self.auth.get_user_by_req(request)
        body = read_json_body(request)
        return 200, await self.keys.claim(body.get("one_time_keys"), _timeout(body))

    async def on_changes(self, request: Request) -> tuple[int, Any]:
        req = await self.auth.get_user_by_req(request)
        from_raw, to_raw = query_arg(request, "from"), query_arg(request, "to")
        if not from_raw:
            raise missing_param("from is required")
        frm = StreamToken.decode(from_raw)
        to = StreamToken.decode(to_raw) if to_raw else self.notifier.current_token()
        memberships = await self.events.get_rooms_for_user(req.user_id)
        rooms = list(await self.events.get_rooms_changed_since(list(memberships), frm.events)) if memberships else []
        newly = {room_id: m for room_id, m, so in await self.events.get_membership_changes_since(req.user_id, frm.events)
                 if so <= to.events}
        changed, left = await self.device_lists.changes_for(req.user_id, frm.device_lists, to.device_lists, rooms,
                                                            newly, frm.events, to.events)
        return 200, {"changed": changed, "left": left}

    async def on_send_to_device(self, request: Request, event_type: str, txn_id: str) -> tuple[int, Any]:
        req = await self.auth.get_user_by_req(request)
        body = read_json_body(request)
        await self.to_device.send(req.user_id, req.device_id, event_type, txn_id, body)
        return 200, {}


def _timeout(body: dict[str, Any]) -> int:
    t = body.get("timeout", DEFAULT_TIMEOUT_MS)
    if not isinstance(t, int) or isinstance(t, bool) or t < 0:
        raise bad_json("timeout must be a non-negative integer")
    return min(t, DEFAULT_TIMEOUT_MS)
