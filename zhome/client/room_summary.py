"""GET /_matrix/client/v1/room_summary/{roomIdOrAlias}: what a room is,
for someone deciding whether to join it, and for clients showing a room
they were invited to.

Spec: client-server-api "Room summaries" (v1.15, MSC3266); the unstable
paths of MSC3266 (``/unstable/im.nheko.summary/rooms/{id}/summary`` and the
older ``/unstable/im.nheko.summary/summary/{id}``) that clients still call
answer the same.

Who may see a summary: anyone, without an access token, when the room's
join rule is public, knock or knock_restricted or its history is
world_readable; a signed-in user also when they are joined, invited or
knocking, or when the room is restricted and they are joined to one of the
rooms its join rule allows. Everyone else gets 404, as for a room this
server does not know, so a summary never tells that a private room exists.
Only rooms this server is in are summarised: the ``via`` servers are not
asked (a room known only over federation answers 404).
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Optional

from twisted.web.server import Request

from zhome.http.auth import token_from_request
from zhome.http.errors import not_found
from zhome.http.server import JsonResource
from zhome.storage.events import EventsStore

OPEN_JOIN_RULES = ("public", "knock", "knock_restricted")
ROOM_OR_ALIAS = r"(?P<target>[^/]+)"


class RoomSummaryServlets:
    def __init__(self, auth: Any, events: EventsStore,
                 resolve_room: Callable[[str], Awaitable[tuple[str, list[str]]]],
                 public_entry: Callable[[str], Awaitable[dict[str, Any]]]) -> None:
        """``resolve_room`` turns a room ID or alias into (room ID, servers);
        ``public_entry`` gives a room's entry as the public room directory
        lists it (name, topic, alias, avatar, join rule, counts)."""
        self.auth = auth
        self.events = events
        self.resolve_room = resolve_room
        self.public_entry = public_entry

    def register_routes(self, r: JsonResource) -> None:
        for path in (r"/_matrix/client/v1/room_summary/" + ROOM_OR_ALIAS,
                     r"/_matrix/client/unstable/im\.nheko\.summary/rooms/" + ROOM_OR_ALIAS + "/summary",
                     r"/_matrix/client/unstable/im\.nheko\.summary/summary/" + ROOM_OR_ALIAS):
            r.register("GET", path, self.on_get, "room_summary")

    async def on_get(self, request: Request, target: str) -> tuple[int, Any]:
        user_id: Optional[str] = None
        if token_from_request(request) is not None:
            # A token that is sent must be valid, even where none is needed.
            user_id = (await self.auth.get_user_by_req(request)).user_id
        room_id, _ = await self.resolve_room(target)
        state = await self.events.get_current_state_ids(room_id)
        if ("m.room.create", "") not in state:
            raise not_found("Room not found")
        wanted = {k[0]: v for k, v in state.items() if k[1] == "" and k[0] in (
            "m.room.create", "m.room.join_rules", "m.room.history_visibility", "m.room.encryption")}
        evs = await self.events.get_events(wanted.values())
        content = {etype: evs[eid].content for etype, eid in wanted.items() if eid in evs}
        join_rules = content.get("m.room.join_rules", {})
        join_rule = join_rules.get("join_rule", "invite")
        world_readable = content.get("m.room.history_visibility", {}).get("history_visibility") == "world_readable"
        allowed_rooms: list[str] = []
        allow = join_rules.get("allow")
        if join_rule in ("restricted", "knock_restricted") and isinstance(allow, list):
            allowed_rooms = [a["room_id"] for a in allow if isinstance(a, dict)
                             and a.get("type") == "m.room_membership" and isinstance(a.get("room_id"), str)]

        membership: Optional[str] = None
        if user_id is not None:
            member_id = state.get(("m.room.member", user_id))
            member = await self.events.get_event(member_id) if member_id else None
            membership = member.membership if member is not None else None
        visible = join_rule in OPEN_JOIN_RULES or world_readable or membership in ("join", "invite", "knock")
        if not visible and user_id is not None and join_rule == "restricted" and allowed_rooms:
            mine = await self.events.get_rooms_for_user(user_id)
            visible = any(r in mine and mine[r][0] == "join" for r in allowed_rooms)
        if not visible:
            raise not_found("Room not found")

        out = await self.public_entry(room_id)
        create = content.get("m.room.create", {})
        version = create.get("room_version", "1")
        out["room_version"] = version if isinstance(version, str) else "1"
        algorithm = content.get("m.room.encryption", {}).get("algorithm")
        if isinstance(algorithm, str):
            out["encryption"] = algorithm
        if allowed_rooms:
            out["allowed_room_ids"] = allowed_rooms
        if user_id is not None:
            out["membership"] = membership or "leave"
        return 200, out
