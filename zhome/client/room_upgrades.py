"""POST /_matrix/client/v3/rooms/{roomId}/upgrade.

Spec: client-server-api "Room Upgrades"; the work is done by
zhome/rooms/room_upgrade.py.
"""

from __future__ import annotations

from typing import Any

from twisted.web.server import Request

from zhome.client.account import CS
from zhome.http.ratelimit import RateLimiter
from zhome.http.server import JsonResource, read_json_body
from zhome.rooms.room_upgrade import RoomUpgradeService

ROOM = r"(?P<room_id>(?:!|%21)[^/]+)"


class RoomUpgradeServlets:
    def __init__(self, auth: Any, upgrades: RoomUpgradeService, ratelimit: RateLimiter) -> None:
        self.auth = auth
        self.upgrades = upgrades
        self.ratelimit = ratelimit

    def register_routes(self, r: JsonResource) -> None:
        r.register("POST", CS + "/rooms/" + ROOM + r"/upgrade", self.on_upgrade, "room_upgrade")

    async def on_upgrade(self, request: Request, room_id: str) -> tuple[int, Any]:
        req = await self.auth.get_user_by_req(request)
        body = read_json_body(request)
        # A new room, as createRoom makes one.
        self.ratelimit.check(req.user_id)
        return 200, {"replacement_room": await self.upgrades.upgrade(req.user_id, room_id, body)}
