"""Presence rows and the presence stream.

Spec: client-server-api "Presence" and server-server-api "Presence". One
row per user with their latest state; every change takes a new position on
the presence stream so /sync can ask what changed after a token.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Optional

from zhome.storage.database import Database, Txn
from zhome.storage.ids import IdGenerator


@dataclass(frozen=True)
class PresenceState:
    user_id: str
    state: str
    status_msg: Optional[str]
    last_active_ts: int
    last_sync_ts: int
    currently_active: bool
    explicit: bool = False
    stream_id: int = 0


_COLUMNS = "user_id, state, status_msg, last_active_ts, last_sync_ts, currently_active, explicit, stream_id"


def _row(r: tuple) -> PresenceState:
    return PresenceState(r[0], r[1], r[2], int(r[3]), int(r[4]), bool(r[5]), bool(r[6]), int(r[7]))


class PresenceStore:
    def __init__(self, db: Database, ids: IdGenerator) -> None:
        self.db = db
        self.ids = ids

    def current_position(self) -> int:
        return self.ids.current()

    async def put(self, states: list[PresenceState], bump: bool = True) -> list[PresenceState]:
        """Write ``states``; with ``bump`` each takes a new stream position.

        Without ``bump`` only the timestamps move (a /sync keeping a user
        online), which nobody needs to be told about.
        """

        def txn_fn(txn: Txn) -> list[PresenceState]:
            out = []
            for s in states:
                sid = self.ids.next() if bump else s.stream_id
                txn.execute("DELETE FROM presence WHERE user_id = ?", (s.user_id,))
                txn.execute(
                    f"INSERT INTO presence ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?)",
                    (s.user_id, s.state, s.status_msg, s.last_active_ts, s.last_sync_ts,
                     int(s.currently_active), int(s.explicit), sid),
                )
                out.append(replace(s, stream_id=sid))
            return out

        return await self.db.run_interaction("put_presence", txn_fn)

    async def get(self, user_ids: Iterable[str]) -> dict[str, PresenceState]:
        rows = await self.db.select_in(
            "get_presence", f"SELECT {_COLUMNS} FROM presence WHERE user_id IN ({{in}})", list(set(user_ids)))
        return {r[0]: _row(r) for r in rows}

    async def get_changed_since(self, since: int, upto: int) -> list[PresenceState]:
        rows = await self.db.execute(
            "presence_since", f"SELECT {_COLUMNS} FROM presence WHERE stream_id > ? AND stream_id <= ?", since, upto)
        return [_row(r) for r in rows]

    async def get_not_offline(self) -> list[PresenceState]:
        rows = await self.db.execute("presence_not_offline",
                                     f"SELECT {_COLUMNS} FROM presence WHERE state != 'offline'")
        return [_row(r) for r in rows]
