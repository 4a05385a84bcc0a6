"""Unread counts recounted after a read receipt.

Spec: client-server-api "Receiving notifications" / "Marking notifications
as read" and "Threaded read receipts": the counts are of the notifying
events after the user's read receipt, by thread.

Persistence adds each new event to the counts in its own transaction
(``EventsStore.persist_txn``); a recount replaces them. Push rules are
evaluated for every event after the receipt, which is too slow to do with
persistence stopped, so the recount is optimistic: it counts up to the
room's newest stored event, then writes with persistence paused only if
no event of the room was stored since (one stored meanwhile has already
changed the counts being replaced, and its change would be lost). When
that fails ``OPTIMISTIC_ATTEMPTS`` times in a row (a busy room), the last
attempt counts and writes with persistence paused throughout, which always
succeeds.

Recounts of one user in one room run one at a time: one that started
earlier, from older receipts, never writes over a later one's counts.
"""

from __future__ import annotations

from typing import Optional

from zhome.rooms.event_creation import EventCreator, RoomLocks
from zhome.rooms.persistence import Persister
from zhome.storage.events import EventsStore
from zhome.storage.notifications import NotificationsStore
from zhome.storage.relations import RelationsStore

#: A recount looks at no more than this many events after the receipt.
MAX_RECOUNT = 1000
#: Recounts written only if nothing came in meanwhile, before the last one
#: that holds persistence back while it counts.
OPTIMISTIC_ATTEMPTS = 3


class UnreadRecount:
    def __init__(self, events: EventsStore, notifications: NotificationsStore, relations: RelationsStore,
                 event_creator: EventCreator, persister: Persister) -> None:
        self.events = events
        self.notifications = notifications
        self.relations = relations
        self.event_creator = event_creator
        self.persister = persister
        # Keyed by user and room.
        self._running = RoomLocks()

    async def recount(self, user_id: str, room_id: str, thread_id: Optional[str]) -> None:
        """Recount the user's unread counts in the room after a read
        receipt, by thread: in each thread, the notifying events after the
        newest event the user's read receipts cover there, that is their
        unthreaded receipts and their receipts for that thread, ``m.read``
        or ``m.read.private``, whichever is ahead (and the user's own
        newest event). An unthreaded receipt (``thread_id`` None) recounts
        every thread, a threaded one (a root or ``main``) its own only.

        A receipt for an older event leaves the newer events counted
        ("Receiving notifications": counts are of events since the receipt).
        """
        async with self._running.lock(f"{user_id} {room_id}"):
            for _ in range(OPTIMISTIC_ATTEMPTS):
                purges = self.events.purges
                counts, upto = await self._count(user_id, room_id, thread_id)
                async with self.persister.writes_paused():
                    # A history purge meanwhile (it runs with writes paused)
                    # took events off the counts that these may still hold.
                    if self.events.purges == purges and await self.events.set_unread_counts(
                            user_id, room_id, counts, only_thread=thread_id, unless_after=upto):
                        return
            async with self.persister.writes_paused():
                counts, _ = await self._count(user_id, room_id, thread_id)
                await self.events.set_unread_counts(user_id, room_id, counts, only_thread=thread_id)

    async def _count(self, user_id: str, room_id: str,
                     thread_id: Optional[str]) -> tuple[dict[str, tuple[int, int]], int]:
        """(thread -> (notifications, highlights), the stream position they
        are counted up to)."""
        # Read first: whatever is stored after it is past what is counted.
        upto = await self.events.get_room_max_stream_ordering(room_id)
        marks = await self.notifications.read_up_to(user_id, {room_id})
        unthreaded = marks.get((room_id, ""))

        def mark_of(thread: str) -> Optional[int]:
            covered = [m for m in (unthreaded, marks.get((room_id, thread))) if m is not None]
            return max(covered) if covered else None

        start = unthreaded if thread_id is None else mark_of(thread_id)
        member_id = await self.events.get_current_state_event_id(room_id, "m.room.member", user_id)
        if start is None or member_id is None:
            return {}, upto
        later = await self.events.get_room_events_between(room_id, start, upto, MAX_RECOUNT, False)
        threads = await self.relations.threads_of(later) if later else {}
        if thread_id is not None:
            later = [e for e in later if threads[e.event_id] == thread_id]
        if later:
            # Push rules need the member count and power levels too; the
            # current state stands in for the state at each later event.
            state = await self.events.get_current_state_ids(room_id)
        else:
            state = {("m.room.member", user_id): member_id}
        counts: dict[str, tuple[int, int]] = {}
        for later_ev in later:
            thread = threads[later_ev.event_id]
            mark = mark_of(thread)
            if mark is not None and later_ev.internal.get("stream_ordering", 0) <= mark:
                continue  # read by a receipt in its thread
            if later_ev.internal.get("redacted_by"):
                # Taken off the counts when it was redacted; its redacted
                # form (no body, no relation) is no notification.
                continue
            notify, highlight = (await self.event_creator.unread_for(later_ev, state, for_user=user_id)).get(
                user_id, (False, False))
            if notify or highlight:
                n, h = counts.get(thread, (0, 0))
                counts[thread] = (n + int(notify), h + int(highlight))
        return counts, upto
