"""Relationships between events: the index behind the relations API, the
threads list and the bundled aggregations.

Spec: client-server-api "Forming relationships between events" (a child's
``m.relates_to`` names its parent with ``rel_type`` and ``event_id``),
"Relationships API", "Threading", "Event replacements", "Reference
relations", "Threaded read receipts" (the thread an event is in, for
receipts and unread counts: ``thread_of_content_txn``, ``threads_of``).

Event content is sealed at rest, so SQL cannot look inside it: every
timeline event with a relation gets a row in ``event_relations`` in the
transaction that stores it (a hook of the persister, see
``persist_txn_hook``), and thread replies keep ``event_threads`` (each
thread's latest event) current. Rejected and soft-failed events are never
indexed, nor are events already redacted. An event whose content is
removed (a redaction, erasure, retention, a purge) loses its row in the
transaction that removes the content (``forget_txn``); redaction strips
``m.relates_to`` in every room version, so a redacted child no longer
relates to anything.

Events stored before the index existed are indexed by a background pass.

Reads for bundled aggregations are on the path of every /sync, so two
things keep them cheap: the set of rooms that have any relation at all
(read at start; the events of other rooms then cost nothing), and a cache
of each parent's aggregation rows (empty when it has no children). A write for a parent forgets its entry in
its transaction and again after commit, and a read only keeps what it read
when no write came in between (``_gen``); removals of content bump the
events store's ``content_epoch``, which empties the parent cache.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Iterable, NamedTuple, Optional

from zhome.storage.database import Database, Txn, in_chunks
from zhome.storage.events_pass import EventsPass
from zhome.storage.lru import LruCache
from zhome.storage.redactions import redacted_in_room_txn

if TYPE_CHECKING:
    from zhome.rooms.events import Event
    from zhome.storage.events import EventsStore, PersistItem

logger = logging.getLogger(__name__)

THREAD = "m.thread"
REPLACE = "m.replace"
REFERENCE = "m.reference"
ANNOTATION = "m.annotation"
#: Event IDs and relation types longer than this are no relation (event IDs
#: are at most 255 bytes; the spec's namespaced identifiers fit too).
MAX_ID_LEN = 255
#: References bundled with one parent at most (the oldest first).
MAX_BUNDLED_REFERENCES = 1000
#: How deep ``recurse`` follows relations (the spec asks for at least 3),
#: and how many relations are followed to find an event's thread.
MAX_RECURSION = 3
#: The thread ID of the main timeline: every event in no thread, thread
#: roots included (client-server-api "Threaded read receipts").
MAIN_THREAD = "main"


def relation_of(content: Any) -> Optional[tuple[str, str]]:
    """(rel_type, parent event ID) of an event's content when its
    ``m.relates_to`` has both; a reply's ``m.in_reply_to`` alone is none."""
    if not isinstance(content, dict):
        return None
    rel = content.get("m.relates_to")
    if not isinstance(rel, dict):
        return None
    rel_type, parent = rel.get("rel_type"), rel.get("event_id")
    if not isinstance(rel_type, str) or not isinstance(parent, str):
        return None
    if not rel_type or len(rel_type) > MAX_ID_LEN or not parent.startswith("$") or len(parent) > MAX_ID_LEN:
        return None
    return rel_type, parent


def served_relation(ev: "Event") -> Optional[tuple[str, str]]:
    """The relation of the event as it is served (a redacted one has none)."""
    if ev.internal.get("redacted_by"):
        return None
    return relation_of(ev.content)


def _threads_via_parents_txn(txn: Txn, pending: dict[str, tuple[str, str]], hops: int) -> dict[str, str]:
    """Event ID -> thread for events whose own relation (not m.thread)
    points at a parent (``pending``: event ID -> (room ID, parent ID)):
    the thread the parent is in, found by following the stored relations
    from it, at most ``hops`` of them. One query per hop for all events."""
    out: dict[str, str] = {}
    for _ in range(hops):
        if not pending:
            break
        rels: dict[str, tuple[str, str, str]] = {}
        for chunk, qs in in_chunks(sorted({parent for _, parent in pending.values()})):
            txn.execute(f"SELECT event_id, room_id, rel_type, parent_id FROM event_relations WHERE event_id IN ({qs})",
                        tuple(chunk))
            for event_id, room_id, rel_type, parent_id in txn.fetchall():
                rels[event_id] = (room_id, rel_type, parent_id)
        further: dict[str, tuple[str, str]] = {}
        for event_id, (room_id, parent) in pending.items():
            row = rels.get(parent)
            if row is None or row[0] != room_id:
                out[event_id] = MAIN_THREAD
            elif row[1] == THREAD:
                out[event_id] = row[2]
            else:
                further[event_id] = (room_id, row[2])
        pending = further
    out.update((event_id, MAIN_THREAD) for event_id in pending)
    return out


