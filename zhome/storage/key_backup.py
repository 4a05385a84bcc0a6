"""Server-side key backups in SQL: backup versions and the room keys in them.

Spec: client-server-api "End-to-End Encryption" → "Server-side key backups"
(/room_keys/version, /room_keys/keys). Callers validate what they store; this
store keeps versions per user (never handing a version out twice, even after
a delete), writes only to the current version, and bumps a version's etag in
the same transaction as every change to its keys. Which of two keys for one
session is kept is the caller's rule, passed in as ``replace``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

from zhome.storage.database import Database, IntegrityError, Txn

#: Attempts at creating a user's first version when another request creates
#: it at the same moment (the per-user counter row is inserted once).
CREATE_ATTEMPTS = 3


class NoSuchVersion(Exception):
    """The backup version does not exist (never did, or was deleted), or the
    user has no backup at all."""


class WrongVersion(Exception):
    """Keys were written to a version that is not the user's current one."""

    def __init__(self, current: int) -> None:
        super().__init__(f"current backup version is {current}")
        self.current = current


@dataclass(frozen=True)
class BackupVersion:
    version: int
    algorithm: str
    auth_data: Any
    etag: int
    count: int


@dataclass(frozen=True)
class RoomKey:
    """One backed-up session key (``KeyBackupData``)."""

    room_id: str
    session_id: str
    first_message_index: int
    forwarded_count: int
    is_verified: bool
    session_data: Any

    def to_json(self) -> dict[str, Any]:
        return {"first_message_index": self.first_message_index, "forwarded_count": self.forwarded_count,
                "is_verified": self.is_verified, "session_data": self.session_data}


