"""Pushers and their delivery positions.

Spec: client-server-api "Push Notifications" → "Pushers" (``GET /pushers``,
``POST /pushers/set``). A pusher is unique per user by ``(app_id,
pushkey)``; setting one without ``append`` removes the same pair from every
other user. Each pusher belongs to the device that created it, so the
device's deletion takes it along (``delete_for_devices_txn``, run in the
account store's transactions). ``last_stream_ordering`` is how far the
pusher has delivered the user's notifications (``zhome.push.delivery``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from zhome.storage.database import Database, IntegrityError, Txn, in_chunks
from zhome.storage.ids import IdGenerator

_COLUMNS = ("id, user_id, device_id, access_token_id, kind, app_id, pushkey, pushkey_ts, app_display_name,"
            " device_display_name, profile_tag, lang, data, last_stream_ordering")


@dataclass(frozen=True)
class Pusher:
    id: int
    user_id: str
    device_id: Optional[str]
    access_token_id: Optional[int]
    kind: str
    app_id: str
    pushkey: str
    pushkey_ts: int
    app_display_name: str
    device_display_name: str
    profile_tag: Optional[str]
    lang: str
    data: dict[str, Any]
    last_stream_ordering: int


@dataclass(frozen=True)
class NewPusher:
    """What ``POST /pushers/set`` asks for (kind not null)."""

    user_id: str
    device_id: Optional[str]
    access_token_id: Optional[int]
    kind: str
    app_id: str
    pushkey: str
    app_display_name: str
    device_display_name: str
    profile_tag: Optional[str]
    lang: str
    data: dict[str, Any]


def _row(r: Sequence[Any]) -> Pusher:
    try:
        data = json.loads(r[12])
    except ValueError:
        data = {}
    return Pusher(int(r[0]), r[1], r[2], None if r[3] is None else int(r[3]), r[4], r[5], r[6], int(r[7]), r[8],
                  r[9], r[10], r[11], data if isinstance(data, dict) else {}, int(r[13]))


class PushersStore:
    def __init__(self, db: Database, ids: IdGenerator) -> None:
        self.db = db
        self.ids = ids

    @classmethod
    async def create(cls, db: Database) -> "PushersStore":
        return cls(db, await IdGenerator.from_table(db, "pushers", "id"))

    async def set_pusher(self, p: NewPusher, append: bool, position: int) -> tuple[Pusher, list[Pusher]]:
        """Create or update the user's pusher for ``(app_id, pushkey)``.

        A new pusher starts delivering after stream position ``position``;
        an update keeps its position. Without ``append`` the same pair is
        removed from every other user. Returns the pusher and the removed ones.
        """

        def txn_fn(txn: Txn) -> tuple[Pusher, list[Pusher]]:
            removed: list[Pusher] = []
            if not append:
                txn.execute(f"SELECT {_COLUMNS} FROM pushers WHERE app_id = ? AND pushkey = ? AND user_id != ?",
                            (p.app_id, p.pushkey, p.user_id))
                removed = [_row(r) for r in txn.fetchall()]
                if removed:
                    txn.execute("DELETE FROM pushers WHERE app_id = ? AND pushkey = ? AND user_id != ?",
                                (p.app_id, p.pushkey, p.user_id))
            now = int(time.time() * 1000)
            data = json.dumps(p.data)
            txn.execute("SELECT id, last_stream_ordering FROM pushers WHERE user_id = ? AND app_id = ? AND pushkey = ?",
                        (p.user_id, p.app_id, p.pushkey))
            row = txn.fetchone()
            if row is None:
                pid, pos = self.ids.next(), position
                txn.execute(
                    f"INSERT INTO pushers ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (pid, p.user_id, p.device_id, p.access_token_id, p.kind, p.app_id, p.pushkey, now,
                     p.app_display_name, p.device_display_name, p.profile_tag, p.lang, data, pos),
                )
            else:
                pid, pos = int(row[0]), int(row[1])
                txn.execute(
                    "UPDATE pushers SET device_id = ?, access_token_id = ?, kind = ?, pushkey_ts = ?,"
                    " app_display_name = ?, device_display_name = ?, profile_tag = ?, lang = ?, data = ?"
                    " WHERE id = ?",
                    (p.device_id, p.access_token_id, p.kind, now, p.app_display_name, p.device_display_name,
                     p.profile_tag, p.lang, data, pid),
                )
            pusher = Pusher(pid, p.user_id, p.device_id, p.access_token_id, p.kind, p.app_id, p.pushkey, now,
                            p.app_display_name, p.device_display_name, p.profile_tag, p.lang, dict(p.data), pos)
            return pusher, removed

        try:
            return await self.db.run_interaction("set_pusher", txn_fn)
        except IntegrityError:
            # A concurrent set of the same pusher inserted it first: this
            # attempt now finds it and updates it.
            return await self.db.run_interaction("set_pusher", txn_fn)

    async def delete_pusher(self, user_id: str, app_id: str, pushkey: str) -> Optional[Pusher]:
        """Delete the user's pusher for ``(app_id, pushkey)``; the deleted one, if any."""

        def txn_fn(txn: Txn) -> Optional[Pusher]:
            txn.execute(f"SELECT {_COLUMNS} FROM pushers WHERE user_id = ? AND app_id = ? AND pushkey = ?",
                        (user_id, app_id, pushkey))
            row = txn.fetchone()
            if row is None:
                return None
            txn.execute("DELETE FROM pushers WHERE id = ?", (row[0],))
            return _row(row)

        return await self.db.run_interaction("delete_pusher", txn_fn)

    async def delete_by_id(self, pusher_id: int) -> bool:
        def txn_fn(txn: Txn) -> bool:
            txn.execute("DELETE FROM pushers WHERE id = ?", (pusher_id,))
            return txn.rowcount > 0

        return await self.db.run_interaction("delete_pusher_by_id", txn_fn)

    async def get_for_user(self, user_id: str) -> list[Pusher]:
        rows = await self.db.execute("get_pushers", f"SELECT {_COLUMNS} FROM pushers WHERE user_id = ? ORDER BY id",
                                     user_id)
        return [_row(r) for r in rows]

    async def get_by_id(self, pusher_id: int) -> Optional[Pusher]:
        rows = await self.db.execute("get_pusher", f"SELECT {_COLUMNS} FROM pushers WHERE id = ?", pusher_id)
        return _row(rows[0]) if rows else None

    async def get_all(self, kind: str) -> list[Pusher]:
        rows = await self.db.execute("get_all_pushers", f"SELECT {_COLUMNS} FROM pushers WHERE kind = ? ORDER BY id",
                                     kind)
        return [_row(r) for r in rows]

    async def advance(self, pusher_id: int, stream_ordering: int) -> None:
        """Record delivery up to ``stream_ordering`` (never moves back)."""
        def txn_fn(txn: Txn) -> None:
            txn.execute("UPDATE pushers SET last_stream_ordering = ? WHERE id = ? AND last_stream_ordering < ?",
                        (stream_ordering, pusher_id, stream_ordering))

        await self.db.run_interaction("advance_pusher", txn_fn)

    @staticmethod
    def delete_for_devices_txn(txn: Txn, user_id: str, device_ids: Optional[Sequence[str]]) -> None:
        """In the transaction that deletes devices: their pushers go too
        (all the user's pushers when ``device_ids`` is None)."""
        if device_ids is None:
            txn.execute("DELETE FROM pushers WHERE user_id = ?", (user_id,))
            return
        for chunk, qs in in_chunks(sorted(set(device_ids))):
            txn.execute(f"DELETE FROM pushers WHERE user_id = ? AND device_id IN ({qs})", (user_id, *chunk))
