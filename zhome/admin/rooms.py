"""The admin API's rooms, in the shape of Synapse's room admin API: the
room list (search, ordering, paging), one room's details, members and
state, and blocking a room (no local user may join it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from twisted.web.server import Request

from zhome.http.errors import bad_json, forbidden, invalid_param, not_found
from zhome.http.server import JsonResource, query_arg, read_json_body
from zhome.client.serialize import serialize_events
from zhome.util.ids import is_valid_room_id

if TYPE_CHECKING:
    from zhome.server import HomeServer

SYN1 = r"/_synapse/admin/v1"
ROOM = r"(?P<room_id>[^/]+)"
MAX_PAGE = 1000

#: order_by values of the room list and whether they sort as text.
ROOM_ORDER = {
    "name": True, "canonical_alias": True, "joined_members": False, "joined_local_members": False,
    "version": True, "creator": True, "encryption": True, "federatable": False, "public": False,
    "join_rules": True, "guest_access": True, "history_visibility": True, "state_events": False,
}
LIST_FIELDS = ("room_id", "name", "canonical_alias", "joined_members", "joined_local_members", "version",
               "creator", "encryption", "federatable", "public", "join_rules", "guest_access",
               "history_visibility", "state_events", "room_type")


def _sort_key(order_by: str) -> Any:
    textual = ROOM_ORDER[order_by]

    def key(room: dict[str, Any]) -> tuple[Any, ...]:
        v = room.get(order_by)
        if textual:
            return (v is None, (v or "").lower() if isinstance(v, str) else "", room["room_id"])
        return (v is None, int(v or 0), room["room_id"])
    return key


class AdminRoomServlets:
    def __init__(self, hs: "HomeServer") -> None:
        self.hs = hs
        self.store = hs.admin_store

    def register_routes(self, r: JsonResource) -> None:
        r.register("GET", SYN1 + r"/rooms", self.on_list, "admin_rooms")
        r.register("GET", SYN1 + r"/rooms/" + ROOM, self.on_room, "admin_room")
        r.register("GET", SYN1 + r"/rooms/" + ROOM + r"/members", self.on_members, "admin_room_members")
        r.register("GET", SYN1 + r"/rooms/" + ROOM + r"/state", self.on_state, "admin_room_state")
        r.register("GET", SYN1 + r"/rooms/" + ROOM + r"/block", self.on_get_block, "admin_room_block")
        r.register("PUT", SYN1 + r"/rooms/" + ROOM + r"/block", self.on_put_block, "admin_room_block")

    async def _require_admin(self, request: Request) -> str:
        req = await self.hs.auth.get_user_by_req(request)
        if not req.is_admin:
            raise forbidden("You are not a server admin")
        return req.user_id

    async def _summary(self, room_id: str) -> dict[str, Any]:
        if not is_valid_room_id(room_id):
            raise invalid_param("Invalid room ID")
        got = (await self.store.room_summaries([room_id])).get(room_id)
        if got is None:
            raise not_found("Room not found")
        return got

    async def on_list(self, request: Request) -> tuple[int, Any]:
        await self._require_admin(request)

        def num(name: str, default: int) -> int:
            raw = query_arg(request, name)
            if raw is None:
                return default
            if not raw.isdigit():
                raise invalid_param(f"{name} must be a non-negative integer")
            return int(raw)

        offset, limit = num("from", 0), min(num("limit", 100), MAX_PAGE)
        order_by = query_arg(request, "order_by") or "name"
        # Synapse's older names for two orderings.
        order_by = {"size": "joined_members", "alphabetical": "name"}.get(order_by, order_by)
        if order_by not in ROOM_ORDER:
            raise invalid_param(f"Unknown value for order_by: {order_by}")
        direction = query_arg(request, "dir") or "f"
        if direction not in ("f", "b"):
            raise invalid_param("dir must be f or b")
        term = (query_arg(request, "search_term") or "").lower()
        public = query_arg(request, "public_rooms")
        empty = query_arg(request, "empty_rooms")
        rooms = list((await self.store.room_summaries()).values())
        if term:
            rooms = [r for r in rooms if any(term in (r.get(k) or "").lower()
                                             for k in ("name", "canonical_alias", "room_id"))]
        if public in ("true", "false"):
            rooms = [r for r in rooms if r["public"] == (public == "true")]
        if empty in ("true", "false"):
            rooms = [r for r in rooms if (r["joined_members"] == 0) == (empty == "true")]
        rooms.sort(key=_sort_key(order_by), reverse=direction == "b")
        if order_by == "name":
            # Synapse orders unnamed rooms last whichever the direction.
            rooms.sort(key=lambda r: r.get("name") is None)
        page = rooms[offset: offset + limit]
        body: dict[str, Any] = {"rooms": [{k: r[k] for k in LIST_FIELDS} for r in page], "offset": offset,
                                "total_rooms": len(rooms)}
        if offset + len(page) < len(rooms):
            body["next_batch"] = offset + len(page)
        if offset > 0:
            body["prev_batch"] = max(0, offset - limit)
        return 200, body

    async def on_room(self, request: Request, room_id: str) -> tuple[int, Any]:
        await self._require_admin(request)
        summary = await self._summary(room_id)
        members = await self._joined(room_id)
        local = [m for m in members if m.endswith(":" + self.hs.server_name)]
        devices = sum([len(await self.hs.accounts.get_devices(u)) for u in local])
        out = {k: summary[k] for k in LIST_FIELDS}
        out.update(avatar=summary["avatar"], topic=summary["topic"], joined_local_devices=devices,
                   forgotten=False)
        return 200, out

    async def _joined(self, room_id: str) -> list[str]:
        state = await self.hs.events.get_current_state_ids(room_id)
        evs = await self.hs.events.get_events([e for (t, _), e in state.items() if t == "m.room.member"])
        return sorted(ev.state_key for ev in evs.values() if ev.membership == "join" and ev.state_key)

    async def on_members(self, request: Request, room_id: str) -> tuple[int, Any]:
        await self._require_admin(request)
        await self._summary(room_id)
        members = await self._joined(room_id)
        return 200, {"members": members, "total": len(members)}

    async def on_state(self, request: Request, room_id: str) -> tuple[int, Any]:
        await self._require_admin(request)
        await self._summary(room_id)
        state = await self.hs.events.get_current_state_ids(room_id)
        evs = await self.hs.events.get_events(list(state.values()))
        ordered = sorted(evs.values(), key=lambda e: (e.type, e.state_key or ""))
        return 200, {"state": await serialize_events(self.hs.events, ordered)}

    async def on_get_block(self, request: Request, room_id: str) -> tuple[int, Any]:
        await self._require_admin(request)
        if not is_valid_room_id(room_id):
            raise invalid_param("Invalid room ID")
        by: Optional[str] = await self.store.room_block(room_id)
        return 200, ({"block": True, "user_id": by} if by else {"block": False})

    async def on_put_block(self, request: Request, room_id: str) -> tuple[int, Any]:
        admin = await self._require_admin(request)
        if not is_valid_room_id(room_id):
            raise invalid_param("Invalid room ID")
        body = read_json_body(request)
        block = body.get("block")
        if not isinstance(block, bool):
            raise bad_json("block must be a boolean")
        # A room this server has never seen can be blocked ahead of time.
        await self.store.set_room_blocked(room_id, admin, block)
        return 200, {"block": block}
