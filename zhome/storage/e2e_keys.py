"""Device keys, one-time keys and fallback keys of local devices.

Spec: client-server-api "End-to-End Encryption" (POST /keys/upload,
/keys/query, /keys/claim). Callers check signatures; this store keeps what
was accepted and hands each one-time key out exactly once: the claim is a
DELETE whose row count says which transaction got the key, so concurrent
claims (PostgreSQL's pool, or several processes) never share one.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

from zhome.storage.cross_signing import CrossSigningStore
from zhome.storage.database import ENGINE_POSTGRES, Database, Txn, in_chunks

#: Attempts at taking a one-time key another claim may take first.
CLAIM_ATTEMPTS = 10


class KeyConflict(Exception):
    """A one-time key ID re-uploaded with different content."""


@dataclass
class KeyUpload:
    """What one /keys/upload stores (already checked by the caller)."""

    device_keys: Optional[dict[str, Any]] = None
    one_time_keys: dict[tuple[str, str], dict[str, Any] | str] = field(default_factory=dict)
    fallback_keys: dict[tuple[str, str], dict[str, Any] | str] = field(default_factory=dict)


def _dump(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class E2eKeysStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        #: Called inside the upload transaction when a device's identity
        #: keys changed: (txn, user_id, device_id). The device-list stream
        #: records the change there, atomically with the keys.
        self.on_device_keys_changed_txn: Optional[Callable[[Txn, str, str], None]] = None

    # -- upload --------------------------------------------------------------
    async def upload(self, user_id: str, device_id: str, upload: KeyUpload) -> dict[str, int]:
        """Store an upload in one transaction and return the one-time key
        counts. Raises KeyConflict (nothing stored) when a one-time key ID
        is already stored with other content."""

        def txn_fn(txn: Txn) -> dict[str, int]:
            now = int(time.time() * 1000)
            if upload.device_keys is not None:
                new = _dump(upload.device_keys)
                txn.execute("SELECT key_json FROM e2e_device_keys WHERE user_id = ? AND device_id = ?",
                            (user_id, device_id))
                row = txn.fetchone()
                if row is None or row[0] != new:
                    if row is None:
                        txn.execute("INSERT INTO e2e_device_keys (user_id, device_id, key_json, ts) VALUES (?,?,?,?)",
                                    (user_id, device_id, new, now))
                    else:
                        txn.execute("UPDATE e2e_device_keys SET key_json = ?, ts = ? WHERE user_id = ? AND device_id = ?",
                                    (new, now, user_id, device_id))
                        if _signed_part(json.loads(row[0])) != _signed_part(upload.device_keys):
                            # Cross-signatures covered the old keys only.
                            CrossSigningStore.delete_device_signatures_txn(txn, user_id, [device_id])
                    if self.on_device_keys_changed_txn is not None:
                        self.on_device_keys_changed_txn(txn, user_id, device_id)
            if upload.one_time_keys:
                fresh = []
                for (algorithm, key_id), key in upload.one_time_keys.items():
                    dumped = _dump(key)
                    txn.execute("SELECT key_json FROM e2e_one_time_keys WHERE user_id = ? AND device_id = ?"
                                " AND algorithm = ? AND key_id = ?", (user_id, device_id, algorithm, key_id))
                    row = txn.fetchone()
                    if row is None:
                        fresh.append((user_id, device_id, algorithm, key_id, dumped, now))
                    elif row[0] != dumped:
                        raise KeyConflict(f"One-time key {algorithm}:{key_id} already exists with other content")
                txn.executemany("INSERT INTO e2e_one_time_keys (user_id, device_id, algorithm, key_id, key_json, ts)"
                                " VALUES (?,?,?,?,?,?)", fresh)
            for (algorithm, key_id), key in upload.fallback_keys.items():
                dumped = _dump(key)
                txn.execute("SELECT key_id, key_json FROM e2e_fallback_keys WHERE user_id = ? AND device_id = ?"
                            " AND algorithm = ?", (user_id, device_id, algorithm))
                row = txn.fetchone()
                if row is not None and row[0] == key_id and row[1] == dumped:
                    continue
                txn.execute("DELETE FROM e2e_fallback_keys WHERE user_id = ? AND device_id = ? AND algorithm = ?",
                            (user_id, device_id, algorithm))
                txn.execute("INSERT INTO e2e_fallback_keys (user_id, device_id, algorithm, key_id, key_json, used)"
                            " VALUES (?,?,?,?,?,0)", (user_id, device_id, algorithm, key_id, dumped))
            return _counts_txn(txn, user_id, device_id)

        return await self.db.run_interaction("e2e_upload_keys", txn_fn)

    # -- reading -------------------------------------------------------------------
    async def count_one_time_keys(self, user_id: str, device_id: str) -> dict[str, int]:
        return await self.db.run_interaction("e2e_count_otks", _counts_txn, user_id, device_id)

    async def sync_summary(self, user_id: str, device_id: str) -> tuple[dict[str, int], list[str]]:
        """One-time key counts and unused fallback key algorithms of a device."""

        def txn_fn(txn: Txn) -> tuple[dict[str, int], list[str]]:
            counts = _counts_txn(txn, user_id, device_id)
            txn.execute("SELECT algorithm FROM e2e_fallback_keys WHERE user_id = ? AND device_id = ? AND used = 0"
                        " ORDER BY algorithm", (user_id, device_id))
            return counts, [r[0] for r in txn.fetchall()]

        return await self.db.run_interaction("e2e_sync_summary", txn_fn)

    async def get_device_keys(self, user_ids: Iterable[str]) -> dict[str, dict[str, dict[str, Any]]]:
        """user -> device -> the device's stored keys, for the given users."""
        rows = await self.db.select_in(
            "e2e_get_device_keys", "SELECT user_id, device_id, key_json FROM e2e_device_keys WHERE user_id IN ({in})",
            sorted(set(user_ids)))
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for user_id, device_id, key_json in rows:
            out.setdefault(user_id, {})[device_id] = json.loads(key_json)
        if out:
            # Signatures of the devices by their user's self-signing key
            # (POST /keys/signatures/upload) are part of the keys given out.
            for target_user, target_key, signer, key_id, sig in await self.db.select_in(
                    "e2e_get_device_signatures",
                    "SELECT target_user_id, target_key_id, user_id, key_id, signature"
                    " FROM e2e_cross_signing_signatures WHERE target_user_id IN ({in})", sorted(out)):
                keys = out[target_user].get(target_key)
                if keys is not None:
                    sigs = keys.setdefault("signatures", {})
                    if isinstance(sigs, dict):
                        sigs.setdefault(signer, {})[key_id] = sig
        return out

    # -- claiming ----------------------------------------------------------------------
    async def claim(self, wanted: list[tuple[str, str, str]]) -> dict[str, dict[str, dict[str, Any]]]:
        """For each (user, device, algorithm): take one one-time key (it is
        deleted), else the fallback key (marked used). Returns
        user -> device -> {"algorithm:key_id": key}; devices without a key of
        the algorithm are left out."""

        def txn_fn(txn: Txn) -> dict[str, dict[str, dict[str, Any]]]:
            out: dict[str, dict[str, dict[str, Any]]] = {}
            taken = _take_one_time_keys_pg_txn(txn, wanted) if txn.engine == ENGINE_POSTGRES else {}
            for user_id, device_id, algorithm in dict.fromkeys(wanted):
                got = taken.get((user_id, device_id, algorithm))
                if got is None:
                    # SQLite; or none was free for the statement above (none
                    # left, or the ones there taken by a claim at the same
                    # time): one at a time, as many tries as that allows.
                    got = _take_one_time_key_txn(txn, user_id, device_id, algorithm)
                if got is None:
                    txn.execute("SELECT key_id, key_json FROM e2e_fallback_keys WHERE user_id = ? AND device_id = ?"
                                " AND algorithm = ?", (user_id, device_id, algorithm))
                    row = txn.fetchone()
                    if row is not None:
                        txn.execute("UPDATE e2e_fallback_keys SET used = 1 WHERE user_id = ? AND device_id = ?"
                                    " AND algorithm = ?", (user_id, device_id, algorithm))
                        got = (row[0], row[1])
                if got is not None:
                    out.setdefault(user_id, {}).setdefault(device_id, {})[f"{algorithm}:{got[0]}"] = json.loads(got[1])
            return out

        return await self.db.run_interaction("e2e_claim_keys", txn_fn)

    # -- devices going away -----------------------------------------------------------------
    @staticmethod
    def delete_device_keys_txn(txn: Txn, user_id: str, device_ids: list[str]) -> None:
        for chunk, qs in in_chunks(device_ids):
            for table in ("e2e_device_keys", "e2e_one_time_keys", "e2e_fallback_keys"):
                txn.execute(f"DELETE FROM {table} WHERE user_id = ? AND device_id IN ({qs})", (user_id, *chunk))
        CrossSigningStore.delete_device_signatures_txn(txn, user_id, device_ids)


