"""Encryption at rest of personal data in the database.

Not a Matrix spec section: zhome's own storage format. Media files have
their own (``zhome/media/crypto.py``); this covers what sits in database
columns: event content, profiles, account data, device names.

Three levels of keys:

* **Master keys** (key-encryption keys): AES-256 keys in the key ring file
  (``encryption.key_file``), one base64 key per line; the first line wraps
  new data keys, the others only unwrap keys not yet re-wrapped.
* **Data keys**: a random AES-256 key per *scope*, an ``(owner, room,
  period)`` triple: for an event the sender, the room and the month of its
  timestamp; for a user's own information the user alone. A data key is
  stored only wrapped by a master key, in the **key store**: a SQLite file
  of its own (``encryption.keystore_path``), never in the main database.
* **Sealed values**: AES-256-GCM under a data key with a fresh 96-bit
  nonce and the row's identity (an event ID, a user ID and column) as
  associated data, so a sealed value moved to another row fails to open.
  Text form, the same on both engines::

      "zk1:" <data key id> ":" base64(nonce || ciphertext || tag)

Crypto-shredding: erasure and retention delete the data keys of what they
remove. Every copy of a value sealed by a deleted key (a database backup
taken before, a replica, a dump) is then unreadable, because the key
exists nowhere else. That holds only if the key store is not kept in the
database's backups for longer than an erasure may take to be final: back
the key store up on its own, and keep those backups briefly.

Rotation without downtime: ``rotate()`` makes a new master key, writes it
first in the key ring file (the old ones stay below it), starts a new
generation of data keys (new writes get new data keys) and re-wraps every
stored data key under the new master key in bounded batches while the
server keeps serving; a master key is dropped from the file once no data
key is wrapped by it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import logging
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from typing import Iterable, Iterator, Optional

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

logger = logging.getLogger("zhome.storage.at_rest")

PREFIX = "zk1:"
KEY_SIZE = 32
NONCE_SIZE = 12
_WRAP_AAD = b"zhome data key v1"
_CHECK_LABEL = b"zhome master key check v1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS data_keys (
    id INTEGER PRIMARY KEY,
    owner TEXT NOT NULL,
    room TEXT NOT NULL,
    period TEXT NOT NULL,
    generation INTEGER NOT NULL,
    master_id TEXT NOT NULL,
    wrapped BLOB NOT NULL,
    created_ts INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS data_keys_scope ON data_keys (owner, room, period, generation);
CREATE INDEX IF NOT EXISTS data_keys_room ON data_keys (room);
CREATE INDEX IF NOT EXISTS data_keys_master ON data_keys (master_id);
CREATE TABLE IF NOT EXISTS keystore_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


#: The owner of named keys in the key store (no user ID starts with "zhome:").
NAMED_KEY_OWNER = "zhome:named"


class KeyStoreError(Exception):
    """The key ring or key store is missing, malformed or does not match."""


class MasterKey:
    __slots__ = ("key", "key_id", "_aes")

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise KeyStoreError(f"a master key must be {KEY_SIZE} bytes, got {len(key)}")
        self.key = key
        # Public: names the key in the key store without revealing it.
        self.key_id = hmac.new(key, _CHECK_LABEL, hashlib.sha256).hexdigest()[:16]
        self._aes = AESGCM(key)

    def wrap(self, data_key: bytes) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._aes.encrypt(nonce, data_key, _WRAP_AAD)

    def unwrap(self, wrapped: bytes) -> bytes:
        try:
            return self._aes.decrypt(wrapped[:NONCE_SIZE], wrapped[NONCE_SIZE:], _WRAP_AAD)
        except InvalidTag:
            raise KeyStoreError(f"a data key does not open with master key {self.key_id}") from None


def new_key_line() -> str:
    return base64.b64encode(os.urandom(KEY_SIZE)).decode("ascii")


def read_key_ring(path: str) -> list[MasterKey]:
    """The master keys in ``path``, current first."""
    try:
        with open(path, encoding="ascii") as f:
            lines = [ln.strip() for ln in f.read().splitlines()]
    except FileNotFoundError:
        raise KeyStoreError(f"encryption key file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise KeyStoreError(f"cannot read encryption key file {path}: {e}") from None
    keys = []
    for n, line in enumerate(lines, 1):
        if not line or line.startswith("#"):
            continue
        try:
            raw = base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError):
            raise KeyStoreError(f"encryption key file {path} line {n} is not base64") from None
        if len(raw) != KEY_SIZE:
            raise KeyStoreError(f"encryption key file {path} line {n} must hold {KEY_SIZE} bytes, base64")
        keys.append(MasterKey(raw))
    if not keys:
        raise KeyStoreError(f"encryption key file {path} holds no key")
    return keys


def write_key_ring(path: str, keys: list[MasterKey]) -> None:
    """Replace the key ring file atomically (a crash leaves the old or the new file, whole)."""
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write("# zhome master keys for data at rest: the first wraps new data keys. Keep secret.\n")
        for k in keys:
            f.write(base64.b64encode(k.key).decode("ascii") + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def event_period(origin_server_ts: object) -> str:
    """The period (UTC month, ``YYYYMM``) an event's data key covers."""
    if not isinstance(origin_server_ts, int) or isinstance(origin_server_ts, bool) \
            or not 0 <= origin_server_ts < 253402300800000:
        return "000000"
    t = time.gmtime(origin_server_ts // 1000)
    return f"{t.tm_year:04d}{t.tm_mon:02d}"


class Sealer:
    """Seals and opens values; owns the key store.

    Thread-safe: database transactions call it from the pool's threads. The
    key store is one SQLite connection behind a lock; unwrapped data keys
    are cached in process memory (bounded), never written anywhere else.
    zhome runs as one process, so that cache is coherent with the store.
    """

    def __init__(self, key_file: str, keystore_path: str, *, enabled: bool = True,
                 cache_size: int = 20000) -> None:
        self.key_file = key_file
        self.keystore_path = keystore_path
        self.enabled = enabled
        self._lock = threading.RLock()
        self._cache_size = cache_size
        # scope -> (id, AESGCM) for writing; id -> AESGCM for reading.
        self._by_scope: OrderedDict[tuple[str, str, str], tuple[int, AESGCM]] = OrderedDict()
        self._by_id: OrderedDict[int, Optional[AESGCM]] = OrderedDict()
        # New data keys made inside key_batch() wait in one open key store
        # transaction (``_open``) and are committed together when the
        # outermost batch of any thread ends, or at once by a key made
        # outside a batch, or by any other write to the key store.
        self._open = False
        self._batch = threading.local()
        if not os.path.exists(key_file):
            os.makedirs(os.path.dirname(os.path.abspath(key_file)), exist_ok=True)
            write_key_ring(key_file, [MasterKey(os.urandom(KEY_SIZE))])
        self._masters = read_key_ring(key_file)
        os.makedirs(os.path.dirname(os.path.abspath(keystore_path)), exist_ok=True)
        new_store = not os.path.exists(keystore_path)
        self._conn = sqlite3.connect(keystore_path, check_same_thread=False, isolation_level=None)
        if new_store:
            os.chmod(keystore_path, 0o600)
        # A deleted key's bytes are overwritten, not left in free pages; a
        # rollback journal (not WAL) so no old page copy lingers beside it.
        self._conn.execute("PRAGMA secure_delete = ON")
        self._conn.execute("PRAGMA journal_mode = DELETE")
        self._conn.execute("PRAGMA synchronous = FULL")
        self._conn.executescript(_SCHEMA)
        self.generation = int(self._meta("generation") or 0)
        known = {m.key_id for m in self._masters}
        used = {r[0] for r in self._conn.execute("SELECT DISTINCT master_id FROM data_keys")}
        missing = used - known
        if missing:
            raise KeyStoreError(
                f"the key store {keystore_path} holds data keys wrapped by master key(s) {sorted(missing)}"
                f" that {key_file} does not have: wrong key file")

    # -- key store ---------------------------------------------------------------------------
    def _meta(self, name: str) -> Optional[str]:
        row = self._conn.execute("SELECT value FROM keystore_meta WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def _set_meta(self, name: str, value: str) -> None:
        self._conn.execute("INSERT INTO keystore_meta (name, value) VALUES (?, ?)"
                           " ON CONFLICT (name) DO UPDATE SET value = excluded.value", (name, value))

    @contextlib.contextmanager
    def key_batch(self) -> Iterator[None]:
        """New data keys made within (by this thread) are committed to the
        key store together as the block ends, not one commit (and its
        fsyncs) each: for a transaction that seals under many scopes (a
        room state of thousands of members, each its sender's key). Ends
        before the caller commits what it sealed, so no sealed row can
        outlive its key by a crash, as with a key committed at once."""
        depth = getattr(self._batch, "depth", 0)
        self._batch.depth = depth + 1
        try:
            yield
        finally:
            self._batch.depth = depth
            if depth == 0:
                with self._lock:
                    self._commit_new_keys()

    def _commit_new_keys(self) -> None:
        """Commit the open key store transaction of new keys (the lock held)."""
        if self._open:
            self._conn.execute("COMMIT")
            self._open = False

    def _master(self, key_id: str) -> MasterKey:
        for m in self._masters:
            if m.key_id == key_id:
                return m
        raise KeyStoreError(f"data key wrapped by unknown master key {key_id}")

    def _remember(self, key_id: int, aes: Optional[AESGCM], scope: Optional[tuple[str, str, str]] = None) -> None:
        self._by_id[key_id] = aes
        self._by_id.move_to_end(key_id)
        while len(self._by_id) > self._cache_size:
            self._by_id.popitem(last=False)
        if scope is not None and aes is not None:
            self._by_scope[scope] = (key_id, aes)
            self._by_scope.move_to_end(scope)
            while len(self._by_scope) > self._cache_size:
                self._by_scope.popitem(last=False)

    def _key_for_scope(self, owner: str, room: str, period: str) -> tuple[int, AESGCM]:
        scope = (owner, room, period)
        with self._lock:
            hit = self._by_scope.get(scope)
            if hit is not None:
                self._by_scope.move_to_end(scope)
                return hit
            gen = self.generation
            row = self._conn.execute(
                "SELECT id, master_id, wrapped FROM data_keys WHERE owner = ? AND room = ? AND period = ?"
                " AND generation = ?", (owner, room, period, gen)).fetchone()
            if row is not None:
                key_id, master_id, wrapped = row
                aes = AESGCM(self._master(master_id).unwrap(bytes(wrapped)))
            else:
                raw = AESGCM.generate_key(bit_length=256)
                master = self._masters[0]
                # Committed (synchronous=FULL) before the caller's own
                # transaction commits what it seals: no row can outlive
                # the only copy of its key by a crash. At once, or with
                # the others of its batch as the batch ends.
                if not self._open:
                    self._conn.execute("BEGIN IMMEDIATE")
                    self._open = True
                cur = self._conn.execute(
                    "INSERT INTO data_keys (owner, room, period, generation, master_id, wrapped, created_ts)"
                    " VALUES (?,?,?,?,?,?,?)",
                    (owner, room, period, gen, master.key_id, master.wrap(raw), int(time.time() * 1000)))
                key_id = int(cur.lastrowid or 0)
                aes = AESGCM(raw)
                if not getattr(self._batch, "depth", 0):
                    self._commit_new_keys()
            self._remember(key_id, aes, scope)
            return key_id, aes

    def _key_by_id(self, key_id: int) -> Optional[AESGCM]:
        with self._lock:
            if key_id in self._by_id:
                self._by_id.move_to_end(key_id)
                return self._by_id[key_id]
            row = self._conn.execute("SELECT master_id, wrapped FROM data_keys WHERE id = ?",
                                     (key_id,)).fetchone()
            aes = AESGCM(self._master(row[0]).unwrap(bytes(row[1]))) if row else None
            self._remember(key_id, aes)
            return aes

    def named_key(self, name: str) -> bytes:
        """A long-lived 32-byte secret named ``name`` (the key of a blind
        index, say), made on first use and kept in the key store beside the
        data keys: wrapped by the master key, re-wrapped on rotation, and
        never among the keys erasure or retention destroy (its owner is no
        user and its period is empty)."""
        with self._lock:
            row = self._conn.execute(
                "SELECT master_id, wrapped FROM data_keys WHERE owner = ? AND room = ? AND period = ''"
                " ORDER BY id LIMIT 1", (NAMED_KEY_OWNER, name)).fetchone()
            if row is not None:
                return self._master(row[0]).unwrap(bytes(row[1]))
            raw = os.urandom(KEY_SIZE)
            master = self._masters[0]
            self._commit_new_keys()
            self._conn.execute(
                "INSERT INTO data_keys (owner, room, period, generation, master_id, wrapped, created_ts)"
                " VALUES (?,?,'',-1,?,?,?)",
                (NAMED_KEY_OWNER, name, master.key_id, master.wrap(raw), int(time.time() * 1000)))
            return raw

    # -- sealing -----------------------------------------------------------------------------
    def seal(self, owner: str, room: str, period: str, plaintext: bytes, aad: bytes) -> tuple[int, str]:
        """(data key id, sealed text) of ``plaintext`` under the scope's key."""
        key_id, aes = self._key_for_scope(owner, room, period)
        nonce = os.urandom(NONCE_SIZE)
        blob = base64.b64encode(nonce + aes.encrypt(nonce, plaintext, aad)).decode("ascii")
        return key_id, f"{PREFIX}{key_id}:{blob}"

    def open(self, token: str, aad: bytes) -> Optional[bytes]:
        """The plaintext of ``token``, or None when its data key was
        destroyed (crypto-shredded). Raises KeyStoreError when the value is
        damaged or does not belong to ``aad``'s row."""
        try:
            _, kid, blob = token.split(":", 2)
            key_id = int(kid)
            raw = base64.b64decode(blob, validate=True)
        except (ValueError, binascii.Error):
            raise KeyStoreError("a sealed value is malformed") from None
        aes = self._key_by_id(key_id)
        if aes is None:
            return None
        try:
            return aes.decrypt(raw[:NONCE_SIZE], raw[NONCE_SIZE:], aad)
        except InvalidTag:
            raise KeyStoreError(f"a sealed value does not open with data key {key_id}") from None

    def seal_text(self, owner: str, value: Optional[str], aad: str) -> Optional[str]:
        """A user's own text value (profile, device name, account data) under
        the user's key; None stays None; unchanged when sealing is off."""
        if value is None or not self.enabled:
            return value
        return self.seal(owner, "", "", value.encode("utf-8"), aad.encode("utf-8"))[1]

    def open_text(self, value: Optional[str], aad: str) -> Optional[str]:
        """The text of a value stored by ``seal_text``; values from before
        sealing (plain text) come back as they are; None when shredded."""
        if value is None or not value.startswith(PREFIX):
            return value
        plain = self.open(value, aad.encode("utf-8"))
        return None if plain is None else plain.decode("utf-8")

    # -- shredding ---------------------------------------------------------------------------
    def key_ids(self, *, owner: Optional[str] = None, room: Optional[str] = None,
                before_period: Optional[str] = None) -> list[int]:
        sql = "SELECT id FROM data_keys WHERE 1 = 1"
        args: list[object] = []
        if owner is not None:
            sql += " AND owner = ?"
            args.append(owner)
        if room is not None:
            sql += " AND room = ?"
            args.append(room)
        if before_period is not None:
            sql += " AND period < ? AND period != ''"
            args.append(before_period)
        with self._lock:
            return [r[0] for r in self._conn.execute(sql, args)]

    def period_of(self, key_id: int) -> Optional[str]:
        with self._lock:
            row = self._conn.execute("SELECT period FROM data_keys WHERE id = ?", (key_id,)).fetchone()
        return row[0] if row else None

    def destroy(self, key_ids: Iterable[int]) -> int:
        """Delete data keys for good; returns how many were deleted."""
        ids = sorted(set(key_ids))
        if not ids:
            return 0
        n = 0
        with self._lock:
            self._commit_new_keys()
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for i in range(0, len(ids), 500):
                    chunk = ids[i:i + 500]
                    cur = self._conn.execute(
                        f"DELETE FROM data_keys WHERE id IN ({','.join('?' * len(chunk))})", chunk)
                    n += cur.rowcount
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            for kid in ids:
                self._by_id[kid] = None
                self._by_id.move_to_end(kid)
            for scope in [s for s, (kid, _) in self._by_scope.items() if kid in set(ids)]:
                del self._by_scope[scope]
            while len(self._by_id) > self._cache_size:
                self._by_id.popitem(last=False)
        logger.info("destroyed %d data keys", n)
        return n

    def destroy_user_key(self, user_id: str) -> int:
        """Shred the key of a user's own information (profile, account data, device names)."""
        return self.destroy(self.key_ids(owner=user_id, room=""))

    # -- rotation ----------------------------------------------------------------------------
    def rotate(self) -> str:
        """A new master key first in the key ring and a new generation of
        data keys; returns the new master key's ID. Call ``rewrap_batch``
        until it returns 0 to move the stored data keys over."""
        with self._lock:
            self._commit_new_keys()
            new = MasterKey(os.urandom(KEY_SIZE))
            write_key_ring(self.key_file, [new, *self._masters])
            self._masters = [new, *self._masters]
            self.generation += 1
            self._set_meta("generation", str(self.generation))
            self._by_scope.clear()
            return new.key_id

    def rewrap_batch(self, limit: int = 500) -> int:
        """Re-wrap up to ``limit`` data keys wrapped by an old master key;
        once none is left, drop the old master keys from the key ring file.
        Returns how many were re-wrapped."""
        with self._lock:
            current = self._masters[0]
            rows = self._conn.execute("SELECT id, master_id, wrapped FROM data_keys WHERE master_id != ?"
                                      " LIMIT ?", (current.key_id, limit)).fetchall()
            if rows:
                self._commit_new_keys()
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    for key_id, master_id, wrapped in rows:
                        raw = self._master(master_id).unwrap(bytes(wrapped))
                        self._conn.execute("UPDATE data_keys SET master_id = ?, wrapped = ? WHERE id = ?",
                                           (current.key_id, current.wrap(raw), key_id))
                    self._conn.execute("COMMIT")
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                return len(rows)
            if len(self._masters) > 1:
                write_key_ring(self.key_file, [current])
                self._masters = [current]
            return 0

    def status(self) -> dict[str, object]:
        with self._lock:
            by_master = dict(self._conn.execute("SELECT master_id, COUNT(*) FROM data_keys GROUP BY master_id"))
            total = sum(by_master.values())
        return {"enabled": self.enabled, "generation": self.generation,
                "current_master_key": self._masters[0].key_id,
                "master_keys": [m.key_id for m in self._masters],
                "data_keys": total, "data_keys_by_master_key": by_master}

    def close(self) -> None:
        with self._lock:
            self._commit_new_keys()
            self._conn.close()


def seal_text(sealer: Optional[Sealer], owner: str, value: Optional[str], aad: str) -> Optional[str]:
    """``value`` sealed under ``owner``'s own key, or as it is without a sealer."""
    return value if sealer is None else sealer.seal_text(owner, value, aad)


def open_text(sealer: Optional[Sealer], value: Optional[str], aad: str) -> Optional[str]:
    """The text ``seal_text`` stored (plain values from before pass through)."""
    if sealer is None:
        if value is not None and value.startswith(PREFIX):
            raise KeyStoreError("a sealed value, and no key store open")
        return value
    return sealer.open_text(value, aad)
