"""A short-lived cache of /sync answers.

A client whose /sync timed out on its side (an initial sync of a big
account, a slow network) sends the very same request again; answering it
from the answer already computed (or still being computed) saves the whole
cost.

Keyed by everything that shapes the answer: user, device, since, filter,
full_state and timeout. Identical requests in flight share one
computation, which runs apart from any one request: a client that gives up
does not cancel it for the others. Answers are kept encoded (the JSON
text), for ``ttl_ms``, within ``max_bytes`` (oldest dropped first).

An answer is only reused while it is still the answer: anything that
wakes the user's syncs (zhome/sync/notifier.py: an event, receipt, typing
or presence in one of the rooms the user was in when it was computed, or
their account data, to-device messages, device lists, a membership of
theirs) drops it, and an answer whose computation overlapped such a wake
is not kept. So a repeated request gets what a fresh computation would
give, only sooner (its ``next_batch`` may be older than a fresh one's,
which is as good a token).

Never kept either: empty answers (a long poll that ended with nothing: the
retry must wait again), and answers computed across a change of stored
content (``epoch``: redactions, erasure, purges bump it, which also drops
every kept answer, so removed content is never served again from here).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Hashable, Iterable

from twisted.internet import defer
from twisted.python.failure import Failure

from zhome.http.jsonsplice import RawJson, encode
from zhome.util.reactor import reactor

logger = logging.getLogger(__name__)

#: compute(rooms) -> the answer; it adds the user's rooms to ``rooms``.
Compute = Callable[[set[str]], Awaitable[dict[str, Any]]]


@dataclass
class _Kept:
    expires: float
    user_id: str
    rooms: frozenset[str]
    body: RawJson


@dataclass
class _InFlight:
    user_id: str
    start_seq: int
    waiters: list[defer.Deferred[RawJson]] = field(default_factory=list)


class SyncResponseCache:
    def __init__(self, ttl_ms: int, max_bytes: int, epoch: Callable[[], int],
                 keep: Callable[[dict[str, Any]], bool]) -> None:
        self.ttl_s = ttl_ms / 1000
        self.max_bytes = max_bytes
        self.epoch = epoch
        self.keep = keep
        self._kept: OrderedDict[Hashable, _Kept] = OrderedDict()
        self._bytes = 0
        self._by_user: dict[str, set[Hashable]] = {}
        self._by_room: dict[str, set[Hashable]] = {}
        self._inflight: dict[Hashable, _InFlight] = {}
        self._seen_epoch = epoch()
        # Wake-ups, numbered: the last one per room and per user, so a
        # computation can tell whether one came while it ran.
        self._seq = 0
        self._room_woken: dict[str, int] = {}
        self._user_woken: dict[str, int] = {}
        self.hits = 0

    # -- invalidation ------------------------------------------------------
    def on_wake(self, room_ids: Iterable[str], user_ids: Iterable[str]) -> None:
        """Something for these rooms' members and these users happened."""
        self._seq += 1
        seq = self._seq
        for r in room_ids:
            if self._inflight:
                self._room_woken[r] = seq
            for key in list(self._by_room.get(r, ())):
                self._drop(key)
        for u in user_ids:
            if self._inflight:
                self._user_woken[u] = seq
            for key in list(self._by_user.get(u, ())):
                self._drop(key)

    def _drop(self, key: Hashable) -> None:
        kept = self._kept.pop(key, None)
        if kept is None:
            return
        self._bytes -= len(kept.body.text)
        for index, name in ((self._by_user, kept.user_id), *((self._by_room, r) for r in kept.rooms)):
            keys = index.get(name)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del index[name]

    def _expire(self, now: float) -> None:
        epoch = self.epoch()
        if epoch != self._seen_epoch:
            self._seen_epoch = epoch
            for key in list(self._kept):
                self._drop(key)
            return
        while self._kept:
            key, kept = next(iter(self._kept.items()))
            if kept.expires > now:
                break
            self._drop(key)

    # -- use -----------------------------------------------------------------
    async def get(self, key: Hashable, user_id: str, compute: Compute) -> RawJson:
        now = reactor.seconds()
        self._expire(now)
        kept = self._kept.get(key)
        if kept is not None:
            self.hits += 1
            return kept.body
        waiter: defer.Deferred[RawJson] = defer.Deferred()
        running = self._inflight.get(key)
        if running is not None:
            self.hits += 1
            running.waiters.append(waiter)
            return await waiter
        self._inflight[key] = _InFlight(user_id, self._seq, [waiter])
        defer.ensureDeferred(self._compute(key, compute))
        return await waiter

    async def _compute(self, key: Hashable, compute: Compute) -> None:
        start_epoch = self.epoch()
        rooms: set[str] = set()
        try:
            result = await compute(rooms)
            body = RawJson(encode(result))
        except BaseException:
            failure = Failure()
            running = self._inflight.pop(key, None)
            for w in running.waiters if running is not None else ():
                if not w.called:
                    w.errback(failure)
            self._forget_wakes()
            return
        running = self._inflight.pop(key)
        if self._may_keep(running, rooms, result, len(body.text), start_epoch):
            self._drop(key)
            kept = _Kept(reactor.seconds() + self.ttl_s, running.user_id, frozenset(rooms), body)
            self._kept[key] = kept
            self._bytes += len(body.text)
            self._by_user.setdefault(kept.user_id, set()).add(key)
            for r in kept.rooms:
                self._by_room.setdefault(r, set()).add(key)
            while self._bytes > self.max_bytes and self._kept:
                self._drop(next(iter(self._kept)))
        self._forget_wakes()
        for w in running.waiters:
            if not w.called:
                # A waiter whose client went away was cancelled; the rest get it.
                w.callback(body)

    def _may_keep(self, running: _InFlight, rooms: set[str], result: dict[str, Any], size: int,
                  start_epoch: int) -> bool:
        if self.ttl_s <= 0 or size > self.max_bytes // 2 or not self.keep(result):
            return False
        if self.epoch() != start_epoch:
            return False
        start = running.start_seq
        if self._user_woken.get(running.user_id, -1) > start:
            return False
        return not any(self._room_woken.get(r, -1) > start for r in rooms)

    def _forget_wakes(self) -> None:
        # Only computations in flight read them.
        if not self._inflight:
            self._room_woken.clear()
            self._user_woken.clear()
