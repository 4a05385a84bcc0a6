"""Users, profiles, devices, access and refresh tokens, UI-auth sessions.

Spec: client-server-api "Client Authentication", "Device management",
"Profiles". Tokens are kept as SHA-256 digests only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from zhome.storage.at_rest import Sealer, open_text, seal_text
from zhome.storage.database import Database, IntegrityError, Txn
from zhome.storage.ids import IdGenerator
from zhome.storage.lru import InvalidatedCache

logger = logging.getLogger(__name__)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class TokenInfo:
    token_id: int
    user_id: str
    device_id: str
    valid_until_ms: Optional[int]
    is_admin: bool
    deactivated: bool
    is_guest: bool = False
    locked: bool = False
    suspended: bool = False


class AccountsStore:
    def __init__(self, db: Database, token_ids: IdGenerator, refresh_ids: IdGenerator,
                 sealer: Optional[Sealer] = None) -> None:
        self.db = db
        #: Encryption at rest of profiles, device names and last-seen addresses.
        self.sealer = sealer
        self._names: Optional[dict[str, Optional[str]]] = None
        self._name_writes = 0
        self.token_ids = token_ids
        self.refresh_ids = refresh_ids
        # Token lookups happen on every request. Entries are dropped whenever
        # any token, device or user is removed, so a cached token is never
        # one that was revoked.
        self._token_cache: dict[str, TokenInfo] = {}
        self._token_generation = 0
        # user -> their device IDs, for the fan-out of to-device messages.
        # Every write of the devices table is in this store and goes through
        # _devices_changed_txn, which invalidates in the transaction;
        # _device_ids_changed does again after commit.
        self._device_ids_cache: InvalidatedCache[str, frozenset[str]] = InvalidatedCache(50000)
        #: Called inside the transaction that adds, renames or deletes
        #: devices: (txn, user_id, device_ids, deleted). End-to-end
        #: encryption records the device-list change there and, for deleted
        #: devices, drops their keys and pending to-device messages; pushers
        #: of deleted devices go too.
        self.device_change_hooks: list[Callable[[Txn, str, list[str], bool], None]] = []
        #: Called with the user ID once a deletion of devices has committed.
        self.after_device_deletion: list[Callable[[str], None]] = []

    def _devices_changed_txn(self, txn: Txn, user_id: str, device_ids: list[str], deleted: bool) -> None:
        if not device_ids:
            return
        self._device_ids_changed(user_id)
        for hook in self.device_change_hooks:
            hook(txn, user_id, device_ids, deleted)

    @staticmethod
    def _device_ids_txn(txn: Txn, user_id: str) -> list[str]:
        txn.execute("SELECT device_id FROM devices WHERE user_id = ? ORDER BY device_id", (user_id,))
        return [r[0] for r in txn.fetchall()]

    # -- users ------------------------------------------------------------
    async def create_user(self, user_id: str, password_hash: Optional[str], admin: bool = False,
                          displayname: Optional[str] = None, guest: bool = False) -> bool:
        """Create the account (a guest account when ``guest``); False if the user ID is taken."""

        def txn_fn(txn: Txn) -> None:
            txn.execute(
                "INSERT INTO users (user_id, password_hash, is_admin, created_ts, is_guest) VALUES (?,?,?,?,?)",
                (user_id, password_hash, int(admin), int(time.time() * 1000), int(guest)),
            )
            txn.execute("INSERT INTO profiles (user_id, displayname) VALUES (?, ?)",
                        (user_id, self.seal_profile(user_id, "displayname", displayname)))

        self._name_writes += 1
        try:
            await self.db.run_interaction("create_user", txn_fn)
        except IntegrityError:
            return False
        self._note_name(user_id, displayname)
        return True

    async def get_user(self, user_id: str) -> Optional[dict[str, Any]]:
        rows = await self.db.execute(
            "get_user",
            "SELECT user_id, password_hash, is_admin, deactivated, created_ts, is_guest FROM users WHERE user_id = ?",
            user_id,
        )
        if not rows:
            return None
        u, ph, adm, deac, ts, guest = rows[0]
        return {"user_id": u, "password_hash": ph, "is_admin": bool(adm), "deactivated": bool(deac), "created_ts": ts,
                "is_guest": bool(guest)}

    async def get_user_status(self, user_id: str) -> Optional[tuple[bool, bool, bool, bool]]:
        """(is_admin, deactivated, locked, suspended) of an account, or None
        (for requests an application service makes as one of its users)."""
        rows = await self.db.execute(
            "get_user_status", "SELECT is_admin, deactivated, locked, suspended FROM users WHERE user_id = ?", user_id)
        if not rows:
            return None
        adm, deac, locked, suspended = rows[0]
        return bool(adm), bool(deac), bool(locked), bool(suspended)

    async def is_guest(self, user_id: str) -> bool:
        rows = await self.db.execute("is_guest", "SELECT is_guest FROM users WHERE user_id = ?", user_id)
        return bool(rows and rows[0][0])

    async def get_guests(self, user_ids: list[str]) -> list[str]:
        """Those of ``user_ids`` that are guest accounts."""
        out: list[str] = []
        # Bounded chunks: a room may have many local members.
        for i in range(0, len(user_ids), 200):
            chunk = user_ids[i:i + 200]
            rows = await self.db.execute(
                "get_guests",
                "SELECT user_id FROM users WHERE is_guest = 1 AND user_id IN (" + ",".join("?" * len(chunk)) + ")",
                *chunk,
            )
            out.extend(r[0] for r in rows)
        return out

    async def list_guests(self, after: str, limit: int) -> list[str]:
        """Active guest accounts with user IDs after ``after``, in order, at most ``limit``."""
        rows = await self.db.execute(
            "list_guests",
            "SELECT user_id FROM users WHERE is_guest = 1 AND deactivated = 0 AND user_id > ?"
            " ORDER BY user_id LIMIT ?",
            after, limit,
        )
        return [r[0] for r in rows]

    async def upgrade_guest(self, user_id: str, password_hash: Optional[str]) -> bool:
        """Make the guest account ``user_id`` a full account; False if it is not a guest (any more)."""

        def txn_fn(txn: Txn) -> bool:
            txn.execute("UPDATE users SET is_guest = 0, password_hash = ? WHERE user_id = ? AND is_guest = 1"
                        " AND deactivated = 0", (password_hash, user_id))
            return txn.rowcount > 0

        done = await self.db.run_interaction("upgrade_guest", txn_fn)
        # Cached tokens still say "guest".
        self._forget_tokens()
        return done

    async def user_exists_ci(self, user_id: str) -> bool:
        rows = await self.db.execute("user_exists", "SELECT 1 FROM users WHERE LOWER(user_id) = LOWER(?)", user_id)
        return bool(rows)

    async def set_password_hash(self, user_id: str, password_hash: Optional[str]) -> None:
        await self.db.run_interaction(
            "set_password",
            lambda txn: txn.execute("UPDATE users SET password_hash = ? WHERE user_id = ?", (password_hash, user_id)),
        )

    async def set_deactivated(self, user_id: str) -> None:
        def txn_fn(txn: Txn) -> None:
            self._devices_changed_txn(txn, user_id, self._device_ids_txn(txn, user_id), True)
            txn.execute("UPDATE users SET deactivated = 1, password_hash = NULL WHERE user_id = ?", (user_id,))
            txn.execute("DELETE FROM access_tokens WHERE user_id = ?", (user_id,))
            txn.execute("DELETE FROM refresh_tokens WHERE user_id = ?", (user_id,))
            txn.execute("DELETE FROM login_tokens WHERE user_id = ?", (user_id,))
            txn.execute("DELETE FROM devices WHERE user_id = ?", (user_id,))
            txn.execute("UPDATE profiles SET displayname = NULL, avatar_url = NULL WHERE user_id = ?", (user_id,))
            txn.execute("DELETE FROM profile_fields WHERE user_id = ?", (user_id,))

        self._forget_tokens()
        self._name_writes += 1
        await self.db.run_interaction("deactivate", txn_fn)
        self._note_name(user_id, None)
        self._forget_tokens()
        self._devices_deleted(user_id)

    async def reactivate(self, user_id: str) -> None:
        """Mark a deactivated account active again (an admin sets its password)."""
        await self.db.run_interaction(
            "reactivate", lambda txn: txn.execute("UPDATE users SET deactivated = 0 WHERE user_id = ?", (user_id,)))
        self._forget_tokens()

    # -- profiles -----------------------------------------------------------
    async def get_profile(self, user_id: str) -> Optional[dict[str, Optional[str]]]:
        rows = await self.db.execute(
            "get_profile", "SELECT displayname, avatar_url FROM profiles WHERE user_id = ?", user_id
        )
        if not rows:
            return None
        return {"displayname": self.open_profile(user_id, "displayname", rows[0][0]),
                "avatar_url": self.open_profile(user_id, "avatar_url", rows[0][1])}

    async def set_profile_field(self, user_id: str, field: str, value: Optional[str]) -> None:
        assert field in ("displayname", "avatar_url")
        stored = self.seal_profile(user_id, field, value)
        if field == "displayname":
            self._name_writes += 1
        await self.db.run_interaction(
            "set_profile",
            lambda txn: txn.execute(f"UPDATE profiles SET {field} = ? WHERE user_id = ?", (stored, user_id)),
        )
        if field == "displayname":
            self._note_name(user_id, value)

    async def get_profile_fields(self, user_id: str) -> dict[str, Any]:
        """The user's extended profile fields (not displayname or avatar_url)."""
        rows = await self.db.execute(
            "get_profile_fields", "SELECT field, value FROM profile_fields WHERE user_id = ? ORDER BY field", user_id)
        out: dict[str, Any] = {}
        for field, stored in rows:
            text = self.open_profile(user_id, "field:" + field, stored)
            if text is not None:
                out[field] = json.loads(text)
        return out

    async def set_extended_profile_field(self, user_id: str, field: str, value: Any,
                                         max_total_bytes: Optional[int] = None) -> bool:
        """Store one extended field. With ``max_total_bytes``, refuse (return
        False, nothing written) when the whole profile would then be larger."""
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        stored = self.seal_profile(user_id, "field:" + field, text)

        def txn_fn(txn: Txn) -> bool:
            if max_total_bytes is not None:
                txn.execute("SELECT field, value FROM profile_fields WHERE user_id = ? AND field <> ?",
                            (user_id, field))
                total = len(field.encode()) + len(text.encode())
                for other, other_stored in txn.fetchall():
                    opened = self.open_profile(user_id, "field:" + other, other_stored) or ""
                    total += len(other.encode()) + len(opened.encode())
                txn.execute("SELECT displayname, avatar_url FROM profiles WHERE user_id = ?", (user_id,))
                row = txn.fetchone()
                if row is not None:
                    for name, v in zip(("displayname", "avatar_url"), row):
                        total += len((self.open_profile(user_id, name, v) or "").encode())
                if total > max_total_bytes:
                    return False
            txn.execute("DELETE FROM profile_fields WHERE user_id = ? AND field = ?", (user_id, field))
            txn.execute("INSERT INTO profile_fields (user_id, field, value) VALUES (?,?,?)", (user_id, field, stored))
            return True

        return await self.db.run_interaction("set_profile_field_ext", txn_fn)

    async def delete_extended_profile_field(self, user_id: str, field: str) -> None:
        await self.db.execute("delete_profile_field_ext", "DELETE FROM profile_fields WHERE user_id = ? AND field = ?",
                              user_id, field)

    # -- encryption at rest: profiles, under the user's key ---------------------------------
    def seal_profile(self, user_id: str, field: str, value: Optional[str]) -> Optional[str]:
        return seal_text(self.sealer, user_id, value, f"profiles.{field}\x00{user_id}")

    def open_profile(self, user_id: str, field: str, value: Optional[str]) -> Optional[str]:
        return open_text(self.sealer, value, f"profiles.{field}\x00{user_id}")

    async def display_names(self) -> dict[str, Optional[str]]:
        """Every local user's display name. Sealed in the database, so what
        searches and orderings by name need is this in-memory copy: a cache
        of the profiles table, loaded on first use and kept by this store's
        own writes (zhome is one process; the table stays the truth)."""
        if self._names is not None:
            return self._names
        for _ in range(3):
            writes = self._name_writes
            rows = await self.db.execute("load_display_names", "SELECT user_id, displayname FROM profiles")
            names = {u: self.open_profile(u, "displayname", n) for u, n in rows}
            if writes == self._name_writes:
                self._names = names
                return names
        return names  # names kept changing while read: used once, not kept

    def _note_name(self, user_id: str, value: Optional[str]) -> None:
        if self._names is not None:
            self._names[user_id] = value

    # -- devices and tokens ---------------------------------------------------
    async def create_device_and_token(
        self,
        user_id: str,
        device_id: str,
        access_token: str,
        display_name: Optional[str],
        valid_until_ms: Optional[int],
        refresh_token: Optional[str],
        ip: Optional[str] = None,
    ) -> None:
        """Create (or reuse) the device and issue a token for it, atomically.

        Logging in again with an existing device ID replaces that device's
        old tokens, as the spec says for re-used device IDs.
        """

        def txn_fn(txn: Txn) -> None:
            now = int(time.time() * 1000)
            txn.execute("SELECT 1 FROM devices WHERE user_id = ? AND device_id = ?", (user_id, device_id))
            if txn.fetchone() is None:
                txn.execute(
                    "INSERT INTO devices (user_id, device_id, display_name, last_seen_ts, last_seen_ip)"
                    " VALUES (?,?,?,?,?)",
                    (user_id, device_id, self.seal_name(user_id, device_id, display_name), now,
                     self.seal_ip(user_id, device_id, ip)),
                )
                self._devices_changed_txn(txn, user_id, [device_id], False)
            else:
                txn.execute("DELETE FROM access_tokens WHERE user_id = ? AND device_id = ?", (user_id, device_id))
                txn.execute("DELETE FROM refresh_tokens WHERE user_id = ? AND device_id = ?", (user_id, device_id))
            self._issue_tokens_txn(txn, user_id, device_id, access_token, valid_until_ms, refresh_token)

        await self.db.run_interaction("create_device_and_token", txn_fn)
        self._device_ids_changed(user_id)
        # Re-using a device ID replaced that device's old tokens.
        self._forget_tokens()

    async def create_device(self, user_id: str, device_id: str, display_name: Optional[str]) -> bool:
        """Create a device that has no access token (a dehydrated device);
        False, and nothing written, when the user already has that device."""

        def txn_fn(txn: Txn) -> bool:
            txn.execute("SELECT 1 FROM devices WHERE user_id = ? AND device_id = ?", (user_id, device_id))
            if txn.fetchone() is not None:
                return False
            txn.execute("INSERT INTO devices (user_id, device_id, display_name, last_seen_ts, last_seen_ip)"
                        " VALUES (?,?,?,?,?)", (user_id, device_id, self.seal_name(user_id, device_id, display_name),
                                                int(time.time() * 1000), None))
            self._devices_changed_txn(txn, user_id, [device_id], False)
            return True

        created = await self.db.run_interaction("create_device", txn_fn)
        self._device_ids_changed(user_id)
        return created

    def _issue_tokens_txn(
        self,
        txn: Txn,
        user_id: str,
        device_id: str,
        access_token: str,
        valid_until_ms: Optional[int],
        refresh_token: Optional[str],
    ) -> None:
        rid = None
        if refresh_token is not None:
            rid = self.refresh_ids.next()
            txn.execute(
                "INSERT INTO refresh_tokens (id, token_hash, user_id, device_id) VALUES (?,?,?,?)",
                (rid, token_hash(refresh_token), user_id, device_id),
            )
        txn.execute(
            "INSERT INTO access_tokens (id, token_hash, user_id, device_id, valid_until_ms, refresh_token_id)"
            " VALUES (?,?,?,?,?,?)",
            (self.token_ids.next(), token_hash(access_token), user_id, device_id, valid_until_ms, rid),
        )

    async def refresh(
        self, refresh_token: str, new_access: str, valid_until_ms: Optional[int], new_refresh: str
    ) -> Optional[tuple[str, str]]:
        """Swap a refresh token for new tokens; None if it is unknown."""

        def txn_fn(txn: Txn) -> Optional[tuple[str, str]]:
            txn.execute("SELECT id, user_id, device_id FROM refresh_tokens WHERE token_hash = ?",
                        (token_hash(refresh_token),))
            row = txn.fetchone()
            if row is None:
                return None
            rid, user_id, device_id = row
            txn.execute("DELETE FROM access_tokens WHERE refresh_token_id = ?", (rid,))
            txn.execute("DELETE FROM refresh_tokens WHERE id = ?", (rid,))
            self._issue_tokens_txn(txn, user_id, device_id, new_access, valid_until_ms, new_refresh)
            return user_id, device_id

        result = await self.db.run_interaction("refresh_token", txn_fn)
        self._forget_tokens()
        return result

    def forget_cached_tokens(self) -> None:
        """Drop cached token lookups after a change to what they carry
        (an account's admin flag, lock or suspension)."""
        self._forget_tokens()

    def _forget_tokens(self) -> None:
        self._token_cache.clear()
        # A lookup that started before a revocation must not cache its
        # (possibly stale) answer afterwards.
        self._token_generation += 1

    async def get_token(self, access_token: str) -> Optional[TokenInfo]:
        cached = self._token_cache.get(access_token)
        if cached is not None:
            return cached
        generation = self._token_generation
        rows = await self.db.execute(
            "get_token",
            "SELECT t.id, t.user_id, t.device_id, t.valid_until_ms, u.is_admin, u.deactivated, u.is_guest,"
            " u.locked, u.suspended FROM access_tokens t JOIN users u ON u.user_id = t.user_id WHERE t.token_hash = ?",
            token_hash(access_token),
        )
        if not rows:
            return None
        tid, user_id, device_id, vu, adm, deac, guest, locked, suspended = rows[0]
        info = TokenInfo(tid, user_id, device_id, vu, bool(adm), bool(deac), bool(guest), bool(locked),
                         bool(suspended))
        if generation == self._token_generation:
            if len(self._token_cache) > 50000:
                self._token_cache.clear()
            self._token_cache[access_token] = info
        return info

    async def delete_token(self, token_id: int) -> None:
        await self.db.run_interaction(
            "delete_token", lambda txn: txn.execute("DELETE FROM access_tokens WHERE id = ?", (token_id,))
        )
        self._forget_tokens()

    async def create_login_token(self, token: str, user_id: str, expires_ts: int) -> None:
        """Spec: "Token-based login": a one-use token; only its hash is kept."""
        await self.db.run_interaction("create_login_token", lambda txn: txn.execute(
            "INSERT INTO login_tokens (token_hash, user_id, expires_ts) VALUES (?,?,?)",
            (token_hash(token), user_id, expires_ts)))

    async def use_login_token(self, token: str, now_ms: int) -> Optional[str]:
        """The user a login token logs in, once: the token is gone after this
        call whether or not it was still valid (expired ones are swept too)."""

        def txn_fn(txn: Txn) -> Optional[str]:
            txn.execute("DELETE FROM login_tokens WHERE expires_ts <= ?", (now_ms,))
            h = token_hash(token)
            txn.execute("SELECT user_id FROM login_tokens WHERE token_hash = ?", (h,))
            row = txn.fetchone()
            if row is None:
                return None
            txn.execute("DELETE FROM login_tokens WHERE token_hash = ?", (h,))
            # Two logins racing on one token: only the one whose delete took it wins.
            return str(row[0]) if txn.rowcount == 1 else None

        return await self.db.run_interaction("use_login_token", txn_fn)

    async def delete_devices(self, user_id: str, device_ids: Optional[list[str]]) -> None:
        """Delete the given devices (all when None) and their tokens."""

        def txn_fn(txn: Txn) -> None:
            if device_ids is None:
                self._devices_changed_txn(txn, user_id, self._device_ids_txn(txn, user_id), True)
                txn.execute("DELETE FROM login_tokens WHERE user_id = ?", (user_id,))
                txn.execute("DELETE FROM access_tokens WHERE user_id = ?", (user_id,))
                txn.execute("DELETE FROM refresh_tokens WHERE user_id = ?", (user_id,))
                txn.execute("DELETE FROM devices WHERE user_id = ?", (user_id,))
                return
            existing = set(self._device_ids_txn(txn, user_id))
            self._devices_changed_txn(txn, user_id, [d for d in dict.fromkeys(device_ids) if d in existing], True)
            for d in device_ids:
                txn.execute("DELETE FROM access_tokens WHERE user_id = ? AND device_id = ?", (user_id, d))
                txn.execute("DELETE FROM refresh_tokens WHERE user_id = ? AND device_id = ?", (user_id, d))
                txn.execute("DELETE FROM devices WHERE user_id = ? AND device_id = ?", (user_id, d))

        await self.db.run_interaction("delete_devices", txn_fn)
        self._forget_tokens()
        self._devices_deleted(user_id)

    async def delete_other_tokens(self, user_id: str, keep_device: Optional[str]) -> None:
        """Log out every device but ``keep_device`` (after a password change)."""

        def txn_fn(txn: Txn) -> None:
            others = [d for d in self._device_ids_txn(txn, user_id) if d != keep_device]
            self._devices_changed_txn(txn, user_id, others, True)
            for d in others:
                txn.execute("DELETE FROM access_tokens WHERE user_id = ? AND device_id = ?", (user_id, d))
                txn.execute("DELETE FROM refresh_tokens WHERE user_id = ? AND device_id = ?", (user_id, d))
                txn.execute("DELETE FROM devices WHERE user_id = ? AND device_id = ?", (user_id, d))

        await self.db.run_interaction("delete_other_tokens", txn_fn)
        self._forget_tokens()
        self._devices_deleted(user_id)

    # -- encryption at rest: a device's name and last address, under the user's key
    def seal_name(self, user_id: str, device_id: str, name: Optional[str]) -> Optional[str]:
        return seal_text(self.sealer, user_id, name, f"devices.display_name\x00{user_id}\x00{device_id}")

    def open_name(self, user_id: str, device_id: str, name: Optional[str]) -> Optional[str]:
        return open_text(self.sealer, name, f"devices.display_name\x00{user_id}\x00{device_id}")

    def seal_ip(self, user_id: str, device_id: str, ip: Optional[str]) -> Optional[str]:
        return seal_text(self.sealer, user_id, ip, f"devices.last_seen_ip\x00{user_id}\x00{device_id}")

    def open_ip(self, user_id: str, device_id: str, ip: Optional[str]) -> Optional[str]:
        return open_text(self.sealer, ip, f"devices.last_seen_ip\x00{user_id}\x00{device_id}")

    def _device_ids_changed(self, user_id: str) -> None:
        self._device_ids_cache.invalidate(user_id)

    async def get_device_ids(self, user_id: str) -> frozenset[str]:
        """The IDs of the user's devices (cached)."""
        cached = self._device_ids_cache.get(user_id)
        if cached is not None:
            return cached
        ticket = self._device_ids_cache.ticket(user_id)
        ids = frozenset(await self.db.run_interaction("get_device_ids", self._device_ids_txn, user_id))
        self._device_ids_cache.set_if_unchanged(user_id, ticket, ids)
        return ids

    def _devices_deleted(self, user_id: str) -> None:
        self._device_ids_changed(user_id)
        for after in self.after_device_deletion:
            try:
                after(user_id)
            except Exception:
                logger.exception("after-device-deletion hook failed")

    async def get_device_names(self, user_ids: list[str]) -> dict[str, dict[str, Optional[str]]]:
        """user -> device -> display name, for many users in one query (key queries)."""
        rows = await self.db.select_in(
            "get_device_names", "SELECT user_id, device_id, display_name FROM devices WHERE user_id IN ({in})",
            user_ids)
        out: dict[str, dict[str, Optional[str]]] = {}
        for u, d, name in rows:
            out.setdefault(u, {})[d] = self.open_name(u, d, name)
        return out

    async def get_devices(self, user_id: str) -> list[dict[str, Any]]:
        rows = await self.db.execute(
            "get_devices",
            "SELECT device_id, display_name, last_seen_ts, last_seen_ip FROM devices WHERE user_id = ?"
            " ORDER BY device_id",
            user_id,
        )
        out = []
        for d, name, ts, ip in rows:
            name = self.open_name(user_id, d, name)
            ip = self.open_ip(user_id, d, ip)
            dev: dict[str, Any] = {"device_id": d}
            if name is not None:
                dev["display_name"] = name
            if ts is not None:
                dev["last_seen_ts"] = ts
            if ip is not None:
                dev["last_seen_ip"] = ip
            out.append(dev)
        return out

    async def set_device_name(self, user_id: str, device_id: str, name: Optional[str]) -> bool:
        def txn_fn(txn: Txn) -> bool:
            txn.execute("UPDATE devices SET display_name = ? WHERE user_id = ? AND device_id = ?",
                        (self.seal_name(user_id, device_id, name), user_id, device_id))
            if txn.rowcount == 0:
                return False
            self._devices_changed_txn(txn, user_id, [device_id], False)
            return True

        return await self.db.run_interaction("set_device_name", txn_fn)

    # -- UI auth sessions ---------------------------------------------------------
    async def create_uia_session(self, session_id: str, params: dict[str, Any]) -> None:
        await self.db.run_interaction(
            "create_uia",
            lambda txn: txn.execute(
                "INSERT INTO ui_auth_sessions (session_id, created_ts, completed, params) VALUES (?,?,?,?)",
                (session_id, int(time.time() * 1000), "[]", json.dumps(params)),
            ),
        )

    async def get_uia_session(self, session_id: str) -> Optional[tuple[list[str], dict[str, Any], int]]:
        rows = await self.db.execute(
            "get_uia", "SELECT completed, params, created_ts FROM ui_auth_sessions WHERE session_id = ?", session_id
        )
        if not rows:
            return None
        return json.loads(rows[0][0]), json.loads(rows[0][1]), rows[0][2]

    async def set_uia_params(self, session_id: str, params: dict[str, Any]) -> None:
        await self.db.run_interaction(
            "uia_params",
            lambda txn: txn.execute(
                "UPDATE ui_auth_sessions SET params = ? WHERE session_id = ?", (json.dumps(params), session_id)
            ),
        )

    async def set_uia_completed(self, session_id: str, completed: list[str]) -> None:
        await self.db.run_interaction(
            "uia_completed",
            lambda txn: txn.execute(
                "UPDATE ui_auth_sessions SET completed = ? WHERE session_id = ?", (json.dumps(completed), session_id)
            ),
        )

    async def delete_uia_session(self, session_id: str) -> None:
        await self.db.run_interaction(
            "delete_uia", lambda txn: txn.execute("DELETE FROM ui_auth_sessions WHERE session_id = ?", (session_id,))
        )

    # -- registration tokens --------------------------------------------------------
    async def registration_token_valid(self, token: str) -> bool:
        rows = await self.db.execute(
            "regtoken_valid", "SELECT uses_allowed, completed, expiry_time FROM registration_tokens WHERE token = ?",
            token,
        )
        if not rows:
            return False
        allowed, completed, expiry = rows[0]
        if expiry is not None and expiry < int(time.time() * 1000):
            return False
        return allowed is None or completed < allowed

    async def use_registration_token(self, token: str) -> None:
        await self.db.run_interaction(
            "regtoken_use",
            lambda txn: txn.execute("UPDATE registration_tokens SET completed = completed + 1 WHERE token = ?",
                                    (token,)),
        )

    async def add_registration_token(self, token: str, uses_allowed: Optional[int], expiry_time: Optional[int]) -> None:
        await self.db.run_interaction(
            "regtoken_add",
            lambda txn: txn.execute(
                "INSERT INTO registration_tokens (token, uses_allowed, completed, expiry_time) VALUES (?,?,0,?)",
                (token, uses_allowed, expiry_time),
            ),
        )
