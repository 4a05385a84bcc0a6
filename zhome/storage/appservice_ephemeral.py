"""The persistent queue of ephemeral events for application services.

Spec: application-service-api "Pushing events", ``ephemeral`` (MSC2409):
typing notices, receipts and presence for services registered with
``receive_ephemeral``. The rows live in ``appservice_ephemeral`` (migration
0038) so that they survive a restart of zhome and an outage of the service
like the events of ``appservice_queue`` do:

* a row is written per service when the ephemeral event happens; at most
  :data:`MAX_QUEUED` rows per service wait for a transaction, the oldest
  going first when there are more (the bound is kept in SQL, in the same
  database transaction as the insert);
* a new transaction takes the oldest waiting rows, in order, and marks them
  with its transaction ID in the same database transaction that records it
  as in flight; a re-send reads exactly the marked rows again;
* the marked rows are deleted when the service answered 200.

Typing notices older than :data:`TYPING_MAX_AGE_MS` are dropped when a new
transaction is built (a notice that someone was typing a minute ago tells a
bridge nothing true); rows already marked for a transaction in flight are
never dropped, so a re-send stays identical. Receipts and presence are
kept until delivered (or pushed out by the bound).

Erasure and room purges delete the rows about the user or room, marked or
not: what must go goes, even if a transaction in flight then carries less.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Optional

from zhome.storage.database import Database, Txn, in_chunks
from zhome.storage.ids import IdGenerator

#: Rows per service waiting for a transaction; the oldest go first beyond it.
MAX_QUEUED = 1000
#: A typing notice older than this is not put in a new transaction.
TYPING_MAX_AGE_MS = 60_000


class AppServiceEphemeralStore:
    def __init__(self, db: Database, ids: IdGenerator) -> None:
        self.db = db
        self.ids = ids

    async def push(self, as_ids: Iterable[str], event: dict[str, Any], user_id: Optional[str], ts: int) -> None:
        """Queue ``event`` for each of ``as_ids``; ``user_id`` is who the
        event is about (a receipt's or presence's user; None for typing)."""
        # IDs are taken now, in call order, so the queue keeps the order in
        # which the ephemeral events happened.
        rows = [(self.ids.next(), as_id) for as_id in as_ids]
        if not rows:
            return
        edu_type = str(event.get("type", ""))
        room_id = event.get("room_id")
        text = json.dumps(event, separators=(",", ":"), ensure_ascii=False)

        def txn_fn(txn: Txn) -> None:
            for row_id, as_id in rows:
                txn.execute("INSERT INTO appservice_ephemeral (id, as_id, edu_type, room_id, user_id, ts, event)"
                            " VALUES (?,?,?,?,?,?,?)",
                            (row_id, as_id, edu_type, room_id if isinstance(room_id, str) else None, user_id, ts,
                             text))
                txn.execute("DELETE FROM appservice_ephemeral WHERE as_id = ? AND txn_id IS NULL AND id <="
                            " (SELECT id FROM appservice_ephemeral WHERE as_id = ? AND txn_id IS NULL"
                            " ORDER BY id DESC LIMIT 1 OFFSET ?)", (as_id, as_id, MAX_QUEUED))

        await self.db.run_interaction("appservice_ephemeral_push", txn_fn)

    @staticmethod
    def take_txn(txn: Txn, as_id: str, txn_id: int, now_ms: int, limit: int) -> int:
        """Within the transaction that records ``txn_id`` as in flight: mark
        the oldest ``limit`` waiting rows of ``as_id`` as carried by it
        (stale typing notices dropped first). Returns how many."""
        txn.execute("DELETE FROM appservice_ephemeral WHERE as_id = ? AND txn_id IS NULL AND edu_type = ?"
                    " AND ts < ?", (as_id, "m.typing", now_ms - TYPING_MAX_AGE_MS))
        txn.execute("SELECT id FROM appservice_ephemeral WHERE as_id = ? AND txn_id IS NULL ORDER BY id LIMIT ?",
                    (as_id, limit))
        ids = [r[0] for r in txn.fetchall()]
        for chunk, qs in in_chunks(ids):
            txn.execute(f"UPDATE appservice_ephemeral SET txn_id = ? WHERE id IN ({qs})", [txn_id, *chunk])
        return len(ids)

    async def carried(self, as_id: str, txn_id: int) -> list[dict[str, Any]]:
        """The ephemeral events transaction ``txn_id`` of ``as_id`` carries, in order."""
        rows = await self.db.execute(
            "appservice_ephemeral_carried", "SELECT event FROM appservice_ephemeral WHERE as_id = ? AND txn_id = ?"
            " ORDER BY id", as_id, txn_id)
        return [json.loads(r[0]) for r in rows]

    @staticmethod
    def delete_txn(txn: Txn, as_id: str, txn_id: int) -> None:
        """The service acknowledged ``txn_id``: its rows are delivered."""
        txn.execute("DELETE FROM appservice_ephemeral WHERE as_id = ? AND txn_id = ?", (as_id, txn_id))

    @staticmethod
    def forget_user_txn(txn: Txn, user_id: str) -> None:
        """Erasure: every queued row about ``user_id``: their receipts and
        presence, and the typing notices that name them."""
        txn.execute("DELETE FROM appservice_ephemeral WHERE user_id = ?", (user_id,))
        txn.execute("SELECT id, event FROM appservice_ephemeral WHERE edu_type = ?", ("m.typing",))
        naming = []
        for row_id, text in txn.fetchall():
            try:
                users = json.loads(text).get("content", {}).get("user_ids", [])
            except (ValueError, AttributeError):
                users = []
            if isinstance(users, list) and user_id in users:
                naming.append(row_id)
        for chunk, qs in in_chunks(naming):
            txn.execute(f"DELETE FROM appservice_ephemeral WHERE id IN ({qs})", chunk)

    @staticmethod
    def forget_room_txn(txn: Txn, room_id: str) -> None:
        """A purged room: its queued typing notices and receipts."""
        txn.execute("DELETE FROM appservice_ephemeral WHERE room_id = ?", (room_id,))
