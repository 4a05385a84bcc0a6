"""Typing notifications.

Spec: client-server-api "Typing Notifications". Typing is ephemeral by
definition (it expires within seconds), so it lives in memory; a restart
only drops notices that would have expired anyway.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

from zhome.sync.notifier import Notifier

MAX_TYPING_TIMEOUT_MS = 120_000


class TypingService:
    def __init__(self, notifier: Notifier, clock: Callable[[], float] = time.monotonic,
                 call_later: Optional[Callable[..., Any]] = None) -> None:
        self.notifier = notifier
        self.clock = clock
        if call_later is None:
            from zhome.util.reactor import reactor

            call_later = reactor.callLater
        self._call_later = call_later
        self.on_local_typing: Optional[Callable[[str, str, bool, int], None]] = None
        #: Called with the room ID whenever a room's typing list changes.
        self.change_hooks: list[Callable[[str], None]] = []
        # room_id -> user_id -> expiry (monotonic seconds)
        self._typing: dict[str, dict[str, float]] = {}
        # room_id -> the typing stream position of its latest change, so the
        # legacy event stream tells a client only of rooms that changed.
        self._changed_at: dict[str, int] = {}

    def set_typing(self, room_id: str, user_id: str, typing: bool, timeout_ms: int = 30000,
                   local: bool = True) -> None:
        if local and self.on_local_typing is not None:
            # Other servers in the room hear about local users' typing.
            self.on_local_typing(room_id, user_id, typing, timeout_ms)
        users = self._typing.setdefault(room_id, {})
        changed = False
        if typing:
            timeout_ms = max(0, min(timeout_ms, MAX_TYPING_TIMEOUT_MS))
            changed = user_id not in users
            users[user_id] = self.clock() + timeout_ms / 1000.0
            # Tell waiting clients when the notice runs out, not only when
            # someone else next types.
            self._call_later(timeout_ms / 1000.0 + 0.05, self._expire, room_id, user_id)
        elif user_id in users:
            del users[user_id]
            changed = True
        if not users:
            self._typing.pop(room_id, None)
        if changed:
            self._changed(room_id)

    def _changed(self, room_id: str) -> None:
        # Recorded before the notifier wakes waiters (which resume at once);
        # on_typing moves the typing position on by one.
        self._changed_at[room_id] = self.notifier.typing_pos + 1
        self.notifier.on_typing(room_id)
        for hook in self.change_hooks:
            hook(room_id)

    def changed_after(self, room_id: str, pos: int) -> bool:
        """Whether the room's typing list changed after typing stream position ``pos``."""
        return self._changed_at.get(room_id, 0) > pos

    def _expire(self, room_id: str, user_id: str) -> None:
        users = self._typing.get(room_id)
        if users is None or user_id not in users or users[user_id] > self.clock():
            return
        del users[user_id]
        if not users:
            self._typing.pop(room_id, None)
        self._changed(room_id)

    def get_typing(self, room_id: str) -> list[str]:
        users = self._typing.get(room_id)
        if not users:
            return []
        now = self.clock()
        expired = [u for u, exp in users.items() if exp <= now]
        for u in expired:
            del users[u]
        if not users:
            self._typing.pop(room_id, None)
            return []
        return sorted(users)
