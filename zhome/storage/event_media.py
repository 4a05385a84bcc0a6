"""Which events show which files (the mxc:// URIs in their content).

Retention deletes a local file once the last event that showed it has
expired, and the admin API lists and quarantines the files of a room
(Synapse's ``/_synapse/admin/v1/room/{roomId}/media``). Event content is
sealed at rest, so SQL cannot look inside it: the references are indexed
in ``event_media`` in the transaction that stores the event, and an event
whose content is purged (redaction, erasure, retention) loses its rows in
the transaction that purges it.

Events stored before the index existed are indexed by a background pass.
Until it has finished nothing may conclude from the index that a file is
shown by no event: ``complete()`` says when it has.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Iterable, Optional

from zhome.storage.database import Database, Txn, in_chunks
from zhome.storage.events_pass import EventsPass

if TYPE_CHECKING:
    from zhome.storage.events import EventsStore

logger = logging.getLogger(__name__)

#: Content keys whose value is the mxc:// URI of a file the event shows.
MXC_KEYS = ("url", "thumbnail_url", "avatar_url")
MAX_DEPTH = 20


def mxc_files(content: Any) -> set[tuple[str, str]]:
    """(origin, media ID) of every file ``content`` shows."""
    out: set[tuple[str, str]] = set()
    _walk(content, out, 0)
    return out


def _walk(value: Any, out: set[tuple[str, str]], depth: int) -> None:
    if depth > MAX_DEPTH:
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if k in MXC_KEYS and isinstance(v, str):
                parsed = parse_mxc(v)
                if parsed is not None:
                    out.add(parsed)
            elif isinstance(v, (dict, list)):
                _walk(v, out, depth + 1)
    elif isinstance(value, list):
        for v in value:
            if isinstance(v, (dict, list)):
                _walk(v, out, depth + 1)


def parse_mxc(uri: str) -> Optional[tuple[str, str]]:
    if not uri.startswith("mxc://"):
        return None
    origin, _, media_id = uri[6:].partition("/")
    if not origin or not media_id or "/" in media_id:
        return None
    return origin, media_id


class EventMediaStore:
    def __init__(self, db: Database, events: "EventsStore") -> None:
        self.db = db
        self.events = events
        #: Indexes the events stored before the index.
        self.backlog = EventsPass(
            db, "event_media", self._backfill_txn, logger=logger, finished="files shown by events: index complete",
            failed="indexing the files shown by stored events failed; retention keeps files meanwhile")
        self.start, self.stop = self.backlog.start, self.backlog.stop

    # -- written with the events ----------------------------------------------------------
    @staticmethod
    def index_txn(txn: Txn, event_id: str, room_id: str, content: Any) -> None:
        files = mxc_files(content) if isinstance(content, dict) and content else ()
        for origin, media_id in files:
            txn.execute("INSERT INTO event_media (event_id, room_id, origin, media_id) VALUES (?,?,?,?)"
                        " ON CONFLICT DO NOTHING", (event_id, room_id, origin, media_id))

    @staticmethod
    def forget_txn(txn: Txn, event_ids: list[str]) -> None:
        """The events' content is gone: they show no file any more."""
        for chunk, qs in in_chunks(event_ids):
            txn.execute(f"DELETE FROM event_media WHERE event_id IN ({qs})", tuple(chunk))

    # -- reading ----------------------------------------------------------------------------
    async def files_of_events(self, event_ids: list[str]) -> set[tuple[str, str]]:
        rows = await self.db.select_in("event_media_of_events",
                                       "SELECT origin, media_id FROM event_media WHERE event_id IN ({in})",
                                       event_ids)
        return {(o, m) for o, m in rows}

    async def shown(self, files: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
        """Those of ``files`` that some stored event still shows."""
        out: set[tuple[str, str]] = set()
        by_origin: dict[str, list[str]] = {}
        for o, m in files:
            by_origin.setdefault(o, []).append(m)
        for origin, ids in by_origin.items():
            rows = await self.db.select_in(
                "event_media_shown", "SELECT DISTINCT media_id FROM event_media WHERE origin = ? AND media_id IN ({in})",
                ids, before=(origin,))
            out.update((origin, m) for (m,) in rows)
        return out

    async def files_of_room(self, room_id: str) -> list[tuple[str, str]]:
        rows = await self.db.execute("event_media_of_room", "SELECT DISTINCT origin, media_id FROM event_media"
                                     " WHERE room_id = ? ORDER BY origin, media_id", room_id)
        return [(o, m) for o, m in rows]

    async def complete(self) -> bool:
        """Whether every stored event is indexed (the background pass is done)."""
        return await self.backlog.complete()

    # -- events stored before the index -----------------------------------------------------
    def _backfill_txn(self, txn: Txn, pos: int, limit: int) -> tuple[int, int]:
        """Index up to ``limit`` events in stream order after ``pos``."""
        txn.execute("SELECT stream_ordering, event_id, room_id, json, sealed FROM events"
                    " WHERE stream_ordering > ? AND rejected_reason IS NULL ORDER BY stream_ordering LIMIT ?",
                    (pos, limit))
        rows = txn.fetchall()
        for so, event_id, room_id, stored, sealed in rows:
            content = self.events.open_pdu(event_id, stored, sealed).get("content")
            self.index_txn(txn, event_id, room_id, content)
            pos = max(pos, int(so))
        return pos, len(rows)
