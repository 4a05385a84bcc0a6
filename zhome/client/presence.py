"""GET and PUT /presence/{userId}/status.

Spec: client-server-api "Presence". A user sets their own presence; anyone
who shares a room with them may read it.
"""

from __future__ import annotations

from typing import Any

from twisted.web.server import Request

from zhome.client.account import CS
from zhome.http.errors import bad_json, forbidden, invalid_param, not_found
from zhome.http.server import JsonResource, read_json_body
from zhome.sync.presence import MAX_STATUS_MSG, STATES, PresenceService
from zhome.util.ids import is_valid_user_id, server_of


class PresenceServlets:
    def __init__(self, auth: Any, accounts: Any, events: Any, presence: PresenceService, server_name: str) -> None:
        self.auth = auth
        self.accounts = accounts
        self.events = events
        self.presence = presence
        self.server_name = server_name

    def register_routes(self, r: JsonResource) -> None:
        path = CS + r"/presence/(?P<user_id>[^/]+)/status"
        r.register("GET", path, self.on_get, "presence", guests=True)
        r.register("PUT", path, self.on_put, "presence", guests=True)

    async def on_get(self, request: Request, user_id: str) -> tuple[int, Any]:
        req = await self.auth.get_user_by_req(request)
        if not is_valid_user_id(user_id):
            raise invalid_param("Invalid user ID")
        if server_of(user_id) == self.server_name and await self.accounts.get_user(user_id) is None:
            raise not_found("Unknown user")
        if user_id != req.user_id and self.presence.enabled and not await self.events.get_users_sharing_rooms(
                req.user_id, [user_id]):
            raise forbidden("You do not share a room with this user")
        state = (await self.presence.get_presence([user_id]))[user_id]
        return 200, self.presence.content(state)

    async def on_put(self, request: Request, user_id: str) -> tuple[int, Any]:
        req = await self.auth.get_user_by_req(request)
        if user_id != req.user_id:
            raise forbidden("You cannot set the presence of another user")
        body = read_json_body(request)
        state = body.get("presence")
        if state not in STATES:
            raise invalid_param("presence must be one of " + ", ".join(STATES))
        msg = body.get("status_msg")
        if "status_msg" in body and msg is not None and not isinstance(msg, str):
            raise bad_json("status_msg must be a string")
        if isinstance(msg, str) and len(msg) > MAX_STATUS_MSG:
            raise invalid_param(f"status_msg is longer than {MAX_STATUS_MSG} characters")
        if "status_msg" in body:
            await self.presence.set_status(user_id, state, msg)
        else:
            await self.presence.set_status(user_id, state)
        return 200, {}
