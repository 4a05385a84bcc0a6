"""The one persistence path for local and remote events.

Spec: server-server-api "Checks performed on receipt of a PDU" end here:
whatever passed its checks is written in one transaction (event, edges,
state group, forward extremities, current state, stream position), and
only after commit are /sync waiters woken and other components told.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

from prometheus_client import Counter
from twisted.internet import defer

from zhome.rooms.events import Event
from zhome.storage.database import Database, Txn
from zhome.storage.events import EventsStore, PersistItem
from zhome.sync.notifier import Notifier

logger = logging.getLogger(__name__)

EVENTS_PERSISTED = Counter("zhome_events_persisted_total", "Events persisted", ["origin"])

PostPersistHook = Callable[[Event], Awaitable[None]]
PrePersistHook = Callable[[PersistItem], Awaitable[None]]
TxnHook = Callable[[Any, PersistItem], None]
AfterCommitHook = Callable[[PersistItem], None]


class Persister:
    def __init__(self, db: Database, events: EventsStore, notifier: Notifier, server_name: str) -> None:
        self.db = db
        self.events = events
        self.notifier = notifier
        self.server_name = server_name
        # Positions must commit in the order they are handed out so that a
        # /sync reader never skips an event; one writer at a time keeps it so.
        self._lock = defer.DeferredLock()
        self.hooks: list[PostPersistHook] = []
        # Run before the transaction (may fill fields of the item), inside it,
        # and right after commit.
        self.pre_hooks: list[PrePersistHook] = []
        self.txn_hooks: list[TxnHook] = []
        self.after_commit_hooks: list[AfterCommitHook] = []
        # The same for invites to rooms this server is not in (outliers).
        self.outlier_txn_hooks: list[TxnHook] = []
        self.outlier_after_commit_hooks: list[AfterCommitHook] = []

    @asynccontextmanager
    async def writes_paused(self) -> AsyncIterator[None]:
        """No event is persisted while inside: every persist transaction
        started before has committed, and the next waits until the block
        is left. For a writer that must not overlap with what persistence
        writes (unread counts recounted after a read receipt,
        zhome/push/unread.py). Not reentrant: nothing inside may persist."""
        await self._lock.acquire()
        try:
            yield
        finally:
            self._lock.release()

    def _key_batched(self, txn_fn: Callable[[Txn], None]) -> Callable[[Txn], None]:
        """``txn_fn`` with the data keys it makes committed to the key store
        together (Sealer.key_batch), before its transaction commits: one
        key store commit for the state of a big room, not one per sender."""
        sealer = self.events.sealer
        if sealer is None or not sealer.enabled:
            return txn_fn

        def batched(txn: Txn) -> None:
            with sealer.key_batch():
                txn_fn(txn)
        return batched

    async def persist(self, item: PersistItem, before_txn: Callable | None = None) -> int:
        """Write ``item``; returns its stream ordering.

        ``before_txn(txn)`` runs first in the same transaction (room
        creation uses it to write the room row atomically with the create
        event).
        """

        for pre in self.pre_hooks:
            await pre(item)

        def txn_fn(txn: Txn) -> None:
            if before_txn is not None:
                before_txn(txn)
            self.events.persist_txn(txn, item)
            for hook in self.txn_hooks:
                hook(txn, item)

        await self._lock.run(self.db.run_interaction, "persist_event", self._key_batched(txn_fn))
        await self._after_commit(item)
        return item.stream_ordering

    async def persist_chain(self, items: list[PersistItem]) -> None:
        """Write local events that follow one another (each the only prev
        event of the next, none changing state) in one transaction: what a
        batch of redactions needs, at a fraction of one transaction each."""
        assert all(not i.outlier and not i.event.is_state() for i in items)
        for item in items:
            for pre in self.pre_hooks:
                await pre(item)

        def txn_fn(txn: Txn) -> None:
            for item in items:
                self.events.persist_txn(txn, item)
                for hook in self.txn_hooks:
                    hook(txn, item)

        await self._lock.run(self.db.run_interaction, "persist_chain", self._key_batched(txn_fn))
        for item in items:
            await self._after_commit(item)

    async def persist_many(self, items: list[PersistItem]) -> None:
        """Write several outliers (state and auth chains) in one transaction."""
        assert all(i.outlier for i in items)

        def txn_fn(txn: Txn) -> None:
            for item in items:
                self.events.persist_txn(txn, item)

        await self._lock.run(self.db.run_interaction, "persist_outliers", self._key_batched(txn_fn))
        for item in items:
            item.event.internal["outlier"] = True
            item.event.internal["stream_ordering"] = item.stream_ordering
            self.events.cache_event(item.event)
        if items:
            self.notifier.on_new_event(max(i.stream_ordering for i in items), items[0].event.room_id)

    async def persist_membership_outlier(self, ev: Event, push_actions: Optional[dict[str, list[Any]]] = None) -> None:
        """An invite or knock for a room this server is not in.

        ``push_actions`` are the invitee's, for the ``outlier_txn_hooks``
        (the notification log) and ``outlier_after_commit_hooks``."""
        item = PersistItem(ev, None, {}, outlier=True, push_actions=push_actions or {})

        def txn_fn(txn: Txn) -> None:
            self.events.persist_txn(txn, item)
            self.events.set_invite_membership_txn(txn, ev, item.stream_ordering)
            for hook in self.outlier_txn_hooks:
                hook(txn, item)

        await self._lock.run(self.db.run_interaction, "persist_membership_outlier", self._key_batched(txn_fn))
        ev.internal["outlier"] = True
        ev.internal["stream_ordering"] = item.stream_ordering
        self.events.cache_event(ev)
        self.events.invalidate_current_state(ev.room_id)
        if ev.state_key is not None:
            self.events.invalidate_user_rooms([ev.state_key])
        for after in self.outlier_after_commit_hooks:
            after(item)
        self.notifier.on_new_event(item.stream_ordering, ev.room_id, [ev.state_key] if ev.state_key else [])

    async def _after_commit(self, item: PersistItem) -> None:
        ev = item.event
        ev.internal["stream_ordering"] = item.stream_ordering
        ev.internal["state_group"] = item.state_group_after
        self.events.on_event_persisted(item)
        for after in self.after_commit_hooks:
            after(item)
        if item.backfilled:
            # Old history: nothing for /sync to wake up for.
            return
        extra = [ev.state_key] if ev.type == "m.room.member" and ev.state_key else []
        self.notifier.on_new_event(item.stream_ordering, ev.room_id, extra)
        origin = "local" if ev.sender.endswith(":" + self.server_name) else "remote"
        EVENTS_PERSISTED.labels(origin).inc()
        for hook in self.hooks:
            try:
                await hook(ev)
            except Exception:
                # A hook (federation sender, for one) failing must not undo
                # or fail a send that is already durable.
                logger.exception("post-persist hook failed for %s", ev.event_id)
