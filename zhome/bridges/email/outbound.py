"""The outbound half's start: room messages mailed to the room's email participants.

Spec: application-service-api "Pushing events" brings the room's
``m.room.message`` events; each is queued in the bridge's database (content
sealed, deleted once mailed) and, after ``quiet_period_ms``, becomes one
mail per email participant (a ghost joined or invited), handed to the
persistent outbox of zhome/mail on the bridge's own database.

Each mail (RFC 5322) has ``Reply-To`` the participant's signed reply
address (tokens.py), a ``Message-ID`` derived from the event
(``<zhome.HASH@mail_domain>``, so a reply's ``In-Reply-To`` finds the event
and the bridge knows its own mail when it comes back) and, for a Matrix
reply, ``In-Reply-To`` the replied-to event's Message-ID when known.

At-least-once: a crash between handing a mail to the outbox and marking
the event mailed sends that event's mails again.
"""

from __future__ import annotations

import email.policy
import email.utils
import hashlib
import logging
import time
from email.message import EmailMessage
from typing import Any, Optional

from twisted.internet import defer

from zhome.bridges.email.hsclient import HomeserverClient, HomeserverError, HomeserverUnreachable
from zhome.bridges.email.store import BridgeStore
from zhome.bridges.email.tokens import reply_localpart
from zhome.mail.outbox import MailOutbox
from zhome.util.reactor import reactor
from zhome.util.rounds import Rounds

logger = logging.getLogger(__name__)

BATCH = 20
MAX_BATCHES_PER_ROUND = 10
RETRY_MS = 60_000


def message_id_for(event_id: str, mail_domain: str) -> str:
    digest = hashlib.sha256(event_id.encode("utf-8")).hexdigest()[:32]
    return f"<zhome.{digest}@{mail_domain}>"


def _one_line(text: str, limit: int = 150) -> str:
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())[:limit]


class OutboundMailer(Rounds):
    def __init__(self, store: BridgeStore, hs: HomeserverClient, outbox: MailOutbox, secret: bytes,
                 mail_domain: str, from_address: str, quiet_period_ms: int, ghost_prefix: str) -> None:
        super().__init__()
        self.ghost_prefix = ghost_prefix
        self.store = store
        self.hs = hs
        self.outbox = outbox
        self.secret = secret
        self.mail_domain = mail_domain
        self.from_address = from_address
        self.quiet_period_ms = quiet_period_ms

    async def queue(self, event: dict[str, Any]) -> None:
        """An event from a transaction; queued when its room has email participants."""
        room_id, event_id, content = event["room_id"], event["event_id"], event["content"]
        if not await self.store.email_participants(room_id, self.ghost_prefix):
            return
        body = content.get("body")
        if not isinstance(body, str) or not body:
            return
        relates = content.get("m.relates_to")
        reply_to = None
        if isinstance(relates, dict) and isinstance(relates.get("m.in_reply_to"), dict):
            target = relates["m.in_reply_to"].get("event_id")
            reply_to = target if isinstance(target, str) else None
        await self.store.add_outbound(room_id, event_id, str(event.get("sender", "")), body, reply_to,
                                      int(time.time() * 1000) + self.quiet_period_ms)
        self._schedule(self.quiet_period_ms / 1000)

    def _schedule(self, delay_s: float) -> None:
        if self._stopped:
            return
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= reactor.seconds() + delay_s:
                return
            self._timer.cancel()
        self._timer = reactor.callLater(max(0.05, delay_s), self.kick)

    async def _round(self) -> None:
        self._running = True
        try:
            for _ in range(MAX_BATCHES_PER_ROUND):
                self._again = False
                rows = await self.store.due_outbound(BATCH)
                for row in rows:
                    if self._stopped:
                        return
                    try:
                        await self._mail_event(*row)
                    except Exception as e:
                        # Tried again later, never in a tight loop.
                        logger.warning("email bridge: outbound event %d not mailed yet (%s)", row[0],
                                       type(e).__name__)
                        await self.store.postpone_outbound(row[0], RETRY_MS)
                if len(rows) < BATCH and not self._again:
                    break
        except Exception:
            logger.exception("email bridge: outbound round failed")
            min_delay = 5.0
        else:
            min_delay = 0.05
        finally:
            self._running = False
        if self._stopped:
            return
        try:
            nxt = await self.store.next_outbound_ts()
        except Exception:
            logger.exception("email bridge: could not read the next outbound time")
            nxt = int(time.time() * 1000) + 30_000
        if nxt is not None:
            self._schedule(max(min_delay, nxt / 1000 - time.time()))

    async def _mail_event(self, row_id: int, room_id: str, event_id: str, sender: str, body: Optional[str],
                          reply_to: Optional[str]) -> None:
        if body is None:
            await self.store.finish_outbound(row_id)
            return
        try:
            name = await self.hs.displayname(sender) or sender
        except (HomeserverError, HomeserverUnreachable):
            name = sender
        mid = message_id_for(event_id, self.mail_domain)
        n = await self.store.remember_event(room_id, event_id, mid)
        in_reply_to = await self.store.message_id_of(reply_to) if reply_to else None
        for address in await self.store.email_participants(room_id, self.ghost_prefix):
            if await self.store.is_bouncing(address):  # a hard bounce stopped mail to it (bounces.py)
                continue
            msg = EmailMessage(policy=email.policy.default)
            msg["From"] = email.utils.formataddr((_one_line(name), self.from_address))
            msg["To"] = address
            msg["Subject"] = "New message"
            msg["Date"] = email.utils.formatdate(usegmt=True)
            msg["Message-ID"] = mid
            msg["Reply-To"] = f"{reply_localpart(self.secret, n, room_id, event_id, address)}@{self.mail_domain}"
            msg["Auto-Submitted"] = "no"
            if in_reply_to:
                msg["In-Reply-To"] = in_reply_to
                msg["References"] = in_reply_to
            msg.set_content(f"{name} wrote:\n\n{body}\n")
            await self.outbox.enqueue(self.from_address, address, msg.as_bytes())
        await self.store.finish_outbound(row_id)
