"""A small LRU cache for immutable values (events, state groups), and one
for values read from tables that change (``InvalidatedCache``).

A cache is never the authority: losing it loses nothing.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Generic, Hashable, Iterable, Optional, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LruCache(Generic[K, V]):
    """At most ``max_size`` entries, and at most ``max_weight`` in total when
    a ``weigh`` function is given (state maps weigh their number of entries:
    one big room's state must not crowd out a hundred small ones)."""

    def __init__(self, max_size: int, max_weight: Optional[int] = None,
                 weigh: Optional[Callable[[V], int]] = None) -> None:
        self.max_size = max_size
        self.max_weight = max_weight
        self._weigh = weigh
        self._weight = 0
        self._d: OrderedDict[K, V] = OrderedDict()
        # Database threads fill caches too; each operation is made atomic.
        self._lock = threading.Lock()

    def _w(self, value: V) -> int:
        return self._weigh(value) if self._weigh is not None else 1

    def get(self, key: K) -> Optional[V]:
        with self._lock:
            v = self._d.get(key)
            if v is not None:
                self._d.move_to_end(key)
            return v

    def get_many(self, keys: Iterable[K]) -> tuple[dict[K, V], list[K]]:
        """The cached values of ``keys`` and, in order, the keys not cached."""
        hits: dict[K, V] = {}
        missing: list[K] = []
        d = self._d
        with self._lock:
            for key in keys:
                v = d.get(key)
                if v is not None:
                    d.move_to_end(key)
                    hits[key] = v
                else:
                    missing.append(key)
        return hits, missing

    def set(self, key: K, value: V) -> None:
        with self._lock:
            old = self._d.pop(key, None)
            if old is not None:
                self._weight -= self._w(old)
            self._d[key] = value
            self._weight += self._w(value)
            while len(self._d) > self.max_size or (
                self.max_weight is not None and self._weight > self.max_weight and len(self._d) > 1
            ):
                _, evicted = self._d.popitem(last=False)
                self._weight -= self._w(evicted)

    def pop(self, key: K) -> None:
        with self._lock:
            old = self._d.pop(key, None)
            if old is not None:
                self._weight -= self._w(old)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self._weight = 0


class InvalidatedCache(LruCache[K, V]):
    """An LruCache of values read from tables that change. Every writer
    calls ``invalidate(key)`` (or ``invalidate_all()``) in its transaction
    and again after commit; a reader takes ``ticket(key)`` before it reads
    and keeps what it read with ``set_if_unchanged``, which stores it only
    when no invalidation came in between (a read that raced a write is
    used once, never kept)."""

    def __init__(self, max_size: int, max_weight: Optional[int] = None,
                 weigh: Optional[Callable[[V], int]] = None) -> None:
        super().__init__(max_size, max_weight, weigh)
        self._gens: dict[K, int] = {}
        self._epoch = 0

    def ticket(self, key: K) -> tuple[int, int]:
        return self._epoch, self._gens.get(key, 0)

    def invalidate(self, key: K) -> None:
        with self._lock:
            self._gens[key] = self._gens.get(key, 0) + 1
        self.pop(key)

    def invalidate_all(self) -> None:
        with self._lock:
            self._epoch += 1
        self.clear()

    def set_if_unchanged(self, key: K, ticket: tuple[int, int], value: V) -> None:
        if ticket == self.ticket(key):
            self.set(key, value)
