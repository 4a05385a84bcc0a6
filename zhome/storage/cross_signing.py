"""Cross-signing keys and the signatures uploaded for them, in SQL.

Spec: client-server-api "Cross-signing" (POST /keys/device_signing/upload,
/keys/signatures/upload, the ``master_keys``, ``self_signing_keys`` and
``user_signing_keys`` of /keys/query); server-server-api "End-to-End
Encryption" (m.signing_key_update). Callers check keys and signatures; this
store keeps what was accepted. A change of a user's cross-signing keys is a
row of the device-list stream (marked ``cross_signing``, outside the
m.device_list_update prev_id chain) in the transaction that made it, so
/sync and /keys/changes report it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

from zhome.storage.database import Database, Txn, in_chunks
from zhome.storage.ids import IdGenerator

KEY_TYPES = ("master", "self_signing", "user_signing")


def _dump(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def public_key_of(key: dict[str, Any]) -> str:
    """The unpadded base64 public key of a (checked) cross-signing key."""
    (key_id,) = key["keys"].keys()
    return str(key_id).partition(":")[2]


class MasterKeyChanged(Exception):
    """Another upload changed the master key meanwhile."""


@dataclass(frozen=True)
class Signature:
    """``user_id``'s key ``key_id`` (``ed25519:...``) signed the key
    ``target_key_id`` (a device ID or a master public key) of
    ``target_user_id``."""

    target_user_id: str
    target_key_id: str
    user_id: str
    key_id: str
    signature: str


class CrossSigningStore:
    def __init__(self, db: Database, device_list_ids: IdGenerator) -> None:
        self.db = db
        #: The device-list stream's positions (shared with DeviceListStore).
        self.ids = device_list_ids
        #: Called inside the transaction that stored a signature of a local
        #: device's keys: (txn, user_id, device_id). The device-list stream
        #: records the change there (the device's keys now carry it).
        self.on_device_signed_txn: Optional[Callable[[Txn, str, str], None]] = None

    # -- reading --------------------------------------------------------------
    async def get_keys(self, user_ids: Iterable[str]) -> dict[str, dict[str, dict[str, Any]]]:
        """user -> key type -> key, as stored (without uploaded signatures)."""
        rows = await self.db.select_in(
            "xsign_get_keys", "SELECT user_id, key_type, key_json FROM e2e_cross_signing_keys WHERE user_id IN ({in})",
            sorted(set(user_ids)))
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for user_id, key_type, key_json in rows:
            out.setdefault(user_id, {})[key_type] = json.loads(key_json)
        return out

    async def get_signatures(self, target_user_ids: Iterable[str]) -> list[Signature]:
        rows = await self.db.select_in(
            "xsign_get_signatures",
            "SELECT target_user_id, target_key_id, user_id, key_id, signature FROM e2e_cross_signing_signatures"
            " WHERE target_user_id IN ({in})", sorted(set(target_user_ids)))
        return [Signature(*r) for r in rows]

    # -- local users' keys -------------------------------------------------------
    async def upload_keys(self, user_id: str, keys: dict[str, dict[str, Any]],
                          expected_master: Optional[dict[str, Any]] = None) -> tuple[int, list[str]]:
        """Store a local user's new keys (key type -> key) in one transaction.
        A new master key takes the self-signing and user-signing keys it did
        not sign with it (those not replaced in the same upload), and every
        replaced key takes the signatures made by or of it. Returns the
        stream position of the change and the key types removed. Raises
        MasterKeyChanged (nothing stored) when the stored master key is not
        ``expected_master`` any more (what the caller's checks relied on)."""

        def txn_fn(txn: Txn) -> tuple[int, list[str]]:
            txn.execute("SELECT key_type, key_json FROM e2e_cross_signing_keys WHERE user_id = ?", (user_id,))
            old = {t: json.loads(j) for t, j in txn.fetchall()}
            if old.get("master") != expected_master:
                raise MasterKeyChanged()
            removed: list[str] = []
            if "master" in keys and "master" in old:
                for t in ("self_signing", "user_signing"):
                    if t in old and t not in keys:
                        removed.append(t)
            for t in [*keys, *removed]:
                if t not in old:
                    continue
                pub = public_key_of(old[t])
                # Signatures made by the old key, and (master) made of it.
                txn.execute("DELETE FROM e2e_cross_signing_signatures WHERE user_id = ? AND key_id = ?",
                            (user_id, f"ed25519:{pub}"))
                if t == "master":
                    txn.execute("DELETE FROM e2e_cross_signing_signatures WHERE target_user_id = ?"
                                " AND target_key_id = ?", (user_id, pub))
            for t in removed:
                txn.execute("DELETE FROM e2e_cross_signing_keys WHERE user_id = ? AND key_type = ?", (user_id, t))
            self._put_keys_txn(txn, user_id, keys)
            # The user-signing key is its owner's business alone.
            private = set(keys) | set(removed) == {"user_signing"}
            return self.record_change_txn(txn, user_id, user_id if private else None), removed

        return await self.db.run_interaction("xsign_upload_keys", txn_fn)

    @staticmethod
    def _put_keys_txn(txn: Txn, user_id: str, keys: dict[str, dict[str, Any]]) -> None:
        now = int(time.time() * 1000)
        for key_type, key in keys.items():
            txn.execute("DELETE FROM e2e_cross_signing_keys WHERE user_id = ? AND key_type = ?", (user_id, key_type))
            txn.execute("INSERT INTO e2e_cross_signing_keys (user_id, key_type, key_id, key_json, ts)"
                        " VALUES (?,?,?,?,?)", (user_id, key_type, f"ed25519:{public_key_of(key)}", _dump(key), now))

    def record_change_txn(self, txn: Txn, user_id: str, visible_to: Optional[str] = None) -> int:
        """A change of ``user_id``'s cross-signing keys (or of what they
        signed) joins the device-list stream; ``visible_to``: only that
        reader is told."""
        sid = self.ids.next()
        txn.execute("INSERT INTO device_list_changes (stream_id, user_id, device_id, prev_id, cross_signing,"
                    " visible_to) VALUES (?,?,?,NULL,1,?)", (sid, user_id, "*", visible_to))
        return sid

    async def record_change(self, user_id: str) -> int:
        return await self.db.run_interaction("xsign_change", self.record_change_txn, user_id)

    # -- signatures -------------------------------------------------------------------
    async def add_signatures(self, signatures: list[Signature], signed_devices: list[tuple[str, str]],
                             changed_users: list[tuple[str, Optional[str]]]) -> list[int]:
        """Store checked signatures in one transaction; ``signed_devices``
        (user, device) are local devices whose keys now carry a new one,
        ``changed_users`` (user, reader or None for everyone) users whose
        cross-signing keys do. Returns the stream positions recorded for
        ``changed_users``."""

        def txn_fn(txn: Txn) -> list[int]:
            for s in signatures:
                txn.execute("DELETE FROM e2e_cross_signing_signatures WHERE target_user_id = ? AND target_key_id = ?"
                            " AND user_id = ? AND key_id = ?", (s.target_user_id, s.target_key_id, s.user_id, s.key_id))
                txn.execute("INSERT INTO e2e_cross_signing_signatures"
                            " (target_user_id, target_key_id, user_id, key_id, signature) VALUES (?,?,?,?,?)",
                            (s.target_user_id, s.target_key_id, s.user_id, s.key_id, s.signature))
            for user_id, device_id in signed_devices:
                if self.on_device_signed_txn is not None:
                    self.on_device_signed_txn(txn, user_id, device_id)
            return [self.record_change_txn(txn, u, reader) for u, reader in changed_users]

        return await self.db.run_interaction("xsign_add_signatures", txn_fn)

    @staticmethod
    def delete_device_signatures_txn(txn: Txn, user_id: str, device_ids: list[str]) -> None:
        """Signatures of devices whose keys are gone or replaced."""
        for chunk, qs in in_chunks(device_ids):
            txn.execute(f"DELETE FROM e2e_cross_signing_signatures WHERE target_user_id = ?"
                        f" AND target_key_id IN ({qs})", (user_id, *chunk))

    # -- remote users' keys ---------------------------------------------------------------
    @staticmethod
    def replace_remote_keys_txn(txn: Txn, user_id: str, keys: dict[str, dict[str, Any]]) -> None:
        """A remote user's whole set, from their server (a device-list resync)."""
        txn.execute("DELETE FROM e2e_cross_signing_keys WHERE user_id = ?", (user_id,))
        CrossSigningStore._put_keys_txn(txn, user_id, keys)

    @staticmethod
    def forget_remote_user_txn(txn: Txn, user_id: str) -> None:
        txn.execute("DELETE FROM e2e_cross_signing_keys WHERE user_id = ?", (user_id,))

    async def apply_remote_update(self, user_id: str, keys: dict[str, dict[str, Any]],
                                  drop: Iterable[str] = ()) -> int:
        """An m.signing_key_update: the keys it carries replace the cached
        ones of their types, ``drop`` types are removed. Returns the stream
        position of the change."""
        gone = list(drop)

        def txn_fn(txn: Txn) -> int:
            for key_type in gone:
                txn.execute("DELETE FROM e2e_cross_signing_keys WHERE user_id = ? AND key_type = ?",
                            (user_id, key_type))
            self._put_keys_txn(txn, user_id, keys)
            return self.record_change_txn(txn, user_id)

        return await self.db.run_interaction("xsign_remote_update", txn_fn)
