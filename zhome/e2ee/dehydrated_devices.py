"""Dehydrated devices: a device kept on the server that receives room keys
while the user has no other device, rehydrated by a client on a later login.

MSC3814 "Dehydrated devices with SSSS", unstable prefix
``org.matrix.msc3814.v1``: ``PUT``/``GET``/``DELETE /dehydrated_device``
and ``POST /dehydrated_device/{device_id}/events``. The PUT carries the
device's ID, its encrypted ``device_data`` and the keys uploaded for it
(the same shapes as ``/keys/upload``); a new dehydrated device replaces the
old one, whose keys and waiting to-device messages go with it. The device
is an ordinary device without an access token, so /keys/query, /keys/claim
and /sendToDevice treat it like any other. Its messages are paged by
``next_batch`` and, as the MSC says, not deleted as they are paged: a
rehydration that fails half-way can start again; they go when the device is
replaced or deleted.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.web.server import Request

from zhome.e2ee.keys import E2eKeysService
from zhome.e2ee.to_device import ToDeviceService
from zhome.e2ee.validation import check_device_keys, check_keys, ed25519_verify_key
from zhome.http.auth import Auth
from zhome.http.errors import bad_json, forbidden, invalid_param, not_found
from zhome.http.server import JsonResource, read_json_body
from zhome.storage.accounts import AccountsStore
from zhome.storage.dehydrated_devices import DehydratedDevicesStore
from zhome.sync.notifier import Notifier

UNSTABLE = r"/_matrix/client/unstable/org.matrix.msc3814.v1"
#: Advertised in /versions.
UNSTABLE_FEATURE = "org.matrix.msc3814"
#: To-device messages in one page of /events.
EVENTS_PER_PAGE = 100
MAX_DEVICE_ID_BYTES = 255
DEFAULT_DISPLAY_NAME = "Dehydrated device"


def _parse_batch(raw: Any) -> int:
    if raw is None:
        return 0
    if not isinstance(raw, str):
        raise bad_json("next_batch must be a string")
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        raise invalid_param("next_batch is not a token this server gave out")
    return int(raw)


class DehydratedDeviceService:
    def __init__(self, store: DehydratedDevicesStore, accounts: AccountsStore, keys: E2eKeysService,
                 to_device: ToDeviceService, notifier: Notifier) -> None:
        self.store = store
        self.accounts = accounts
        self.keys = keys
        self.to_device = to_device
        self.notifier = notifier
        # Replacing is several writes (old device out, new device in, its
        # keys, the mark); two at once for one user could leave a device
        # behind. They are rare, so one lock serves every user.
        self._lock = defer.DeferredLock()

    async def put(self, user_id: str, body: dict[str, Any]) -> dict[str, Any]:
        device_id = body.get("device_id")
        if not isinstance(device_id, str) or not device_id or len(device_id.encode("utf-8")) > MAX_DEVICE_ID_BYTES \
                or any(c.isspace() for c in device_id):
            raise bad_json(f"device_id must be a string of 1 to {MAX_DEVICE_ID_BYTES} bytes")
        device_data = body.get("device_data")
        if not isinstance(device_data, dict):
            raise bad_json("device_data must be an object")
        name = body.get("initial_device_display_name", DEFAULT_DISPLAY_NAME)
        if not isinstance(name, str):
            raise bad_json("initial_device_display_name must be a string")
        if body.get("device_keys") is None:
            raise bad_json("device_keys is required: a dehydrated device without keys cannot receive any")
        # Everything is checked before anything is written, so a refused
        # PUT leaves the old dehydrated device in place.
        device_keys = check_device_keys(body["device_keys"], user_id, device_id)
        verify_key = ed25519_verify_key(device_keys, device_id)
        check_keys(body.get("one_time_keys"), "one_time_keys", user_id, device_id, verify_key)
        check_keys(body.get("fallback_keys"), "fallback_keys", user_id, device_id, verify_key)

        await self._lock.acquire()
        try:
            return await self._replace(user_id, device_id, name, device_data, body)
        finally:
            self._lock.release()

    async def _replace(self, user_id: str, device_id: str, name: str, device_data: dict[str, Any],
                       body: dict[str, Any]) -> dict[str, Any]:
        old = await self.store.get(user_id)
        existing = {d["device_id"] for d in await self.accounts.get_devices(user_id)}
        if device_id in existing and (old is None or old.device_id != device_id):
            raise invalid_param(f"{device_id} is the ID of one of your devices")
        if old is not None and old.device_id in existing:
            # The device's keys, one-time keys and inbox go with it, and
            # its mark (a device-change hook).
            await self.accounts.delete_devices(user_id, [old.device_id])
        if not await self.accounts.create_device(user_id, device_id, name):
            raise invalid_param(f"{device_id} is the ID of one of your devices")
        try:
            await self.keys.upload(user_id, device_id, {k: body.get(k) for k in
                                                        ("device_keys", "one_time_keys", "fallback_keys")})
        except Exception:
            # Nothing of the new device stays when its keys are refused.
            await self.accounts.delete_devices(user_id, [device_id])
            raise
        await self.store.set(user_id, device_id, device_data)
        return {"device_id": device_id}

    async def get(self, user_id: str) -> dict[str, Any]:
        found = await self.store.get(user_id)
        if found is None:
            raise not_found("No dehydrated device")
        return {"device_id": found.device_id, "device_data": found.device_data}

    async def delete(self, user_id: str) -> dict[str, Any]:
        await self._lock.acquire()
        try:
            found = await self.store.get(user_id)
            if found is None:
                raise not_found("No dehydrated device")
            await self.accounts.delete_devices(user_id, [found.device_id])
            return {"device_id": found.device_id}
        finally:
            self._lock.release()

    async def events(self, user_id: str, device_id: str, body: dict[str, Any]) -> dict[str, Any]:
        found = await self.store.get(user_id)
        if found is None or found.device_id != device_id:
            raise forbidden("That is not your dehydrated device")
        after = _parse_batch(body.get("next_batch"))
        upto = self.notifier.current_token().to_device
        events, last = await self.to_device.store.peek(user_id, device_id, after, upto, EVENTS_PER_PAGE)
        # The last page is followed by one more call that finds nothing:
        # that empty answer tells the client it has everything.
        return {"events": events, "next_batch": str(last if last is not None else max(after, 0))}


class DehydratedDeviceServlets:
    def __init__(self, auth: Auth, service: DehydratedDeviceService) -> None:
        self.auth = auth
        self.service = service

    def register_routes(self, r: JsonResource) -> None:
        path = UNSTABLE + r"/dehydrated_device"
        r.register("PUT", path, self.on_put, "dehydrated_device")
        r.register("GET", path, self.on_get, "dehydrated_device")
        r.register("DELETE", path, self.on_delete, "dehydrated_device")
        r.register("POST", path + r"/(?P<device_id>[^/]+)/events", self.on_events, "dehydrated_device_events")

    async def on_put(self, request: Request) -> tuple[int, Any]:
        req = await self.auth.get_user_by_req(request)
        return 200, await self.service.put(req.user_id, read_json_body(request))

    async def on_get(self, request: Request) -> tuple[int, Any]:
        req = await self.auth.get_user_by_req(request)
        return 200, await self.service.get(req.user_id)

    async def on_delete(self, request: Request) -> tuple[int, Any]:
        req = await self.auth.get_user_by_req(request)
        return 200, await self.service.delete(req.user_id)

    async def on_events(self, request: Request, device_id: str) -> tuple[int, Any]:
        req = await self.auth.get_user_by_req(request)
        return 200, await self.service.events(req.user_id, device_id, read_json_body(request, allow_empty=True))

