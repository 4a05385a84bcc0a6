"""A per-user cache of merged push rulesets for evaluating every new event.

Spec: client-server-api "Push Notifications" → "Push Rules". Unread counts
are computed from each member's rules on every message, so the rules are read
from the database once per user and kept until that user changes them
(``invalidate``, called by the push rule API). The database stays the
authority: losing the cache loses nothing.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer

from zhome.push.rules import load_ruleset
from zhome.storage.lru import LruCache

Ruleset = dict[str, dict[str, list[dict[str, Any]]]]


class RulesetCache:
    def __init__(self, user_data: Any, max_size: int = 5000) -> None:
        self.user_data = user_data
        self._cache: LruCache[str, Ruleset] = LruCache(max_size)
        # Bumped by invalidate: a load that started before a change must not
        # store what it read.
        self._generation: dict[str, int] = {}
        # Callers waiting for a load already in flight, by user.
        self._waiters: dict[str, list[defer.Deferred[Ruleset]]] = {}

    async def get(self, user_id: str) -> Ruleset:
        """The user's merged ruleset; callers must not mutate it."""
        cached = self._cache.get(user_id)
        if cached is not None:
            return cached
        waiters = self._waiters.get(user_id)
        if waiters is not None:
            d: defer.Deferred[Ruleset] = defer.Deferred()
            waiters.append(d)
            return await d
        return await self._load(user_id)

    async def _load(self, user_id: str) -> Ruleset:
        gen = self._generation.get(user_id, 0)
        waiters: list[defer.Deferred[Ruleset]] = []
        self._waiters[user_id] = waiters
        try:
            ruleset = await load_ruleset(self.user_data, user_id)
        except Exception as e:
            if self._waiters.get(user_id) is waiters:
                del self._waiters[user_id]
            for d in waiters:
                d.errback(e)
            raise
        if self._waiters.get(user_id) is waiters:
            del self._waiters[user_id]
        if self._generation.get(user_id, 0) == gen:
            self._cache.set(user_id, ruleset)
        for d in waiters:
            d.callback(ruleset)
        return ruleset

    def invalidate(self, user_id: str) -> None:
        """Forget the user's rules; call after every change to them."""
        self._generation[user_id] = self._generation.get(user_id, 0) + 1
        self._cache.pop(user_id)
        # A load in flight may have read the old rules: callers from now on
        # start a fresh one instead of joining it.
        self._waiters.pop(user_id, None)
