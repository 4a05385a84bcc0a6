"""Events, the graph's edges, state groups and current state.

Spec: server-server-api "Room State Resolution" and client-server "Syncing"
rely on the facts stored here: every event with its stream position, its
prev_events edges, the state group holding the room state after it, the
forward extremities of each room and its current state.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable, Optional, Sequence, cast

from zhome.rooms.auth import can_redact
from zhome.rooms.events import Event, StateMap
from zhome.rooms.redaction import prune_event_dict
from zhome.rooms.versions import EventIdFormat, RoomVersion, get_room_version
from zhome.storage.at_rest import Sealer, event_period
from zhome.storage.database import Database, Txn, in_chunks
from zhome.storage.event_media import EventMediaStore
from zhome.storage.event_search import EventSearchStore
from zhome.storage.events_pass import events_pass_position_txn
from zhome.storage.ids import IdGenerator
from zhome.storage.lru import InvalidatedCache, LruCache
from zhome.storage.notifications import notified_of_txn, read_marks_txn
from zhome.storage.redactions import redacted_in_room_txn, redactions_in_room_txn
from zhome.storage.relations import thread_of_content_txn
from zhome.util import fastjson
from zhome.util.ids import server_of

# A state group's chain of deltas is cut by a full snapshot at this length.
MAX_STATE_CHAIN = 64
# Keys asked for in one state_keys_for_groups query.
KEYS_PER_QUERY = 40


@dataclass
class PersistItem:
    event: Event
    # State group holding the state *before* the event (None for a create).
    state_group_before: Optional[int]
    state_before: StateMap
    txn_id: Optional[str] = None
    device_id: Optional[str] = None
    # user_id -> (notify, highlight) for local users whose unread counts grow.
    unread: dict[str, tuple[bool, bool]] = field(default_factory=dict)
    # user_id -> the push rule actions for local users the event notifies
    # (one row each in the notification log, zhome/push/notifications.py).
    push_actions: dict[str, list[Any]] = field(default_factory=dict)
    # An outlier is stored without state, extremities or timeline position
    # (auth chains and state fetched over federation).
    outlier: bool = False
    # Passed auth against its own state but not against current state.
    soft_failed: bool = False
    # When the state before the event was resolved from several groups (a
    # fork) or received over federation, write it as a new snapshot group.
    snapshot_before: bool = False
    # The room's current state after this event when it is not simply the
    # old current state plus this event (forks, joins over federation).
    current_state: Optional[StateMap] = None
    # Filled by persistence when current_state is given: what it changed
    # (a removed key maps to None).
    current_state_delta: dict[tuple[str, str], Optional[str]] = field(default_factory=dict)
    # History fetched from another server (/backfill): positioned before
    # everything stored, never an extremity, never current state.
    backfilled: bool = False
    # Servers that must receive the event (the outbound queue is written in
    # the same transaction).
    destinations: list[str] = field(default_factory=list)
    # Application services that must receive the event (their queue rows
    # are written in the same transaction; zhome/appservice/transactions.py).
    appservices: list[str] = field(default_factory=list)
    # Events an accepted event replaces as forward extremities besides its
    # prev events: those its soft-failed or rejected prev events built on.
    also_replaces: list[str] = field(default_factory=list)
    # False for a received or backfilled redaction that must not take
    # effect (rooms/v3+ "Handling redactions": not from the original's
    # server, no redact level). One whose target is not stored yet is
    # judged as the target is stored (_redacted_on_arrival_txn).
    apply_redaction: bool = True
    # Sent by a local user through the client API: what the room notified
    # them of before it is read ("Receiving notifications").
    sender_read: bool = False
    # A local send under a transaction ID: the persisting transaction first
    # looks for an event already sent under it, and raises TransactionIdUsed
    # (writing nothing) when there is one.
    check_txn_id: bool = False
    # Filled by persistence:
    stream_ordering: int = 0
    state_group_after: Optional[int] = None
    # Local users whose unread counts the event lowered: the sender whose
    # counts sending cleared (sender_read), the members a redaction took
    # its target's notification off.
    unread_lowered: list[str] = field(default_factory=list)
    # The redaction (in the event's room, one that may take effect on it)
    # that was stored before the event itself, received over federation
    # or backfilled ahead of its target: the event is stored, counted and
    # served redacted. None: not redacted on arrival.
    redacted_by: Optional[str] = None


class TransactionIdUsed(Exception):
    """The transaction ID of a send was used before, by ``event_id``
    (client-server-api "Transaction identifiers")."""

    def __init__(self, event_id: str) -> None:
        super().__init__(event_id)
        self.event_id = event_id


def _replaced_extremities(item: PersistItem) -> list[str]:
    return list(dict.fromkeys(item.event.prev_event_ids + item.also_replaces))


class EventsStore:
    def __init__(self, db: Database, stream_ids: IdGenerator, state_group_ids: IdGenerator,
                 backfill_ids: Optional[IdGenerator] = None, sealer: Optional[Sealer] = None,
                 server_name: Optional[str] = None) -> None:
        self.db = db
        # ":" + this server's name: a new event of a local sender was just
        # made here, so no redaction can have named it yet. None: any event
        # may have been (tools and tests without a server name).
        self._local = ":" + server_name if server_name is not None else None
        #: Encryption at rest of event content; None stores plain JSON
        #: (tools and tests that open a database without the key store).
        self.sealer = sealer
        self.stream_ids = stream_ids
        self.backfill_ids = backfill_ids or IdGenerator(0, step=-1)
        self.state_group_ids = state_group_ids
        # Sized for memory: a big room's state map is tens of kilobytes.
        self._event_cache: LruCache[str, Event] = LruCache(1500)
        self._state_group_cache: LruCache[int, dict[tuple[str, str], str]] = LruCache(
            1000, max_weight=20000, weigh=len)
        self._extremities_cache: LruCache[str, tuple[str, ...]] = LruCache(10000)
        # room -> (type, state_key) -> (event ID, membership): the room's
        # current state as /sync reads it for every room with news (an
        # all-staff room's is thousands of rows). Weighed by entries. Every
        # write of current_state_events is in this store and bumps the
        # room's generation in its transaction and again after commit; a
        # read keeps what it read only when no bump came in between.
        self._current_state_cache: InvalidatedCache[str, dict[tuple[str, str], tuple[str, Optional[str]]]] = \
            InvalidatedCache(2000, max_weight=200_000, weigh=lambda m: len(m) + 1)
        # room -> (type, state_key) -> event ID (None: no such state): the
        # single keys of current state read one at a time (a member's
        # membership, checked by most requests), for rooms whose whole
        # current state is not cached. Dropped with it (invalidate_current_state).
        self._current_state_keys: InvalidatedCache[str, dict[tuple[str, str], Optional[str]]] = \
            InvalidatedCache(20000, max_weight=200_000, weigh=lambda m: len(m) + 1)
        # user -> (room -> (membership, event ID) from current state, the
        # newest stream position in the user's membership log, the rooms
        # they forgot): what every /sync asks first. Every write of a
        # member's current state, of the membership log or of forgotten
        # rooms bumps the user's generation in its transaction and again
        # after commit (persist_txn, set_invite_membership_txn, forget_room;
        # PrivacyStore.delete_user_traces); a purged room bumps all of them
        # (drop_room_caches). A read keeps what it read only when no bump
        # came in between.
        self._user_rooms_cache: InvalidatedCache[str, _UserRooms] = InvalidatedCache(
            50000, max_weight=1_000_000, weigh=lambda v: len(v.rooms) + len(v.forgotten) + 1)
        # room -> the newest stream position of an event in its timeline
        # (neither outlier nor soft-failed), or _NO_POSITION: which rooms a
        # /sync since a position has news in. Set by on_event_persisted
        # (commits come in position order, so the newest is the maximum),
        # dropped by drop_room_caches.
        self._room_position: LruCache[str, int] = LruCache(200_000)
        self._room_position_drops = 0
        # room -> its newest timeline events (what an incremental /sync
        # reads), recorded by on_event_persisted from a position on that
        # was known to be the room's newest: complete after ``start``.
        self._room_recent: LruCache[str, _RecentEvents] = LruCache(20_000)
        # (state group, (type, state_key)) -> event ID, "" when the group has
        # no such key: what get_state_keys_for_groups read (groups never change).
        self._state_key_cache: LruCache[tuple[int, tuple[str, str]], str] = LruCache(20000)
        #: Bumped whenever stored content is removed or replaced (a
        #: redaction applied, erasure, a purge): what was read before may
        #: hold content that is gone (zhome/sync/response_cache.py).
        self.content_epoch = 0
        #: Bumped by drop_room_caches (a room's history purged or the room
        #: deleted): counts made from events read before may hold events
        #: that are gone (zhome/push/unread.py).
        self.purges = 0
        #: Bundled aggregations (unsigned "m.relations") of events served
        #: to clients: (events, requester, with_room_id) -> event ID ->
        #: aggregations (zhome/client/aggregations.py). None: none.
        self.bundle_aggregations: Optional[
            Callable[[list[Event], Any, bool], Awaitable[dict[str, dict[str, Any]]]]] = None

    # -- writing ----------------------------------------------------------
    def persist_txn(self, txn: Txn, item: PersistItem) -> None:
        """Write one event and everything that follows from it.

        Runs inside the caller's transaction; the caller holds the
        persistence lock so positions commit in the order they were given.
        """
        ev = item.event
        if item.check_txn_id and item.txn_id and item.device_id:
            # In the transaction that would record it, so that a send costs
            # one interaction; before a position is taken, so a repeat
            # leaves no gap.
            txn.execute("SELECT event_id FROM event_txn_ids WHERE user_id = ? AND device_id = ? AND txn_id = ?",
                        (ev.sender, item.device_id, item.txn_id))
            row = txn.fetchone()
            if row is not None:
                raise TransactionIdUsed(row[0])
        so = self.backfill_ids.next() if item.backfilled else self.stream_ids.next()
        item.stream_ordering = so
        item.unread_lowered = []
        item.redacted_by = None
        rejected = ev.rejected_reason
        if item.outlier:
            self._insert_event_txn(txn, item, so, None)
            return
        if item.snapshot_before:
            item.state_group_before = self._new_state_group_txn(txn, ev.room_id, None, dict(item.state_before))
        group_after = item.state_group_before
        if ev.is_state() and not rejected:
            group_after = self._new_state_group_txn(
                txn, ev.room_id, item.state_group_before, {ev.state_tuple(): ev.event_id}
            )
        item.state_group_after = group_after
        self._insert_event_txn(txn, item, so, group_after)
        # A remote event may list a prev event twice.
        prevs = list(dict.fromkeys(ev.prev_event_ids))
        if prevs:
            txn.executemany_later(
                "INSERT INTO event_edges (event_id, prev_event_id) VALUES (?, ?)",
                [(ev.event_id, p) for p in prevs],
            )
        if not rejected and not item.soft_failed and self.may_be_named(item):
            self._redacted_on_arrival_txn(txn, item)
            ev = item.event
        if rejected or item.soft_failed or item.backfilled:
            # Neither rejected nor soft-failed events extend the room, and
            # old history never changes its present.
            if item.backfilled and not rejected and ev.redacts and item.apply_redaction:
                txn.execute("INSERT INTO redactions (event_id, redacts) VALUES (?, ?)", (ev.event_id, ev.redacts))
            return
        replaced = _replaced_extremities(item)
        if replaced:
            txn.executemany_later(
                "DELETE FROM room_forward_extremities WHERE room_id = ? AND event_id = ?",
                [(ev.room_id, p) for p in replaced],
            )
        txn.execute_later(
            "INSERT INTO room_forward_extremities (room_id, event_id) VALUES (?, ?)", (ev.room_id, ev.event_id)
        )
        if item.current_state is not None or ev.is_state():
            self.invalidate_current_state(ev.room_id)
        if item.current_state is not None:
            item.current_state_delta = self._replace_current_state_txn(txn, ev.room_id, item.current_state)
        elif ev.is_state():
            txn.execute_later(
                "DELETE FROM current_state_events WHERE room_id = ? AND type = ? AND state_key = ?",
                (ev.room_id, ev.type, ev.state_key),
            )
            txn.execute_later(
                "INSERT INTO current_state_events (room_id, type, state_key, event_id, membership)"
                " VALUES (?,?,?,?,?)",
                (ev.room_id, ev.type, ev.state_key, ev.event_id, ev.membership),
            )
        if ev.type == "m.room.member" and ev.state_key is not None:
            txn.execute_later(
                "INSERT INTO room_memberships (event_id, user_id, room_id, membership, stream_ordering)"
                " VALUES (?,?,?,?,?)",
                (ev.event_id, ev.state_key, ev.room_id, ev.membership or "", so),
            )
            if ev.membership == "join":
                txn.execute_later(
                    "DELETE FROM room_forgotten WHERE user_id = ? AND room_id = ?", (ev.state_key, ev.room_id)
                )
        self.invalidate_user_rooms(_members_changed(item))
        redacts = ev.redacts
        if redacts and item.apply_redaction:
            # Before the redaction is recorded and the content purged: both
            # tell what the target counted for.
            item.unread_lowered.extend(self._uncount_redacted_txn(txn, redacts, ev.room_id))
            txn.execute("INSERT INTO redactions (event_id, redacts) VALUES (?, ?)", (ev.event_id, redacts))
            self._purge_redacted_txn(txn, redacts, ev.room_id)
            self._event_cache.pop(redacts)
            self.content_epoch += 1
        if item.txn_id and item.device_id:
            txn.execute_later(
                "INSERT INTO event_txn_ids (user_id, device_id, txn_id, event_id) VALUES (?,?,?,?)",
                (ev.sender, item.device_id, item.txn_id, ev.event_id),
            )
        if item.unread:
            # The counts are kept by thread ("Threaded read receipts"); the
            # event's thread is the same for every member, found once.
            thread_id = thread_of_content_txn(txn, ev.room_id, ev.content)
            # One statement for every member (a big room has thousands):
            # on PostgreSQL pages of them per round trip, not one each.
            txn.executemany_later(
                "INSERT INTO room_unread (user_id, room_id, thread_id, notification_count, highlight_count)"
                " VALUES (?,?,?,?,?) ON CONFLICT (user_id, room_id, thread_id) DO UPDATE SET"
                " notification_count = room_unread.notification_count + excluded.notification_count,"
                " highlight_count = room_unread.highlight_count + excluded.highlight_count",
                [(user_id, ev.room_id, thread_id, int(notify), int(highlight))
                 for user_id, (notify, highlight) in item.unread.items()],
            )
        if item.sender_read:
            # Everything before the user's own event is read, in every thread.
            txn.execute_later(
                "INSERT INTO sent_read_marks (user_id, room_id, stream_ordering) VALUES (?,?,?)"
                " ON CONFLICT (user_id, room_id) DO UPDATE SET stream_ordering = excluded.stream_ordering",
                (ev.sender, ev.room_id, so))
            # Its rowcount is read: the writes waiting before it go with it.
            txn.execute("DELETE FROM room_unread WHERE user_id = ? AND room_id = ?", (ev.sender, ev.room_id))
            if txn.rowcount > 0 and ev.sender not in item.unread_lowered:
                # Rows removed: counts the sender's other devices still show.
                item.unread_lowered.append(ev.sender)

    def may_be_named(self, item: PersistItem) -> bool:
        """Whether another stored event can already name ``item``'s event
        (a redaction or an edit received before it): history fetched from
        other servers, and any event from another server. A local user's
        new event was made just now; its ID was known to no one."""
        return item.backfilled or self._local is None or not item.event.sender.endswith(self._local)

    def _redacted_on_arrival_txn(self, txn: Txn, item: PersistItem) -> None:
        """A redaction received before its target (over federation or in
        backfilled history) takes effect as the target is stored, if it
        may (``_redaction_applies_txn``): the target keeps only its redacted
        form, notifies no one and counts for no one ("Receiving
        notifications": counts are of notifying events, and a redacted
        event is none). Sets ``item.redacted_by`` and replaces
        ``item.event`` by its redacted form, which the transaction hooks
        (search, relations, the notification log, push) and the caches
        after commit see.

        The redactions recorded for the target that may not take effect
        are forgotten here, so that every reader of the ``redactions``
        table (rooms/v3+ "Handling redactions": a server applies only
        those) takes the target as it is. Runs in the transaction that
        stores the target, under its room's lock: no redaction of it can
        be recorded in between (the receive and backfill paths decide
        whether one applies under the same lock)."""
        ev = item.event
        # The one query every event from elsewhere pays: most are named by
        # no redaction.
        named = redactions_in_room_txn(txn, ev.event_id, ev.room_id)
        if not named:
            return
        applying = [red_id for red_id, sender, group in named if self._redaction_applies_txn(txn, ev, sender, group)]
        refused = [red_id for red_id, _, _ in named if red_id not in applying]
        if refused:
            txn.executemany_later("DELETE FROM redactions WHERE event_id = ? AND redacts = ?",
                                  [(red_id, ev.event_id) for red_id in refused])
        if not applying:
            return
        red_id = applying[0]
        item.redacted_by = red_id
        self._purge_redacted_txn(txn, ev.event_id, ev.room_id)
        pruned = Event(prune_event_dict(ev.room_version, ev.pdu), ev.event_id, ev.room_version, ev.rejected_reason)
        pruned.internal.update(ev.internal)
        pruned.internal["redacted_by"] = red_id
        item.event = pruned
        item.unread = {}
        item.push_actions = {}

    def _redaction_applies_txn(self, txn: Txn, target: Event, redaction_sender: str,
                               redaction_group: Optional[int]) -> bool:
        """Whether a redaction stored before ``target`` takes effect on it
        (rooms/v3+ "Handling redactions"): its sender is on the target
        sender's server, or had the redact level in the state before the
        redaction (its state group). In v1 and v2 the auth rules the
        redaction passed decided it already."""
        rv = target.room_version
        if rv.event_id_format is EventIdFormat.SERVER_CHOSEN:
            return True
        if redaction_sender == target.sender or server_of(redaction_sender) == server_of(target.sender):
            return True
        if redaction_group is None:
            return False
        keys = [("m.room.create", ""), ("m.room.power_levels", "")]
        state = self._state_keys_txn(txn, redaction_group, keys)
        ids = [state[k] for k in keys if k in state]
        found, missing = self._event_cache.get_many(ids)
        if missing:
            found.update((e.event_id, e) for e in self._get_events_txn(txn, missing))
        auth_map = {k: found[state[k]] for k in keys if k in state and state[k] in found}
        return can_redact(rv, redaction_sender, target.sender, auth_map, same_server_ok=True)

    def _insert_event_txn(self, txn: Txn, item: PersistItem, so: int, group: Optional[int]) -> None:
        ev = item.event
        stored, sealed, data_key = self.seal_pdu(ev.event_id, ev.room_version, ev.pdu)
        txn.execute_later(
            "INSERT INTO events (stream_ordering, event_id, room_id, type, state_key, sender, depth,"
            " origin_server_ts, received_ts, json, rejected_reason, outlier, state_group, soft_failed,"
            " prev_state_group, sealed, data_key) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                so,
                ev.event_id,
                ev.room_id,
                ev.type,
                ev.state_key,
                ev.sender,
                ev.depth,
                ev.origin_server_ts,
                int(time.time() * 1000),
                stored,
                ev.rejected_reason,
                int(item.outlier),
                group,
                int(item.soft_failed),
                None if item.outlier else item.state_group_before,
                sealed,
                data_key,
            ),
        )
        if not ev.rejected_reason:
            EventMediaStore.index_txn(txn, ev.event_id, ev.room_id, ev.content)

    # -- encryption at rest -------------------------------------------------
    def seal_pdu(self, event_id: str, room_version: RoomVersion,
                 pdu: dict[str, Any]) -> tuple[str, Optional[str], Optional[int]]:
        """(json column, sealed column, data_key column) for storing ``pdu``.

        The json column gets the event's redacted form; everything the
        redaction algorithm removes is sealed under the data key of the
        event's sender, room and month (see ``zhome/storage/at_rest.py``).
        """
        if self.sealer is None or not self.sealer.enabled:
            return _dumps(pdu), None, None
        pruned = prune_event_dict(room_version, pdu)
        rest = {k: v for k, v in pdu.items() if k not in pruned}
        if pruned.get("content") != pdu.get("content"):
            rest["content"] = pdu["content"]
        if not rest:
            return _dumps(pruned), None, 0
        key_id, sealed = self.sealer.seal(
            str(pdu.get("sender", "")), str(pdu.get("room_id", "")), event_period(pdu.get("origin_server_ts")),
            _dumps(rest).encode("utf-8"), event_id.encode("utf-8"))
        return _dumps(pruned), sealed, key_id

    def _uncount_redacted_txn(self, txn: Txn, event_id: str, room_id: str) -> list[str]:
        """Take a newly redacted event off the unread counts it is still in
        ("Receiving notifications": counts are of notifying events, and a
        redacted event notifies no one): one notification, and one
        highlight if it highlighted, off its thread's counts of each local
        user the notification log says it notified and who has not read
        it (read receipts and sent events, as the recount reads them).
        Clamped at zero. Returns the users whose counts went down.

        The log is what tells: a user whose row retention removed (older
        than the log keeps, or past its length) keeps the count, which
        their next read receipt recounts."""
        if redacted_in_room_txn(txn, event_id, room_id) is not None:
            return []  # taken off by the first redaction of it
        txn.execute("SELECT stream_ordering, json, sealed, type, state_key FROM events WHERE event_id = ?"
                    " AND room_id = ? AND outlier = 0 AND soft_failed = 0 AND rejected_reason IS NULL",
                    (event_id, room_id))
        row = txn.fetchone()
        if row is None:
            return []
        so, stored, sealed, etype, state_key = row
        notified = notified_of_txn(txn, event_id, int(so))
        content = self.open_pdu(event_id, stored, sealed).get("content") if notified else None
        if not isinstance(content, dict):
            return []
        if etype == "m.room.member" and content.get("membership") == "invite":
            # An invite is not in its invitee's counts (unread_from_actions).
            notified.pop(state_key, None)
        # The thread the event was counted into as it was persisted.
        thread_id = thread_of_content_txn(txn, room_id, content)
        # Those whose read mark in the thread is at or after the event have read it.
        marks = read_marks_txn(txn, room_id, thread_id, list(notified))
        unread = sorted(u for u in notified if u not in marks or marks[u] < int(so))
        lowered: list[str] = []
        for chunk, qs in in_chunks(unread):
            txn.execute("SELECT user_id, notification_count, highlight_count FROM room_unread"
                        f" WHERE room_id = ? AND thread_id = ? AND user_id IN ({qs})", (room_id, thread_id, *chunk))
            for user_id, n, h in txn.fetchall():
                n2, h2 = max(0, int(n) - 1), max(0, int(h) - int(notified[user_id]))
                if (n2, h2) == (int(n), int(h)):
                    continue
                if n2 or h2:
                    txn.execute_later("UPDATE room_unread SET notification_count = ?, highlight_count = ?"
                                      " WHERE user_id = ? AND room_id = ? AND thread_id = ?",
                                      (n2, h2, user_id, room_id, thread_id))
                else:
                    # No row is what nothing unread is (set_unread_counts).
                    txn.execute_later("DELETE FROM room_unread WHERE user_id = ? AND room_id = ? AND thread_id = ?",
                                      (user_id, room_id, thread_id))
                lowered.append(user_id)
        return lowered

    def _purge_redacted_txn(self, txn: Txn, event_id: str, room_id: str) -> None:
        """A redacted event keeps only its redacted form in the database:
        the spec says servers should remove the content of redacted events,
        and nothing here needs it any more (clients, other servers and
        exports all get the redacted form)."""
        txn.execute("SELECT e.json, e.sealed, r.room_version FROM events e JOIN rooms r ON r.room_id = e.room_id"
                    " WHERE e.event_id = ? AND e.room_id = ?", (event_id, room_id))
        row = txn.fetchone()
        if row is None:
            return
        EventMediaStore.forget_txn(txn, [event_id])
        # What it edited is rewritten by the search index's persist hook.
        EventSearchStore.forget_txn(txn, [event_id])
        stored, sealed, version = row
        if sealed is not None:
            txn.execute("UPDATE events SET sealed = NULL, data_key = 0 WHERE event_id = ?", (event_id,))
            return
        pdu = json.loads(stored)
        pruned = prune_event_dict(get_room_version(version), pdu)
        if pruned != pdu:
            txn.execute("UPDATE events SET json = ? WHERE event_id = ?", (_dumps(pruned), event_id))

    def seal_backlog_txn(self, txn: Txn, limit: int) -> int:
        """Seal up to ``limit`` events stored before encryption at rest (or
        while it was off), in stream order; returns how many rows were
        looked at (0: none left). The update only lands on a row still as
        it was read, so a purge meanwhile is never undone."""
        pos = events_pass_position_txn(txn, "events")
        txn.execute(
            "SELECT e.stream_ordering, e.event_id, r.room_version, e.json FROM events e"
            " JOIN rooms r ON r.room_id = e.room_id WHERE e.stream_ordering > ? AND e.data_key IS NULL"
            " AND e.sealed IS NULL ORDER BY e.stream_ordering LIMIT ?", (pos, limit))
        rows = txn.fetchall()
        for so, event_id, version, js in rows:
            stored, sealed, data_key = self.seal_pdu(event_id, get_room_version(version), json.loads(js))
            txn.execute("UPDATE events SET json = ?, sealed = ?, data_key = ? WHERE event_id = ?"
                        " AND data_key IS NULL AND sealed IS NULL AND json = ?",
                        (stored, sealed, data_key, event_id, js))
            pos = max(pos, int(so))
        txn.execute("UPDATE at_rest_progress SET position = ? WHERE name = 'events'", (pos,))
        return len(rows)

    def open_pdu(self, event_id: str, stored: str, sealed: Optional[str],
                 bounded_ints: bool = False) -> dict[str, Any]:
        """The event as it was persisted, from its json and sealed columns.
        When the data key was destroyed (erasure, retention) the redacted
        form is all there is, and that is what comes back. ``bounded_ints``:
        the event's room version keeps its integers in the canonical range
        (``strict_canonical_json``), so nothing needs looking for longer ones."""
        loads = fastjson.loads_bounded if bounded_ints else fastjson.loads
        pdu = loads(stored)
        if sealed is not None:
            if self.sealer is None:
                raise RuntimeError("an event is sealed but no key store is open")
            plain = self.sealer.open(sealed, event_id.encode("utf-8"))
            if plain is not None:
                pdu.update(loads(plain))
        return pdu

    def _replace_current_state_txn(self, txn: Txn, room_id: str,
                                   state: StateMap) -> dict[tuple[str, str], Optional[str]]:
        """Make ``state`` the room's current state; returns what changed
        (a removed key maps to None)."""
        txn.execute("SELECT type, state_key, event_id FROM current_state_events WHERE room_id = ?", (room_id,))
        old = {(t, sk): eid for t, sk, eid in txn.fetchall()}
        changed = {k: v for k, v in state.items() if old.get(k) != v}
        removed = [k for k in old if k not in state]
        for t, sk in removed + list(changed):
            txn.execute(
                "DELETE FROM current_state_events WHERE room_id = ? AND type = ? AND state_key = ?", (room_id, t, sk)
            )
        delta: dict[tuple[str, str], Optional[str]] = {**{k: None for k in removed}, **changed}
        if not changed:
            return delta
        memberships: dict[str, Optional[str]] = {}
        member_ids = [eid for (t, _), eid in changed.items() if t == "m.room.member"]
        for chunk, qs in in_chunks(member_ids):
            txn.execute(f"SELECT event_id, json FROM events WHERE event_id IN ({qs})", chunk)
            for eid, js in txn.fetchall():
                memberships[eid] = (json.loads(js).get("content") or {}).get("membership")
        txn.executemany(
            "INSERT INTO current_state_events (room_id, type, state_key, event_id, membership) VALUES (?,?,?,?,?)",
            [(room_id, t, sk, eid, memberships.get(eid) if t == "m.room.member" else None)
             for (t, sk), eid in changed.items()],
        )
        return delta

    def set_invite_membership_txn(self, txn: Txn, ev: Event, stream_ordering: int) -> None:
        """Record a local user's invite to a room this server is not in.

        The invite arrives alone (an outlier); it still has to show in the
        user's /sync and let them accept or reject it.
        """
        assert ev.state_key is not None
        # Again after commit (Persister.persist_membership_outlier).
        self.invalidate_current_state(ev.room_id)
        self.invalidate_user_rooms([ev.state_key])
        txn.execute(
            "DELETE FROM current_state_events WHERE room_id = ? AND type = 'm.room.member' AND state_key = ?",
            (ev.room_id, ev.state_key),
        )
        txn.execute(
            "INSERT INTO current_state_events (room_id, type, state_key, event_id, membership) VALUES (?,?,?,?,?)",
            (ev.room_id, "m.room.member", ev.state_key, ev.event_id, ev.membership),
        )
        txn.execute(
            "INSERT INTO room_memberships (event_id, user_id, room_id, membership, stream_ordering) VALUES (?,?,?,?,?)",
            (ev.event_id, ev.state_key, ev.room_id, ev.membership or "", stream_ordering),
        )

    def _new_state_group_txn(
        self, txn: Txn, room_id: str, prev_group: Optional[int], delta: dict[tuple[str, str], str]
    ) -> int:
        chain = 0
        if prev_group is not None:
            txn.execute("SELECT chain_length FROM state_groups WHERE id = ?", (prev_group,))
            row = txn.fetchone()
            chain = int(row[0]) if row else 0
        gid = self.state_group_ids.next()
        if prev_group is None or chain + 1 >= MAX_STATE_CHAIN:
            full = dict(self._state_group_txn(txn, prev_group)) if prev_group is not None else {}
            full.update(delta)
            txn.execute(
                "INSERT INTO state_groups (id, room_id, prev_group, chain_length) VALUES (?,?,NULL,0)",
                (gid, room_id),
            )
            entries = full
        else:
            txn.execute(
                "INSERT INTO state_groups (id, room_id, prev_group, chain_length) VALUES (?,?,?,?)",
                (gid, room_id, prev_group, chain + 1),
            )
            entries = delta
        txn.executemany(
            "INSERT INTO state_group_entries (state_group, type, state_key, event_id) VALUES (?,?,?,?)",
            [(gid, t, sk, eid) for (t, sk), eid in entries.items()],
        )
        return gid

    def new_state_group_txn(self, txn: Txn, room_id: str, state: StateMap) -> int:
        """A snapshot group holding exactly ``state`` (used for resolved state)."""
        return self._new_state_group_txn(txn, room_id, None, dict(state))

    # -- reading: state -----------------------------------------------------
    def _state_group_txn(self, txn: Txn, group: int) -> dict[tuple[str, str], str]:
        cached = self._state_group_cache.get(group)
        if cached is not None:
            return cached
        chain: list[int] = []
        g: Optional[int] = group
        base: dict[tuple[str, str], str] = {}
        # The chain is bounded by MAX_STATE_CHAIN.
        for _ in range(MAX_STATE_CHAIN + 2):
            if g is None:
                break
            hit = self._state_group_cache.get(g)
            if hit is not None:
                base = dict(hit)
                break
            chain.append(g)
            txn.execute("SELECT prev_group FROM state_groups WHERE id = ?", (g,))
            row = txn.fetchone()
            g = row[0] if row else None
        for cg in reversed(chain):
            txn.execute("SELECT type, state_key, event_id FROM state_group_entries WHERE state_group = ?", (cg,))
            for t, sk, eid in txn.fetchall():
                base[(t, sk)] = eid
        # Only the group asked for is kept: caching every link of the chain
        # would fill the cache with copies nobody asks for again.
        self._state_group_cache.set(group, base)
        return base

    async def get_state_group(self, group: int) -> dict[tuple[str, str], str]:
        cached = self._state_group_cache.get(group)
        if cached is not None:
            return cached
        return await self.db.run_interaction("get_state_group", self._state_group_txn, group)

    async def get_state_keys_for_groups(self, groups: Sequence[int],
                                        keys: Sequence[tuple[str, str]]) -> dict[int, StateMap]:
        """For each group, its entries for ``keys`` only (absent keys left
        out): one query for all of them, walking each group's chain in SQL,
        without reading (or caching) whole state maps. A cached whole map
        answers for its group directly."""
        out: dict[int, StateMap] = {}
        todo: list[int] = []
        want = list(dict.fromkeys(keys))
        for g in dict.fromkeys(groups):
            hit = self._state_group_cache.get(g)
            if hit is not None:
                out[g] = {k: hit[k] for k in want if k in hit}
                continue
            known: StateMap = {}
            for k in want:
                eid = self._state_key_cache.get((g, k))
                if eid is None:
                    todo.append(g)
                    break
                if eid:
                    known[k] = eid
            else:
                out[g] = known
        if not todo or not want:
            for g in todo:
                out[g] = {}
            return out

        read = await self.db.run_interaction("state_keys_for_groups", self._read_state_keys_txn, todo, want)
        for g, m in read.items():
            for k in want:
                self._state_key_cache.set((g, k), m.get(k, ""))
        out.update(read)
        return out

    def _read_state_keys_txn(self, txn: Txn, groups: list[int], want: list[tuple[str, str]]) -> dict[int, StateMap]:
        """Each of ``groups``' entries for the keys ``want`` (absent keys
        left out), read from the database: one query per chunk of groups
        and keys, walking each group's chain in SQL."""
        found: dict[int, dict[tuple[str, str], tuple[int, str]]] = {g: {} for g in groups}
        for g_chunk, g_qs in in_chunks(groups):
            for k_start in range(0, len(want), KEYS_PER_QUERY):
                k_chunk = want[k_start:k_start + KEYS_PER_QUERY]
                values = ", ".join("(?, ?)" for _ in k_chunk)
                txn.execute(
                    "WITH RECURSIVE wanted(t, sk) AS (VALUES " + values + "),"
                    " chain(start, g, depth) AS ("
                    f"  SELECT id, id, 0 FROM state_groups WHERE id IN ({g_qs})"
                    "  UNION ALL"
                    "  SELECT chain.start, sg.prev_group, chain.depth + 1 FROM chain"
                    "  JOIN state_groups sg ON sg.id = chain.g"
                    "  WHERE sg.prev_group IS NOT NULL AND chain.depth < ?)"
                    " SELECT chain.start, chain.depth, e.type, e.state_key, e.event_id FROM chain"
                    " JOIN wanted ON 1 = 1"
                    " JOIN state_group_entries e ON e.state_group = chain.g AND e.type = wanted.t"
                    " AND e.state_key = wanted.sk",
                    (*[x for k in k_chunk for x in k], *g_chunk, MAX_STATE_CHAIN + 1),
                )
                for start, depth, t, sk, eid in txn.fetchall():
                    # The nearest link of the chain holds the value.
                    have = found[int(start)].get((t, sk))
                    if have is None or int(depth) < have[0]:
                        found[int(start)][(t, sk)] = (int(depth), eid)
        return {g: {k: v[1] for k, v in m.items()} for g, m in found.items()}

    def _state_keys_txn(self, txn: Txn, group: int, keys: list[tuple[str, str]]) -> StateMap:
        """A stored group's entries for ``keys`` (absent keys left out),
        read inside a transaction: from the caches when they hold them
        all, else from the database. Nothing is cached here (the caller's
        transaction may yet roll back)."""
        hit = self._state_group_cache.get(group)
        if hit is not None:
            return {k: hit[k] for k in keys if k in hit}
        known: StateMap = {}
        for k in keys:
            eid = self._state_key_cache.get((group, k))
            if eid is None:
                return self._read_state_keys_txn(txn, [group], keys).get(group, {})
            if eid:
                known[k] = eid
        return known

    async def state_group_before(self, event: Event) -> Optional[int]:
        """The group of the room's state just before ``event``."""
        if not event.is_state():
            return event.internal.get("state_group") if "state_group" in event.internal else \
                await self.get_state_group_for_event(event.event_id)
        if "prev_state_group" in event.internal:
            return cast(Optional[int], event.internal["prev_state_group"])
        rows = await self.db.execute(
            "prev_state_group", "SELECT prev_state_group FROM events WHERE event_id = ?", event.event_id)
        return rows[0][0] if rows else None

    async def get_state_group_for_event(self, event_id: str) -> Optional[int]:
        cached = self._event_cache.get(event_id)
        if cached is not None and "state_group" in cached.internal:
            return cached.internal["state_group"]
        rows = await self.db.execute("state_group_for_event", "SELECT state_group FROM events WHERE event_id = ?", event_id)
        return rows[0][0] if rows else None

    async def get_state_after_event(self, event_id: str) -> StateMap:
        g = await self.get_state_group_for_event(event_id)
        return dict(await self.get_state_group(g)) if g is not None else {}

    async def get_state_before_event(self, event: Event) -> StateMap:
        if not event.is_state():
            # A message changes no state: before and after are the same.
            return await self.get_state_after_event(event.event_id)
        if "prev_state_group" in event.internal:
            prev_group = event.internal["prev_state_group"]
        else:
            rows = await self.db.execute(
                "prev_state_group", "SELECT prev_state_group FROM events WHERE event_id = ?", event.event_id
            )
            prev_group = rows[0][0] if rows else None
        if prev_group is None:
            return {}
        return dict(await self.get_state_group(prev_group))

    async def get_current_state_ids(self, room_id: str) -> StateMap:
        state = (await self.get_current_state_for_rooms([room_id]))[room_id]
        return {key: entry[0] for key, entry in state.items()}

    async def get_current_state_event_id(self, room_id: str, etype: str, state_key: str) -> Optional[str]:
        key = (etype, state_key)
        whole = self._current_state_cache.get(room_id)
        if whole is not None:
            entry = whole.get(key)
            return entry[0] if entry is not None else None
        known = self._current_state_keys.get(room_id)
        if known is not None and key in known:
            return known[key]
        ticket = self._current_state_keys.ticket(room_id)
        rows = await self.db.execute(
            "current_state_event",
            "SELECT event_id FROM current_state_events WHERE room_id = ? AND type = ? AND state_key = ?",
            room_id,
            etype,
            state_key,
        )
        event_id: Optional[str] = rows[0][0] if rows else None
        # Kept with the keys read before, unless the room's state changed
        # since the read began (then those are gone too).
        known = self._current_state_keys.get(room_id)
        self._current_state_keys.set_if_unchanged(room_id, ticket, {**(known or {}), key: event_id})
        return event_id

    async def get_forward_extremities(self, room_id: str) -> list[str]:
        cached = self._extremities_cache.get(room_id)
        if cached is not None:
            return list(cached)
        rows = await self.db.execute(
            "forward_extremities", "SELECT event_id FROM room_forward_extremities WHERE room_id = ?", room_id
        )
        return [r[0] for r in rows]

    def on_event_persisted(self, item: PersistItem) -> None:
        """Keep caches in step with a committed event.

        Called by the persister (the only writer of events) after commit, so
        the cached extremities are exactly what the table now holds.
        """
        ev = item.event
        ev.internal["txn"] = (item.device_id, item.txn_id) if item.txn_id and item.device_id else None
        if item.soft_failed:
            ev.internal["soft_failed"] = True
        self.cache_event(ev)
        if ev.redacts:
            self.invalidate_event(ev.redacts)
        if not (item.outlier or item.soft_failed or item.backfilled):
            before = self._room_position.get(ev.room_id)
            recent = self._room_recent.get(ev.room_id)
            if recent is None and before is not None and before < item.stream_ordering:
                recent = _RecentEvents(before, [])
                self._room_recent.set(ev.room_id, recent)
            if recent is not None and not ev.rejected_reason:
                recent.add(item.stream_ordering, ev.event_id)
            self._raise_room_position(ev.room_id, item.stream_ordering)
        if item.outlier or item.soft_failed or item.backfilled or ev.rejected_reason:
            return
        if item.current_state is not None or ev.is_state():
            self.invalidate_current_state(ev.room_id)
        self.invalidate_user_rooms(_members_changed(item))
        current = self._extremities_cache.get(ev.room_id)
        if current is None:
            if not ev.prev_event_ids:
                self._extremities_cache.set(ev.room_id, (ev.event_id,))
            return
        replaced = set(_replaced_extremities(item))
        self._extremities_cache.set(ev.room_id, tuple([e for e in current if e not in replaced] + [ev.event_id]))

    # -- reading: events ----------------------------------------------------
    def _row_to_event(self, row: tuple) -> Event:
        (event_id, room_version, js, rejected, so, state_group, outlier, soft_failed, prev_group, redacted_by,
         txn_device, txn_id, sealed) = row
        version = get_room_version(room_version)
        ev = Event(self.open_pdu(event_id, js, sealed, version.strict_canonical_json), event_id, version, rejected)
        ev.internal["txn"] = (txn_device, txn_id) if txn_id is not None else None
        ev.internal["stream_ordering"] = so
        ev.internal["state_group"] = state_group
        ev.internal["prev_state_group"] = prev_group
        if outlier:
            ev.internal["outlier"] = True
        if soft_failed:
            ev.internal["soft_failed"] = True
        if redacted_by:
            ev.internal["redacted_by"] = redacted_by
        return ev

    _EVENT_SELECT = (
        "SELECT e.event_id, r.room_version, e.json, e.rejected_reason, e.stream_ordering, e.state_group,"
        " e.outlier, e.soft_failed, e.prev_state_group,"
        # Only a redaction in the event's own room applies (rooms/v3+
        # "Handling redactions"; one named before its target was stored
        # may turn out to be from another room).
        " (SELECT MIN(rd.event_id) FROM redactions rd JOIN events re ON re.event_id = rd.event_id"
        " WHERE rd.redacts = e.event_id AND re.room_id = e.room_id),"
        " t.device_id, t.txn_id, e.sealed"
        " FROM events e JOIN rooms r ON r.room_id = e.room_id"
        " LEFT JOIN event_txn_ids t ON t.event_id = e.event_id"
    )

    async def get_events(self, event_ids: Iterable[str]) -> dict[str, Event]:
        out, missing = self._event_cache.get_many(event_ids)
        if missing:
            fetched = await self.db.run_reads("get_events", self._get_events_txn, missing)
            for ev in fetched:
                self._event_cache.set(ev.event_id, ev)
                out[ev.event_id] = ev
        return out

    def _get_events_txn(self, txn: Txn, event_ids: list[str]) -> list[Event]:
        res: list[Event] = []
        for chunk, qs in in_chunks(event_ids):
            txn.execute(self._EVENT_SELECT + f" WHERE e.event_id IN ({qs})", chunk)
            res.extend(self._row_to_event(r) for r in txn.fetchall())
        return res

    async def get_event(self, event_id: str) -> Optional[Event]:
        return (await self.get_events([event_id])).get(event_id)

    def cache_event(self, ev: Event) -> None:
        self._event_cache.set(ev.event_id, ev)

    def invalidate_event(self, event_id: str) -> None:
        self._event_cache.pop(event_id)
        self.content_epoch += 1

    def drop_room_caches(self, room_id: str) -> None:
        """After a room was purged from the database: nothing of it stays cached."""
        self.content_epoch += 1
        self.purges += 1
        self._event_cache.clear()
        self._state_group_cache.clear()
        self._extremities_cache.pop(room_id)
        self._room_position.pop(room_id)
        self._room_position_drops += 1
        self._room_recent.pop(room_id)
        self.invalidate_current_state(room_id)
        self.invalidate_user_rooms(None)

    def invalidate_current_state(self, room_id: str) -> None:
        """The room's current state is changing or changed: forget it, and
        make any read in flight not keep what it read."""
        self._current_state_cache.invalidate(room_id)
        self._current_state_keys.invalidate(room_id)

    def invalidate_user_rooms(self, user_ids: Optional[Iterable[str]]) -> None:
        """These users' memberships are changing or changed (None: anyone's):
        forget them, and make any read in flight not keep what it read."""
        if user_ids is None:
            self._user_rooms_cache.invalidate_all()
            return
        for user_id in user_ids:
            self._user_rooms_cache.invalidate(user_id)

    async def _user_rooms(self, user_id: str) -> _UserRooms:
        cached = self._user_rooms_cache.get(user_id)
        if cached is not None:
            return cached
        ticket = self._user_rooms_cache.ticket(user_id)

        def txn_fn(txn: Txn) -> _UserRooms:
            txn.execute("SELECT room_id, membership, event_id FROM current_state_events WHERE type = 'm.room.member'"
                        " AND state_key = ?", (user_id,))
            rooms = {r: (m, e) for r, m, e in txn.fetchall()}
            txn.execute("SELECT MAX(stream_ordering) FROM room_memberships WHERE user_id = ?", (user_id,))
            row = txn.fetchone()
            txn.execute("SELECT room_id FROM room_forgotten WHERE user_id = ?", (user_id,))
            forgotten = frozenset(r[0] for r in txn.fetchall())
            return _UserRooms(rooms, int(row[0]) if row and row[0] is not None else 0, forgotten)

        value = await self.db.run_interaction("rooms_for_user", txn_fn)
        self._user_rooms_cache.set_if_unchanged(user_id, ticket, value)
        return value

    async def get_state_events(self, state: StateMap) -> dict[tuple[str, str], Event]:
        evs = await self.get_events(state.values())
        return {k: evs[v] for k, v in state.items() if v in evs}

    async def get_room_events_between(
        self, room_id: str, from_exclusive: int, to_inclusive: int, limit: int, backwards: bool = True
    ) -> list[Event]:
        """Events of a room in (from, to] by stream order; newest first when backwards."""
        order = "DESC" if backwards else "ASC"
        sql = ("SELECT event_id FROM events WHERE room_id = ? AND stream_ordering > ? AND stream_ordering <= ?"
               " AND outlier = 0 AND soft_failed = 0 AND rejected_reason IS NULL"
               f" ORDER BY stream_ordering {order} LIMIT ?")

        def txn_fn(txn: Txn) -> tuple[list[str], dict[str, Event], list[Event]]:
            # The page's IDs and the events not cached, in one trip to the
            # database thread (history read back is mostly not cached).
            txn.execute(sql, (room_id, from_exclusive, to_inclusive, limit))
            ids = [r[0] for r in txn.fetchall()]
            cached, missing = self._event_cache.get_many(ids)
            return ids, cached, self._get_events_txn(txn, missing) if missing else []

        ids, evs, fetched = await self.db.run_reads("room_events_between", txn_fn)
        for ev in fetched:
            self._event_cache.set(ev.event_id, ev)
            evs[ev.event_id] = ev
        return [evs[i] for i in ids if i in evs]

    async def get_room_events_near_ts(self, room_id: str, ts: int, forwards: bool, limit: int,
                                      after: Optional[tuple[int, int]] = None) -> list[Event]:
        """Timeline events of a room sent at or after ``ts`` (oldest first)
        when ``forwards``, else at or before it (newest first), by
        ``origin_server_ts`` with ties in stream order. ``after`` is the
        (origin_server_ts, stream_ordering) of the last event of the
        previous page: the page goes on strictly past it."""
        cmp, order = (">", "ASC") if forwards else ("<", "DESC")
        if after is None:
            where, args = f"origin_server_ts {cmp}= ?", [ts]
        else:
            where = f"(origin_server_ts {cmp} ? OR (origin_server_ts = ? AND stream_ordering {cmp} ?))"
            args = [after[0], after[0], after[1]]
        rows = await self.db.execute(
            "room_events_near_ts",
            f"SELECT event_id FROM events WHERE room_id = ? AND {where}"
            " AND outlier = 0 AND soft_failed = 0 AND rejected_reason IS NULL"
            f" ORDER BY origin_server_ts {order}, stream_ordering {order} LIMIT ?",
            room_id, *args, limit,
        )
        ids = [r[0] for r in rows]
        evs = await self.get_events(ids)
        return [evs[i] for i in ids if i in evs]

    async def get_recent_events_for_rooms(
        self, room_ids: list[str], from_exclusive: int, to_inclusive: int, limit: int
    ) -> dict[str, list[Event]]:
        """The newest ``limit`` timeline events of each room in (from, to], newest first.

        One query for all rooms: an initial /sync of a user in many rooms
        would otherwise pay a round trip per room.
        """
        out: dict[str, list[Event]] = {r: [] for r in room_ids}
        ids: list[tuple[str, str]] = []
        ask: list[str] = []
        for r in room_ids:
            recent = self._room_recent.get(r)
            if recent is not None and recent.start <= from_exclusive:
                ids.extend((r, e) for e in recent.between(from_exclusive, to_inclusive, limit))
            else:
                ask.append(r)
        if ask:
            ids.extend((r, e) for r, e in await self.db.select_in(
                "recent_events_for_rooms",
                "SELECT room_id, event_id FROM (SELECT room_id, event_id, stream_ordering, ROW_NUMBER() OVER"
                " (PARTITION BY room_id ORDER BY stream_ordering DESC) AS rn FROM events WHERE room_id IN"
                " ({in}) AND stream_ordering > ? AND stream_ordering <= ? AND outlier = 0 AND soft_failed = 0"
                " AND rejected_reason IS NULL) ranked WHERE rn <= ? ORDER BY room_id, stream_ordering DESC",
                ask, after=(from_exclusive, to_inclusive, limit),
            ))
        evs = await self.get_events(e for _, e in ids)
        for r, e in ids:
            if e in evs:
                out[r].append(evs[e])
        return out

    async def get_stream_events_for_rooms(
        self, room_ids: list[str], from_exclusive: int, to_inclusive: int, limit: int
    ) -> list[Event]:
        """The oldest ``limit`` timeline events of all the rooms together in (from, to], by stream order.

        The legacy event stream reads all of a user's rooms as one stream; one
        query per chunk of rooms, each chunk's first ``limit`` merged.
        """
        if not room_ids or limit <= 0 or to_inclusive <= from_exclusive:
            return []
        rows = await self.db.select_in(
            "stream_events_for_rooms",
            "SELECT stream_ordering, event_id FROM events WHERE room_id IN ({in}) AND stream_ordering > ?"
            " AND stream_ordering <= ? AND outlier = 0 AND soft_failed = 0 AND rejected_reason IS NULL"
            " ORDER BY stream_ordering ASC LIMIT ?",
            room_ids, after=(from_exclusive, to_inclusive, limit),
        )
        ids = [e for _, e in sorted(rows)[:limit]]
        evs = await self.get_events(ids)
        return [evs[i] for i in ids if i in evs]

    async def get_current_state_for_rooms(
        self, room_ids: list[str]
    ) -> dict[str, dict[tuple[str, str], tuple[str, Optional[str]]]]:
        """room_id -> (type, state_key) -> (event_id, membership), in one
        query per 200 rooms for those not cached. The maps are shared with
        the cache: callers must not change them."""
        out, missing = self._current_state_cache.get_many(room_ids)
        if not missing:
            return out
        tickets = {r: self._current_state_cache.ticket(r) for r in missing}
        read: dict[str, dict[tuple[str, str], tuple[str, Optional[str]]]] = {r: {} for r in missing}
        rows = await self.db.select_in(
            "current_state_for_rooms",
            "SELECT room_id, type, state_key, event_id, membership FROM current_state_events WHERE room_id IN ({in})",
            missing,
        )
        for r, t, sk, eid, m in rows:
            read[r][(t, sk)] = (eid, m)
        for r, state in read.items():
            if state:
                self._current_state_cache.set_if_unchanged(r, tickets[r], state)
        out.update(read)
        return out

    async def get_unread_counts_by_thread(self, user_id: str,
                                          room_ids: list[str]) -> dict[str, dict[str, tuple[int, int]]]:
        """room_id -> thread ID (a thread root, or ``MAIN_THREAD``) ->
        (notifications, highlights), for the threads with a row."""
        rows = await self.db.select_in(
            "unread_for_rooms",
            "SELECT room_id, thread_id, notification_count, highlight_count FROM room_unread WHERE user_id = ?"
            " AND room_id IN ({in})",
            room_ids, before=(user_id,),
        )
        out: dict[str, dict[str, tuple[int, int]]] = {}
        for r, t, n, h in rows:
            out.setdefault(r, {})[t] = (int(n), int(h))
        return out

    async def get_rooms_changed_since(self, room_ids: list[str], since: int) -> set[str]:
        """Those of the rooms with an event in their timeline after ``since``."""
        known, missing = self._room_position.get_many(room_ids)
        if missing:
            drops = self._room_position_drops
            rows = await self.db.select_in(
                "room_positions",
                "SELECT room_id, MAX(stream_ordering) FROM events WHERE outlier = 0 AND soft_failed = 0"
                " AND room_id IN ({in}) GROUP BY room_id", missing)
            found = {r: int(p) for r, p in rows if p is not None}
            for room_id in missing:
                # An event committed meanwhile is newer than what was read.
                pos = max(found.get(room_id, _NO_POSITION), self._room_position.get(room_id) or _NO_POSITION)
                known[room_id] = pos
                if drops == self._room_position_drops:
                    self._raise_room_position(room_id, pos)
        return {r for r, pos in known.items() if pos > since}

    def _raise_room_position(self, room_id: str, pos: int) -> None:
        """The room's newest timeline position is at least ``pos``."""
        self._room_position.set(room_id, max(pos, self._room_position.get(room_id) or _NO_POSITION))

    async def get_backward_extremities(self, room_id: str, limit: int = 20) -> list[str]:
        """Events referenced as prev_events in the room but not stored here."""
        rows = await self.db.execute(
            "backward_extremities",
            "SELECT DISTINCT g.prev_event_id FROM event_edges g JOIN events e ON e.event_id = g.event_id"
            " WHERE e.room_id = ? AND e.outlier = 0 AND NOT EXISTS"
            " (SELECT 1 FROM events x WHERE x.event_id = g.prev_event_id AND x.outlier = 0) LIMIT ?",
            room_id,
            limit,
        )
        return [r[0] for r in rows]

    async def get_earliest_state_group(self, room_id: str) -> Optional[int]:
        """The state before the oldest event stored for the room."""
        rows = await self.db.execute(
            "earliest_state_group",
            "SELECT prev_state_group, state_group FROM events WHERE room_id = ? AND outlier = 0"
            " AND rejected_reason IS NULL ORDER BY stream_ordering ASC LIMIT 1",
            room_id,
        )
        if not rows:
            return None
        return rows[0][0] if rows[0][0] is not None else rows[0][1]

    async def get_event_id_for_txn(self, user_id: str, device_id: str, txn_id: str) -> Optional[str]:
        rows = await self.db.execute(
            "event_for_txn",
            "SELECT event_id FROM event_txn_ids WHERE user_id = ? AND device_id = ? AND txn_id = ?",
            user_id,
            device_id,
            txn_id,
        )
        return rows[0][0] if rows else None

    async def max_depth(self, event_ids: list[str]) -> int:
        evs = await self.get_events(event_ids)
        return max((e.depth for e in evs.values()), default=0)

    # -- membership -----------------------------------------------------------
    async def get_rooms_for_user(self, user_id: str) -> dict[str, tuple[str, str]]:
        """room_id -> (membership, event_id) from current state."""
        return dict((await self._user_rooms(user_id)).rooms)

    async def get_users_sharing_rooms(self, user_id: str, among: Optional[Iterable[str]] = None) -> set[str]:
        """Users joined to a room ``user_id`` is joined to (themself included
        when joined anywhere); with ``among``, only those of these users."""
        sql = ("SELECT DISTINCT c2.state_key FROM current_state_events c1 JOIN current_state_events c2"
               " ON c2.room_id = c1.room_id AND c2.type = 'm.room.member' AND c2.membership = 'join'"
               " WHERE c1.type = 'm.room.member' AND c1.state_key = ? AND c1.membership = 'join'")
        if among is None:
            rows = await self.db.execute("users_sharing_rooms", sql, user_id)
        else:
            wanted = list(set(among))
            if not wanted:
                return set()
            rows = await self.db.select_in("users_sharing_rooms_among", sql + " AND c2.state_key IN ({in})",
                                           wanted, before=(user_id,))
        return {r[0] for r in rows}

    async def get_joined_users(self, room_id: str) -> list[str]:
        rows = await self.db.execute(
            "joined_users",
            "SELECT state_key FROM current_state_events WHERE room_id = ? AND type = 'm.room.member'"
            " AND membership = 'join'",
            room_id,
        )
        return [r[0] for r in rows]

    async def get_membership_changes_since(self, user_id: str, since: int) -> list[tuple[str, str, int]]:
        if (await self._user_rooms(user_id)).last_membership <= since:
            return []
        rows = await self.db.execute(
            "membership_changes",
            "SELECT room_id, membership, stream_ordering FROM room_memberships WHERE user_id = ?"
            " AND stream_ordering > ? ORDER BY stream_ordering",
            user_id,
            since,
        )
        return [(r, m, s) for r, m, s in rows]

    async def get_memberships_at(self, user_id: str, room_ids: list[str], pos: int) -> dict[str, str]:
        """room_id -> the user's membership as of stream position ``pos``
        (rooms where they had none are left out)."""
        if not room_ids:
            return {}
        rows = await self.db.select_in(
            "memberships_at",
            "SELECT m.room_id, m.membership FROM room_memberships m WHERE m.user_id = ? AND m.room_id IN ({in})"
            " AND m.stream_ordering = (SELECT MAX(m2.stream_ordering) FROM room_memberships m2"
            " WHERE m2.user_id = m.user_id AND m2.room_id = m.room_id AND m2.stream_ordering <= ?)",
            room_ids, before=(user_id,), after=(pos,),
        )
        return {r: m for r, m in rows}

    async def is_forgotten(self, user_id: str, room_id: str) -> bool:
        rows = await self.db.execute(
            "is_forgotten", "SELECT 1 FROM room_forgotten WHERE user_id = ? AND room_id = ?", user_id, room_id
        )
        return bool(rows)

    async def forget_room(self, user_id: str, room_id: str) -> None:
        def txn_fn(txn: Txn) -> None:
            self.invalidate_user_rooms([user_id])
            txn.execute("DELETE FROM room_forgotten WHERE user_id = ? AND room_id = ?", (user_id, room_id))
            txn.execute("INSERT INTO room_forgotten (user_id, room_id) VALUES (?, ?)", (user_id, room_id))

        try:
            await self.db.run_interaction("forget_room", txn_fn)
        finally:
            self.invalidate_user_rooms([user_id])

    async def get_forgotten_rooms(self, user_id: str) -> set[str]:
        return set((await self._user_rooms(user_id)).forgotten)

    async def get_membership_at(self, user_id: str, room_id: str, stream_ordering: int) -> Optional[tuple[str, int]]:
        """The user's membership in the room as of a stream position."""
        rows = await self.db.execute(
            "membership_at",
            "SELECT membership, stream_ordering FROM room_memberships WHERE user_id = ? AND room_id = ?"
            " AND stream_ordering <= ? ORDER BY stream_ordering DESC LIMIT 1",
            user_id,
            room_id,
            stream_ordering,
        )
        return (rows[0][0], rows[0][1]) if rows else None

    async def get_unread_counts(self, user_id: str, room_id: str) -> tuple[int, int]:
        """The user's unread counts in the room, summed over its threads."""
        rows = await self.db.execute(
            "unread_counts",
            "SELECT SUM(notification_count), SUM(highlight_count) FROM room_unread WHERE user_id = ?"
            " AND room_id = ?",
            user_id,
            room_id,
        )
        return (int(rows[0][0] or 0), int(rows[0][1] or 0)) if rows else (0, 0)

    async def get_total_unread(self, user_id: str) -> int:
        """The user's unread notifications summed over the rooms they are
        joined to and all their threads (the badge count of push
        notifications)."""
        rows = await self.db.execute(
            "total_unread",
            "SELECT SUM(u.notification_count) FROM room_unread u JOIN current_state_events c"
            " ON c.room_id = u.room_id AND c.type = 'm.room.member' AND c.state_key = u.user_id"
            " WHERE u.user_id = ? AND c.membership = 'join'", user_id)
        return int(rows[0][0] or 0) if rows else 0

    async def get_room_max_stream_ordering(self, room_id: str) -> int:
        """The newest stream position of any committed event of the room
        (outliers and soft-failed ones too), whether or not the notifier
        has announced it yet; 0 for a room with none."""
        rows = await self.db.execute("room_max_stream_ordering",
                                     "SELECT MAX(stream_ordering) FROM events WHERE room_id = ?", room_id)
        return int(rows[0][0] or 0) if rows else 0

    async def set_unread_counts(self, user_id: str, room_id: str, counts: dict[str, tuple[int, int]],
                                only_thread: Optional[str] = None, unless_after: Optional[int] = None) -> bool:
        """Replace the user's unread counts in the room by ``counts`` (thread
        ID -> (notifications, highlights); a thread left out has none). With
        ``only_thread``, only that thread's counts are replaced.

        ``unless_after``: the stream position the counts were computed up
        to. When an event of the room was stored after it, the counts may
        miss what that event added (or took away), and nothing is written:
        returns False. The check and the write are one transaction; the
        caller holds the persistence lock around it
        (``Persister.writes_paused``), so no event is being stored
        meanwhile."""
        def txn_fn(txn: Txn) -> bool:
            if unless_after is not None:
                txn.execute("SELECT MAX(stream_ordering) FROM events WHERE room_id = ?", (room_id,))
                row = txn.fetchone()
                if row is not None and row[0] is not None and int(row[0]) > unless_after:
                    return False
            if only_thread is None:
                txn.execute("DELETE FROM room_unread WHERE user_id = ? AND room_id = ?", (user_id, room_id))
                rows = counts
            else:
                txn.execute("DELETE FROM room_unread WHERE user_id = ? AND room_id = ? AND thread_id = ?",
                            (user_id, room_id, only_thread))
                rows = {only_thread: counts[only_thread]} if only_thread in counts else {}
            values = [(user_id, room_id, t, n, h) for t, (n, h) in sorted(rows.items()) if n or h]
            if values:
                txn.executemany(
                    "INSERT INTO room_unread (user_id, room_id, thread_id, notification_count, highlight_count)"
                    " VALUES (?,?,?,?,?)", values)
            return True

        return bool(await self.db.run_interaction("set_unread_counts", txn_fn))


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


