"""GET /_matrix/client/v1/mutual_rooms: the rooms the caller and another
user are both joined to.

Spec: client-server-api "Mutual rooms" (mutual_rooms.yaml, v1.16; MSC2666,
whose unstable path and ``batch_token`` parameter clients still use,
answers the same). Rooms are listed by room ID, ``MAX_PAGE`` at a time;
``next_batch`` names the last room listed (opaque to clients), so a page
never repeats or skips a room that stayed shared. ``count`` is the total.
``limit`` (1 to ``MAX_PAGE``) is a zhome extension for smaller pages. A
missing, malformed or own user ID is 400; a well-formed ID of a user this
server shares no room with (or that does not exist) gives an empty list,
as the spec says.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from twisted.web.server import Request

from zhome.http.errors import MatrixError, invalid_param
from zhome.http.server import JsonResource, query_arg, query_int
from zhome.storage.events import EventsStore
from zhome.util.ids import is_valid_user_id

MAX_PAGE = 100
#: Announced in /versions' unstable_features: clients that predate v1.16
#: look for it before calling the endpoint.
UNSTABLE_FEATURE = "uk.half-shot.msc2666.query_mutual_rooms"


class MutualRoomsServlets:
    def __init__(self, auth: Any, events: EventsStore) -> None:
        self.auth = auth
        self.events = events

    def register_routes(self, r: JsonResource) -> None:
        r.register("GET", r"/_matrix/client/v1/mutual_rooms", self.on_get, "mutual_rooms")
        r.register("GET", r"/_matrix/client/unstable/uk\.half-shot\.msc2666/user/mutual_rooms", self.on_get,
                   "mutual_rooms")

    async def on_get(self, request: Request) -> tuple[int, Any]:
        req = await self.auth.get_user_by_req(request)
        other = query_arg(request, "user_id")
        if other is None:
            raise MatrixError(400, "M_MISSING_PARAM", "'user_id' is required")
        if not is_valid_user_id(other):
            raise invalid_param("The user ID provided was invalid")
        if other == req.user_id:
            raise invalid_param("You cannot ask for the rooms you share with yourself")
        limit = query_int(request, "limit", MAX_PAGE)
        assert limit is not None
        if not 1 <= limit <= MAX_PAGE:
            raise invalid_param(f"'limit' must be between 1 and {MAX_PAGE}")
        token = query_arg(request, "from") or query_arg(request, "batch_token")
        after = _decode(token) if token else None
        mine = await self.events.get_rooms_for_user(req.user_id)
        theirs = await self.events.get_rooms_for_user(other)
        shared = sorted(r for r, (m, _) in mine.items() if m == "join" and theirs.get(r, ("", ""))[0] == "join")
        rest = [r for r in shared if after is None or r > after]
        page = rest[:limit]
        out: dict[str, Any] = {"joined": page, "count": len(shared)}
        if len(rest) > limit:
            out["next_batch"] = _encode(page[-1])
        return 200, out


def _encode(room_id: str) -> str:
    return base64.urlsafe_b64encode(room_id.encode()).decode().rstrip("=")


def _decode(token: str) -> str:
    try:
        room_id = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise invalid_param("Invalid 'from' token")
    if not room_id.startswith("!"):
        raise invalid_param("Invalid 'from' token")
    return room_id