def _signed_part(keys: dict[str, Any]) -> dict[str, Any]:
    """What a signature of device keys covers."""
    return {k: v for k, v in keys.items() if k not in ("signatures", "unsigned")}


def _counts_txn(txn: Txn, user_id: str, device_id: str) -> dict[str, int]:
    txn.execute("SELECT algorithm, COUNT(*) FROM e2e_one_time_keys WHERE user_id = ? AND device_id = ?"
                " GROUP BY algorithm", (user_id, device_id))
    counts = {r[0]: int(r[1]) for r in txn.fetchall()}
    # Clients read a missing signed_curve25519 as "unknown" rather than 0.
    counts.setdefault("signed_curve25519", 0)
    return counts


#: (user, device, algorithm) triples claimed per statement on PostgreSQL.
_CLAIM_CHUNK = 300


def _take_one_time_keys_pg_txn(txn: Txn, wanted: list[tuple[str, str, str]]
                               ) -> dict[tuple[str, str, str], tuple[str, str]]:
    """PostgreSQL: one one-time key taken (deleted) for each wanted (user,
    device, algorithm) that has a free one, the lowest key ID, in one
    statement per chunk instead of two round trips a device. Keys that
    concurrent claims hold are skipped (each takes a different key)."""
    out: dict[tuple[str, str, str], tuple[str, str]] = {}
    unique = list(dict.fromkeys(wanted))
    for i in range(0, len(unique), _CLAIM_CHUNK):
        chunk = unique[i:i + _CLAIM_CHUNK]
        values = ",".join(["(?,?,?)"] * len(chunk))
        txn.execute(
            f"WITH w (user_id, device_id, algorithm) AS (VALUES {values}),"
            " pick AS (SELECT k.user_id, k.device_id, k.algorithm, k.key_id FROM w CROSS JOIN LATERAL"
            " (SELECT o.user_id, o.device_id, o.algorithm, o.key_id FROM e2e_one_time_keys o"
            " WHERE o.user_id = w.user_id AND o.device_id = w.device_id AND o.algorithm = w.algorithm"
            " ORDER BY o.key_id LIMIT 1 FOR UPDATE SKIP LOCKED) k)"
            " DELETE FROM e2e_one_time_keys d USING pick WHERE d.user_id = pick.user_id"
            " AND d.device_id = pick.device_id AND d.algorithm = pick.algorithm AND d.key_id = pick.key_id"
            " RETURNING d.user_id, d.device_id, d.algorithm, d.key_id, d.key_json",
            tuple(v for triple in chunk for v in triple))
        for user_id, device_id, algorithm, key_id, key_json in txn.fetchall():
            out[(user_id, device_id, algorithm)] = (key_id, key_json)
    return out


def _take_one_time_key_txn(txn: Txn, user_id: str, device_id: str, algorithm: str) -> Optional[tuple[str, str]]:
    for _ in range(CLAIM_ATTEMPTS):
        # On PostgreSQL concurrent claims skip the rows others hold, so each
        # takes a different key instead of all racing for the first one.
        lock = " FOR UPDATE SKIP LOCKED" if txn.engine == ENGINE_POSTGRES else ""
        txn.execute("SELECT key_id, key_json FROM e2e_one_time_keys WHERE user_id = ? AND device_id = ?"
                    " AND algorithm = ? ORDER BY key_id LIMIT 1" + lock, (user_id, device_id, algorithm))
        row = txn.fetchone()
        if row is None:
            return None
        txn.execute("DELETE FROM e2e_one_time_keys WHERE user_id = ? AND device_id = ? AND algorithm = ?"
                    " AND key_id = ?", (user_id, device_id, algorithm, row[0]))
        if txn.rowcount == 1:
            # This transaction deleted the row, so no other claim has it.
            return row[0], row[1]
    return None
