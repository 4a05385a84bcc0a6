"""Outbound EDUs: typing notifications, read receipts and presence for
other servers.

Spec: server-server-api "Typing Notifications" (m.typing), "Receipts"
(m.receipt) and "Presence" (m.presence). Sent to every other server with a
joined member in the room (for presence: in any room the user is in) that
the residency policy allows; typing and presence are not persisted (they
are stale by the time a retry would carry them), receipts are.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Optional

from twisted.internet import defer

from zhome.util.ids import server_of

if TYPE_CHECKING:
    from zhome.rooms.events import Event
    from zhome.server import HomeServer
    from zhome.storage.events import PersistItem
    from zhome.storage.presence import PresenceState

logger = logging.getLogger(__name__)

# Rooms looked at for one presence change (a user in more rooms reaches the
# servers of these first ones).
MAX_PRESENCE_ROOMS = 500


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

    async def presence(self, states: list["PresenceState"], only: Optional[list[str]] = None) -> None:
        """Push local users' presence to the servers sharing a room with
        each (or only to ``only``, still if they share one)."""
        by_server: dict[str, list[dict[str, Any]]] = {}
        for st in states:
            rooms = await self.hs.events.get_rooms_for_user(st.user_id)
            servers: set[str] = set()
            for room_id in [r for r, (m, _) in rooms.items() if m == "join"][:MAX_PRESENCE_ROOMS]:
                servers.update(await self._servers(room_id))
            if only is not None:
                servers &= set(only)
            push = dict(self.hs.presence.content(st), user_id=st.user_id)
            # Required in the EDU; a user never active has no better value.
            push.setdefault("last_active_ago", 0)
            for s in servers:
                by_server.setdefault(s, []).append(push)
        for s, pushes in sorted(by_server.items()):
            await self.hs.federation_sender.queue_edu([s], "m.presence", {"push": pushes}, persistent=False)

    def after_persist_presence(self, item: "PersistItem") -> None:
        """A join: the room's other servers hear the presence of whom they
        now share it with (only member events get here past one check)."""
        ev: "Event" = item.event
        if ev.type != "m.room.member" or ev.membership != "join" or not ev.state_key:
            return
        if item.outlier or item.backfilled or item.soft_failed or ev.rejected_reason:
            return
        defer.ensureDeferred(self._presence_on_join(ev.state_key, ev.room_id))

    async def _presence_on_join(self, user_id: str, room_id: str) -> None:
        try:
            await self.hs.presence.on_joined(user_id, room_id)
        except Exception:
            logger.exception("presence after a join failed")