def thread_of_content_txn(txn: Txn, room_id: str, content: Any) -> str:
    """The thread an event with this content is in, for receipts and unread
    counts (client-server-api "Threaded read receipts"): the root named by
    an m.thread relation; else, for an event relating to another (a
    reaction, an edit, a reference), the thread of the event it relates
    to, following relations for at most ``MAX_RECURSION`` hops in all;
    else the main timeline. A thread root is in the main timeline, as is
    what relates to it other than by m.thread."""
    rel = relation_of(content)
    if rel is None:
        return MAIN_THREAD
    rel_type, parent = rel
    if rel_type == THREAD:
        return parent
    return _threads_via_parents_txn(txn, {"": (room_id, parent)}, MAX_RECURSION - 1)[""]


class AggRow(NamedTuple):
    """One row of a parent's aggregation data."""

    rel_type: str
    room_id: str
    sender: str
    event_id: str
    #: m.thread: the stream ordering of this sender's latest reply;
    #: m.replace: origin_server_ts (every row is a latest edit);
    #: m.reference: the stream ordering.
    position: int
    #: m.thread: how many replies of the thread this sender sent; else 1.
    number: int


# The candidates for the most recent valid replacement of each parent of
# a chunk: the replacements by the parent's own sender, in its room, with
# its type, of a parent that is no state event, that share the latest
# origin_server_ts (the spec's tie-break on event_id is ``latest_edit``'s,
# as SQL text order depends on the collation). Whether the parent is itself
# an edit is ``replaceable``'s to say.
_LATEST_EDITS_SQL = (
    "SELECT parent_id, 'm.replace', room_id, sender, event_id, origin_server_ts, 1 FROM ("
    " SELECT r.parent_id, r.room_id, r.sender, r.event_id, r.origin_server_ts,"
    " RANK() OVER (PARTITION BY r.parent_id ORDER BY r.origin_server_ts DESC) AS rk"
    " FROM event_relations r JOIN events o ON o.event_id = r.parent_id"
    " WHERE r.parent_id IN ({qs}) AND r.rel_type = 'm.replace' AND r.edit_ok = 1 AND o.room_id = r.room_id"
    " AND o.sender = r.sender AND o.type = r.type AND o.state_key IS NULL) e WHERE rk = 1"
)

# One statement for a chunk of parents (its IN list three times): per
# (parent, sender) of a thread the count and latest reply; the latest
# edits (as above); the oldest references.
_AGGREGATE_SQL = (
    "SELECT parent_id, 'm.thread', room_id, sender, event_id, stream_ordering, n FROM ("
    " SELECT parent_id, room_id, sender, event_id, stream_ordering,"
    " COUNT(*) OVER (PARTITION BY parent_id, room_id, sender) AS n,"
    " ROW_NUMBER() OVER (PARTITION BY parent_id, room_id, sender ORDER BY stream_ordering DESC) AS rn"
    " FROM event_relations WHERE parent_id IN ({qs}) AND rel_type = 'm.thread') t WHERE rn = 1"
    " UNION ALL "
    + _LATEST_EDITS_SQL +
    " UNION ALL"
    " SELECT parent_id, 'm.reference', room_id, sender, event_id, stream_ordering, 1 FROM ("
    " SELECT parent_id, room_id, sender, event_id, stream_ordering,"
    " ROW_NUMBER() OVER (PARTITION BY parent_id ORDER BY stream_ordering) AS rn"
    " FROM event_relations WHERE parent_id IN ({qs}) AND rel_type = 'm.reference') f WHERE rn <= ?"
)


def replaceable(relation: Optional[tuple[str, str]]) -> bool:
    """Whether an event whose own relation is ``relation`` (as
    ``relation_of`` or ``served_relation`` give it) can be the original of
    a replacement: an edit cannot be edited (spec "Validity of replacement
    events")."""
    return relation is None or relation[0] != REPLACE


