"""Client-Server endpoints for and about application services.

Spec: client-server-api "Application service ping" (``POST
/_matrix/client/v1/appservice/{appserviceId}/ping``), "Third-party
networks" (``GET /thirdparty/...``: answered by the services whose
``protocols`` include the protocol), "Application service room
directories" (``PUT``/``DELETE /directory/list/appservice/{networkId}/{roomId}``).
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.web.server import Request

from zhome.appservice.service import AppServices
from zhome.http.auth import Auth
from zhome.http.errors import MatrixError, bad_json, forbidden, not_found
from zhome.http.server import JsonResource, read_json_body
from zhome.storage.database import Database, Txn

CS = r"/_matrix/client/(?:r0|v3)"


class AppServiceRoomList:
    """The rooms each service published in its networks' directories."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def set(self, as_id: str, network_id: str, room_id: str, visible: bool) -> None:
        def txn_fn(txn: Txn) -> None:
            txn.execute("DELETE FROM appservice_room_list WHERE as_id = ? AND network_id = ? AND room_id = ?",
                        (as_id, network_id, room_id))
            if visible:
                txn.execute("INSERT INTO appservice_room_list (as_id, network_id, room_id) VALUES (?,?,?)",
                            (as_id, network_id, room_id))

        await self.db.run_interaction("appservice_room_list_set", txn_fn)

    async def room_ids(self, instance_id: Optional[str]) -> list[str]:
        """Rooms of one network instance (``{as_id}|{network_id}``), or of all when None."""
        if instance_id is None:
            rows = await self.db.execute("appservice_room_list_all", "SELECT DISTINCT room_id FROM appservice_room_list")
        else:
            as_id, _, network_id = instance_id.partition("|")
            rows = await self.db.execute(
                "appservice_room_list", "SELECT room_id FROM appservice_room_list WHERE as_id = ? AND network_id = ?",
                as_id, network_id)
        return sorted(r[0] for r in rows)


class AppServiceServlets:
    def __init__(self, auth: Auth, services: AppServices, room_list: AppServiceRoomList,
                 room_exists: Any) -> None:
        self.auth = auth
        self.services = services
        self.room_list = room_list
        self.room_exists = room_exists

    def register_routes(self, r: JsonResource) -> None:
        r.register("POST", r"/_matrix/client/v1/appservice/(?P<as_id>[^/]+)/ping", self.on_ping, "appservice_ping")
        r.register("GET", CS + r"/thirdparty/protocols", self.on_protocols, "thirdparty")
        r.register("GET", CS + r"/thirdparty/protocol/(?P<protocol>[^/]+)", self.on_protocol, "thirdparty")
        r.register("GET", CS + r"/thirdparty/(?P<kind>location|user)/(?P<protocol>[^/]+)", self.on_lookup,
                   "thirdparty")
        r.register("GET", CS + r"/thirdparty/(?P<kind>location|user)", self.on_reverse_lookup, "thirdparty")
        r.register("PUT", CS + r"/directory/list/appservice/(?P<network_id>[^/]+)/(?P<room_id>[^/]+)",
                   self.on_put_room_list, "appservice_room_list")
        r.register("DELETE", CS + r"/directory/list/appservice/(?P<network_id>[^/]+)/(?P<room_id>[^/]+)",
                   self.on_delete_room_list, "appservice_room_list")

    async def on_ping(self, request: Request, as_id: str) -> tuple[int, Any]:
        req = await self.auth.get_user_by_req(request)
        if req.app_service is None or req.app_service != as_id:
            raise forbidden("Provided access token is not the appservice's as_token")
        body = read_json_body(request, allow_empty=True)
        txn_id = body.get("transaction_id")
        if txn_id is not None and not isinstance(txn_id, str):
            raise bad_json("'transaction_id' must be a string")
        service = self.services.by_id(as_id)
        assert service is not None
        return 200, {"duration_ms": await self.services.ping(service, txn_id)}

    async def on_protocols(self, request: Request) -> tuple[int, Any]:
        await self.auth.get_user_by_req(request)
        out: dict[str, Any] = {}
        for p in self.services.all_protocols():
            info = await self.services.protocol_info(p)
            if info is not None:
                out[p] = info
        return 200, out

    async def on_protocol(self, request: Request, protocol: str) -> tuple[int, Any]:
        await self.auth.get_user_by_req(request)
        info = await self.services.protocol_info(protocol) if self.services.protocol_services(protocol) else None
        if info is None:
            raise not_found("The protocol is unknown")
        return 200, info

    @staticmethod
    def _fields(request: Request) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, vs in request.args.items():
            key = k.decode("utf-8", "replace")
            if key == "access_token":
                continue
            vals = [v.decode("utf-8", "replace") for v in vs]
            out[key] = vals if len(vals) > 1 else vals[0]
        return out

    async def on_lookup(self, request: Request, kind: str, protocol: str) -> tuple[int, Any]:
        await self.auth.get_user_by_req(request)
        if not self.services.protocol_services(protocol):
            raise not_found("The protocol is unknown")
        return 200, await self.services.lookup(kind, protocol, self._fields(request))

    async def on_reverse_lookup(self, request: Request, kind: str) -> tuple[int, Any]:
        await self.auth.get_user_by_req(request)
        key = "alias" if kind == "location" else "userid"
        fields = self._fields(request)
        if not isinstance(fields.get(key), str):
            raise MatrixError(400, "M_MISSING_PARAM", f"Missing '{key}' parameter")
        found = await self.services.lookup(kind, None, {key: fields[key]})
        if not found:
            raise not_found(f"No third-party {kind} found")
        return 200, found

    async def _room_list(self, request: Request, network_id: str, room_id: str, visible: bool) -> tuple[int, Any]:
        req = await self.auth.get_user_by_req(request)
        if req.app_service is None:
            raise forbidden("Only application services may publish to a network's room directory")
        if visible:
            body = read_json_body(request)
            if body.get("visibility") not in ("public", "private"):
                raise bad_json("'visibility' must be 'public' or 'private'")
            visible = body["visibility"] == "public"
        if not await self.room_exists(room_id):
            raise not_found("Room not found")
        await self.room_list.set(req.app_service, network_id, room_id, visible)
        return 200, {}

    async def on_put_room_list(self, request: Request, network_id: str, room_id: str) -> tuple[int, Any]:
        return await self._room_list(request, network_id, room_id, True)

    async def on_delete_room_list(self, request: Request, network_id: str, room_id: str) -> tuple[int, Any]:
        return await self._room_list(request, network_id, room_id, False)
