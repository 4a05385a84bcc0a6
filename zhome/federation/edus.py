"""Outbound EDUs: typing notifications and read receipts for other servers.

Spec: server-server-api "Typing Notifications" (m.typing) and "Receipts"
(m.receipt). Sent to every other server with a joined member in the room
that the residency policy allows; typing is not persisted (it is stale by
the time a retry would carry it), receipts are.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from twisted.internet import defer

from zhome.util.ids import server_of

if TYPE_CHECKING:
    from zhome.server import HomeServer


class EduSender:
    def __init__(self, hs: "HomeServer") -> None:
        self.hs = hs

    async def _servers(self, room_id: str) -> list[str]:
        joined = await self.hs.events.get_joined_users(room_id)
        servers = {server_of(u) for u in joined} - {self.hs.server_name}
        if not servers:
            return []
        allowed = []
        for s in sorted(servers):
            if await self.hs.federation_handler._room_allows(s, room_id):
                allowed.append(s)
            else:
                self.hs.residency_policy.count_refusal("edu")
        return allowed

    def on_local_typing(self, room_id: str, user_id: str, typing: bool, timeout_ms: int) -> None:
        defer.ensureDeferred(self._typing(room_id, user_id, typing, timeout_ms))

    async def _typing(self, room_id: str, user_id: str, typing: bool, timeout_ms: int) -> None:
        servers = await self._servers(room_id)
        if servers:
            await self.hs.federation_sender.queue_edu(
                servers, "m.typing", {"room_id": room_id, "user_id": user_id, "typing": typing,
                                      "timeout": timeout_ms}, persistent=False)

    async def receipt(self, room_id: str, user_id: str, event_id: str, data: dict[str, Any]) -> None:
        servers = await self._servers(room_id)
        if not servers:
            return
        rdata: dict[str, Any] = {"ts": data.get("ts", int(time.time() * 1000))}
        if isinstance(data.get("thread_id"), str):
            rdata["thread_id"] = data["thread_id"]
        content = {room_id: {"m.read": {user_id: {"event_ids": [event_id], "data": rdata}}}}
        await self.hs.federation_sender.queue_edu(servers, "m.receipt", content)
