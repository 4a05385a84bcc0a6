"""GET /_matrix/client/v1/rooms/{roomId}/hierarchy.

Spec: client-server-api "Spaces" (space_hierarchy.yaml); the walk is
zhome/rooms/spaces.py. MSC2946's unstable path, which older clients call,
answers the same.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.web.server import Request

from zhome.http.errors import invalid_param
from zhome.http.server import JsonResource, query_arg, query_int
from zhome.rooms.spaces import SpaceHierarchy

ROOM = r"(?P<room_id>(?:!|%21)[^/]+)"


def query_bool(request: Request, name: str) -> bool:
    raw = query_arg(request, name)
    if raw is None:
        return False
    if raw not in ("true", "false"):
        raise invalid_param(f"Query parameter {name!r} must be 'true' or 'false'")
    return raw == "true"


class SpaceServlets:
    def __init__(self, auth: Any, hierarchy: SpaceHierarchy) -> None:
        self.auth = auth
        self.hierarchy = hierarchy

    def register_routes(self, r: JsonResource) -> None:
        for prefix in (r"/_matrix/client/v1", r"/_matrix/client/unstable/org\.matrix\.msc2946"):
            r.register("GET", prefix + "/rooms/" + ROOM + r"/hierarchy", self.on_hierarchy, "hierarchy")

    async def on_hierarchy(self, request: Request, room_id: str) -> tuple[int, Any]:
        req = await self.auth.get_user_by_req(request)
        from_token: Optional[str] = query_arg(request, "from")
        return 200, await self.hierarchy.hierarchy(
            req.user_id, room_id, query_bool(request, "suggested_only"), query_int(request, "max_depth"),
            query_int(request, "limit"), from_token)
