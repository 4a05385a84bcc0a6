"""Mail about missed messages, per room.

A user turns it on for one room with the room account data
``org.zhome.email_notifications`` ``{"enabled": true}`` (client-server-api
"Client Config": any client can set room account data). Every
``missed_messages_interval_ms`` the server looks at the notifications
(zhome/storage/notifications.py: what the user's push rules notify about)
in those rooms that came after the setting was first seen and after the
last mail, and are older than ``missed_messages_delay_ms``; those still
unread (no read receipt of the user at or after them) are summed up in one
mail per room to the user's validated email addresses: how many, from
whom, a link to the room. Message text is not mailed (it may be
encrypted, and a mail is less private than the room). State is in SQL
(table email_missed_messages), so a restart loses no mail (one may go twice
if the server stops between queueing it and recording it). Never logs an
address.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional
from urllib.parse import quote

from twisted.internet import defer, task

from zhome.mail.mailer import Mailer
from zhome.storage.database import Database, Txn
from zhome.util.reactor import reactor

logger = logging.getLogger(__name__)

SETTING_TYPE = "org.zhome.email_notifications"
MAX_PER_ROUND = 200


class MissedMessagesMailer:
    def __init__(self, db: Database, user_data: Any, notifications: Any, events: Any, threepids: Any,
                 mailer: Mailer, delay_ms: int, interval_ms: int, client_location: str) -> None:
        self.db = db
        self.user_data = user_data
        self.notifications = notifications
        self.events = events
        self.threepids = threepids
        self.mailer = mailer
        self.delay_ms = delay_ms
        self.interval_ms = interval_ms
        self.client_location = client_location
        self._loop: Optional[task.LoopingCall] = None
        self._running: Optional[defer.Deferred[Any]] = None

    def start(self) -> None:
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = reactor
        self._loop.start(self.interval_ms / 1000, now=False)

    async def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._running is not None:
            try:
                await self._running
            except Exception:
                pass

    def _tick(self) -> None:
        if self._running is not None:
            return
        d = defer.ensureDeferred(self.run_once())

        def done(result: Any) -> None:
            self._running = None
            if isinstance(result, Exception) or hasattr(result, "getTraceback"):
                logger.warning("missed-messages mail: a round failed")

        d.addBoth(done)
        self._running = d

    async def run_once(self) -> int:
        """One round; the number of mails queued."""
        rows = await self.db.execute("missed_settings", "SELECT user_id, room_id FROM account_data"
                                     " WHERE type = ? AND room_id != ''", SETTING_TYPE)
        sent = 0
        for user_id, room_id in rows[:MAX_PER_ROUND]:
            content = await self.user_data.get_account_data(user_id, room_id, SETTING_TYPE)
            if not isinstance(content, dict) or content.get("enabled") is not True:
                continue
            if await self._room(str(user_id), str(room_id)):
                sent += 1
        return sent

    async def _state(self, user_id: str, room_id: str) -> tuple[int, int]:
        now = int(time.time() * 1000)

        def txn_fn(txn: Txn) -> tuple[int, int]:
            txn.execute("SELECT since_ts, mailed_up_to FROM email_missed_messages WHERE user_id = ? AND room_id = ?",
                        (user_id, room_id))
            row = txn.fetchone()
            if row is not None:
                return int(row[0]), int(row[1])
            txn.execute("INSERT INTO email_missed_messages (user_id, room_id, since_ts, mailed_up_to)"
                        " VALUES (?,?,?,0)", (user_id, room_id, now))
            return now, 0

        return await self.db.run_interaction("missed_state", txn_fn)

    async def _read_up_to(self, user_id: str, room_id: str) -> int:
        rows = await self.db.execute(
            "missed_read_up_to", "SELECT MAX(e.stream_ordering) FROM receipts r JOIN events e"
            " ON e.event_id = r.event_id WHERE r.room_id = ? AND r.user_id = ?"
            " AND r.receipt_type IN ('m.read', 'm.read.private')", room_id, user_id)
        return int(rows[0][0]) if rows and rows[0][0] is not None else -1

    async def _room(self, user_id: str, room_id: str) -> bool:
        since_ts, mailed_up_to = await self._state(user_id, room_id)
        cutoff = int(time.time() * 1000) - self.delay_ms
        got = await self.notifications.get_after(user_id, mailed_up_to, 2 ** 62, 500)
        due = [n for n in got if n.room_id == room_id and n.ts > since_ts]
        if any(n.ts > cutoff for n in due):
            # Mailed once the newest is old enough: one mail for a burst.
            return False
        if not due:
            return False
        read_up_to = await self._read_up_to(user_id, room_id)
        unread = [n for n in due if n.stream_ordering > read_up_to]
        up_to = max(n.stream_ordering for n in due)
        sent = False
        if unread:
            addresses = [t["address"] for t in await self.threepids.list_for_user(user_id)
                         if t["medium"] == "email"]
            if addresses:
                evs = await self.events.get_events([n.event_id for n in unread])
                senders = sorted({ev.sender for ev in evs.values() if ev is not None})
                name = await self._room_name(room_id)
                link = self.client_location + "#/room/" + quote(room_id, safe="!:")
                for address in addresses:
                    await self.mailer.send_missed_messages(address, name, len(unread), senders, link)
                sent = True
        await self.db.run_interaction("missed_mailed", lambda txn: txn.execute(
            "UPDATE email_missed_messages SET mailed_up_to = ? WHERE user_id = ? AND room_id = ?"
            " AND mailed_up_to < ?", (up_to, user_id, room_id, up_to)))
        return sent

    async def _room_name(self, room_id: str) -> str:
        event_id = await self.events.get_current_state_event_id(room_id, "m.room.name", "")
        if event_id is not None:
            ev = await self.events.get_event(event_id)
            name = ev.content.get("name") if ev is not None else None
            if isinstance(name, str) and name:
                return name
        return "a room"
