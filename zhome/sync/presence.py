"""Presence: whether users are online, idle or offline.

Spec: client-server-api "Presence" (GET/PUT /presence/{userId}/status, the
``set_presence`` parameter of /sync, ``m.presence`` events in /sync) and
server-server-api "Presence" (the ``m.presence`` EDU).

The state of every user lives in SQL (zhome/storage/presence.py); this
service keeps a copy of the local users who are not offline so that a
/sync that changes nothing costs no query. A change takes a new position on
the presence stream, wakes /sync waiters of the rooms the user is in and is
pushed to the other servers sharing a room. Local users go unavailable after
IDLE_AFTER_MS without activity and offline SYNC_OFFLINE_AFTER_MS after their
last /sync ended; remote users offline when their server stays silent for
REMOTE_OFFLINE_AFTER_MS.

Public functions for other endpoints: :meth:`PresenceService.get_presence`,
:meth:`PresenceService.get_presence_events`, :meth:`current_position`,
:meth:`changes_for_user`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any, Awaitable, Callable, Iterable, Optional

from twisted.internet import defer

from zhome.storage.events import EventsStore
from zhome.storage.presence import PresenceState, PresenceStore
from zhome.sync.notifier import Notifier
from zhome.util.ids import server_of

logger = logging.getLogger(__name__)

STATES = ("online", "unavailable", "offline")
IDLE_AFTER_MS = 5 * 60 * 1000
SYNC_OFFLINE_AFTER_MS = 60 * 1000
REMOTE_OFFLINE_AFTER_MS = 30 * 60 * 1000
CURRENTLY_ACTIVE_MS = 60 * 1000
# A /sync that keeps a user online writes its time at most this often.
SYNC_WRITE_EVERY_MS = 60 * 1000
CHECK_INTERVAL_S = 5.0
MAX_STATUS_MSG = 1024
_UNSET: Any = object()


class PresenceService:
    def __init__(self, store: PresenceStore, events: EventsStore, notifier: Notifier, server_name: str,
                 enabled: bool = True, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.events = events
        self.notifier = notifier
        self.server_name = server_name
        self.enabled = enabled
        self.clock = clock
        # Local users not offline, as stored; remote users not offline.
        self._local: dict[str, PresenceState] = {}
        self._remote_online: dict[str, int] = {}
        self._syncing: dict[str, int] = {}
        self._lock = defer.DeferredLock()
        self._loop: Any = None
        # Set by the federation wiring: called with local changes to push.
        # (states, only these servers or None for all sharing a room).
        self.send_to_servers: Optional[Callable[[list[PresenceState], Optional[list[str]]], Awaitable[None]]] = None
        #: Called with the states just written (application services' ephemeral events).
        self.change_hooks: list[Callable[[list[PresenceState]], None]] = []

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _is_local(self, user_id: str) -> bool:
        return server_of(user_id) == self.server_name

    async def start(self) -> None:
        for s in await self.store.get_not_offline():
            if self._is_local(s.user_id):
                self._local[s.user_id] = s
            else:
                self._remote_online[s.user_id] = s.last_sync_ts
        if self.enabled:
            from twisted.internet.task import LoopingCall

            self._loop = LoopingCall(self._check_timeouts_soon)
            self._loop.start(CHECK_INTERVAL_S, now=False)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    # -- reading ----------------------------------------------------------------
    def current_position(self) -> int:
        """The presence stream's position (part of every sync token)."""
        return self.store.current_position()

    async def get_presence(self, user_ids: Iterable[str]) -> dict[str, PresenceState]:
        """The stored state of each user; users never seen are offline."""
        wanted = list(dict.fromkeys(user_ids))
        found = await self.store.get(wanted) if wanted else {}
        return {u: found.get(u) or PresenceState(u, "offline", None, 0, 0, False) for u in wanted}

    async def get_present(self, user_ids: Iterable[str], also: str) -> list[PresenceState]:
        """The stored states of these users that are not offline, and that of
        ``also`` whatever it is (an initial sync's presence). Local users
        who are not offline are all in memory, so only remote users (and
        ``also``, when offline) are read from the database."""
        wanted = set(user_ids)
        out = [s for u in wanted if (s := self._local.get(u)) is not None and s.stream_id]
        ask = [u for u in wanted if not self._is_local(u)]
        if also not in self._local:
            ask.append(also)
        if ask:
            for s in (await self.store.get(ask)).values():
                if s.stream_id and (s.state != "offline" or s.user_id == also):
                    out.append(s)
        return out

    def content(self, s: PresenceState) -> dict[str, Any]:
        """The ``m.presence`` content of a state (client and federation alike)."""
        now = self._now_ms()
        out: dict[str, Any] = {"presence": s.state}
        if s.last_active_ts:
            out["last_active_ago"] = max(0, now - s.last_active_ts)
        if s.status_msg is not None:
            out["status_msg"] = s.status_msg
        out["currently_active"] = bool(s.state == "online" and s.currently_active
                                       and now - s.last_active_ts < CURRENTLY_ACTIVE_MS)
        return out

    def event(self, s: PresenceState) -> dict[str, Any]:
        return {"type": "m.presence", "sender": s.user_id, "content": self.content(s)}

    async def get_presence_events(self, user_ids: Iterable[str]) -> list[dict[str, Any]]:
        """``m.presence`` events for these users (those ever seen)."""
        found = await self.store.get(list(set(user_ids)))
        return [self.event(s) for s in sorted(found.values(), key=lambda s: s.user_id)]

    async def changes_for_user(self, user_id: str, since: int, upto: int) -> list[PresenceState]:
        """Changes in (since, upto] of the user and of users sharing a room with them."""
        if upto <= since:
            return []
        changed = await self.store.get_changed_since(since, upto)
        if not changed:
            return []
        others = {s.user_id for s in changed} - {user_id}
        visible = await self.events.get_users_sharing_rooms(user_id, others) if others else set()
        visible.add(user_id)
        return [s for s in changed if s.user_id in visible]

    # -- writing --------------------------------------------------------------
    async def _current(self, user_id: str) -> PresenceState:
        cached = self._local.get(user_id)
        if cached is not None:
            return cached
        return (await self.get_presence([user_id]))[user_id]

    async def _write(self, states: list[PresenceState], bump: bool = True,
                     unless_changed: Optional[dict[str, PresenceState]] = None) -> list[PresenceState]:
        async with self._lock:
            if unless_changed is not None:
                # A timeout decided on a state that a request has replaced
                # meanwhile does not apply.
                states = [s for s in states if s.user_id not in unless_changed
                          or self._local.get(s.user_id) is unless_changed[s.user_id]]
            if not states:
                return []
            written = await self.store.put(states, bump=bump)
            for s in written:
                if self._is_local(s.user_id):
                    if s.state == "offline":
                        self._local.pop(s.user_id, None)
                    else:
                        self._local[s.user_id] = s
                elif s.state == "offline":
                    self._remote_online.pop(s.user_id, None)
                else:
                    self._remote_online[s.user_id] = s.last_sync_ts
            if bump and written:
                await self._notify(written)
        if bump:
            local = [s for s in written if self._is_local(s.user_id)]
            if local and self.send_to_servers is not None:
                defer.ensureDeferred(self._push(local))
        return written

    async def _push(self, states: list[PresenceState], servers: Optional[list[str]] = None) -> None:
        assert self.send_to_servers is not None
        try:
            await self.send_to_servers(states, servers)
        except Exception:
            logger.exception("sending presence over federation failed")

    async def _notify(self, written: list[PresenceState]) -> None:
        rooms: set[str] = set()
        for s in written:
            for room_id, (membership, _) in (await self.events.get_rooms_for_user(s.user_id)).items():
                if membership == "join":
                    rooms.add(room_id)
        self.notifier.on_presence(max(s.stream_id for s in written), rooms, [s.user_id for s in written])
        for hook in self.change_hooks:
            hook(written)

    async def set_status(self, user_id: str, state: str, status_msg: Any = _UNSET) -> None:
        """PUT /presence/{userId}/status: the user chose ``state``."""
        if not self.enabled:
            return
        old = await self._current(user_id)
        now = self._now_ms()
        msg = old.status_msg if status_msg is _UNSET else status_msg
        active = state == "online"
        await self._write([PresenceState(user_id, state, msg, now if active else old.last_active_ts,
                                         max(old.last_sync_ts, now), active, explicit=True)])

    def sync_started(self, user_id: str) -> None:
        self._syncing[user_id] = self._syncing.get(user_id, 0) + 1

    def sync_ended(self, user_id: str) -> None:
        n = self._syncing.get(user_id, 0) - 1
        if n > 0:
            self._syncing[user_id] = n
        else:
            self._syncing.pop(user_id, None)
            cached = self._local.get(user_id)
            if cached is not None:
                # The offline timeout counts from the end of the last sync.
                self._local[user_id] = replace(cached, last_sync_ts=self._now_ms())

    async def user_synced(self, user_id: str, set_presence: str) -> None:
        """A /sync with ``set_presence``: online or unavailable mark the user
        so; offline leaves their state as it is (spec: "not marked as being
        online")."""
        if not self.enabled or set_presence == "offline":
            return
        now = self._now_ms()
        cached = self._local.get(user_id)
        if cached is not None and (cached.state == set_presence or (
                cached.state == "unavailable" and cached.explicit and set_presence == "online")):
            # Nothing changes for anyone else: keep the times in memory and
            # write them now and then, without a new stream position.
            upd = replace(cached, last_sync_ts=now)
            if cached.state == "online":
                upd = replace(upd, last_active_ts=now, currently_active=True)
            if now - cached.last_sync_ts >= SYNC_WRITE_EVERY_MS:
                await self._write([upd], bump=False)
            else:
                self._local[user_id] = upd
            return
        old = cached or await self._current(user_id)
        if old.state == set_presence or (old.state == "unavailable" and old.explicit and set_presence == "online"):
            return
        active = set_presence == "online"
        await self._write([PresenceState(user_id, set_presence, old.status_msg,
                                         now if active else old.last_active_ts, now, active)])

    async def on_remote_presence(self, origin: str, pushes: list[Any]) -> None:
        """An ``m.presence`` EDU: keep what it says of users on ``origin``.

        Not only of users already in a room here: a server pushes its users'
        presence to a server that joins one of its rooms while that join is
        still being completed here. /sync shows it only to users who share
        a room with them.
        """
        if not self.enabled:
            return
        now = self._now_ms()
        states = []
        for p in pushes[:100]:
            if not isinstance(p, dict):
                continue
            user_id, state = p.get("user_id"), p.get("presence")
            if not isinstance(user_id, str) or server_of(user_id) != origin or state not in STATES:
                continue
            ago = p.get("last_active_ago")
            ago = ago if isinstance(ago, int) and not isinstance(ago, bool) and 0 <= ago < 2**40 else 0
            msg = p.get("status_msg")
            msg = msg[:MAX_STATUS_MSG] if isinstance(msg, str) else None
            states.append(PresenceState(user_id, state, msg, now - ago, now, p.get("currently_active") is True))
        if states:
            await self._write(states)

    # -- timeouts ---------------------------------------------------------------
    def _check_timeouts_soon(self) -> None:
        defer.ensureDeferred(self._check_timeouts_logged())

    async def _check_timeouts_logged(self) -> None:
        try:
            await self.check_timeouts()
        except Exception:
            logger.exception("presence timeout check failed")

    async def check_timeouts(self) -> None:
        now = self._now_ms()
        changes = []
        decided_on: dict[str, PresenceState] = {}
        for user_id, s in list(self._local.items()):
            decided_on[user_id] = s
            seen = max(s.last_sync_ts, s.last_active_ts)
            # A sync in flight keeps its user from going offline.
            if user_id not in self._syncing and now - seen >= SYNC_OFFLINE_AFTER_MS:
                changes.append(replace(s, state="offline", currently_active=False, explicit=False))
            elif s.state == "online" and now - s.last_active_ts >= IDLE_AFTER_MS:
                changes.append(replace(s, state="unavailable", currently_active=False, explicit=False))
        stale = [u for u, ts in self._remote_online.items() if now - ts >= REMOTE_OFFLINE_AFTER_MS]
        if stale:
            for s in (await self.store.get(stale)).values():
                changes.append(replace(s, state="offline", currently_active=False))
        if changes:
            await self._write(changes, unless_changed=decided_on)

    async def on_joined(self, user_id: str, room_id: str) -> None:
        """Someone joined a room: members they now share it with see their
        presence, and the other servers of the room hear of local members'."""
        if not self.enabled:
            return
        if self.send_to_servers is None:
            return
        joined = await self.events.get_joined_users(room_id)
        if self._is_local(user_id):
            s = await self._current(user_id)
            servers = sorted({server_of(u) for u in joined} - {self.server_name})
            if s.state != "offline" and servers:
                await self._push([s], servers)
            return
        local = [u for u in joined if self._is_local(u)]
        states = [s for s in (await self.store.get(local)).values() if s.state != "offline"]
        if states:
            await self._push(states, [server_of(user_id)])
