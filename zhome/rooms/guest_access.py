"""Guests in rooms: who may join, and leaving when access is withdrawn.

Spec: client-server-api "Guest Access", "Server behaviour": "Servers MUST
only allow guest users to join rooms if the ``m.room.guest_access`` state
event is present on the room, and has the ``guest_access`` value
``can_join``. If the ``m.room.guest_access`` event is changed to stop this
from being the case, the server MUST set those users' ``m.room.member``
state to ``leave``."

Whether an account is a guest is known only to its own server, so each
server enforces this for its own guests: the join check is in
``MembershipService`` (local joins, inside the room lock; remote joins,
against the state the resident server sent); the withdrawal is this
module's post-persist hook, for local and remote ``m.room.guest_access``
events alike, plus a sweep at start-up for changes that landed while a
previous run was stopping.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Optional, Protocol

from twisted.internet import defer
from twisted.python.failure import Failure

from zhome.http.errors import MatrixError
from zhome.rooms.events import Event
from zhome.storage.accounts import AccountsStore
from zhome.storage.events import EventsStore

logger = logging.getLogger(__name__)

GUEST_ACCESS = "m.room.guest_access"
CAN_JOIN = "can_join"
# Start-up sweep: guests looked at per page, and at most this many pages.
_SWEEP_PAGE = 500
_SWEEP_MAX_PAGES = 200
LEAVE_REASON = "Guest access has been withdrawn from this room"


def guests_can_join(guest_access_content: Optional[Mapping[str, Any]]) -> bool:
    """Whether an ``m.room.guest_access`` content (None: no such event) lets guests join."""
    return guest_access_content is not None and guest_access_content.get("guest_access") == CAN_JOIN


class _Membership(Protocol):
    def is_mine(self, user_id: str) -> bool: ...

    async def update(self, sender: str, target: str, room_id: str, membership: str,
                     reason: Optional[str] = None) -> Event: ...


class GuestAccessEnforcer:
    """Sets this server's guests' membership to ``leave`` when a room stops
    being ``can_join``."""

    def __init__(self, events: EventsStore, accounts: AccountsStore, membership: _Membership) -> None:
        self.events = events
        self.accounts = accounts
        self.membership = membership
        # Withdrawals being carried out, so stopping can wait for them.
        self._running: set[defer.Deferred[Any]] = set()

    async def after_persist(self, ev: Event) -> None:
        """Post-persist hook. The persistence path may hold the room's lock
        (a local send does), and leaving needs it: the leaves run apart."""
        if ev.type != GUEST_ACCESS or ev.state_key != "" or ev.rejected_reason:
            return
        self._in_background(self.withdraw_if_closed(ev.room_id))

    def start_sweep(self) -> None:
        self._in_background(self.sweep())

    def _in_background(self, work: Any) -> None:
        d: defer.Deferred[Any] = defer.ensureDeferred(work)
        self._running.add(d)
        d.addBoth(self._finished, d)

    def _finished(self, result: Any, d: "defer.Deferred[Any]") -> None:
        self._running.discard(d)
        if isinstance(result, Failure):
            logger.error("withdrawing guest access failed: %s", result.getErrorMessage())

    async def withdraw_if_closed(self, room_id: str) -> int:
        """If the room's current state does not let guests join, make every
        local guest joined to it leave. Returns how many left."""
        if guests_can_join(await self._current_guest_access(room_id)):
            return 0
        local = [u for u in await self.events.get_joined_users(room_id) if self.membership.is_mine(u)]
        left = 0
        for guest in await self.accounts.get_guests(local):
            try:
                # A member may always leave: the guest's own leave needs no
                # power level in the room.
                await self.membership.update(guest, guest, room_id, "leave", reason=LEAVE_REASON)
                left += 1
            except MatrixError as e:
                logger.warning("could not make guest %s leave %s: %s", guest, room_id, e.msg)
        if left:
            logger.info("guest access withdrawn in %s: %d guest(s) left", room_id, left)
        return left

    async def _current_guest_access(self, room_id: str) -> Optional[dict[str, Any]]:
        eid = await self.events.get_current_state_event_id(room_id, GUEST_ACCESS, "")
        ev = await self.events.get_event(eid) if eid else None
        return ev.content if ev is not None else None

    async def sweep(self) -> None:
        """At start-up: guests still joined to rooms that closed to guests
        (the change landed while the previous run was stopping)."""
        after = ""
        for _ in range(_SWEEP_MAX_PAGES):
            guests = await self.accounts.list_guests(after, _SWEEP_PAGE)
            if not guests:
                return
            rooms: set[str] = set()
            for guest in guests:
                for room_id, (membership, _) in (await self.events.get_rooms_for_user(guest)).items():
                    if membership == "join":
                        rooms.add(room_id)
            for room_id in sorted(rooms):
                await self.withdraw_if_closed(room_id)
            after = guests[-1]
        logger.warning("guest access sweep stopped after %d guests", _SWEEP_PAGE * _SWEEP_MAX_PAGES)

    async def stop(self) -> None:
        for d in list(self._running):
            try:
                await d
            except Exception:
                pass
