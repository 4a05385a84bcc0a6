"""Per-sender rate limits of inbound mail: token buckets in memory.

One bucket per envelope sender address (``<>`` for the null sender) and
one per client IP; each accepted ``RCPT TO`` takes a token from both. A
refused attempt takes none, so one sender flooding does not use up the
shared IP's bucket that other senders (behind the same MTA) need. Over the
limit the bridge answers ``451 4.7.1`` and the sender retries later.
Counters live in memory only (a restart forgets them: a limit, not state).
The number of buckets is bounded; the least recently used go first.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable

MAX_BUCKETS = 10_000


class TokenBuckets:
    def __init__(self, rate_per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate_per_minute / 60.0
        self.burst = float(burst)
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def _level(self, key: str) -> float:
        now = self.clock()
        level, ts = self._buckets.get(key, (self.burst, now))
        return min(self.burst, level + (now - ts) * self.rate)

    def allows(self, key: str) -> bool:
        return self._level(key) >= 1.0

    def take(self, key: str) -> None:
        level = self._level(key)
        self._buckets[key] = (max(0.0, level - 1.0), self.clock())
        self._buckets.move_to_end(key)
        while len(self._buckets) > MAX_BUCKETS:
            self._buckets.popitem(last=False)


class SenderLimits:
    def __init__(self, rate_per_minute: float, burst: int, ip_rate_per_minute: float, ip_burst: int) -> None:
        self.senders = TokenBuckets(rate_per_minute, burst)
        self.ips = TokenBuckets(ip_rate_per_minute, ip_burst)

    def admit(self, sender: str, client_ip: str) -> bool:
        """Take a token from both buckets if both have one."""
        s = sender.strip().lower() or "<>"
        if not self.senders.allows(s) or not self.ips.allows(client_ip):
            return False
        self.senders.take(s)
        self.ips.take(client_ip)
        return True
