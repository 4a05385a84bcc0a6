"""Rooms, room aliases and the public room directory.

Spec: client-server-api "Room aliases", "Listing rooms".
"""

from __future__ import annotations

import time
from typing import Optional

from zhome.storage.database import Database, IntegrityError, Txn


class RoomsStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._versions: dict[str, str] = {}

    def store_room_txn(self, txn: Txn, room_id: str, room_version: str, creator: Optional[str]) -> None:
        txn.execute(
            "INSERT INTO rooms (room_id, room_version, creator, is_public, created_ts) VALUES (?,?,?,0,?)",
            (room_id, room_version, creator, int(time.time() * 1000)),
        )

    def drop_room_caches(self, room_id: str) -> None:
        self._versions.pop(room_id, None)

    async def get_room_version(self, room_id: str) -> Optional[str]:
        v = self._versions.get(room_id)
        if v is not None:
            return v
        rows = await self.db.execute("room_version", "SELECT room_version FROM rooms WHERE room_id = ?", room_id)
        if not rows:
            return None
        # A room's version never changes, so remembering it is safe.
        self._versions[room_id] = rows[0][0]
        return rows[0][0]

    async def set_public(self, room_id: str, public: bool) -> None:
        await self.db.run_interaction(
            "set_public",
            lambda txn: txn.execute("UPDATE rooms SET is_public = ? WHERE room_id = ?", (int(public), room_id)),
        )

    async def is_public(self, room_id: str) -> bool:
        rows = await self.db.execute("is_public", "SELECT is_public FROM rooms WHERE room_id = ?", room_id)
        return bool(rows and rows[0][0])

    async def get_public_room_ids(self) -> list[str]:
        rows = await self.db.execute("public_rooms", "SELECT room_id FROM rooms WHERE is_public = 1 ORDER BY room_id")
        return [r[0] for r in rows]

    # -- aliases ------------------------------------------------------------
    async def create_alias(self, alias: str, room_id: str, creator: str) -> bool:
        try:
            await self.db.run_interaction(
                "create_alias",
                lambda txn: txn.execute(
                    "INSERT INTO room_aliases (room_alias, room_id, creator) VALUES (?,?,?)", (alias, room_id, creator)
                ),
            )
        except IntegrityError:
            return False
        return True

    def create_alias_txn(self, txn: Txn, alias: str, room_id: str, creator: str) -> None:
        txn.execute("INSERT INTO room_aliases (room_alias, room_id, creator) VALUES (?,?,?)", (alias, room_id, creator))

    async def get_alias(self, alias: str) -> Optional[tuple[str, str]]:
        rows = await self.db.execute(
            "get_alias", "SELECT room_id, creator FROM room_aliases WHERE room_alias = ?", alias
        )
        return (rows[0][0], rows[0][1]) if rows else None

    async def delete_alias(self, alias: str) -> None:
        await self.db.run_interaction(
            "delete_alias", lambda txn: txn.execute("DELETE FROM room_aliases WHERE room_alias = ?", (alias,))
        )

    async def get_aliases_for_room(self, room_id: str) -> list[str]:
        rows = await self.db.execute(
            "room_aliases", "SELECT room_alias FROM room_aliases WHERE room_id = ? ORDER BY room_alias", room_id
        )
        return [r[0] for r in rows]

    async def move_aliases(self, from_room: str, to_room: str) -> list[str]:
        """Point every alias of ``from_room`` at ``to_room`` (a room upgrade);
        returns the aliases moved."""

        def txn_fn(txn: Txn) -> list[str]:
            txn.execute("SELECT room_alias FROM room_aliases WHERE room_id = ? ORDER BY room_alias", (from_room,))
            aliases = [r[0] for r in txn.fetchall()]
            txn.execute("UPDATE room_aliases SET room_id = ? WHERE room_id = ?", (to_room, from_room))
            return aliases

        return await self.db.run_interaction("move_aliases", txn_fn)