#: A room with no event in its timeline (get_rooms_changed_since).
_NO_POSITION = -(2 ** 62)


class _RecentEvents:
    """A room's newest timeline events, oldest first: every one after
    ``start`` (a stream position), at most RECENT_KEPT of them."""

    __slots__ = ("start", "events")

    def __init__(self, start: int, events: list[tuple[int, str]]) -> None:
        self.start = start
        self.events = events

    def add(self, pos: int, event_id: str) -> None:
        self.events.append((pos, event_id))
        if len(self.events) > RECENT_KEPT:
            dropped, _ = self.events.pop(0)
            self.start = dropped

    def between(self, from_exclusive: int, to_inclusive: int, limit: int) -> list[str]:
        """The newest ``limit`` event IDs in (from, to], newest first."""
        out: list[str] = []
        for pos, event_id in reversed(self.events):
            if len(out) >= limit or pos <= from_exclusive:
                break
            if pos <= to_inclusive:
                out.append(event_id)
        return out


#: Timeline events kept per room for incremental /sync.
RECENT_KEPT = 64


@dataclass(frozen=True)
class _UserRooms:
    rooms: dict[str, tuple[str, str]]
    last_membership: int
    forgotten: frozenset[str]


def _members_changed(item: PersistItem) -> list[str]:
    """The users whose current membership or membership log the event's
    persisting changes."""
    ev = item.event
    users = [sk for (t, sk) in item.current_state_delta if t == "m.room.member"]
    if ev.type == "m.room.member" and ev.state_key is not None:
        users.append(ev.state_key)
    return users
