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
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional, Protocol

from twisted.internet import defer
from twisted.python.failure import Failure

from zhome.storage.at_rest import Sealer, open_text, seal_text
from zhome.storage.database import Database, Txn, in_chunks
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
BATCH = 200
#: Mails handed over on one connection before it is closed and another
#: opened (relays limit what one session may send).
MAILS_PER_CONNECTION = 50
#: Connections to the relay open at once (by default).
CONNECTIONS = 4


class Relay(Protocol):
    async def send(self, sender: str, recipient: str, message: bytes) -> None: ...

    # Optional: ``send_many(mails) -> [None | error]`` hands several
    # mails (sender, recipient, message) over one connection
    # (zhome.mail.smtp.SmtpRelay); without it each goes by ``send``.


@dataclass(frozen=True)
class _Due:
    row_id: int
    sender: str
    recipient: str
    message: bytes
    attempts: int


def _lanes(mails: list[_Due], connections: int) -> list[list[_Due]]:
    """``mails`` (in queue order) shared out over at most ``connections``
    connections: each recipient's mails all on one, in order; a new
    recipient goes to the least loaded."""
    lanes: list[list[_Due]] = [[] for _ in range(max(1, min(connections, len(mails))))]
    lane_of: dict[str, int] = {}
    for mail in mails:
        key = mail.recipient.lower()
        i = lane_of.get(key)
        if i is None:
            i = min(range(len(lanes)), key=lambda n: len(lanes[n]))
            lane_of[key] = i
        lanes[i].append(mail)
    return [lane for lane in lanes if lane]


class _SentRows:
    """Deletes the rows of accepted mails soon after each acceptance, in
    group commits (one commit at a time; what is accepted meanwhile goes
    in the next), so a crash can resend only what one commit holds."""

    def __init__(self, outbox: "MailOutbox") -> None:
        self.outbox = outbox
        self.pending: list[int] = []
        self.running: Optional[defer.Deferred[None]] = None

    def add(self, row_id: int) -> None:
        self.pending.append(row_id)
        if self.running is None:
            self.running = defer.ensureDeferred(self._drain())

    async def _drain(self) -> None:
        try:
            while self.pending:
                row_ids, self.pending = self.pending, []
                try:
                    await self.outbox._commit_sent(row_ids)
                except Exception:
                    # Still queued: sent again later (at least once).
                    logger.exception("mail outbox: could not record %d sent mail(s)", len(row_ids))
        finally:
            self.running = None

    async def flush(self) -> None:
        for _ in range(1000):  # bounded: each pass commits what was pending
            if self.running is None:
                return
            await self.running


async def ensure_schema(db: Database) -> None:
    """Create the outbox table and its index when the database has none
    (zhome's own database gets both from migration 0023)."""
    def txn_fn(txn: Txn) -> None:
        txn.execute(OUTBOX_SCHEMA.strip())
        # The due mails are found by their next attempt, without reading
        # every (large) row.
        txn.execute("CREATE INDEX IF NOT EXISTS mail_outbox_next ON mail_outbox (next_attempt_ts)")

    await db.run_interaction("mail_outbox_schema", txn_fn)