def _dump(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class KeyBackupStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    # -- versions ------------------------------------------------------------
    async def create_version(self, user_id: str, algorithm: str, auth_data: Any) -> int:
        """Create a backup that becomes the user's current one; returns its
        version, higher than any version the user ever had."""

        def txn_fn(txn: Txn) -> int:
            # The UPDATE holds the counter row's lock until commit, so
            # concurrent creates for one user queue behind each other.
            txn.execute("UPDATE e2e_room_keys_version_seq SET last_version = last_version + 1 WHERE user_id = ?",
                        (user_id,))
            if txn.rowcount == 0:
                txn.execute("INSERT INTO e2e_room_keys_version_seq (user_id, last_version) VALUES (?, 1)",
                            (user_id,))
            txn.execute("SELECT last_version FROM e2e_room_keys_version_seq WHERE user_id = ?", (user_id,))
            row = txn.fetchone()
            assert row is not None
            version = int(row[0])
            txn.execute("INSERT INTO e2e_room_keys_versions (user_id, version, algorithm, auth_data, etag)"
                        " VALUES (?,?,?,?,0)", (user_id, version, algorithm, _dump(auth_data)))
            return version

        for attempt in range(1, CREATE_ATTEMPTS + 1):
            try:
                return await self.db.run_interaction("key_backup_create_version", txn_fn)
            except IntegrityError:
                # Another create inserted the counter row first; it exists now.
                if attempt == CREATE_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    async def get_version(self, user_id: str, version: Optional[int] = None) -> Optional[BackupVersion]:
        """A live backup version with its key count and etag; the current
        one when ``version`` is None. None when there is no such backup."""

        def txn_fn(txn: Txn) -> Optional[BackupVersion]:
            if version is None:
                txn.execute("SELECT version, algorithm, auth_data, etag FROM e2e_room_keys_versions"
                            " WHERE user_id = ? ORDER BY version DESC LIMIT 1", (user_id,))
            else:
                txn.execute("SELECT version, algorithm, auth_data, etag FROM e2e_room_keys_versions"
                            " WHERE user_id = ? AND version = ?", (user_id, version))
            row = txn.fetchone()
            if row is None:
                return None
            v = int(row[0])
            return BackupVersion(v, row[1], json.loads(row[2]), int(row[3]), _count_txn(txn, user_id, v))

        return await self.db.run_interaction("key_backup_get_version", txn_fn)

    async def update_version(self, user_id: str, version: int, auth_data: Any) -> None:
        """Replace a live version's ``auth_data``. Raises NoSuchVersion."""

        def txn_fn(txn: Txn) -> None:
            txn.execute("UPDATE e2e_room_keys_versions SET auth_data = ? WHERE user_id = ? AND version = ?",
                        (_dump(auth_data), user_id, version))
            if txn.rowcount == 0:
                raise NoSuchVersion()

        await self.db.run_interaction("key_backup_update_version", txn_fn)

    async def delete_version(self, user_id: str, version: int) -> bool:
        """Delete a backup version and its keys. True when it was live or
        had been deleted before (a repeated delete succeeds); False when the
        user never had that version."""

        def txn_fn(txn: Txn) -> bool:
            # The version row's lock first: an upload into this version that
            # is under way commits before its keys are deleted here, so none
            # of them stays behind.
            if _lock_version_txn(txn, user_id, version) is not None:
                txn.execute("DELETE FROM e2e_room_keys WHERE user_id = ? AND version = ?", (user_id, version))
                txn.execute("DELETE FROM e2e_room_keys_versions WHERE user_id = ? AND version = ?",
                            (user_id, version))
                return True
            txn.execute("SELECT last_version FROM e2e_room_keys_version_seq WHERE user_id = ?", (user_id,))
            row = txn.fetchone()
            return row is not None and 1 <= version <= int(row[0])

        return await self.db.run_interaction("key_backup_delete_version", txn_fn)

    # -- keys ----------------------------------------------------------------
    async def put_keys(self, user_id: str, version: int, keys: Iterable[RoomKey],
                       replace: Callable[[RoomKey, RoomKey], bool]) -> tuple[int, int]:
        """Store keys in the user's current backup, in one transaction. Where
        a session already has a key, ``replace(stored, new)`` says whether
        the new one takes its place. Returns (etag, count). Raises
        NoSuchVersion when the user has no backup, WrongVersion when
        ``version`` is not the current one."""
        wanted = list(keys)

        def txn_fn(txn: Txn) -> tuple[int, int]:
            # Lock first, then look for the current version: a create or
            # delete that commits meanwhile is seen by the check.
            etag = _lock_version_txn(txn, user_id, version)
            current = _current_txn(txn, user_id)
            if current is None:
                raise NoSuchVersion()
            if etag is None or version != current:
                raise WrongVersion(current)
            changed = False
            for key in wanted:
                txn.execute("SELECT first_message_index, forwarded_count, is_verified, session_data"
                            " FROM e2e_room_keys WHERE user_id = ? AND version = ? AND room_id = ?"
                            " AND session_id = ?", (user_id, version, key.room_id, key.session_id))
                row = txn.fetchone()
                values = (key.first_message_index, key.forwarded_count, int(key.is_verified),
                          _dump(key.session_data))
                if row is None:
                    txn.execute("INSERT INTO e2e_room_keys (user_id, version, room_id, session_id,"
                                " first_message_index, forwarded_count, is_verified, session_data)"
                                " VALUES (?,?,?,?,?,?,?,?)", (user_id, version, key.room_id, key.session_id, *values))
                    changed = True
                    continue
                stored = RoomKey(key.room_id, key.session_id, int(row[0]), int(row[1]), bool(row[2]),
                                 json.loads(row[3]))
                if replace(stored, key):
                    txn.execute("UPDATE e2e_room_keys SET first_message_index = ?, forwarded_count = ?,"
                                " is_verified = ?, session_data = ? WHERE user_id = ? AND version = ?"
                                " AND room_id = ? AND session_id = ?",
                                (*values, user_id, version, key.room_id, key.session_id))
                    changed = True
            if changed:
                etag = _bump_etag_txn(txn, user_id, version)
            return etag, _count_txn(txn, user_id, version)

        return await self.db.run_interaction("key_backup_put_keys", txn_fn)

    async def get_keys(self, user_id: str, version: int, room_id: Optional[str] = None,
                       session_id: Optional[str] = None) -> list[RoomKey]:
        """The keys of a live version, all of them or one room's or one
        session's. Raises NoSuchVersion."""

        def txn_fn(txn: Txn) -> list[RoomKey]:
            txn.execute("SELECT 1 FROM e2e_room_keys_versions WHERE user_id = ? AND version = ?", (user_id, version))
            if txn.fetchone() is None:
                raise NoSuchVersion()
            where, params = _key_filter(user_id, version, room_id, session_id)
            txn.execute("SELECT room_id, session_id, first_message_index, forwarded_count, is_verified, session_data"
                        f" FROM e2e_room_keys WHERE {where} ORDER BY room_id, session_id", params)
            return [RoomKey(r[0], r[1], int(r[2]), int(r[3]), bool(r[4]), json.loads(r[5])) for r in txn.fetchall()]

        return await self.db.run_interaction("key_backup_get_keys", txn_fn)

    async def delete_keys(self, user_id: str, version: int, room_id: Optional[str] = None,
                          session_id: Optional[str] = None) -> tuple[int, int]:
        """Delete a live version's keys (all, one room's, one session's).
        Returns (etag, count). Raises NoSuchVersion."""

        def txn_fn(txn: Txn) -> tuple[int, int]:
            etag = _lock_version_txn(txn, user_id, version)
            if etag is None:
                raise NoSuchVersion()
            where, params = _key_filter(user_id, version, room_id, session_id)
            txn.execute(f"DELETE FROM e2e_room_keys WHERE {where}", params)
            if txn.rowcount > 0:
                etag = _bump_etag_txn(txn, user_id, version)
            return etag, _count_txn(txn, user_id, version)

        return await self.db.run_interaction("key_backup_delete_keys", txn_fn)

    # -- erasure -------------------------------------------------------------
    async def delete_for_user(self, user_id: str) -> None:
        """Forget every backup of a user: versions, keys and the version
        counter (an erased account's ID is never registered again)."""

        def txn_fn(txn: Txn) -> None:
            for table in ("e2e_room_keys", "e2e_room_keys_versions", "e2e_room_keys_version_seq"):
                txn.execute(f"DELETE FROM {table} WHERE user_id = ?", (user_id,))

        await self.db.run_interaction("key_backup_delete_for_user", txn_fn)


def _current_txn(txn: Txn, user_id: str) -> Optional[int]:
    txn.execute("SELECT MAX(version) FROM e2e_room_keys_versions WHERE user_id = ?", (user_id,))
    row = txn.fetchone()
    return int(row[0]) if row is not None and row[0] is not None else None


def _lock_version_txn(txn: Txn, user_id: str, version: int) -> Optional[int]:
    """Take the version row's write lock (changes to one version's keys run
    one after the other on PostgreSQL too) and return its etag; None when
    the version is not live."""
    txn.execute("UPDATE e2e_room_keys_versions SET etag = etag WHERE user_id = ? AND version = ?", (user_id, version))
    if txn.rowcount == 0:
        return None
    txn.execute("SELECT etag FROM e2e_room_keys_versions WHERE user_id = ? AND version = ?", (user_id, version))
    row = txn.fetchone()
    return int(row[0]) if row is not None else None


def _bump_etag_txn(txn: Txn, user_id: str, version: int) -> int:
    txn.execute("UPDATE e2e_room_keys_versions SET etag = etag + 1 WHERE user_id = ? AND version = ?",
                (user_id, version))
    txn.execute("SELECT etag FROM e2e_room_keys_versions WHERE user_id = ? AND version = ?", (user_id, version))
    row = txn.fetchone()
    assert row is not None
    return int(row[0])


def _count_txn(txn: Txn, user_id: str, version: int) -> int:
    txn.execute("SELECT COUNT(*) FROM e2e_room_keys WHERE user_id = ? AND version = ?", (user_id, version))
    row = txn.fetchone()
    return int(row[0]) if row is not None else 0


def _key_filter(user_id: str, version: int, room_id: Optional[str],
                session_id: Optional[str]) -> tuple[str, tuple[Any, ...]]:
    where = "user_id = ? AND version = ?"
    params: tuple[Any, ...] = (user_id, version)
    if room_id is not None:
        where += " AND room_id = ?"
        params += (room_id,)
        if session_id is not None:
            where += " AND session_id = ?"
            params += (session_id,)
    return where, params
