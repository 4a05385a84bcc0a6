"""The notification log: the events each local user was notified about.

Spec: client-server-api "Push Notifications" → "Listing Notifications".
Rows are written inside the transaction that persists the event
(``insert_txn``), into ``user_notifications_staging`` in position order,
and moved into ``user_notifications`` in user order by ``fold`` (a
background pass) and by ``fold_staging_txn`` at the start of every
transaction that reads or deletes notifications; they are read a page at a
time from the newest down, and removed by the retention passes of
``zhome.push.notifications``. Whether a row is
read is never stored: ``get_page`` returns the user's read receipt
positions with the rows so the caller can tell.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from zhome.storage.database import ENGINE_POSTGRES, Database, Txn, in_chunks

# Receipt types that mark events as read ("Receipts": m.read and its
# private twin move the same read-up-to mark).
_READ_RECEIPT_TYPES = ("m.read", "m.read.private")

# (user_id, room_id, event_id, stream_ordering, ts, actions JSON, highlight 0/1)
NotificationInsert = tuple[str, str, str, int, int, str, int]


@dataclass(frozen=True)
class StoredNotification:
    room_id: str
    event_id: str
    stream_ordering: int
    ts: int
    actions: list[Any]
    highlight: bool


@dataclass(frozen=True)
class NotificationPage:
    rows: list[StoredNotification]
    # Whether rows older than the last one exist (for ``next_token``).
    more: bool
    # (room_id, thread_id) -> the stream position of the newest event the
    # user's read receipts point at; thread_id "" is an unthreaded receipt.
    read_up_to: dict[tuple[str, str], int]


_COLUMNS = "user_id, room_id, event_id, stream_ordering, ts, actions, highlight"


def fold_staging_txn(txn: Txn) -> int:
    """Move every staged row into ``user_notifications``, in user order;
    returns how many. Called first by every transaction that reads or
    deletes notification rows, so none of them misses a staged one."""
    if txn.engine == ENGINE_POSTGRES:
        # Moved by the DELETE itself: a fold running at the same time in
        # another transaction waits for these rows and finds them gone, so
        # no row is moved twice.
        txn.execute(
            f"WITH moved AS (DELETE FROM user_notifications_staging RETURNING {_COLUMNS})"
            f" INSERT INTO user_notifications ({_COLUMNS}) SELECT {_COLUMNS} FROM moved"
            " ORDER BY user_id, stream_ordering")
        return max(txn.rowcount, 0)
    # SQLite runs one transaction at a time: nothing can come in between.
    txn.execute(f"INSERT INTO user_notifications ({_COLUMNS}) SELECT {_COLUMNS} FROM user_notifications_staging"
                " ORDER BY user_id, stream_ordering")
    moved = max(txn.rowcount, 0)
    if moved:
        txn.execute("DELETE FROM user_notifications_staging")
    return moved


class NotificationsStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    @staticmethod
    def insert_txn(txn: Txn, rows: Sequence[NotificationInsert]) -> None:
        if rows:
            # Appended in position order; ``fold`` moves them (see the module docstring).
            txn.executemany_later(
                "INSERT INTO user_notifications_staging (user_id, room_id, event_id, stream_ordering, ts, actions,"
                " highlight) VALUES (?,?,?,?,?,?,?)",
                rows,
            )

    async def fold(self) -> int:
        """Move the staged rows over now; returns how many."""
        return int(await self.db.run_interaction("fold_notifications", fold_staging_txn))

    async def get_page(self, user_id: str, before: Optional[int], limit: int,
                       only_highlight: bool) -> NotificationPage:
        """Up to ``limit`` of the user's notifications below stream position
        ``before`` (all when None), newest first."""

        def txn_fn(txn: Txn) -> NotificationPage:
            fold_staging_txn(txn)
            sql = ("SELECT room_id, event_id, stream_ordering, ts, actions, highlight FROM user_notifications"
                   " WHERE user_id = ?")
            params: list[Any] = [user_id]
            if before is not None:
                sql += " AND stream_ordering < ?"
                params.append(before)
            if only_highlight:
                sql += " AND highlight = 1"
            # One extra row tells whether another page follows.
            sql += " ORDER BY stream_ordering DESC LIMIT ?"
            params.append(limit + 1)
            txn.execute(sql, params)
            fetched = txn.fetchall()
            rows = [
                StoredNotification(room_id, event_id, int(so), int(ts), _actions(actions), bool(highlight))
                for room_id, event_id, so, ts, actions, highlight in fetched[:limit]
            ]
            read_up_to = _read_up_to_txn(txn, user_id, {r.room_id for r in rows})
            return NotificationPage(rows, len(fetched) > limit, read_up_to)

        return await self.db.run_interaction("get_notifications", txn_fn)

    async def read_up_to(self, user_id: str, room_ids: set[str]) -> dict[tuple[str, str], int]:
        """(room_id, thread_id) -> the stream position of the newest event
        the user's read receipts in those rooms point at."""
        return await self.db.run_interaction("notifications_read_up_to",
                                             lambda txn: _read_up_to_txn(txn, user_id, room_ids))

    async def get_after(self, user_id: str, after: int, upto: int, limit: int) -> list[StoredNotification]:
        """The user's notifications above position ``after`` and at most
        ``upto``, oldest first (what a pusher has yet to deliver)."""
        def txn_fn(txn: Txn) -> list[tuple[Any, ...]]:
            fold_staging_txn(txn)
            txn.execute(
                "SELECT room_id, event_id, stream_ordering, ts, actions, highlight FROM user_notifications"
                " WHERE user_id = ? AND stream_ordering > ? AND stream_ordering <= ? ORDER BY stream_ordering LIMIT ?",
                (user_id, after, upto, limit))
            return txn.fetchall()

        rows = await self.db.run_interaction("notifications_after", txn_fn)
        return [StoredNotification(room_id, event_id, int(so), int(ts), _actions(actions), bool(highlight))
                for room_id, event_id, so, ts, actions, highlight in rows]

    async def trim_user(self, user_id: str, keep: int) -> int:
        """Delete all but the user's ``keep`` (at least 1) newest
        notifications; returns how many went."""
        return await self.trim_users([user_id], keep)

    async def trim_users(self, user_ids: Sequence[str], keep: int) -> int:
        """``trim_user`` for each of ``user_ids``, in one transaction."""

        def txn_fn(txn: Txn) -> int:
            fold_staging_txn(txn)
            removed = 0
            for user_id in user_ids:
                # The oldest position to keep, found on the (user, position) index.
                txn.execute(
                    "SELECT stream_ordering FROM user_notifications WHERE user_id = ?"
                    " ORDER BY stream_ordering DESC LIMIT 1 OFFSET ?",
                    (user_id, max(keep, 1) - 1),
                )
                row = txn.fetchone()
                if row is None:
                    continue
                txn.execute("DELETE FROM user_notifications WHERE user_id = ? AND stream_ordering < ?",
                            (user_id, int(row[0])))
                removed += txn.rowcount
            return removed

        return await self.db.run_interaction("trim_notifications", txn_fn)

    async def delete_older_than(self, ts: int) -> int:
        """Delete every notification recorded before ``ts`` (ms); returns how many went."""

        def txn_fn(txn: Txn) -> int:
            fold_staging_txn(txn)
            txn.execute("DELETE FROM user_notifications WHERE ts < ?", (ts,))
            return txn.rowcount

        return await self.db.run_interaction("expire_notifications", txn_fn)

    async def count_for_user(self, user_id: str) -> int:
        def txn_fn(txn: Txn) -> int:
            fold_staging_txn(txn)
            txn.execute("SELECT COUNT(*) FROM user_notifications WHERE user_id = ?", (user_id,))
            row = txn.fetchone()
            return int(row[0]) if row else 0

        return int(await self.db.run_interaction("count_notifications", txn_fn))