class MailOutbox(Rounds):
    def __init__(self, db: Database, ids: IdGenerator, sealer: Optional[Sealer], relay: Relay, *,
                 owner: str = "zhome:mail", min_backoff_s: float = 5.0, max_backoff_s: float = 3600.0,
                 max_attempts: int = 25, clock: Callable[[], float] = time.time,
                 connections: int = CONNECTIONS) -> None:
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
        self.connections = max(1, connections)
        #: Run with the row IDs of accepted mails inside the transaction
        #: that deletes their rows (work on the same database that must
        #: commit with it).
        self.sent_txn: list[Callable[[Txn, list[int]], None]] = []
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
        """Send the mails that are due, at most BATCH; True when fewer were due.

        The mails go out over at most ``connections`` connections at once,
        several on each (``Relay.send_many``); all mails to one recipient
        take the same connection, in the order they were queued, so they
        reach the relay in that order. Each accepted mail's row is deleted
        right after its acceptance (group commits: the mails accepted
        while one commit runs go in the next)."""
        now = int(self.clock() * 1000)
        rows = await self.db.execute(
            "mail_due", "SELECT id, sender, recipient, message, attempts FROM mail_outbox"
            " WHERE next_attempt_ts <= ? ORDER BY next_attempt_ts, id LIMIT ?", now, BATCH)
        mails: list[_Due] = []
        gone: list[int] = []
        for row_id, sender, recipient_s, message_s, attempts in rows:
            recipient = self._open(row_id, "recipient", recipient_s)
            body = self._open(row_id, "message", message_s)
            if recipient is None or body is None:
                # Its key was destroyed (erasure): nothing left to send.
                gone.append(int(row_id))
                continue
            mails.append(_Due(int(row_id), str(sender), recipient, base64.b64decode(body), int(attempts)))
        if gone:
            await self._delete_rows(gone)
        sent = _SentRows(self)
        # Every lane ends before the round does (a lane still sending must
        # not meet its own mails again in the next round).
        results = await defer.DeferredList([defer.ensureDeferred(self._send_lane(lane, sent))
                                            for lane in _lanes(mails, self.connections)], consumeErrors=True)
        await sent.flush()
        for ok, failure in results:
            if not ok and isinstance(failure, Failure):
                failure.raiseException()
        return len(rows) < BATCH

    async def _send_lane(self, lane: list["_Due"], sent: "_SentRows") -> None:
        """One connection's share of a round, MAILS_PER_CONNECTION a connection."""
        for i in range(0, len(lane), MAILS_PER_CONNECTION):
            if self._stopped:
                return  # the rest stay queued, untouched
            chunk = lane[i: i + MAILS_PER_CONNECTION]
            outcomes = await self._relay_many(chunk)
            retry: list[tuple[int, int, str]] = []
            for mail, error in zip(chunk, outcomes):
                if error is None:
                    sent.add(mail.row_id)
                    continue
                attempts = mail.attempts + 1
                text = type(error).__name__ + ": " + str(error)[:200]
                if bool(getattr(error, "permanent", False)) or attempts >= self.max_attempts:
                    await self._failed(mail.row_id, attempts, bool(getattr(error, "permanent", False)), text)
                else:
                    retry.append((mail.row_id, attempts, text))
            if retry:
                await self._retry_later(retry)

    async def _relay_many(self, chunk: list["_Due"]) -> list[Optional[Exception]]:
        """Each mail's outcome (None: accepted) from the relay: over one
        connection when it can (``send_many``), else one by one."""
        send_many = getattr(self.relay, "send_many", None)
        if send_many is not None:
            try:
                got = list(await send_many([(m.sender, m.recipient, m.message) for m in chunk]))
            except Exception as e:
                got = [e] * len(chunk)
            if len(got) != len(chunk):
                return [RuntimeError("the relay gave no outcome for each mail")] * len(chunk)
            return got
        out: list[Optional[Exception]] = []
        for m in chunk:
            try:
                await self.relay.send(m.sender, m.recipient, m.message)
            except Exception as e:
                out.append(e)
            else:
                out.append(None)
        return out

    async def _commit_sent(self, row_ids: list[int]) -> None:
        """The relay took these: their rows go (with what ``sent_txn``
        hooks do in the same transaction), then ``on_sent`` hears of each."""
        hooks = list(self.sent_txn)

        def txn_fn(txn: Txn) -> None:
            for chunk, qs in in_chunks(row_ids):
                txn.execute(f"DELETE FROM mail_outbox WHERE id IN ({qs})", chunk)
            for hook in hooks:
                hook(txn, row_ids)

        await self.db.run_interaction("mail_sent", txn_fn)
        for row_id in row_ids:
            for on_sent in self.on_sent:
                try:
                    got = on_sent(row_id)
                    if got is not None:
                        await got
                except Exception as e:  # the mail is sent either way
                    logger.warning("mail %d: a sent hook failed: %s", row_id, type(e).__name__)

    async def _delete_rows(self, row_ids: list[int]) -> None:
        def txn_fn(txn: Txn) -> None:
            for chunk, qs in in_chunks(row_ids):
                txn.execute(f"DELETE FROM mail_outbox WHERE id IN ({qs})", chunk)

        await self.db.run_interaction("mail_gone", txn_fn)

    async def _retry_later(self, failures: list[tuple[int, int, str]]) -> None:
        """Not taken this time: (row, attempts, error) each tried again after its backoff."""
        updates = []
        for row_id, attempts, error in failures:
            backoff = min(self.max_backoff_s, self.min_backoff_s * (2 ** (attempts - 1)))
            logger.info("mail %d not sent (attempt %d), retrying in %.0fs", row_id, attempts, backoff)
            updates.append((attempts, int((self.clock() + backoff) * 1000), error, row_id))

        def txn_fn(txn: Txn) -> None:
            txn.executemany("UPDATE mail_outbox SET attempts = ?, next_attempt_ts = ?, last_error = ? WHERE id = ?",
                            updates)

        await self.db.run_interaction("mail_failed", txn_fn)

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
