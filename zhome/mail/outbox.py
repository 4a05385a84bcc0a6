"""The persistent outbox: mail waits in the database until the relay took it.

What is acknowledged (``enqueue`` returned) survives a restart: the row is
committed first and deleted in the same step that records the relay's
acceptance, so each mail is handed over once (a crash in the instant
between the relay's "250" and that commit is the only way to send twice,
the usual at-least-once edge of SMTP). Failures are retried with
exponential backoff; a permanent refusal (5xx) or too many attempts drops
the mail with a log line that names neither address nor content, and
tells ``on_dropped`` (the email bridge says so in the room).

Recipient and message are sealed at rest (zhome/storage/at_rest.py) under
the outbox's own data key. The table's DDL is ``OUTBOX_SCHEMA`` so another
component can create it in its own database (``ensure_schema``).
"""

from __future__ import annotations

import base64
import logging
import time
from typing import Any, Awaitable, Callable, Optional, Protocol

from twisted.internet import defer

from zhome.storage.at_rest import Sealer, open_text, seal_text
from zhome.storage.database import Database, Txn
from zhome.storage.ids import IdGenerator
from zhome.util.reactor import reactor
from zhome.util.rounds import Rounds

logger = logging.getLogger(__name__)

OUTBOX_SCHEMA = """
CREATE TABLE IF NOT EXISTS mail_outbox (
    id BIGINT PRIMARY KEY,
    created_ts BIGINT NOT NULL,
    sender TEXT NOT NULL,
    recipient TEXT NOT NULL,
    message TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_ts BIGINT NOT NULL,
    last_error TEXT
)
"""

#: Mails sent per round; a round ends and the next is scheduled at once.
BATCH = 20


class Relay(Protocol):
    async def send(self, sender: str, recipient: str, message: bytes) -> None: ...


async def ensure_schema(db: Database) -> None:
    """Create the outbox table when the database has none (zhome's own
    database gets it from migration 0023)."""
    await db.run_interaction("mail_outbox_schema", lambda txn: txn.execute(OUTBOX_SCHEMA.strip()))


