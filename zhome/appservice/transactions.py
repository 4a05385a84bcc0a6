"""Pushing events to application services.

Spec: application-service-api "Pushing events" (``PUT
/_matrix/app/v1/transactions/{txnId}``): events a service is interested in
(sender or membership target in its users namespace, room in its rooms
namespace, room with an alias in its aliases namespace, and rooms one of
its users is joined to) go out in transactions, in order. A transaction
that failed is sent again with the same ID and the same events until the
service answers 200: the queue is persistent (written in the same database
transaction as the event, ``appservice_queue``), the transaction in flight
is recorded before it is sent (``appservice_state``). Ephemeral events
(MSC2409: typing, receipts, presence) go to services with
``receive_ephemeral`` in ``ephemeral`` and ``de.sorunome.msc2409.ephemeral``;
they are queued in the database too (``appservice_ephemeral``, see
zhome/storage/appservice_ephemeral.py: at most 1000 waiting per service,
the oldest dropped first), the rows a transaction carries are marked with
its ID when it is recorded as in flight, so a re-send (after a failure or a
restart) carries the same ephemeral events, and they are deleted when the
service answered 200. Typing notices older than a minute are dropped when a
new transaction is built, never from one in flight; receipts and presence
are kept. Nothing is written for ephemeral events when no service has
``receive_ephemeral``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Awaitable, Callable, Iterable, Optional

from prometheus_client import Counter
from twisted.internet import defer

from zhome.appservice.http import AppServiceUnreachable, RequestFn, segment, service_url
from zhome.appservice.registration import ApplicationService
from zhome.rooms.events import Event
from zhome.storage.appservice_ephemeral import AppServiceEphemeralStore
from zhome.storage.database import Database, Txn, in_chunks
from zhome.storage.events import PersistItem
from zhome.storage.ids import IdGenerator
from zhome.storage.lru import LruCache
from zhome.util.reactor import reactor, wakeable_sleep

logger = logging.getLogger(__name__)

MAX_EVENTS = 100
MAX_EPHEMERAL = 100
MIN_RETRY_MS = 500
MAX_RETRY_MS = 5 * 60 * 1000
ALIAS_CACHE_S = 10.0

AS_TXNS = Counter("zhome_appservice_transactions_total", "Transactions to application services", ["result"])

GetEvents = Callable[[Iterable[str]], Awaitable[dict[str, Event]]]
Serialize = Callable[[list[Event]], Awaitable[list[dict[str, Any]]]]


class AppServiceTransactions:
    def __init__(self, services: list[ApplicationService], db: Database, ids: IdGenerator, get_events: GetEvents,
                 serialize: Serialize, get_room_aliases: Callable[[str], Awaitable[list[str]]],
                 request: RequestFn, *, ephemeral: AppServiceEphemeralStore,
                 clock: Callable[[], float] = time.time, max_retry_ms: int = MAX_RETRY_MS) -> None:
        self.services = [s for s in services]
        self.by_id = {s.id: s for s in services}
        self.db = db
        self.ids = ids
        self.get_events = get_events
        self.serialize = serialize
        self.get_room_aliases = get_room_aliases
        self.request = request
        self.clock = clock
        self.max_retry_ms = max_retry_ms
        self._alias_cache: dict[str, tuple[float, list[str]]] = {}
        # (service ID, state group) -> whether one of its users is joined.
        self._joined_cache: LruCache[tuple[str, int], bool] = LruCache(20000)
        self._running: set[str] = set()
        self._again: set[str] = set()
        self._wake: dict[str, defer.Deferred[None]] = {}
        self.ephemeral = ephemeral
        self._stopped = False

    # -- interest -------------------------------------------------------------------
    async def _aliases(self, room_id: str) -> list[str]:
        now = time.monotonic()
        hit = self._alias_cache.get(room_id)
        if hit is not None and hit[0] > now:
            return hit[1]
        aliases = await self.get_room_aliases(room_id)
        if len(self._alias_cache) > 10000:
            self._alias_cache.clear()
        self._alias_cache[room_id] = (now + ALIAS_CACHE_S, aliases)
        return aliases

    def alias_changed(self, room_id: str) -> None:
        self._alias_cache.pop(room_id, None)

    async def interested_services(self, room_id: str, state: dict[tuple[str, str], str],
                                  event: Optional[Event] = None,
                                  state_group: Optional[int] = None) -> list[ApplicationService]:
        """The services interested in ``event`` (or, without one, in the room:
        for ephemeral events), given the room's state ``state`` (the state
        group ``state_group`` when known: whether a service's user is joined
        is then remembered, so a busy room costs a lookup per state change,
        not per message)."""
        out: list[ApplicationService] = []
        aliases: Optional[list[str]] = None
        member_keys = [sk for (t, sk) in state if t == "m.room.member"]
        for s in self.services:
            if event is not None and (s.is_interested_in_user(event.sender) or (
                    event.type == "m.room.member" and event.state_key is not None
                    and s.is_interested_in_user(event.state_key))):
                out.append(s)
                continue
            if s.is_interested_in_room(room_id):
                out.append(s)
                continue
            if s.aliases:
                if aliases is None:
                    aliases = await self._aliases(room_id)
                if any(s.is_interested_in_alias(a) for a in aliases):
                    out.append(s)
                    continue
            key = (s.id, state_group) if state_group is not None else None
            joined = self._joined_cache.get(key) if key is not None else None
            if joined is None:
                candidates = [state[("m.room.member", sk)] for sk in member_keys if s.is_interested_in_user(sk)]
                joined = False
                if candidates:
                    evs = await self.get_events(candidates[:1000])
                    joined = any(e.membership == "join" for e in evs.values())
                if key is not None:
                    self._joined_cache.set(key, joined)
            if joined:
                out.append(s)
        return out

    async def before_persist(self, item: PersistItem) -> None:
        """Pre-persist hook: which services get the event (their queue rows are
        written in the event's transaction)."""
        ev = item.event
        if item.outlier or item.backfilled or item.soft_failed or ev.rejected_reason:
            return
        group = item.state_group_before if not item.snapshot_before else None
        item.appservices = [s.id for s in await self.interested_services(ev.room_id, item.state_before, ev, group)]

    def persist_txn_hook(self, txn: Txn, item: PersistItem) -> None:
        if item.appservices:
            txn.executemany_later("INSERT INTO appservice_queue (id, as_id, event_id) VALUES (?,?,?)",
                            [(self.ids.next(), as_id, item.event.event_id) for as_id in item.appservices])

    def outlier_txn_hook(self, txn: Txn, item: PersistItem) -> None:
        """Invites to rooms this server is not in: for the invitee's service."""
        ev = item.event
        if ev.state_key is None:
            return
        item.appservices = [s.id for s in self.services if s.is_interested_in_user(ev.state_key)]
        self.persist_txn_hook(txn, item)

    def after_persist(self, item: PersistItem) -> None:
        for as_id in item.appservices:
            self.wake(as_id)

    # -- ephemeral events ----------------------------------------------------------------
    async def push_ephemeral(self, services: Iterable[ApplicationService], edu: dict[str, Any],
                             user_id: Optional[str] = None) -> None:
        """Queue ``edu`` (about ``user_id``, if one user) for those of
        ``services`` that receive ephemeral events."""
        wanted = [s.id for s in services if s.receive_ephemeral and s.url is not None]
        if not wanted or self._stopped:
            return
        await self.ephemeral.push(wanted, edu, user_id, int(self.clock() * 1000))
        for as_id in wanted:
            self.wake(as_id)

    # -- delivery ------------------------------------------------------------------------
    async def start(self) -> None:
        for s in self.services:
            if s.url is not None:
                self.wake(s.id)

    def stop(self) -> None:
        self._stopped = True
        # Firing a wake-up ends its loop, which removes it from the dict.
        for w in list(self._wake.values()):
            if not w.called:
                w.callback(None)

    def wake(self, as_id: str) -> None:
        if self._stopped:
            return
        service = self.by_id.get(as_id)
        if service is None or service.url is None:
            return
        if as_id in self._running:
            # The loop may have just found the queue empty: it looks again.
            self._again.add(as_id)
            return
        self._running.add(as_id)
        defer.ensureDeferred(self._run(service))

    async def _run(self, service: ApplicationService) -> None:
        try:
            # Bounded: each round sends one transaction or waits; a round that
            # finds nothing to send ends the loop.
            for _ in range(10_000_000):
                if self._stopped:
                    return
                delay = await self._retry_delay(service.id)
                if delay > 0:
                    await self._sleep(service.id, delay)
                    if self._stopped:
                        return
                self._again.discard(service.id)
                if not await self._send_one(service) and service.id not in self._again:
                    return
        except Exception:
            if not self._stopped:
                logger.exception("application service %s: delivery loop failed", service.id)
        finally:
            self._running.discard(service.id)
            self._wake.pop(service.id, None)

    async def _send_one(self, service: ApplicationService) -> bool:
        """Send the transaction in flight, or the next one. False: nothing to send."""
        state = await self.db.execute(
            "appservice_state", "SELECT last_txn_id, inflight_txn_id, inflight_max_id FROM appservice_state"
            " WHERE as_id = ?", service.id)
        last_txn, inflight, inflight_max = state[0] if state else (0, None, None)
        if inflight is not None:
            rows = await self.db.execute(
                "appservice_inflight", "SELECT id, event_id FROM appservice_queue WHERE as_id = ? AND id <= ?"
                " ORDER BY id", service.id, inflight_max)
        else:
            rows = await self.db.execute(
                "appservice_batch", "SELECT id, event_id FROM appservice_queue WHERE as_id = ? ORDER BY id LIMIT ?",
                service.id, MAX_EVENTS)
        retry = inflight is not None
        if inflight is None:
            inflight = int(last_txn) + 1
            inflight_max = rows[-1][0] if rows else 0
            if not await self._record_inflight(service, inflight, inflight_max, bool(state), bool(rows)):
                return False
        # The ephemeral events the transaction carries were marked with its
        # ID when it was recorded: a retry (after a restart too) sends them
        # again, as they were.
        ephemeral = await self.ephemeral.carried(service.id, inflight) if (
            service.receive_ephemeral or retry) else []
        evs = await self.get_events([r[1] for r in rows])
        events = await self.serialize([evs[r[1]] for r in rows if r[1] in evs])
        body: dict[str, Any] = {"events": events}
        if service.receive_ephemeral or ephemeral:
            body["ephemeral"] = ephemeral
            body["de.sorunome.msc2409.ephemeral"] = ephemeral
        txn_id = str(inflight)
        try:
            code, _, text = await self.request(
                "PUT", service_url(service, f"/transactions/{segment(txn_id)}"), service.hs_token, body, 60.0)
        except AppServiceUnreachable as e:
            if self._stopped:
                return False
            code, text = 0, str(e)
        if self._stopped and code != 200:
            return False
        if code != 200:
            AS_TXNS.labels("failed").inc()
            logger.info("application service %s: transaction %s (%d events) failed: %s %s", service.id, txn_id,
                        len(events), code or "unreachable", text[:200] if code else text)
            await self._record_failure(service.id)
            return True
        AS_TXNS.labels("ok").inc()
        logger.info("application service %s: transaction %s, %d events, %d ephemeral", service.id, txn_id,
                    len(events), len(ephemeral))
        sent_ids = [r[0] for r in rows]

        def done(txn: Txn) -> None:
            for chunk, qs in in_chunks(sent_ids):
                txn.execute(f"DELETE FROM appservice_queue WHERE id IN ({qs})", chunk)
            if ephemeral:
                self.ephemeral.delete_txn(txn, service.id, inflight)
            txn.execute("UPDATE appservice_state SET last_txn_id = ?, inflight_txn_id = NULL,"
                        " inflight_max_id = NULL, failure_count = 0, retry_interval_ms = 0, last_failure_ts = NULL"
                        " WHERE as_id = ?", (inflight, service.id))

        await self.db.run_interaction("appservice_txn_done", done)
        return True

    async def _record_inflight(self, service: ApplicationService, txn_id: int, max_id: int, exists: bool,
                               has_events: bool) -> bool:
        """Record transaction ``txn_id`` as in flight, carrying the queued
        events up to ``max_id`` and (marked in the same database
        transaction) the next ephemeral events. False: nothing to send."""
        now_ms = int(self.clock() * 1000)

        def txn_fn(txn: Txn) -> bool:
            taken = 0
            if service.receive_ephemeral:
                taken = AppServiceEphemeralStore.take_txn(txn, service.id, txn_id, now_ms, MAX_EPHEMERAL)
            if not has_events and not taken:
                return False
            if exists:
                txn.execute("UPDATE appservice_state SET inflight_txn_id = ?, inflight_max_id = ? WHERE as_id = ?",
                            (txn_id, max_id, service.id))
            else:
                txn.execute("INSERT INTO appservice_state (as_id, last_txn_id, inflight_txn_id, inflight_max_id)"
                            " VALUES (?,?,?,?)", (service.id, txn_id - 1, txn_id, max_id))
            return True

        return await self.db.run_interaction("appservice_inflight_set", txn_fn)

    async def _retry_delay(self, as_id: str) -> float:
        rows = await self.db.execute(
            "appservice_retry", "SELECT retry_interval_ms, last_failure_ts FROM appservice_state WHERE as_id = ?",
            as_id)
        if not rows or rows[0][1] is None:
            return 0.0
        interval, last = rows[0]
        return max(0.0, (last + interval) / 1000.0 - self.clock())

    async def _record_failure(self, as_id: str) -> None:
        now = int(self.clock() * 1000)

        def txn_fn(txn: Txn) -> None:
            txn.execute("SELECT retry_interval_ms FROM appservice_state WHERE as_id = ?", (as_id,))
            row = txn.fetchone()
            interval = min(max(MIN_RETRY_MS, (row[0] if row else 0) * 2), self.max_retry_ms)
            txn.execute("UPDATE appservice_state SET failure_count = failure_count + 1, retry_interval_ms = ?,"
                        " last_failure_ts = ? WHERE as_id = ?", (interval, now, as_id))

        await self.db.run_interaction("appservice_failure", txn_fn)

    async def _sleep(self, as_id: str, seconds: float) -> None:
        await wakeable_sleep(self._wake, as_id, seconds)

    def retry_now(self, as_id: str) -> None:
        """The service showed it is alive (a ping answered): cut the backoff short."""
        w = self._wake.get(as_id)
        if w is not None and not w.called:
            w.callback(None)

    async def reset_backoff(self, as_id: str) -> None:
        await self.db.run_interaction("appservice_reset", lambda txn: txn.execute(
            "UPDATE appservice_state SET retry_interval_ms = 0, last_failure_ts = NULL WHERE as_id = ?", (as_id,)))
        self.retry_now(as_id)
        self.wake(as_id)
