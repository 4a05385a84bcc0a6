"""The outbound federation queue.

Spec: server-server-api "Transactions" (PUT /send/{txnId}, at most 50 PDUs
and 100 EDUs each) and the retry behaviour servers are expected to have.
One queue per destination, persisted in SQL in the same transaction as the
event, so what was acknowledged to a client reaches other servers even
after a crash. Each destination is served by one loop at a time: batches go
out in order, failures back off exponentially, and a message from the
destination (it is alive again) cuts the wait short. Local sends never wait
for any of this.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Awaitable, Callable, Iterable, Optional

from prometheus_client import Counter, Gauge, Histogram
from twisted.internet import defer

from zhome.federation.policy import ResidencyPolicy
from zhome.rooms.events import Event
from zhome.storage.at_rest import Sealer, open_text, seal_text
from zhome.storage.database import Database, Txn, in_chunks
from zhome.storage.events import PersistItem
from zhome.storage.ids import IdGenerator
from zhome.util.ids import server_of
from zhome.util.reactor import reactor, wakeable_sleep

logger = logging.getLogger(__name__)

MAX_PDUS = 50
MAX_EDUS = 100
MIN_RETRY_MS = 500

QUEUED = Gauge("zhome_federation_queue_length", "Queued PDUs and EDUs per destination", ["destination"])
TXN_SECONDS = Histogram("zhome_federation_transaction_seconds", "Outbound transaction latency",
                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
TXN_RESULTS = Counter("zhome_federation_transactions_total", "Outbound transactions", ["result"])


class FederationSender:
    def __init__(
        self,
        server_name: str,
        db: Database,
        ids: IdGenerator,
        put_json: Callable[[str, str, Any], Awaitable[Any]],
        get_events: Callable[[Iterable[str]], Awaitable[dict[str, Event]]],
        policy: ResidencyPolicy,
        max_retry_interval_ms: int = 10 * 60 * 1000,
        clock: Callable[[], float] = time.time,
        sealer: Optional[Sealer] = None,
    ) -> None:
        self.server_name = server_name
        #: Queued EDUs (presence status messages, device names in device-list
        #: updates, to-device payloads, receipts) are sealed at rest.
        self.sealer = sealer
        self.db = db
        self.ids = ids
        self.put_json = put_json
        self.get_events = get_events
        self.policy = policy
        #: (sender, server) -> bool: a do-not-transfer sender's events go only to servers it allows.
        self.may_transfer: Optional[Callable[[str, str], bool]] = None
        self.max_retry_interval_ms = max_retry_interval_ms
        self.clock = clock
        self._running: set[str] = set()
        self._wake: dict[str, defer.Deferred[None]] = {}
        #: Destinations woken while their loop ran (see wake).
        self._again: set[str] = set()
        # Typing notices are only worth sending now; they are not queued in SQL.
        self._ephemeral: dict[str, list[dict[str, Any]]] = {}
        self._txn_counter = int(clock() * 1000)
        self._stopped = False

    # -- enqueueing ------------------------------------------------------------
    def queue_pdu_txn(self, txn: Txn, event_id: str, destinations: Iterable[str]) -> None:
        now = int(self.clock() * 1000)
        rows = [(self.ids.next(), d, event_id, None, now) for d in sorted(set(destinations))]
        if rows:
            txn.executemany_later(
                "INSERT INTO federation_outbound (id, destination, event_id, edu_json, created_ts) VALUES (?,?,?,?,?)",
                rows,
            )

    async def queue_edu(self, destinations: Iterable[str], edu_type: str, content: dict[str, Any],
                        persistent: bool = True) -> None:
        dests = [d for d in set(destinations) if d != self.server_name and self.policy.server_allowed(d)]
        if not dests:
            return
        edu = {"edu_type": edu_type, "content": content}
        if not persistent:
            for d in dests:
                self._ephemeral.setdefault(d, []).append(edu)
                self.wake(d)
            return
        now = int(self.clock() * 1000)

        text = json.dumps(edu)

        def txn_fn(txn: Txn) -> None:
            rows = []
            for d in dests:
                row_id = self.ids.next()
                rows.append((row_id, d, None, self.seal_edu(row_id, text), now))
            txn.executemany(
                "INSERT INTO federation_outbound (id, destination, event_id, edu_json, created_ts) VALUES (?,?,?,?,?)",
                rows,
            )

        await self.db.run_interaction("queue_edu", txn_fn)
        for d in dests:
            self.wake(d)

    # -- encryption at rest of queued EDUs, under the server's own key ----------------------
    def seal_edu(self, row_id: int, text: str) -> Optional[str]:
        return seal_text(self.sealer, self.server_name, text, f"federation_outbound.edu_json\x00{row_id}")

    def open_edu(self, row_id: int, stored: str) -> Any:
        text = open_text(self.sealer, stored, f"federation_outbound.edu_json\x00{row_id}")
        return json.loads(text) if text is not None else None

    async def before_persist(self, item: PersistItem) -> None:
        """Pre-persist hook: work out who must receive a local event."""
        ev = item.event
        if item.outlier or ev.rejected_reason or item.soft_failed or item.backfilled:
            return
        if server_of(ev.sender) != self.server_name:
            return
        servers = await self.destinations_for(ev, item.state_before)
        item.destinations = servers

    async def destinations_for(self, ev: Event, state: dict[tuple[str, str], str]) -> list[str]:
        member_ids = [eid for (t, sk), eid in state.items()
                      if t == "m.room.member" and server_of(sk) != self.server_name]
        servers: set[str] = set()
        if member_ids:
            evs = await self.get_events(member_ids)
            for e in evs.values():
                if e.membership == "join" and e.state_key:
                    servers.add(server_of(e.state_key))
        if (ev.type == "m.room.member" and ev.state_key and server_of(ev.state_key) != self.server_name
                and ev.membership != "invite"):
            # The target of a kick, ban or leave hears about it even though
            # it is no longer joined. (An invite reached the invitee's server
            # through /invite; a /send for a room it is not in is no use.)
            servers.add(server_of(ev.state_key))
        if not servers:
            return []
        room_state = await self._policy_state(state)
        allowed = []
        for s in sorted(servers):
            if (self.may_transfer is not None and not self.may_transfer(ev.sender, s)
                    and ev.type != "m.room.redaction" and ev.membership != "leave"):
                # Leaving and redacting reach every server: they take data back.
                self.policy.count_refusal("send")
                logger.info("do-not-transfer: not sending %s to %s", ev.event_id, s)
                continue
            if self.policy.room_allows(s, room_state):
                allowed.append(s)
            else:
                self.policy.count_refusal("send")
                logger.info("residency policy: not sending %s to %s", ev.event_id, s)
        return allowed

    async def _policy_state(self, state: dict[tuple[str, str], str]) -> dict[tuple[str, str], Any]:
        keys = [k for k in (("m.room.server_acl", ""), ("zhome.residency", "")) if k in state]
        if not keys:
            return {}
        evs = await self.get_events(state[k] for k in keys)
        return {k: evs[state[k]].content for k in keys if state[k] in evs}

    def persist_txn_hook(self, txn: Txn, item: PersistItem) -> None:
        if item.destinations:
            self.queue_pdu_txn(txn, item.event.event_id, item.destinations)

    def after_persist(self, item: PersistItem) -> None:
        for d in item.destinations:
            self.wake(d)

    # -- the per-destination loop ---------------------------------------------------
    def wake(self, destination: str, reset_backoff: bool = False) -> None:
        if self._stopped:
            return
        if reset_backoff:
            w = self._wake.pop(destination, None)
            if w is not None and not w.called:
                w.callback(None)
        if destination in self._running:
            # The running loop may have just found the queue empty, before
            # this event's row committed: it looks once more before ending.
            self._again.add(destination)
            w = self._wake.get(destination)
            if w is not None and not w.called and reset_backoff:
                w.callback(None)
            return
        self._running.add(destination)
        defer.ensureDeferred(self._run(destination))

    async def start(self) -> None:
        rows = await self.db.execute("pending_destinations", "SELECT DISTINCT destination FROM federation_outbound")
        for (d,) in rows:
            self.wake(d)

    def stop(self) -> None:
        self._stopped = True
        # Firing a wake-up ends its loop, which takes its entry out.
        for w in list(self._wake.values()):
            if not w.called:
                w.callback(None)

    async def _run(self, destination: str) -> None:
        try:
            # Bounded: each round sends a batch or waits; a loop that finds
            # nothing to send ends.
            for _ in range(1_000_000):
                if self._stopped:
                    return
                delay = await self._retry_delay(destination)
                if delay > 0:
                    await self._sleep(destination, delay)
                    if self._stopped:
                        return
                self._again.discard(destination)
                rows = await self.db.execute(
                    "outbound_batch",
                    "SELECT id, event_id, edu_json FROM federation_outbound WHERE destination = ?"
                    " ORDER BY id LIMIT ?",
                    destination,
                    MAX_PDUS + MAX_EDUS,
                )
                ephemeral = self._ephemeral.pop(destination, [])
                if not rows and not ephemeral:
                    if destination in self._again:
                        continue
                    return
                QUEUED.labels(destination).set(len(rows))
                ok = await self._send_batch(destination, rows, ephemeral)
                if not ok:
                    # Typing notices are stale by the time of a retry.
                    continue
        except Exception:
            if not self._stopped:
                raise
            # Shutdown closed the database under a running loop: what was
            # queued stays queued for the next start.
        finally:
            self._running.discard(destination)
            self._again.discard(destination)
            self._wake.pop(destination, None)

    async def _send_batch(self, destination: str, rows: list[tuple], ephemeral: list[dict[str, Any]]) -> bool:
        # Take rows in queue order until a kind reaches its per-transaction
        # limit, so nothing overtakes what was queued before it.
        edu_room = MAX_EDUS - min(len(ephemeral), MAX_EDUS)
        pdu_rows: list[tuple] = []
        edu_rows: list[tuple] = []
        for r in rows:
            if r[1] is not None:
                if len(pdu_rows) >= MAX_PDUS:
                    break
                pdu_rows.append(r)
            else:
                if len(edu_rows) >= edu_room:
                    break
                edu_rows.append(r)
        evs = await self.get_events([r[1] for r in pdu_rows])
        pdus = [evs[r[1]].pdu for r in pdu_rows if r[1] in evs]
        opened = (self.open_edu(int(r[0]), r[2]) for r in edu_rows)
        edus = [e for e in opened if e is not None] + ephemeral[:MAX_EDUS]
        sent_ids = sorted(r[0] for r in pdu_rows + edu_rows)
        self._txn_counter += 1
        txn_id = f"{self._txn_counter}_{sent_ids[-1] if sent_ids else 0}"
        body = {"origin": self.server_name, "origin_server_ts": int(self.clock() * 1000), "pdus": pdus,
                "edus": edus}
        start = time.monotonic()
        try:
            result = await self.put_json(destination, f"/_matrix/federation/v1/send/{txn_id}", body)
        except Exception as e:
            if self._stopped:
                # Cut off by our own shutdown: the rows stay queued for the
                # next start, and the database may already be closed.
                return False
            TXN_RESULTS.labels("failed").inc()
            await self._record_failure(destination)
            logger.info("transaction %s to %s failed (%d pdus, %d edus): %s", txn_id, destination, len(pdus),
                        len(edus), _short(e))
            return False
        TXN_SECONDS.observe(time.monotonic() - start)
        TXN_RESULTS.labels("ok").inc()
        if isinstance(result, dict):
            for event_id, res in (result.get("pdus") or {}).items():
                if isinstance(res, dict) and res.get("error"):
                    logger.info("%s rejected PDU %s: %s", destination, event_id, str(res.get("error"))[:200])
        logger.info("transaction %s to %s: %d pdus, %d edus, %.0f ms", txn_id, destination, len(pdus), len(edus),
                    (time.monotonic() - start) * 1000)

        # The transfer log: what this destination now holds, per room and sender.
        sent_by: dict[tuple[str, str], int] = {}
        for r in pdu_rows:
            if r[1] in evs:
                key = (evs[r[1]].room_id, evs[r[1]].sender)
                sent_by[key] = sent_by.get(key, 0) + 1
        now_ms = int(self.clock() * 1000)

        def done(txn: Txn) -> None:
            for chunk, qs in in_chunks(sent_ids):
                txn.execute(f"DELETE FROM federation_outbound WHERE id IN ({qs})", chunk)
            txn.execute("DELETE FROM federation_destinations WHERE destination = ?", (destination,))
            for (room_id, sender), n in sent_by.items():
                txn.execute("UPDATE transfer_log SET events = events + ?, last_ts = ? WHERE destination = ?"
                            " AND room_id = ? AND sender = ?", (n, now_ms, destination, room_id, sender))
                if txn.rowcount == 0:
                    txn.execute("INSERT INTO transfer_log (destination, room_id, sender, events, first_ts, last_ts)"
                                " VALUES (?,?,?,?,?,?)", (destination, room_id, sender, n, now_ms, now_ms))

        await self.db.run_interaction("outbound_done", done)
        return True

    async def _retry_delay(self, destination: str) -> float:
        rows = await self.db.execute(
            "destination_retry",
            "SELECT retry_interval_ms, last_failure_ts FROM federation_destinations WHERE destination = ?",
            destination,
        )
        if not rows or rows[0][1] is None:
            return 0.0
        interval, last = rows[0]
        due = (last + interval) / 1000.0
        return max(0.0, due - self.clock())

    async def _record_failure(self, destination: str) -> None:
        now = int(self.clock() * 1000)

        def txn_fn(txn: Txn) -> None:
            txn.execute("SELECT failure_count, retry_interval_ms FROM federation_destinations WHERE destination = ?",
                        (destination,))
            row = txn.fetchone()
            count = (row[0] if row else 0) + 1
            interval = min(max(MIN_RETRY_MS, (row[1] if row else 0) * 2), self.max_retry_interval_ms)
            txn.execute("DELETE FROM federation_destinations WHERE destination = ?", (destination,))
            txn.execute(
                "INSERT INTO federation_destinations (destination, failure_count, retry_interval_ms, last_failure_ts)"
                " VALUES (?,?,?,?)",
                (destination, count, interval, now),
            )

        await self.db.run_interaction("outbound_failure", txn_fn)

    async def on_destination_alive(self, destination: str) -> None:
        """The destination just talked to us: retry it now."""
        rows = await self.db.execute(
            "destination_alive", "SELECT 1 FROM federation_destinations WHERE destination = ?", destination)
        if not rows:
            return
        await self.db.run_interaction(
            "destination_reset",
            lambda txn: txn.execute("DELETE FROM federation_destinations WHERE destination = ?", (destination,)),
        )
        self.wake(destination, reset_backoff=True)

    async def _sleep(self, destination: str, seconds: float) -> None:
        await wakeable_sleep(self._wake, destination, seconds)


def _short(e: Exception) -> str:
    s = f"{type(e).__name__}: {e}"
    return s[:300]

