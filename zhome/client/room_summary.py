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
from zhome.rooms.previews import RoomPreviews

ROOM_OR_ALIAS = r"(?P<target>[^/]+)"


class RoomSummaryServlets:
    def __init__(self, auth: Any, previews: RoomPreviews,
                 resolve_room: Callable[[str], Awaitable[tuple[str, list[str]]]]) -> None:
        """``resolve_room`` turns a room ID or alias into (room ID, servers);
        who may see what is decided by zhome/rooms/previews.py."""
        self.auth = auth
        self.previews = previews
        self.resolve_room = resolve_room

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
        facts = await self.previews.facts(room_id)
        if facts is None:
            raise not_found("Room not found")
        visible, membership = await self.previews.visible_to_user(facts, user_id)
        if not visible:
            raise not_found("Room not found")
        out = await self.previews.summary(facts)
        if user_id is not None:
            out["membership"] = membership or "leave"
        return 200, out
