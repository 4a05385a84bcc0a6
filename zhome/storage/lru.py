"""A small LRU cache for immutable values (events, state groups).

Caches here only ever hold values that never change once written, so a
cache is never the authority: losing it loses nothing.
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
        for key in keys:
            v = self.get(key)
            if v is not None:
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
