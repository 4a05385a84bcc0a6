"""The audit log: who did what to which data, when, and with what outcome.

Append-only (nothing in zhome updates or deletes an entry) and
hash-chained: each entry's ``hash`` is the SHA-256 of the previous entry's
hash and this entry's canonical JSON, the first entry chaining from
``GENESIS``. ``verify`` recomputes the chain and names the first entry
that does not match, so an edit of any stored entry (or a deletion in the
middle) is found.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any, Iterable, Optional

from twisted.internet import defer

from zhome.storage.database import Database, Txn

GENESIS = "0" * 64
COLUMNS = "seq, ts, actor, action, target, outcome, prev_hash, hash"


def entry_hash(prev_hash: str, seq: int, ts: int, actor: str, action: str, target: str, outcome: str) -> str:
    body = json.dumps([seq, ts, actor, action, target, outcome], separators=(",", ":"), ensure_ascii=False,
                      sort_keys=True)
    return hashlib.sha256((prev_hash + body).encode("utf-8")).hexdigest()


def _row(r: tuple[Any, ...]) -> dict[str, Any]:
    seq, ts, actor, action, target, outcome, prev, h = r
    return {"seq": seq, "ts": ts, "actor": actor, "action": action, "target": json.loads(target),
            "outcome": outcome, "prev_hash": prev, "hash": h}


def verify(rows: Iterable[tuple[Any, ...]]) -> Optional[tuple[int, str]]:
    """None when the chain holds; else (seq, what is wrong) of the first bad entry."""
    prev, expected_seq = GENESIS, 1
    for seq, ts, actor, action, target, outcome, prev_hash, h in rows:
        if seq != expected_seq:
            return seq, f"expected entry {expected_seq} here: entries are missing"
        if prev_hash != prev:
            return seq, "prev_hash does not match the previous entry's hash"
        if entry_hash(prev_hash, seq, ts, actor, action, target, outcome) != h:
            return seq, "the entry's content does not match its hash (edited)"
        prev, expected_seq = h, seq + 1
    return None


class AuditLog:
    def __init__(self, db: Database) -> None:
        self.db = db
        # One writer at a time, so every entry chains from the one before.
        self._lock = defer.DeferredLock()

    async def append(self, actor: str, action: str, target: dict[str, Any], outcome: str) -> int:
        target_json = json.dumps(target, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        ts = int(time.time() * 1000)

        def txn_fn(txn: Txn) -> int:
            txn.execute("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
            last = txn.fetchone()
            seq, prev = (int(last[0]) + 1, str(last[1])) if last else (1, GENESIS)
            h = entry_hash(prev, seq, ts, actor, action, target_json, outcome)
            txn.execute(f"INSERT INTO audit_log ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?)",
                        (seq, ts, actor, action, target_json, outcome, prev, h))
            return seq

        await self._lock.acquire()
        try:
            return await self.db.run_interaction("audit_append", txn_fn)
        finally:
            self._lock.release()

    async def entries(self, after: int = 0, limit: int = 1000, actor: Optional[str] = None,
                      about: Optional[str] = None) -> list[dict[str, Any]]:
        sql = f"SELECT {COLUMNS} FROM audit_log WHERE seq > ?"
        args: list[Any] = [after]
        if actor:
            sql += " AND actor = ?"
            args.append(actor)
        rows = await self.db.execute("audit_entries", sql + " ORDER BY seq LIMIT ?", *args, limit)
        out = [_row(r) for r in rows]
        if about:
            out = [e for e in out if e["actor"] == about or about in e["target"].values()]
        return out

    async def verify(self) -> Optional[tuple[int, str]]:
        rows = await self.db.execute("audit_verify", f"SELECT {COLUMNS} FROM audit_log ORDER BY seq")
        return verify(rows)