def _read_up_to_txn(txn: Txn, user_id: str, room_ids: set[str]) -> dict[tuple[str, str], int]:
    read_up_to: dict[tuple[str, str], int] = {}
    for chunk, qs in in_chunks(sorted(room_ids)):
        txn.execute(
            "SELECT r.room_id, r.thread_id, MAX(e.stream_ordering) FROM receipts r"
            " JOIN events e ON e.event_id = r.event_id"
            f" WHERE r.room_id IN ({qs}) AND r.user_id = ? AND r.receipt_type IN (?, ?)"
            " GROUP BY r.room_id, r.thread_id",
            (*chunk, user_id, *_READ_RECEIPT_TYPES),
        )
        for room_id, thread_id, so in txn.fetchall():
            if so is not None:
                read_up_to[(room_id, thread_id)] = int(so)
        # The user's own newest event reads what came before it, unthreaded
        # ("Receiving notifications": "or by sending an event").
        txn.execute(f"SELECT room_id, stream_ordering FROM sent_read_marks WHERE room_id IN ({qs}) AND user_id = ?",
                    (*chunk, user_id))
        for room_id, so in txn.fetchall():
            read_up_to[(room_id, "")] = max(int(so), read_up_to.get((room_id, ""), int(so)))
    return read_up_to


def notified_of_txn(txn: Txn, event_id: str, stream_ordering: int) -> dict[str, bool]:
    """User ID -> highlight, for each user the log says the event notified,
    staged rows included. Rows removed by retention are gone: those users
    are not in the answer."""
    out: dict[str, bool] = {}
    for table in ("user_notifications_staging", "user_notifications"):
        # On the stream_ordering index of each table.
        txn.execute(f"SELECT user_id, highlight FROM {table} WHERE stream_ordering = ? AND event_id = ?",
                    (stream_ordering, event_id))
        for user_id, highlight in txn.fetchall():
            out[user_id] = out.get(user_id, False) or bool(highlight)
    return out


def read_marks_txn(txn: Txn, room_id: str, thread_id: str, user_ids: Sequence[str]) -> dict[str, int]:
    """User ID -> the stream position up to which each of ``user_ids`` has
    read the room's thread ``thread_id`` (their read receipts, unthreaded
    or in that thread, and their own newest event: the marks of
    ``_read_up_to_txn``); a user who has read nothing there is left out.
    Their count in the thread covers only notifying events after it."""
    marks: dict[str, int] = {}
    for chunk, qs in in_chunks(sorted(user_ids)):
        txn.execute(
            "SELECT r.user_id, MAX(e.stream_ordering) FROM receipts r JOIN events e ON e.event_id = r.event_id"
            f" WHERE r.room_id = ? AND r.receipt_type IN (?, ?) AND r.user_id IN ({qs})"
            " AND r.thread_id IN ('', ?) GROUP BY r.user_id",
            (room_id, *_READ_RECEIPT_TYPES, *chunk, thread_id))
        rows = txn.fetchall()
        txn.execute(f"SELECT user_id, stream_ordering FROM sent_read_marks WHERE room_id = ? AND user_id IN ({qs})",
                    (room_id, *chunk))
        for user_id, so in rows + txn.fetchall():
            if so is not None:
                marks[user_id] = max(int(so), marks.get(user_id, int(so)))
    return marks


def _actions(text: str) -> list[Any]:
    try:
        value = json.loads(text)
    except ValueError:
        return []
    return value if isinstance(value, list) else []
