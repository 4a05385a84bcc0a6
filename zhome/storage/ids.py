"""Integer ID and stream position allocation.

Positions are allocated in the process from the table's maximum at start.
The event stream is advanced only once the transaction that wrote a position
has committed, so a reader never sees a position whose data is missing.
"""

from __future__ import annotations

from zhome.storage.database import Database


class IdGenerator:
    def __init__(self, current: int, step: int = 1) -> None:
        self._current = current
        # -1 for positions handed out below everything else (backfilled
        # history is older than any event already stored).
        self._step = step

    @classmethod
    async def from_table(cls, db: Database, table: str, column: str) -> "IdGenerator":
        rows = await db.execute(f"id_gen_{table}", f"SELECT MAX({column}) FROM {table}")
        return cls(int(rows[0][0] or 0))

    @classmethod
    async def downward_from_table(cls, db: Database, table: str, column: str) -> "IdGenerator":
        rows = await db.execute(f"id_gen_min_{table}", f"SELECT MIN({column}) FROM {table}")
        return cls(min(0, int(rows[0][0] or 0)), step=-1)

    @classmethod
    async def from_tables(cls, db: Database, pairs: list[tuple[str, str]]) -> "IdGenerator":
        best = 0
        for table, column in pairs:
            rows = await db.execute(f"id_gen_{table}", f"SELECT MAX({column}) FROM {table}")
            best = max(best, int(rows[0][0] or 0))
        return cls(best)

    def next(self) -> int:
        self._current += self._step
        return self._current

    def current(self) -> int:
        return self._current