class MailOutbox(Rounds):
    def __init__(self, db: Database, ids: IdGenerator, sealer: Optional[Sealer], relay: Relay, *,
                 owner: str = "zhome:mail", min_backoff_s: float = 5.0, max_backoff_s: float = 3600.0,
                 max_attempts: int = 25, clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self.db = db
        self.ids = ids
        self.sealer = sealer
        self.relay = relay
        self.owner = owner
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_attempts = max_attempts
        self.clock = clock
        #: Called with the row ID after the relay accepted a mail (tests, metrics).
        self.on_sent: list[Callable[[int], Awaitable[None] | None]] = []
        #: Called with the row ID and whether the relay refused it for good
        #: (else: too many failed attempts) when a mail is given up.
        self.on_dropped: list[Callable[[int, bool], Awaitable[None] | None]] = []

    # -- sealing --------------------------------------------------------------------------
    def _aad(self, row_id: int, column: str) -> str:
        return f"mail_outbox.{column}\x00{row_id}"

    def _seal(self, row_id: int, column: str, value: str) -> str:
        sealed = seal_text(self.sealer, self.owner, value, self._aad(row_id, column))
        assert sealed is not None
        return sealed

    def _open(self, row_id: int, column: str, value: str) -> Optional[str]:
        return open_text(self.sealer, value, self._aad(row_id, column))

    # -- queueing -------------------------------------------------------------------------
    async def enqueue(self, sender: str, recipient: str, message: bytes) -> int:
        """Queue a mail; durable once this returns. Sending starts at once."""
        row_id = self.ids.next()
        now = int(self.clock() * 1000)
        body = base64.b64encode(message).decode("ascii")
        args = (row_id, now, sender, self._seal(row_id, "recipient", recipient),
                self._seal(row_id, "message", body), now)
        await self.db.run_interaction("mail_enqueue", lambda txn: txn.execute(
            "INSERT INTO mail_outbox (id, created_ts, sender, recipient, message, attempts, next_attempt_ts)"
            " VALUES (?,?,?,?,?,0,?)", args))
        self.kick()
        return row_id

    def prepare(self, sender: str, recipient: str, message: bytes) -> tuple[Any, ...]:
        """A mail's row, sealed, for ``enqueue_txn``."""
        row_id = self.ids.next()
        now = int(self.clock() * 1000)
        body = base64.b64encode(message).decode("ascii")
        return (row_id, now, sender, self._seal(row_id, "recipient", recipient),
                self._seal(row_id, "message", body), now)

    @staticmethod
    def enqueue_txn(txn: Txn, row: tuple[Any, ...]) -> int:
        """Queue a ``prepare``d mail inside the caller's transaction (with
        other work that must commit with it, or not at all); ``kick()`` once
        it committed."""
        txn.execute("INSERT INTO mail_outbox (id, created_ts, sender, recipient, message, attempts, next_attempt_ts)"
                    " VALUES (?,?,?,?,?,0,?)", row)
        return int(row[0])

    async def pending(self) -> int:
        rows = await self.db.execute("mail_pending", "SELECT COUNT(*) FROM mail_outbox")
        return int(rows[0][0])

    # -- the sending loop -----------------------------------------------------------------
    async def _round(self) -> None:
        self._running = True
        try:
            while not self._stopped:
                self._again = False
                sent_all = await self._send_due()
                if not (self._again or not sent_all):
                    break
        except Exception:
            logger.exception("mail outbox round failed")
        finally:
            self._running = False
        await self._schedule_next()

    async def _schedule_next(self) -> None:
        if self._stopped:
            return
        try:
            rows = await self.db.execute("mail_next", "SELECT MIN(next_attempt_ts) FROM mail_outbox")
        except Exception:
            logger.exception("mail outbox: could not read the next attempt time")
            rows = [(int(self.clock() * 1000) + 30_000,)]
        nxt = rows[0][0] if rows else None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if nxt is None:
            return
        delay = max(0.05, min(float(nxt) / 1000 - self.clock(), self.max_backoff_s))
        self._timer = reactor.callLater(delay, self.kick)

    async def _send_due(self) -> bool:
        """Send the mails that are due, at most BATCH; True when fewer were due."""
        now = int(self.clock() * 1000)
        rows = await self.db.execute(
            "mail_due", "SELECT id, sender, recipient, message, attempts FROM mail_outbox"
            " WHERE next_attempt_ts <= ? ORDER BY next_attempt_ts, id LIMIT ?", now, BATCH)
        for row_id, sender, recipient_s, message_s, attempts in rows:
            if self._stopped:
                return True
            recipient = self._open(row_id, "recipient", recipient_s)
            body = self._open(row_id, "message", message_s)
            if recipient is None or body is None:
                # Its key was destroyed (erasure): nothing left to send.
                await self._delete(row_id)
                continue
            try:
                await self.relay.send(sender, recipient, base64.b64decode(body))
            except Exception as e:
                permanent = bool(getattr(e, "permanent", False))
                await self._failed(row_id, int(attempts) + 1, permanent, type(e).__name__ + ": " + str(e)[:200])
                continue
            await self._delete(row_id)
            for hook in self.on_sent:
                got = hook(row_id)
                if got is not None:
                    await got
        return len(rows) < BATCH

    async def _delete(self, row_id: int) -> None:
        await self.db.run_interaction("mail_sent", lambda txn: txn.execute(
            "DELETE FROM mail_outbox WHERE id = ?", (row_id,)))

    async def _failed(self, row_id: int, attempts: int, permanent: bool, error: str) -> None:
        if permanent or attempts >= self.max_attempts:
            logger.warning("mail %d dropped after %d attempt(s): %s", row_id, attempts,
                           "refused by the relay" if permanent else "too many failures")
            await self._delete(row_id)
            for hook in self.on_dropped:
                try:
                    got = hook(row_id, permanent)
                    if got is not None:
                        await got
                except Exception as e:  # the mail is gone either way; a hook must not stop the outbox
                    logger.warning("mail %d: a drop hook failed: %s", row_id, type(e).__name__)
            return
        backoff = min(self.max_backoff_s, self.min_backoff_s * (2 ** (attempts - 1)))
        nxt = int((self.clock() + backoff) * 1000)
        logger.info("mail %d not sent (attempt %d), retrying in %.0fs", row_id, attempts, backoff)

        def txn_fn(txn: Txn) -> None:
            txn.execute("UPDATE mail_outbox SET attempts = ?, next_attempt_ts = ?, last_error = ? WHERE id = ?",
                        (attempts, nxt, error, row_id))

        await self.db.run_interaction("mail_failed", txn_fn)
