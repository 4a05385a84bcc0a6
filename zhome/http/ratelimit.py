"""Rate limits with ``M_LIMIT_EXCEEDED`` and ``retry_after_ms``.

Spec: client-server-api "Rate limiting". A token bucket per (action, key),
where the key is a user ID or a client IP. Buckets are ephemeral by nature:
losing them on restart only resets the limits.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional

from zhome.http.errors import limit_exceeded


class RateLimiter:
    def __init__(self, per_second: float, burst_count: int, enabled: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_second = per_second
        self.burst = burst_count
        self.enabled = enabled
        self.clock = clock
        # key -> (tokens, last refill time)
        self._buckets: dict[str, tuple[float, float]] = {}
        #: Keys never limited (application services registered with
        #: ``rate_limited: false`` and their users).
        self.exempt: Optional[Callable[[str], bool]] = None

    def check(self, key: str) -> None:
        """Take one action for ``key`` or raise M_LIMIT_EXCEEDED."""
        self._take(key, 1.0)

    def peek(self, key: str) -> None:
        """Raise M_LIMIT_EXCEEDED if ``key`` could not take an action now,
        without taking one (for actions counted only once they succeed)."""
        self._take(key, 0.0)

    def record(self, key: str) -> None:
        """Count an action that already happened (after a ``peek``); never raises."""
        if not self.enabled:
            return
        now = self.clock()
        tokens, last = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.per_second)
        self._buckets[key] = (max(0.0, tokens - 1.0), now)

    def _take(self, key: str, cost: float) -> None:
        if not self.enabled or (self.exempt is not None and self.exempt(key)):
            return
        now = self.clock()
        tokens, last = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.per_second)
        if tokens < 1.0:
            wait = (1.0 - tokens) / self.per_second if self.per_second > 0 else 3600.0
            self._buckets[key] = (tokens, now)
            raise limit_exceeded(int(math.ceil(wait * 1000)))
        self._buckets[key] = (tokens - cost, now)
        if len(self._buckets) > 100000:
            # Bound memory: forget full buckets (they carry no information).
            self._buckets = {k: v for k, v in self._buckets.items() if v[0] < self.burst}
