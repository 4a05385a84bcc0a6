"""The full-text index behind server-side search, blind to the words it holds.

Spec: client-server-api "Server Side Search" (``POST /search``, category
``room_events``, keys ``content.body``, ``content.name``,
``content.topic``). The endpoint is ``zhome/client/search.py``; this module
is the index and its queries.

Encryption at rest. Event content is sealed (``zhome/storage/at_rest.py``),
so a plaintext full-text index would hand the words of every message to
anyone holding the database file. Instead:

1. the text is normalised: NFKC, case-folded (full Unicode case folding),
   NFKC again, then split into words on word boundaries (an approximation
   of Unicode's default word boundaries, UAX #29, with the standard
   library: runs of letters, digits, combining marks and connector
   punctuation, joined across an apostrophe or full stop between two of
   them and a comma between digits; every CJK ideograph and Hiragana
   character is a word of its own, as UAX #29 has it, so text written
   without spaces is still searchable; Katakana, Hangul and scripts such as
   Thai stay in runs, which UAX #29 also does without a dictionary);
2. each word becomes an opaque token: the first 64 bits of
   HMAC-SHA256(key, word), written with the letters a-p (so neither
   engine's tokenizer can read a number or split it);
3. the tokens, space separated and in word order, go into SQLite FTS5 (an
   external-content table whose content is the tokens themselves) or a
   PostgreSQL ``tsvector`` made by ``to_tsvector('simple', ...)`` (no
   stemming, no stop words) with a GIN index.

Search terms go through the same steps, so a query is a set of tokens:
every word must match (AND); words written together without a space in the
query ("e-mail", a run of ideographs) and words in double quotes must
match as a phrase, in order and adjacent. Ranking: FTS5 ``bm25()`` and
PostgreSQL ``ts_rank``. Because only whole words are tokens, there is no
prefix matching, no stemming ("run" does not find "running"), no fuzzy or
accent-insensitive matching: each would need the plain words.

The key is ``Sealer.named_key("event-search-index")``: it lives in the key
store, never in the database, so the index alone gives away neither the
words nor a way to test guesses against it. It is used whether or not
encryption at rest is on (``encryption.enabled``: the key store exists
either way), so turning it on or off never re-indexes. Without a key
store at all (tools and unit tests that open a database bare) the key is
32 zero bytes: the same format, but guesses can be tested. What the index
does show to someone with the database file alone: which events share a
word (tokens are deterministic), word counts and frequencies.

Events that are rejected, soft-failed or outliers are not indexed. A
redacted event loses its row in the transaction that applies the
redaction; erasure, retention and purges remove the rows with the content
(``zhome/storage/privacy.py``), so the index never outlives the content
(the data keys of erased events being destroyed is not enough: the index
key is not destroyed). On SQLite, rows deleted from FTS5 can linger in its
segments until they are merged: where SQLite offers FTS5 ``secure-delete``
(3.42 and later) it is switched on at start-up, elsewhere ``scrub()`` (run
by erasure, not by retention) merges the whole index into one segment,
which rewrites all of it while holding the write lock. On PostgreSQL
erasure vacuums ``event_search``. Until then what lingers are tokens,
which only the index key turns back into guesses.

Edits. A search sees each message as it reads now: by the words of its
latest valid replacement (client-server-api "Event replacements": same
room, sender and type, no state key, an original that is no edit itself,
an ``m.new_content``; the most recent by ``origin_server_ts``, then the
largest event ID). Which edit that is comes from the relations index
(``RelationsStore.latest_edits_txn``, with ``latest_edit`` and
``replaceable``: the rule the bundled aggregation uses), and its
``m.new_content`` replaces the original's text, so a hit is the original
event, served with the edit bundled (``zhome/client/aggregations.py``).
An edit (any event with an ``m.replace`` relation, valid or not) has no
row of its own; an invalid one changes nothing. The original's row names
the edit whose words it holds (``edit_id``; kept, with no tokens, when the
edit's new content has no text), so that:

* a new edit that is now the latest rewrites the original's row (one
  read of the relations index and one update, for edits only; a message
  sent here needs no look at edits, as nothing can name it before it
  exists, while one from elsewhere may arrive after its edits);
* a redacted edit, or one whose content erasure, retention or a purge
  removed (``forget_txn`` empties the rows it gave words to at once,
  ``reindex_txn`` rewrites them once the relations index forgot it), gives
  the original back the words of the edit before it, or its own;
* a redacted original loses its row, edits or not.

Whoever searches must be able to see the edit as well as the original
(``zhome/client/search.py``): one who left before the edit does not find
the message by words it gained after.

Events stored before the index existed are indexed by a bounded background
pass (``start()``), as ``zhome/storage/event_media.py`` does; it reads
edits from the relations index, so it waits until that index is complete,
and then gives what indexing each event as it came would have given.
Migration 0037 rebuilt the index this way (rows made before it indexed
edits as events of their own).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import re
import threading
import unicodedata
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

from zhome.storage.database import ENGINE_SQLITE, Database, Txn, in_chunks
from zhome.storage.events_pass import EventsPass
from zhome.storage.redactions import REDACTED_IN_ROOM
from zhome.storage.relations import REPLACE, relation_of, replaceable

if TYPE_CHECKING:
    from zhome.storage.at_rest import Sealer
    from zhome.storage.events import EventsStore, PersistItem
    from zhome.storage.relations import RelationsStore

logger = logging.getLogger(__name__)

#: Event type -> (search key, content field holding its text).
INDEXED_TYPES = {
    "m.room.message": ("content.body", "body"),
    "m.room.name": ("content.name", "name"),
    "m.room.topic": ("content.topic", "topic"),
}
SEARCH_KEYS = tuple(k for k, _ in INDEXED_TYPES.values())
KEY_NAME = "event-search-index"
#: Words in one search term at most (each is a term of the query).
MAX_QUERY_WORDS = 64
#: Rooms in one statement at most (each is a parameter or four: both
#: engines limit them); more rooms take more statements, merged.
ROOMS_PER_QUERY = 2000
#: A room's bound that is no bound (the whole room is searched).
UNBOUNDED = 2 ** 62
#: How long the background pass waits for the relations index between looks.
RELATIONS_WAIT_S = 0.5

_JOINER = r"(?:['\u2019.]|(?<=\d),(?=\d))"
# Characters that are each a word of their own (UAX #29 joins none of
# them): Hiragana, CJK ideographs (with extensions and compatibility forms).
_SOLO = "\u3040-\u309f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
_LETTERS = "abcdefghijklmnop"


@functools.lru_cache(maxsize=1)
def _patterns() -> tuple[re.Pattern[str], re.Pattern[str]]:
    """(words, pieces of a word). Python's ``\\w`` leaves out combining
    marks (Devanagari's vowel signs and virama, say), which belong inside
    words: they are added from the Unicode database (planes 0, 1 and the
    variation selectors of plane 14 hold them all), once per process."""
    cat = unicodedata.category
    marks = [cp for r in (range(0x300, 0x20000), range(0xE0100, 0xE01F0)) for cp in r if cat(chr(cp))[0] == "M"]
    spans: list[tuple[int, int]] = []
    for cp in marks:
        if spans and spans[-1][1] == cp - 1:
            spans[-1] = (spans[-1][0], cp)
        else:
            spans.append((cp, cp))
    mark_class = "".join(f"\\U{a:08x}-\\U{b:08x}" for a, b in spans)
    char = "[\\w" + mark_class + "]"
    word = re.compile(char + "+(?:" + _JOINER + char + "+)*")
    pieces = re.compile("[" + _SOLO + "][" + mark_class + "]*|[^" + _SOLO + "]+")
    return word, pieces


def normalise(text: str) -> str:
    """NFKC, case-folded, NFKC again (case folding can undo the normal form)."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())


def _words_with_spans(text: str) -> list[tuple[str, int, int]]:
    out: list[tuple[str, int, int]] = []
    word_re, pieces_re = _patterns()
    for m in word_re.finditer(text):
        word = m.group(0)
        for p in pieces_re.finditer(word):
            piece = p.group(0).strip("_")
            if piece:
                out.append((piece, m.start() + p.start(), m.start() + p.end()))
    return out


def words(text: str) -> list[str]:
    """The words of ``text``, normalised, in order."""
    return [w for w, _, _ in _words_with_spans(normalise(text))]


@dataclass(frozen=True)
class Query:
    """A parsed search term: phrases of words (each phrase must match in
    order and adjacent, all phrases must match)."""
    phrases: tuple[tuple[str, ...], ...]

    @property
    def words(self) -> list[str]:
        return list(dict.fromkeys(w for p in self.phrases for w in p))


def parse_query(term: str) -> Query:
    """Phrases: a double-quoted part, or the words of a run of text without
    whitespace ("e-mail" is the phrase "e mail")."""
    text = normalise(term)
    phrases: list[tuple[str, ...]] = []
    for i, part in enumerate(text.split('"')):
        if i % 2:
            ws = tuple(w for w, _, _ in _words_with_spans(part))
            if ws:
                phrases.append(ws)
            continue
        for chunk in part.split():
            ws = tuple(w for w, _, _ in _words_with_spans(chunk))
            if ws:
                phrases.append(ws)
    return Query(tuple(dict.fromkeys(phrases)))


def token(key: bytes, word: str) -> str:
    # surrogatepass: a lone surrogate in received JSON must not fail the event's persistence.
    digest = hmac.new(key, word.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()[:8]
    return "".join(_LETTERS[b >> 4] + _LETTERS[b & 15] for b in digest)


def text_of(ev_type: str, content: Any) -> Optional[tuple[str, str]]:
    """(search key, text) of an event (or of an edit's ``m.new_content``,
    which replaces its original's content) that is searchable, else None."""
    spec = INDEXED_TYPES.get(ev_type)
    if spec is None or not isinstance(content, dict):
        return None
    key, field = spec
    value = content.get(field)
    if not isinstance(value, str) or not value:
        return None
    return key, value


@dataclass(frozen=True)
class Hit:
    event_id: str
    room_id: str
    sender: str
    stream_ordering: int
    rank: float
    #: The edit whose words the event was found by (None: its own).
    edit_id: Optional[str] = None


@dataclass(frozen=True)
class _Stored:
    """A stored event as the index reads it."""
    event_id: str
    room_id: str
    sender: str
    type: str
    state_key: Optional[str]
    stream_ordering: int
    content: Any


@dataclass(frozen=True)
class _Row:
    event: _Stored
    key: str
    tokens: str
    edit_id: Optional[str]


class EventSearchStore:
    def __init__(self, db: Database, events: "EventsStore", sealer: Optional["Sealer"],
                 relations: "RelationsStore") -> None:
        self.db = db
        self.events = events
        self.sealer = sealer
        #: Its persist hook runs before this store's: an edit is in it when ours runs.
        self.relations = relations
        self._key: Optional[bytes] = None
        self._key_lock = threading.Lock()
        #: Indexes the events stored before the index; edits are read from
        #: the relations index, so it waits until that is complete.
        self.backlog = EventsPass(
            db, "event_search", self._backfill_txn, logger=logger,
            finished="search index: events stored before it are indexed",
            failed="indexing stored events for search failed; older events are not searchable",
            prepare=self.enable_secure_delete, ready=relations.complete, ready_wait_s=RELATIONS_WAIT_S)
        self.start, self.stop = self.backlog.start, self.backlog.stop
        #: Whether deleted FTS5 rows are removed from its segments at once.
        self.secure_delete = self.db.engine != ENGINE_SQLITE

    # -- tokens ---------------------------------------------------------------------------
    def key(self) -> bytes:
        """The index key (from the key store; thread-safe, read once)."""
        if self._key is None:
            with self._key_lock:
                if self._key is None:
                    self._key = self.sealer.named_key(KEY_NAME) if self.sealer is not None else b"\x00" * 32
        return self._key

    def tokens(self, text: str) -> list[str]:
        k = self.key()
        return [token(k, w) for w in words(text)]

    # -- written with the events ------------------------------------------------------------
    def persist_txn_hook(self, txn: Txn, item: "PersistItem") -> None:
        """Runs in the transaction that persists ``item`` (a txn hook of the
        persister, after the relations index's): index the event when it is
        searchable, apply it to its original when it is an edit."""
        ev = item.event
        if item.outlier or item.soft_failed or ev.rejected_reason:
            return
        if ev.redacts:
            # A redaction that took effect (backfilled ones too, whose
            # target's content the persist path leaves in place).
            txn.execute("SELECT 1 FROM redactions WHERE event_id = ?", (ev.event_id,))
            if txn.fetchone() is not None:
                txn.execute("DELETE FROM event_search WHERE event_id = ? AND room_id = ?", (ev.redacts, ev.room_id))
                # A redacted edit: what it replaced reads as before it.
                txn.execute("SELECT event_id FROM event_search WHERE edit_id = ? AND room_id = ?",
                            (ev.redacts, ev.room_id))
                self.reindex_txn(txn, [r[0] for r in txn.fetchall()])
        if ev.type not in INDEXED_TYPES:
            return
        rel = relation_of(ev.content)
        if rel is not None and not replaceable(rel):
            self._edit_txn(txn, ev.event_id, ev.room_id, ev.type, ev.content, rel[1])
            return
        if item.redacted_by is not None:
            # A redaction in its room came first (over federation): the
            # persist path found it and stored the event redacted.
            return
        stored = _Stored(ev.event_id, ev.room_id, ev.sender, ev.type, ev.state_key, item.stream_ordering, ev.content)
        # Edits stored before the event can only exist when something could
        # name it before it was stored (EventsStore.may_be_named: an event
        # from elsewhere, or backfilled).
        self._insert_txn(txn, self._rows_txn(txn, [stored], self.events.may_be_named(item)), upsert=False)

    def _edit_txn(self, txn: Txn, event_id: str, room_id: str, ev_type: str, content: Any, original: str) -> None:
        """An edit of ``original`` is stored (and in the relations index)."""
        latest = self.relations.latest_edits_txn(txn, [(original, room_id)]).get(original)
        if latest != event_id:
            # Invalid, or older than the latest edit: the original reads as it did.
            return
        joined = " ".join(self._edit_tokens(ev_type, content))
        if txn.engine == ENGINE_SQLITE:
            txn.execute("UPDATE event_search SET tokens = ?, edit_id = ? WHERE event_id = ? AND room_id = ?",
                        (joined, event_id, original, room_id))
        else:
            txn.execute("UPDATE event_search SET vector = to_tsvector('simple', ?), edit_id = ?"
                        " WHERE event_id = ? AND room_id = ?", (joined, event_id, original, room_id))
        if txn.rowcount == 0:
            # No row: the original had no words of its own, or is not stored
            # or is no hit (redacted, an edit itself, ...): it says which.
            self.reindex_txn(txn, [original])

    def _edit_tokens(self, ev_type: str, content: Any) -> list[str]:
        """The tokens of an edit's new content (not of its "* " fallback)."""
        new = content.get("m.new_content") if isinstance(content, dict) else None
        found = text_of(ev_type, new)
        return self.tokens(found[1]) if found is not None else []

    def _rows_txn(self, txn: Txn, evs: list[_Stored], edited: bool) -> list[_Row]:
        """The index rows of searchable events that are no edits: each by
        the words of its latest valid edit (``edited``: look for one) or by
        its own. An edited event keeps a row even without words (its
        ``edit_id`` is how the loss of the edit finds it)."""
        latest: dict[str, str] = {}
        if edited:
            parents = [(e.event_id, e.room_id) for e in evs if e.state_key is None]
            if parents:
                latest = self.relations.latest_edits_txn(txn, parents)
        edits = self._load_txn(txn, list(latest.values())) if latest else {}
        out: list[_Row] = []
        for e in evs:
            edit = edits.get(latest.get(e.event_id, ""))
            # As the bundled aggregation: a latest edit that cannot be served is none.
            if edit is not None and relation_of(edit.content) == (REPLACE, e.event_id):
                out.append(_Row(e, INDEXED_TYPES[e.type][0], " ".join(self._edit_tokens(e.type, edit.content)),
                                edit.event_id))
                continue
            found = text_of(e.type, e.content)
            toks = self.tokens(found[1]) if found is not None else []
            if found is not None and toks:
                out.append(_Row(e, found[0], " ".join(toks), None))
        return out

    def _load_txn(self, txn: Txn, event_ids: list[str]) -> dict[str, _Stored]:
        """Those of the events that are stored in the timeline, accepted and
        not redacted, with their content."""
        out: dict[str, _Stored] = {}
        for chunk, qs in in_chunks(event_ids):
            txn.execute(
                "SELECT e.event_id, e.room_id, e.sender, e.type, e.state_key, e.stream_ordering, e.json, e.sealed"
                f" FROM events e WHERE e.event_id IN ({qs})"
                " AND e.rejected_reason IS NULL AND e.outlier = 0 AND e.soft_failed = 0"
                f" AND NOT {REDACTED_IN_ROOM}", tuple(chunk))
            for event_id, room_id, sender, ev_type, state_key, so, stored, sealed in txn.fetchall():
                content = self.events.open_pdu(event_id, stored, sealed).get("content")
                out[event_id] = _Stored(event_id, room_id, sender, ev_type, state_key, int(so), content)
        return out

    def _insert_txn(self, txn: Txn, rows: list[_Row], upsert: bool) -> None:
        if txn.engine == ENGINE_SQLITE:
            sql = ("INSERT INTO event_search (event_id, room_id, sender, key, stream_ordering, tokens, edit_id)"
                   " VALUES (?,?,?,?,?,?,?)")
            update = " ON CONFLICT (event_id) DO UPDATE SET tokens = excluded.tokens, edit_id = excluded.edit_id"
        else:
            sql = ("INSERT INTO event_search (event_id, room_id, sender, key, stream_ordering, vector, edit_id)"
                   " VALUES (?,?,?,?,?, to_tsvector('simple', ?), ?)")
            update = " ON CONFLICT (event_id) DO UPDATE SET vector = excluded.vector, edit_id = excluded.edit_id"
        sql += update if upsert else " ON CONFLICT DO NOTHING"
        for r in rows:
            e = r.event
            txn.execute_later(sql, (e.event_id, e.room_id, e.sender, r.key, e.stream_ordering, r.tokens, r.edit_id))

    def reindex_txn(self, txn: Txn, event_ids: Sequence[str]) -> None:
        """Write the rows of these events as they read now (by their latest
        valid edit, or their own words), or drop them where they are no
        hit (gone, redacted, an edit, no words). Callers whose change
        touches the relations index (a redaction, a purge) run it after."""
        if not event_ids:
            return
        found = self._load_txn(txn, list(dict.fromkeys(event_ids)))
        evs = [e for e in found.values() if e.type in INDEXED_TYPES and replaceable(relation_of(e.content))]
        rows = self._rows_txn(txn, evs, True)
        kept = {r.event.event_id for r in rows}
        gone = [e for e in dict.fromkeys(event_ids) if e not in kept]
        for chunk, qs in in_chunks(gone):
            txn.execute(f"DELETE FROM event_search WHERE event_id IN ({qs})", tuple(chunk))
        self._insert_txn(txn, rows, upsert=True)

    @staticmethod
    def forget_txn(txn: Txn, event_ids: Sequence[str]) -> list[str]:
        """The events' content is gone: they are found by no search, nor by
        their words are the events they edited, whose rows are emptied
        (they match nothing). Returns the IDs of those edited events: the
        caller gives them back their earlier words by ``reindex_txn`` once
        the relations index has forgotten the events too."""
        for chunk, qs in in_chunks(event_ids):
            txn.execute(f"DELETE FROM event_search WHERE event_id IN ({qs})", tuple(chunk))
        edited: list[str] = []
        for chunk, qs in in_chunks(event_ids):
            txn.execute(f"SELECT event_id FROM event_search WHERE edit_id IN ({qs})", tuple(chunk))
            found = [r[0] for r in txn.fetchall()]
            if not found:
                continue
            edited += found
            column = "tokens = ''" if txn.engine == ENGINE_SQLITE else "vector = to_tsvector('simple', '')"
            txn.execute(f"UPDATE event_search SET {column} WHERE edit_id IN ({qs})", tuple(chunk))
        return edited

    @staticmethod
    def forget_room_txn(txn: Txn, room_id: str) -> None:
        txn.execute("DELETE FROM event_search WHERE room_id = ?", (room_id,))

    async def forget(self, event_ids: Sequence[str]) -> None:
        """Hits found redacted (the redaction on its way when they were indexed)."""
        if event_ids:
            def txn_fn(txn: Txn) -> None:
                self.reindex_txn(txn, self.forget_txn(txn, list(event_ids)))

            await self.db.run_interaction("event_search_forget", txn_fn)

    async def scrub(self) -> None:
        """Make deleted rows leave the full-text index's own storage too (see
        the module docstring); erasure calls it before scrubbing the files."""
        if self.db.engine != ENGINE_SQLITE or self.secure_delete:
            return
        await self.db.run_interaction("event_search_optimize", lambda txn: txn.execute(
            "INSERT INTO event_search_fts (event_search_fts) VALUES ('optimize')"))

    async def enable_secure_delete(self) -> None:
        """On SQLite with FTS5 secure-delete (3.42+), switch it on: a
        deleted row's tokens are removed from the index at once."""
        if self.db.engine != ENGINE_SQLITE:
            return

        def txn_fn(txn: Txn) -> None:
            txn.execute("INSERT INTO event_search_fts (event_search_fts, rank) VALUES ('secure-delete', 1)")

        try:
            await self.db.run_interaction("event_search_secure_delete", txn_fn)
            self.secure_delete = True
        except Exception:
            self.secure_delete = False

    # -- searching ----------------------------------------------------------------------------
    def match_expression(self, query: Query) -> str:
        """The query as FTS5 MATCH text or as PostgreSQL tsquery text."""
        k = self.key()
        if self.db.engine == ENGINE_SQLITE:
            return " AND ".join('"' + " ".join(token(k, w) for w in phrase) + '"' for phrase in query.phrases)
        return " & ".join("(" + " <-> ".join(token(k, w) for w in phrase) + ")" for phrase in query.phrases)

    async def search(self, query: Query, bounds: Sequence[tuple[str, int]], keys: Sequence[str],
                     order_by: str, limit: int, after: Optional[tuple[float, int]] = None,
                     senders: Optional[Sequence[str]] = None) -> list[Hit]:
        """Up to ``limit`` hits in rooms of ``bounds`` (room ID, highest
        stream ordering searched in it, or UNBOUNDED), best first
        (``order_by`` "rank") or newest first ("recent"); ``after``: (rank,
        stream ordering) of the last hit already had, to go on from."""
        if not query.phrases or not bounds or not keys or limit <= 0 or (senders is not None and not senders):
            return []
        match = self.match_expression(query)
        statements = [self._search_sql(match, list(bounds[i:i + ROOMS_PER_QUERY]), keys, order_by, limit,
                                       after, senders) for i in range(0, len(bounds), ROOMS_PER_QUERY)]

        def txn_fn(txn: Txn) -> list[Hit]:
            hits: list[Hit] = []
            for sql, params in statements:
                txn.execute(sql, params)
                hits += [Hit(e, r, s, int(so), float(rank), ed) for e, r, s, so, rank, ed in txn.fetchall()]
            return hits

        hits = await self.db.run_interaction("event_search", txn_fn)
        if len(statements) > 1:
            # Each statement gave its best ``limit``: the best of them all are among those.
            if order_by == "rank":
                hits.sort(key=lambda h: (h.rank, h.stream_ordering), reverse=True)
            else:
                hits.sort(key=lambda h: h.stream_ordering, reverse=True)
        return hits[:limit]

    def _search_sql(self, match: str, bounds: list[tuple[str, int]], keys: Sequence[str], order_by: str,
                    limit: int, after: Optional[tuple[float, int]],
                    senders: Optional[Sequence[str]]) -> tuple[str, list[Any]]:
        params: list[Any] = []
        if self.db.engine == ENGINE_SQLITE:
            # The full-text match drives the query (CROSS JOIN fixes the
            # order): looked up per row of event_search it is far slower.
            inner = ("SELECT s.event_id, s.room_id, s.sender, s.stream_ordering, -bm25(event_search_fts) AS r,"
                     " s.edit_id"
                     " FROM event_search_fts CROSS JOIN event_search s"
                     " WHERE event_search_fts MATCH ? AND s.id = event_search_fts.rowid")
        else:
            inner = ("SELECT s.event_id, s.room_id, s.sender, s.stream_ordering,"
                     " CAST(ts_rank(s.vector, to_tsquery('simple', ?)) AS DOUBLE PRECISION) AS r, s.edit_id"
                     " FROM event_search s WHERE s.vector @@ to_tsquery('simple', ?)")
            params.append(match)
        params.append(match)
        # Rooms as an IN list (a lookup per row on both engines); the few
        # rooms searched only up to a point get their bound in a CASE.
        inner += f" AND s.room_id IN ({','.join('?' * len(bounds))})"
        params += [r for r, _ in bounds]
        bounded = [(r, upto) for r, upto in bounds if upto < UNBOUNDED]
        if bounded:
            inner += (f" AND (s.room_id NOT IN ({','.join('?' * len(bounded))}) OR s.stream_ordering <= CASE s.room_id"
                      + " WHEN ? THEN ?" * len(bounded) + " END)")
            params += [r for r, _ in bounded]
            for r, upto in bounded:
                params += [r, upto]
        inner += f" AND s.key IN ({','.join('?' * len(keys))})"
        params += list(keys)
        if senders is not None:
            inner += f" AND s.sender IN ({','.join('?' * len(senders))})"
            params += list(senders)
        sql = f"SELECT event_id, room_id, sender, stream_ordering, r, edit_id FROM ({inner}) hits"
        if after is not None:
            rank, so = after
            if order_by == "rank":
                sql += " WHERE (r < ? OR (r = ? AND stream_ordering < ?))"
                params += [rank, rank, so]
            else:
                sql += " WHERE stream_ordering < ?"
                params.append(so)
        sql += " ORDER BY r DESC, stream_ordering DESC" if order_by == "rank" else " ORDER BY stream_ordering DESC"
        sql += " LIMIT ?"
        params.append(limit)
        return sql, params

    # -- events stored before the index -----------------------------------------------------
    async def complete(self) -> bool:
        """Whether every stored event is indexed (the background pass is done)."""
        return await self.backlog.complete()

    def _backfill_txn(self, txn: Txn, pos: int, limit: int) -> tuple[int, int]:
        """Index up to ``limit`` events in stream order after ``pos``, each by
        its latest valid edit as the persist hook would (edits give no row
        of their own). The relations index must be complete."""
        types = tuple(INDEXED_TYPES)
        txn.execute(
            "SELECT e.stream_ordering, e.event_id, e.room_id, e.sender, e.type, e.state_key, e.json, e.sealed"
            f" FROM events e WHERE e.stream_ordering > ? AND e.type IN ({','.join('?' * len(types))})"
            " AND e.rejected_reason IS NULL AND e.outlier = 0 AND e.soft_failed = 0"
            f" AND NOT {REDACTED_IN_ROOM}"
            " ORDER BY e.stream_ordering LIMIT ?", (pos, *types, limit))
        rows = txn.fetchall()
        batch: list[_Stored] = []
        for so, event_id, room_id, sender, ev_type, state_key, stored, sealed in rows:
            pos = max(pos, int(so))
            content = self.events.open_pdu(event_id, stored, sealed).get("content")
            if replaceable(relation_of(content)):
                batch.append(_Stored(event_id, room_id, sender, ev_type, state_key, int(so), content))
        self._insert_txn(txn, self._rows_txn(txn, batch, True), upsert=False)
        return pos, len(rows)