def latest_edit(rows: Iterable[AggRow]) -> Optional[AggRow]:
    """The most recent valid replacement among one parent's m.replace rows
    (as ``aggregation_rows`` and ``latest_edits_txn`` give them: they share
    the latest origin_server_ts): the lexicographically largest event ID
    (spec "Server-side aggregation of m.replace relationships"). The one
    rule for the bundled aggregation and the search index."""
    edits = [r for r in rows if r.rel_type == REPLACE]
    return max(edits, key=lambda r: r.event_id) if edits else None


def _redacted_txn(txn: Txn, event_id: str, room_id: str) -> bool:
    """Whether a redaction in the room has already removed the event's content."""
    return redacted_in_room_txn(txn, event_id, room_id) is not None


class RelationsStore:
    def __init__(self, db: Database, events: "EventsStore") -> None:
        self.db = db
        self.events = events
        # parent event ID -> its aggregation rows (empty: no children).
        self._parents: LruCache[str, tuple[AggRow, ...]] = LruCache(
            20000, max_weight=200_000, weigh=lambda rows: len(rows) + 1)
        # The rooms where some event relates to another, once known (the
        # index complete and read at start); None until then. A room
        # written meanwhile is in _rooms_added too, so the set read at
        # start cannot miss it.
        self._rooms_with: Optional[set[str]] = None
        self._rooms_added: Optional[set[str]] = set()
        self._gen = 0
        self._epoch = events.content_epoch
        #: Indexes the events stored before the index; once complete, which
        #: rooms have relations is read.
        self.backlog = EventsPass(
            db, "event_relations", self._backfill_txn, logger=logger,
            finished="relations between events: index complete",
            failed="indexing the relations of stored events failed", on_complete=self._load_rooms)
        self.start, self.stop = self.backlog.start, self.backlog.stop

    # -- written with the events ----------------------------------------------------------
    def persist_txn_hook(self, txn: Txn, item: "PersistItem") -> None:
        """Runs in the transaction of every timeline event the persister
        writes (``Persister.txn_hooks``; outliers never come here)."""
        ev = item.event
        if item.outlier or ev.rejected_reason:
            return
        redacts = ev.redacts
        # As EventsStore.persist_txn records the redaction (then the
        # target is served redacted and its m.relates_to is gone).
        if redacts and item.apply_redaction and (item.backfilled or not item.soft_failed):
            self.forget_txn(txn, [redacts], room_id=ev.room_id)
            self._changed_txn(txn, ev.room_id, None)
        if item.soft_failed:
            return
        self.index_txn(txn, ev.event_id, ev.room_id, ev.type, ev.state_key, ev.sender, item.stream_ordering,
                       ev.origin_server_ts, ev.content)

    def index_txn(self, txn: Txn, event_id: str, room_id: str, etype: str, state_key: Optional[str], sender: str,
                  stream_ordering: int, ts: Any, content: Any) -> bool:
        """Index the event's relation, if it has one; returns whether it did."""
        rel = relation_of(content)
        if rel is None:
            return False
        rel_type, parent = rel
        if parent == event_id or _redacted_txn(txn, event_id, room_id):
            return False
        edit_ok = rel_type == REPLACE and state_key is None and (
            etype == "m.room.encrypted" or isinstance(content.get("m.new_content"), dict))
        txn.execute("INSERT INTO event_relations (event_id, room_id, parent_id, rel_type, type, sender,"
                    " stream_ordering, origin_server_ts, edit_ok) VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                    (event_id, room_id, parent, rel_type, etype, sender, stream_ordering,
                     ts if isinstance(ts, int) else 0, int(edit_ok)))
        if rel_type == THREAD:
            txn.execute("INSERT INTO event_threads (room_id, root_id, latest_event_id, latest_stream_ordering)"
                        " VALUES (?,?,?,?) ON CONFLICT (room_id, root_id) DO UPDATE SET"
                        " latest_event_id = excluded.latest_event_id,"
                        " latest_stream_ordering = excluded.latest_stream_ordering"
                        " WHERE excluded.latest_stream_ordering > event_threads.latest_stream_ordering",
                        (room_id, parent, event_id, stream_ordering))
        self._changed_txn(txn, room_id, parent)
        return True

    def _changed_txn(self, txn: Txn, room_id: str, parent: Optional[str]) -> None:
        """A relation of ``parent`` (None: of some parent in the room) is
        being written or removed: forget what is cached now and again after
        commit, and keep no read that was in flight meanwhile."""
        def forget() -> None:
            self._gen += 1
            if parent is None:
                self._parents.clear()
            else:
                self._parents.pop(parent)
            # Saying a room has relations when it has none only costs a query.
            if self._rooms_added is not None:
                self._rooms_added.add(room_id)
            if self._rooms_with is not None:
                self._rooms_with.add(room_id)

        forget()
        txn.call_after_commit(forget)

    @staticmethod
    def forget_txn(txn: Txn, event_ids: list[str], room_id: Optional[str] = None,
                   roots_gone: bool = False) -> None:
        """The events' content is gone (or the events are): they relate to
        nothing any more. ``room_id``: only where they are in that room.
        ``roots_gone``: they leave the timeline, and with them the threads
        they started. Callers bump the events store's content_epoch (every
        removal of content does), which empties the parent cache."""
        threads: set[tuple[str, str]] = set()
        for chunk, qs in in_chunks(event_ids):
            args = tuple(chunk)
            where = f"event_id IN ({qs})" + (" AND room_id = ?" if room_id is not None else "")
            if room_id is not None:
                args += (room_id,)
            txn.execute(f"SELECT room_id, parent_id FROM event_relations WHERE {where} AND rel_type = 'm.thread'",
                        args)
            threads.update((r, p) for r, p in txn.fetchall())
            txn.execute(f"DELETE FROM event_relations WHERE {where}", args)
            if roots_gone:
                txn.execute(f"SELECT room_id, root_id FROM event_threads WHERE root_id IN ({qs})", tuple(chunk))
                gone = txn.fetchall()
                txn.execute(f"DELETE FROM event_threads WHERE root_id IN ({qs})", tuple(chunk))
                threads.difference_update((r, p) for r, p in gone)
        for room, root in sorted(threads):
            txn.execute("SELECT event_id, stream_ordering FROM event_relations WHERE parent_id = ? AND room_id = ?"
                        " AND rel_type = 'm.thread' ORDER BY stream_ordering DESC LIMIT 1", (root, room))
            row = txn.fetchone()
            if row is None:
                txn.execute("DELETE FROM event_threads WHERE room_id = ? AND root_id = ?", (room, root))
            else:
                txn.execute("UPDATE event_threads SET latest_event_id = ?, latest_stream_ordering = ?"
                            " WHERE room_id = ? AND root_id = ?", (row[0], row[1], room, root))

    # -- reading: bundled aggregations ------------------------------------------------------
    async def aggregation_rows(self, parents: list[tuple[str, str]]) -> dict[str, tuple[AggRow, ...]]:
        """(event ID, room ID) of parents -> their aggregation rows, for
        those that have any. Rows of children in another room than their
        parent are left out (such a relation is invalid)."""
        if self._epoch != self.events.content_epoch:
            self._epoch = self.events.content_epoch
            self._parents.clear()
        out: dict[str, tuple[AggRow, ...]] = {}
        todo: dict[str, str] = {}
        rooms_with = self._rooms_with
        for event_id, room_id in parents:
            if rooms_with is not None and room_id not in rooms_with:
                continue
            cached = self._parents.get(event_id)
            if cached is not None:
                if cached:
                    out[event_id] = cached
                continue
            todo[event_id] = room_id
        if not todo:
            return out
        gen, epoch = self._gen, self._epoch

        def txn_fn(txn: Txn) -> dict[str, list[AggRow]]:
            found: dict[str, list[AggRow]] = {e: [] for e in todo}
            for chunk, qs in in_chunks(list(todo)):
                txn.execute(_AGGREGATE_SQL.format(qs=qs), (*chunk, *chunk, *chunk, MAX_BUNDLED_REFERENCES))
                for parent, rel_type, room_id, sender, event_id, position, n in txn.fetchall():
                    if room_id == todo.get(parent):
                        found[parent].append(AggRow(rel_type, room_id, sender, event_id, int(position), int(n)))
            return found

        found = await self.db.run_interaction("relations_aggregate", txn_fn)
        keep = self._gen == gen and self.events.content_epoch == epoch
        for parent, rows in found.items():
            value = tuple(sorted(rows, key=lambda r: (r.rel_type, r.position, r.event_id)))
            if keep:
                self._parents.set(parent, value)
            if value:
                out[parent] = value
        return out

    @staticmethod
    def latest_edits_txn(txn: Txn, parents: list[tuple[str, str]]) -> dict[str, str]:
        """(event ID, room ID) of events -> the event ID of the most recent
        valid replacement of each that has one (``latest_edit``; the caller
        checks ``replaceable`` on the event's own relation and that it is
        not redacted). Read from the index, not the cache: for writers."""
        rooms = dict(parents)
        out: dict[str, str] = {}
        for chunk, qs in in_chunks(list(rooms)):
            txn.execute(_LATEST_EDITS_SQL.format(qs=qs), tuple(chunk))
            found: dict[str, list[AggRow]] = {}
            for parent, rel_type, room_id, sender, event_id, position, n in txn.fetchall():
                if room_id == rooms.get(parent):
                    found.setdefault(parent, []).append(AggRow(rel_type, room_id, sender, event_id, int(position),
                                                               int(n)))
            for parent, rows in found.items():
                best = latest_edit(rows)
                if best is not None:
                    out[parent] = best.event_id
        return out

    async def _load_rooms(self) -> None:
        """Read which rooms have relations (once every event is indexed):
        from then on the events of other rooms are answered without a query."""
        rows = await self.db.execute(
            "relations_rooms", "SELECT r.room_id FROM rooms r"
            " WHERE EXISTS (SELECT 1 FROM event_relations e WHERE e.room_id = r.room_id)")
        added = self._rooms_added or set()
        self._rooms_with = {r[0] for r in rows} | added
        self._rooms_added = None

    # -- reading: the relations API and the threads list ------------------------------------
    async def children(self, room_id: str, parent_id: str, rel_type: Optional[str], event_type: Optional[str],
                       after: int, upto: int, backwards: bool, limit: int,
                       depth: int = 1) -> list[tuple[str, int]]:
        """(event ID, stream ordering) of the events in the room relating
        to ``parent_id`` (to depth ``depth``, through events that match the
        filters too) with a position in (after, upto], newest first when
        ``backwards``; at most ``limit``."""
        filters, fargs = "", []
        if rel_type is not None:
            filters += " AND {t}rel_type = ?"
            fargs.append(rel_type)
        if event_type is not None:
            filters += " AND {t}type = ?"
            fargs.append(event_type)
        order = "DESC" if backwards else "ASC"
        if depth <= 1:
            sql = ("SELECT event_id, stream_ordering FROM event_relations WHERE parent_id = ? AND room_id = ?"
                   + filters.format(t="") + " AND stream_ordering > ? AND stream_ordering <= ?"
                   f" ORDER BY stream_ordering {order} LIMIT ?")
            args: list[Any] = [parent_id, room_id, *fargs, after, upto, limit]
        else:
            sql = ("WITH RECURSIVE tree(event_id, depth) AS ("
                   " SELECT event_id, 1 FROM event_relations WHERE parent_id = ? AND room_id = ?"
                   + filters.format(t="") +
                   " UNION ALL"
                   " SELECT r.event_id, tree.depth + 1 FROM tree JOIN event_relations r ON r.parent_id = tree.event_id"
                   " WHERE tree.depth < ? AND r.room_id = ?" + filters.format(t="r.") + ")"
                   " SELECT DISTINCT r.event_id, r.stream_ordering FROM tree"
                   " JOIN event_relations r ON r.event_id = tree.event_id"
                   " WHERE r.stream_ordering > ? AND r.stream_ordering <= ?"
                   f" ORDER BY r.stream_ordering {order} LIMIT ?")
            args = [parent_id, room_id, *fargs, depth, room_id, *fargs, after, upto, limit]
        rows = await self.db.execute("relations_children", sql, *args)
        return [(e, int(so)) for e, so in rows]

    async def threads(self, room_id: str, upto: int, limit: int,
                      participant: Optional[str] = None) -> list[tuple[str, int]]:
        """(root event ID, latest reply's stream ordering) of the room's
        threads whose latest reply is at or before ``upto``, latest first;
        with ``participant``, only threads they started or replied to."""
        sql = "SELECT t.root_id, t.latest_stream_ordering FROM event_threads t WHERE t.room_id = ?" \
              " AND t.latest_stream_ordering <= ?"
        args: list[Any] = [room_id, upto]
        if participant is not None:
            sql += (" AND (EXISTS (SELECT 1 FROM event_relations r WHERE r.parent_id = t.root_id"
                    " AND r.room_id = t.room_id AND r.rel_type = 'm.thread' AND r.sender = ?)"
                    " OR EXISTS (SELECT 1 FROM events e WHERE e.event_id = t.root_id AND e.sender = ?))")
            args += [participant, participant]
        rows = await self.db.execute("relations_threads", sql + " ORDER BY t.latest_stream_ordering DESC LIMIT ?",
                                     *args, limit)
        return [(e, int(so)) for e, so in rows]

    async def threads_of(self, events: "list[Event]") -> dict[str, str]:
        """Event ID -> the thread each event is in (``thread_of_content_txn``):
        a thread root's event ID or ``MAIN_THREAD``. A redacted event has
        lost its relation and is in the main timeline. Only events with
        a relation other than m.thread cost queries: one per hop for all."""
        out: dict[str, str] = {}
        follow: dict[str, tuple[str, str]] = {}
        for ev in events:
            rel = served_relation(ev)
            if rel is None:
                out[ev.event_id] = MAIN_THREAD
            elif rel[0] == THREAD:
                out[ev.event_id] = rel[1]
            else:
                follow[ev.event_id] = (ev.room_id, rel[1])
        if follow:
            out.update(await self.db.run_interaction("threads_of", _threads_via_parents_txn, follow,
                                                     MAX_RECURSION - 1))
        return out

    @staticmethod
    def stored_threads_txn(txn: Txn, event_ids: list[str]) -> dict[str, str]:
        """Event ID -> thread root for those of the stored ``event_ids`` that
        are in a thread (by the index: run before ``forget_txn`` drops
        their rows); events in the main timeline are left out."""
        out: dict[str, str] = {}
        follow: dict[str, tuple[str, str]] = {}
        for chunk, qs in in_chunks(event_ids):
            txn.execute(f"SELECT event_id, room_id, rel_type, parent_id FROM event_relations WHERE event_id IN ({qs})",
                        tuple(chunk))
            for event_id, room_id, rel_type, parent in txn.fetchall():
                if rel_type == THREAD:
                    out[event_id] = str(parent)
                else:
                    follow[event_id] = (room_id, parent)
        if follow:
            out.update((e, t) for e, t in _threads_via_parents_txn(txn, follow, MAX_RECURSION - 1).items()
                       if t != MAIN_THREAD)
        return out

    async def relation_type_of(self, event_id: str) -> Optional[str]:
        """The rel_type of the event's own relation (None: it has none)."""
        rows = await self.db.execute("relation_type_of", "SELECT rel_type FROM event_relations WHERE event_id = ?",
                                     event_id)
        return rows[0][0] if rows else None

    async def relations_by(self, room_id: str, parent_id: str, rel_type: str, sender: str,
                           event_type: str) -> list[str]:
        """IDs of the events of ``sender`` of that type relating to the parent that way."""
        rows = await self.db.execute(
            "relations_by", "SELECT event_id FROM event_relations WHERE parent_id = ? AND rel_type = ?"
            " AND room_id = ? AND sender = ? AND type = ?", parent_id, rel_type, room_id, sender, event_type)
        return [r[0] for r in rows]

    # -- events stored before the index -----------------------------------------------------
    async def complete(self) -> bool:
        """Whether every stored event is indexed (the background pass is done)."""
        return await self.backlog.complete()

    def _backfill_txn(self, txn: Txn, pos: int, limit: int) -> tuple[int, int]:
        """Index up to ``limit`` events in stream order after ``pos``."""
        txn.execute("SELECT stream_ordering, event_id, room_id, type, state_key, sender, origin_server_ts, json,"
                    " sealed FROM events WHERE stream_ordering > ? AND rejected_reason IS NULL AND outlier = 0"
                    " AND soft_failed = 0 ORDER BY stream_ordering LIMIT ?", (pos, limit))
        rows = txn.fetchall()
        for so, event_id, room_id, etype, state_key, sender, ts, stored, sealed in rows:
            pos = max(pos, int(so))
            if sealed is None and '"m.relates_to"' not in stored:
                continue  # plain JSON without a relation: nothing to open
            content = self.events.open_pdu(event_id, stored, sealed).get("content")
            self.index_txn(txn, event_id, room_id, etype, state_key, sender, int(so), ts, content)
        return pos, len(rows)
