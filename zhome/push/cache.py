"""A per-user cache of push rules for evaluating every new event.

Spec: client-server-api "Push Notifications" → "Push Rules". Unread counts
are computed from each member's rules on every message, so the rules are read
from the database once per user and kept until that user changes them
(``invalidate``, called by the push rule API). The database stays the
authority: losing the cache loses nothing.

What is kept per user is small: the user's *template*, the rules and
enables they stored (most users store none). Users with the same stored
rules share one template object, and a template carries the ruleset merged
for nobody in particular, which lets a message into a room of thousands be
evaluated once per template instead of once per member
(``zhome.push.bulk``). A user's own merged ruleset is built from the
template when asked for and kept in a smaller cache.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from twisted.internet import defer

from zhome.push.rules import build_ruleset
from zhome.storage.lru import LruCache

Ruleset = dict[str, dict[str, list[dict[str, Any]]]]

#: A user ID that names no one: the neutral evaluation of a template runs
#: as this user (``zhome.push.bulk``).
NO_ONE = "@\x00:\x00"


class Template:
    """Stored push rule changes shared by every user who has exactly these
    (``key`` is their canonical encoding), and the ruleset they give a user
    whose ID and name an event does not mention."""

    __slots__ = ("key", "user_rules", "enables", "neutral")

    def __init__(self, key: str, user_rules: list[tuple[Any, ...]], enables: list[tuple[Any, ...]]) -> None:
        self.key = key
        self.user_rules = user_rules
        self.enables = enables
        self.neutral: Ruleset = build_ruleset(NO_ONE, user_rules, enables)


def template_key(user_rules: list[tuple[Any, ...]], enables: list[tuple[Any, ...]]) -> str:
    return json.dumps([list(map(list, user_rules)), sorted(map(list, enables), key=lambda e: (e[0], e[1]))],
                      sort_keys=True, separators=(",", ":"), default=repr)


class RulesetCache:
    def __init__(self, user_data: Any, max_users: int = 200_000, max_rulesets: int = 5000,
                 max_templates: int = 10_000) -> None:
        self.user_data = user_data
        # Bounded by count, but an entry is a reference to a shared
        # template: 200,000 users cost a few tens of MB at most.
        self._templates_of: LruCache[str, Template] = LruCache(max_users)
        self._by_key: LruCache[str, Template] = LruCache(max_templates)
        self._rulesets: LruCache[str, Ruleset] = LruCache(max_rulesets)
        # Bumped by invalidate: a load that started before a change must not
        # store what it read.
        self._generation: dict[str, int] = {}
        # Callers waiting for a load already in flight, by user.
        self._waiters: dict[str, list[defer.Deferred[Template]]] = {}

    def cached_template(self, user_id: str) -> Optional[Template]:
        return self._templates_of.get(user_id)

    async def template(self, user_id: str) -> Template:
        cached = self._templates_of.get(user_id)
        if cached is not None:
            return cached
        waiters = self._waiters.get(user_id)
        if waiters is not None:
            d: defer.Deferred[Template] = defer.Deferred()
            waiters.append(d)
            return await d
        return await self._load(user_id)

    async def get(self, user_id: str) -> Ruleset:
        """The user's merged ruleset; callers must not mutate it."""
        cached = self._rulesets.get(user_id)
        if cached is not None:
            return cached
        gen = self._generation.get(user_id, 0)
        t = await self.template(user_id)
        if self._generation.get(user_id, 0) != gen:
            return build_ruleset(user_id, t.user_rules, t.enables)
        # Another caller waiting on the same load may have built it already.
        cached = self._rulesets.get(user_id)
        if cached is None:
            cached = build_ruleset(user_id, t.user_rules, t.enables)
            self._rulesets.set(user_id, cached)
        return cached

    async def _load(self, user_id: str) -> Template:
        gen = self._generation.get(user_id, 0)
        waiters: list[defer.Deferred[Template]] = []
        self._waiters[user_id] = waiters
        try:
            user_rules, enables = await self.user_data.get_push_rule_changes(user_id)
            key = template_key(user_rules, enables)
            t = self._by_key.get(key)
            if t is None:
                t = Template(key, user_rules, enables)
                self._by_key.set(key, t)
        except Exception as e:
            if self._waiters.get(user_id) is waiters:
                del self._waiters[user_id]
            for d in waiters:
                d.errback(e)
            raise
        if self._waiters.get(user_id) is waiters:
            del self._waiters[user_id]
        if self._generation.get(user_id, 0) == gen:
            self._templates_of.set(user_id, t)
        for d in waiters:
            d.callback(t)
        return t

    def invalidate(self, user_id: str) -> None:
        """Forget the user's rules; call after every change to them."""
        self._generation[user_id] = self._generation.get(user_id, 0) + 1
        self._templates_of.pop(user_id)
        self._rulesets.pop(user_id)
        # A load in flight may have read the old rules: callers from now on
        # start a fresh one instead of joining it.
        self._waiters.pop(user_id, None)
