"""Server notices (client-server-api "Server Notices"), sent by an admin
through Synapse's path POST /_synapse/admin/v1/send_server_notice.

Notices come from a system account (``@server-notices:<server>``, made on
first use, with no password) in one room per user, tagged
``m.server_notice`` in the user's account data; the user is invited and may
read but not write there (power levels).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from twisted.web.server import Request

from zhome.http.errors import MatrixError, bad_json, forbidden, invalid_param, not_found
from zhome.http.server import JsonResource, read_json_body
from zhome.storage.database import Txn
from zhome.util.ids import is_valid_user_id

if TYPE_CHECKING:
    from zhome.server import HomeServer

SYSTEM_LOCALPART = "server-notices"


class ServerNoticeServlets:
    def __init__(self, hs: "HomeServer") -> None:
        self.hs = hs
        self.system_user = f"@{SYSTEM_LOCALPART}:{hs.server_name}"

    def register_routes(self, r: JsonResource) -> None:
        r.register("POST", r"/_synapse/admin/v1/send_server_notice", self.on_send, "admin_server_notice")
        r.register("PUT", r"/_synapse/admin/v1/send_server_notice/(?P<txn_id>[^/]+)", self.on_send,
                   "admin_server_notice")

    async def _room_for(self, user_id: str) -> str:
        rows = await self.hs.db.execute("notice_room", "SELECT room_id FROM server_notice_rooms WHERE user_id = ?",
                                        user_id)
        if rows:
            room_id = str(rows[0][0])
            membership = await self.hs.membership.current_membership(room_id, user_id)
            if membership in ("join", "invite"):
                return room_id
            if membership == "leave":
                await self.hs.membership.update(self.system_user, user_id, room_id, "invite")
                return room_id
        if await self.hs.accounts.get_user(self.system_user) is None:
            await self.hs.accounts.create_user(self.system_user, None, displayname="Server notices")
        room_id, _ = await self.hs.room_creation.create_room(self.system_user, {
            "preset": "private_chat", "name": "Server notices", "invite": [user_id], "is_direct": False,
            # The creator (the system account) keeps full power; the user may read only.
            "power_level_content_override": {"events_default": 100, "invite": 100}})
        pos = await self.hs.user_data.set_account_data(user_id, room_id, "m.tag",
                                                       {"tags": {"m.server_notice": {"order": 0.5}}})
        self.hs.notifier.on_account_data(pos, user_id)

        def txn_fn(txn: Txn) -> None:
            txn.execute("DELETE FROM server_notice_rooms WHERE user_id = ?", (user_id,))
            txn.execute("INSERT INTO server_notice_rooms (user_id, room_id) VALUES (?,?)", (user_id, room_id))

        await self.hs.db.run_interaction("set_notice_room", txn_fn)
        return room_id

    async def on_send(self, request: Request, txn_id: Optional[str] = None) -> tuple[int, Any]:
        req = await self.hs.auth.get_user_by_req(request)
        if not req.is_admin:
            raise forbidden("You are not a server admin")
        body = read_json_body(request)
        user_id, content = body.get("user_id"), body.get("content")
        etype = body.get("type", "m.room.message")
        if not isinstance(user_id, str) or not is_valid_user_id(user_id):
            raise bad_json("user_id must be a user ID")
        if not user_id.endswith(":" + self.hs.server_name):
            raise invalid_param("Server notices can only be sent to local users")
        if not isinstance(content, dict) or not isinstance(etype, str) or not etype:
            raise bad_json("content must be an object and type a string")
        user = await self.hs.accounts.get_user(user_id)
        if user is None or user["deactivated"]:
            raise not_found("User not found")
        room_id = await self._room_for(user_id)
        try:
            ev = await self.hs.event_creator.send(room_id, etype, self.system_user, content,
                                                  state_key=body.get("state_key"))
        except MatrixError:
            raise
        return 200, {"event_id": ev.event_id}
