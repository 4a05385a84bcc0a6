"""Stream positions and the notifier that wakes waiting /sync requests.

Spec: client-server-api "Syncing" (long-polling with ``timeout``). Each
stream (events, account data, receipts, typing, presence, device lists,
to-device messages) has an integer position; a sync token is their
composition. Tokens issued before presence, device lists and to-device
messages existed (four positions) still decode, at position 0 of those
streams. Waiters register for the rooms they are
in and their own user ID; a change to a room or user wakes exactly those.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterable, Optional, Sequence

from prometheus_client import Gauge
from twisted.internet import defer

from zhome.http.errors import invalid_param
from zhome.util.reactor import DelayedCall, reactor

SYNC_WAITERS = Gauge("zhome_sync_waiters", "Requests waiting in /sync")


@dataclass(frozen=True, order=True)
class StreamToken:
    events: int
    account_data: int
    receipts: int
    typing: int
    # Tokens issued before these streams existed have four parts and mean
    # "these streams from the start".
    presence: int = 0
    device_lists: int = 0
    to_device: int = 0

    def encode(self) -> str:
        return (f"s{self.events}_{self.account_data}_{self.receipts}_{self.typing}"
                f"_{self.presence}_{self.device_lists}_{self.to_device}")

    def with_events(self, events: int) -> "StreamToken":
        return replace(self, events=events)

    @classmethod
    def decode(cls, s: str) -> "StreamToken":
        try:
            if not s.startswith("s"):
                raise ValueError
            parts = [int(p) for p in s[1:].split("_")]
            # The events position may be negative: pagination tokens reach
            # back into history backfilled from other servers.
            if len(parts) not in (4, 7) or any(p < 0 for p in parts[1:]):
                raise ValueError
        except ValueError:
            raise invalid_param(f"Invalid stream token {s!r}")
        return cls(*parts)

    def is_after(self, other: "StreamToken") -> bool:
        return (
            self.events > other.events
            or self.account_data > other.account_data
            or self.receipts > other.receipts
            or self.typing > other.typing
            or self.presence > other.presence
            or self.device_lists > other.device_lists
            or self.to_device > other.to_device
        )


class _Waiter:
    __slots__ = ("deferred", "rooms", "user_id", "timer")

    def __init__(self, user_id: str, rooms: set[str]) -> None:
        self.deferred: defer.Deferred[bool] = defer.Deferred()
        self.rooms = rooms
        self.user_id = user_id
        self.timer: Optional[DelayedCall] = None


class Notifier:
    def __init__(self, events_pos: int, account_data_pos: int, receipts_pos: int, presence_pos: int = 0,
                 device_lists_pos: int = 0, to_device_pos: int = 0) -> None:
        self.events_pos = events_pos
        self.presence_pos = presence_pos
        self.account_data_pos = account_data_pos
        self.receipts_pos = receipts_pos
        self.typing_pos = 0
        self.device_lists_pos = device_lists_pos
        self.to_device_pos = to_device_pos
        self._by_room: dict[str, set[_Waiter]] = {}
        self._by_user: dict[str, set[_Waiter]] = {}
        #: (room_ids, user_ids) -> None, called with every wake-up (the
        #: /sync answer cache drops what it covers).
        self.wake_listeners: list[Callable[[Sequence[str], Sequence[str]], None]] = []

    def current_token(self) -> StreamToken:
        return StreamToken(self.events_pos, self.account_data_pos, self.receipts_pos, self.typing_pos,
                           self.presence_pos, self.device_lists_pos, self.to_device_pos)

    # -- producers ----------------------------------------------------------
    def on_new_event(self, stream_ordering: int, room_id: str, extra_users: Iterable[str] = ()) -> None:
        if stream_ordering > self.events_pos:
            self.events_pos = stream_ordering
        self._wake(room_ids=[room_id], user_ids=extra_users)

    def on_account_data(self, pos: int, user_id: str) -> None:
        self.account_data_pos = max(self.account_data_pos, pos)
        self._wake(user_ids=[user_id])

    def on_receipt(self, pos: int, room_id: str) -> None:
        self.receipts_pos = max(self.receipts_pos, pos)
        self._wake(room_ids=[room_id])

    def on_typing(self, room_id: str) -> None:
        self.typing_pos += 1
        self._wake(room_ids=[room_id])

    def on_presence(self, pos: int, room_ids: Iterable[str], user_ids: Iterable[str]) -> None:
        self.presence_pos = max(self.presence_pos, pos)
        self._wake(room_ids=room_ids, user_ids=user_ids)

    def on_device_list_change(self, pos: int, room_ids: Iterable[str], user_ids: Iterable[str]) -> None:
        """A user's devices changed: wake whoever shares a room with them."""
        self.device_lists_pos = max(self.device_lists_pos, pos)
        self._wake(room_ids=room_ids, user_ids=user_ids)

    def on_to_device(self, pos: int, user_ids: Iterable[str]) -> None:
        self.to_device_pos = max(self.to_device_pos, pos)
        self._wake(user_ids=user_ids)

    def _wake(self, room_ids: Iterable[str] = (), user_ids: Iterable[str] = ()) -> None:
        if self.wake_listeners:
            room_ids, user_ids = list(room_ids), list(user_ids)
            for listener in self.wake_listeners:
                listener(room_ids, user_ids)
        hit: set[_Waiter] = set()
        for r in room_ids:
            hit.update(self._by_room.get(r, ()))
        for u in user_ids:
            hit.update(self._by_user.get(u, ()))
        for w in hit:
            self._finish(w, True)

    # -- consumers -------------------------------------------------------------
    async def wait_for_change(self, user_id: str, rooms: set[str], since: StreamToken, timeout_ms: int) -> bool:
        """Wait until something for this user may have changed after ``since``.

        Returns True when woken, False on timeout. Callers re-check the
        streams afterwards; a spurious wake costs one more look.
        """
        if self.current_token().is_after(since):
            return True
        if timeout_ms <= 0:
            return False
        w = _Waiter(user_id, rooms)
        for r in rooms:
            self._by_room.setdefault(r, set()).add(w)
        self._by_user.setdefault(user_id, set()).add(w)
        w.timer = reactor.callLater(timeout_ms / 1000.0, self._finish, w, False)
        SYNC_WAITERS.inc()
        try:
            return await w.deferred
        finally:
            SYNC_WAITERS.dec()

    def _finish(self, w: _Waiter, woken: bool) -> None:
        if w.deferred.called:
            return
        if w.timer is not None and w.timer.active():
            w.timer.cancel()
        for r in w.rooms:
            s = self._by_room.get(r)
            if s is not None:
                s.discard(w)
                if not s:
                    del self._by_room[r]
        s = self._by_user.get(w.user_id)
        if s is not None:
            s.discard(w)
            if not s:
                del self._by_user[w.user_id]
        w.deferred.callback(woken)
