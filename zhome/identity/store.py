"""Storage of the identity service: accounts, associations, stored invites.

Spec: identity-service-api "Authentication" (accounts made from OpenID
tokens), "Establishing associations", "Association lookup" (hashed with a
pepper), "Invitation storage". Addresses are sealed and found through the
blind index of zhome/storage/threepids.py; the association of an address
is sealed under the Matrix user's own data key (erasing the user shreds
it), stored invites and their ephemeral keys under the service's.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from typing import Any, Optional

from zhome.storage.at_rest import Sealer, open_text, seal_text
from zhome.storage.database import Database, Txn
from zhome.storage.threepids import ThreepidStore, digest

SERVICE_OWNER = "zhome:identity"


def lookup_hash(address: str, medium: str, pepper: str) -> str:
    """The spec's sha256 lookup hash: unpadded URL-safe base64 of SHA-256("address medium pepper")."""
    raw = hashlib.sha256(f"{address} {medium} {pepper}".encode("utf-8")).digest()
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


class IdentityStore:
    def __init__(self, db: Database, sealer: Optional[Sealer], threepids: ThreepidStore) -> None:
        self.db = db
        self.sealer = sealer
        self.threepids = threepids
        self._pepper: Optional[str] = None

    # -- the pepper ------------------------------------------------------------------------
    async def pepper(self, configured: Optional[str]) -> str:
        """The lookup pepper: the configured one, else one made once and kept."""
        if configured:
            return configured
        if self._pepper is not None:
            return self._pepper
        candidate = secrets.token_urlsafe(24).replace("-", "x").replace("_", "y")

        def txn_fn(txn: Txn) -> str:
            txn.execute("SELECT value FROM identity_meta WHERE name = 'lookup_pepper'")
            row = txn.fetchone()
            if row is not None:
                return str(row[0])
            txn.execute("INSERT INTO identity_meta (name, value) VALUES ('lookup_pepper', ?)", (candidate,))
            return candidate

        self._pepper = await self.db.run_interaction("identity_pepper", txn_fn)
        return self._pepper

    async def rehash(self, pepper: str) -> None:
        """Recompute the lookup hashes when the pepper changed (configured anew)."""
        rows = await self.db.execute("identity_assoc_all", "SELECT medium, address_index, mxid, address, lookup_hash"
                                     " FROM identity_associations")
        for medium, idx, mxid, sealed, old in rows:
            address = open_text(self.sealer, sealed, self._aad(medium, idx))
            if address is None:
                continue
            new = lookup_hash(address, medium, pepper)
            if new != old:
                await self.db.run_interaction("identity_rehash", lambda txn, m=medium, i=idx, h=new: txn.execute(
                    "UPDATE identity_associations SET lookup_hash = ? WHERE medium = ? AND address_index = ?",
                    (h, m, i)))

    # -- accounts ----------------------------------------------------------------------------
    async def create_account(self, token: str, user_id: str) -> None:
        await self.db.run_interaction("identity_account", lambda txn: txn.execute(
            "INSERT INTO identity_accounts (token_hash, user_id, created_ts) VALUES (?,?,?)",
            (digest(token), user_id, int(time.time() * 1000))))

    async def account_user(self, token: str) -> Optional[str]:
        rows = await self.db.execute("identity_account_user", "SELECT user_id FROM identity_accounts"
                                     " WHERE token_hash = ?", digest(token))
        return str(rows[0][0]) if rows else None

    async def delete_account(self, token: str) -> None:
        await self.db.run_interaction("identity_logout", lambda txn: txn.execute(
            "DELETE FROM identity_accounts WHERE token_hash = ?", (digest(token),)))

    async def delete_for_user(self, user_id: str) -> None:
        """A local user's accounts and associations (deactivation, erasure)."""

        def txn_fn(txn: Txn) -> None:
            txn.execute("DELETE FROM identity_accounts WHERE user_id = ?", (user_id,))
            txn.execute("DELETE FROM identity_associations WHERE mxid = ?", (user_id,))
            txn.execute("DELETE FROM invite_registration_tokens WHERE user_id = ?", (user_id,))
            txn.execute("DELETE FROM email_invite_claims WHERE user_id = ?", (user_id,))

        await self.db.run_interaction("identity_delete_user", txn_fn)

    # -- associations ------------------------------------------------------------------------
    def _aad(self, medium: str, idx: str) -> str:
        return f"identity_associations.address\x00{medium}\x00{idx}"

    async def bind(self, medium: str, address: str, mxid: str, pepper: str) -> int:
        idx = self.threepids.index(medium, address)
        sealed = seal_text(self.sealer, mxid, address, self._aad(medium, idx))
        now = int(time.time() * 1000)
        h = lookup_hash(address, medium, pepper)

        def txn_fn(txn: Txn) -> None:
            txn.execute("DELETE FROM identity_associations WHERE medium = ? AND address_index = ?", (medium, idx))
            txn.execute("INSERT INTO identity_associations (medium, address_index, lookup_hash, mxid, address,"
                        " created_ts) VALUES (?,?,?,?,?,?)", (medium, idx, h, mxid, sealed, now))

        await self.db.run_interaction("identity_bind", txn_fn)
        return now

    async def unbind(self, medium: str, address: str, mxid: str) -> bool:
        idx = self.threepids.index(medium, address)

        def txn_fn(txn: Txn) -> bool:
            txn.execute("DELETE FROM identity_associations WHERE medium = ? AND address_index = ? AND mxid = ?",
                        (medium, idx, mxid))
            return txn.rowcount > 0

        return await self.db.run_interaction("identity_unbind", txn_fn)

    async def mxid_for(self, medium: str, address: str) -> Optional[str]:
        rows = await self.db.execute("identity_mxid_for", "SELECT mxid FROM identity_associations WHERE medium = ?"
                                     " AND address_index = ?", medium, self.threepids.index(medium, address))
        return str(rows[0][0]) if rows else None

    async def lookup(self, hashes: list[str]) -> dict[str, str]:
        rows = await self.db.select_in("identity_lookup", "SELECT lookup_hash, mxid FROM identity_associations"
                                       " WHERE lookup_hash IN ({in})", hashes)
        return {str(h): str(m) for h, m in rows}

    # -- stored invites ----------------------------------------------------------------------
    def _invite_aad(self, token: str) -> str:
        return f"identity_invites.ephemeral_private_key\x00{token}"

    async def store_invite(self, token: str, medium: str, address: str, room_id: str, sender: str,
                           private_key: str, public_key: str) -> None:
        idx = self.threepids.index(medium, address)
        sealed = seal_text(self.sealer, SERVICE_OWNER, private_key, self._invite_aad(token))
        args = (token, medium, idx, room_id, sender, int(time.time() * 1000), sealed, public_key)
        await self.db.run_interaction("identity_store_invite", lambda txn: txn.execute(
            "INSERT INTO identity_invites (token, medium, address_index, room_id, sender, created_ts,"
            " ephemeral_private_key, ephemeral_public_key) VALUES (?,?,?,?,?,?,?,?)", args))

    async def take_invites(self, medium: str, address: str) -> list[dict[str, Any]]:
        """The invites stored for an address, removed from the store."""
        idx = self.threepids.index(medium, address)

        def txn_fn(txn: Txn) -> list[tuple[Any, ...]]:
            txn.execute("SELECT token, room_id, sender FROM identity_invites WHERE medium = ? AND address_index = ?"
                        " ORDER BY created_ts", (medium, idx))
            rows = txn.fetchall()
            txn.execute("DELETE FROM identity_invites WHERE medium = ? AND address_index = ?", (medium, idx))
            return rows

        rows = await self.db.run_interaction("identity_take_invites", txn_fn)
        return [{"token": t, "room_id": r, "sender": s} for t, r, s in rows]

    async def ephemeral_public_key_valid(self, public_key: str) -> bool:
        rows = await self.db.execute("identity_ephemeral_valid", "SELECT 1 FROM identity_invites"
                                     " WHERE ephemeral_public_key = ?", public_key)
        return bool(rows)

    async def invite_private_key(self, token: str) -> Optional[str]:
        rows = await self.db.execute("identity_invite_key", "SELECT ephemeral_private_key FROM identity_invites"
                                     " WHERE token = ?", token)
        if not rows:
            return None
        return open_text(self.sealer, rows[0][0], self._invite_aad(token))

    # -- invitations by email: registration tokens and claims (migration 0025) --------------
    def _regtoken_aad(self, token_hash: str) -> str:
        return f"invite_registration_tokens.address\x00{token_hash}"

    async def add_registration_token(self, token: str, medium: str, address: str, invite_token: str,
                                     room_id: str, lifetime_ms: int) -> None:
        """Store an invitation-bound registration token (hashed; the address sealed)."""
        h = digest(token)
        idx = self.threepids.index(medium, address)
        sealed = seal_text(self.sealer, SERVICE_OWNER, address, self._regtoken_aad(h))
        now = int(time.time() * 1000)
        args = (h, medium, idx, sealed, invite_token, room_id, now, now + lifetime_ms)

        def txn_fn(txn: Txn) -> None:
            # Tokens expired and never used go (with their sealed address).
            txn.execute("DELETE FROM invite_registration_tokens WHERE expires_ts < ? AND used_ts IS NULL", (now,))
            txn.execute("INSERT INTO invite_registration_tokens (token_hash, medium, address_index, address,"
                        " invite_token, room_id, created_ts, expires_ts) VALUES (?,?,?,?,?,?,?,?)", args)

        await self.db.run_interaction("identity_add_regtoken", txn_fn)

    async def registration_token(self, token: str) -> Optional[dict[str, Any]]:
        """The registration token's row (the address opened), or None."""
        h = digest(token)
        rows = await self.db.execute("identity_get_regtoken", "SELECT medium, address, invite_token, room_id,"
                                     " expires_ts, used_ts, user_id, done_ts FROM invite_registration_tokens"
                                     " WHERE token_hash = ?", h)
        if not rows:
            return None
        medium, sealed, invite_token, room_id, expires, used, user_id, done = rows[0]
        return {"medium": medium, "address": open_text(self.sealer, sealed, self._regtoken_aad(h)),
                "invite_token": invite_token, "room_id": room_id, "expires_ts": int(expires),
                "used_ts": used, "user_id": user_id, "done_ts": done}

    async def reserve_registration_token(self, token: str, user_id: str) -> bool:
        """Take the token for ``user_id`` (once; the same user again: still theirs)."""
        h = digest(token)
        now = int(time.time() * 1000)

        def txn_fn(txn: Txn) -> bool:
            txn.execute("UPDATE invite_registration_tokens SET used_ts = ?, user_id = ? WHERE token_hash = ?"
                        " AND used_ts IS NULL AND expires_ts > ?", (now, user_id, h, now))
            if txn.rowcount > 0:
                return True
            txn.execute("SELECT user_id, done_ts FROM invite_registration_tokens WHERE token_hash = ?", (h,))
            row = txn.fetchone()
            return row is not None and row[0] == user_id and row[1] is None

        return await self.db.run_interaction("identity_reserve_regtoken", txn_fn)

    async def release_registration_token(self, token: str, user_id: str) -> None:
        """Give back a reservation whose account could not be made (the name was taken)."""
        await self.db.run_interaction("identity_release_regtoken", lambda txn: txn.execute(
            "UPDATE invite_registration_tokens SET used_ts = NULL, user_id = NULL WHERE token_hash = ?"
            " AND user_id = ? AND done_ts IS NULL", (digest(token), user_id)))

    async def finish_registration_token(self, token: str) -> None:
        now = int(time.time() * 1000)
        await self.db.run_interaction("identity_finish_regtoken", lambda txn: txn.execute(
            "UPDATE invite_registration_tokens SET done_ts = ? WHERE token_hash = ?", (now, digest(token))))

    async def invite_row(self, token: str) -> Optional[tuple[str, str, str]]:
        """(medium, address_index, room_id) of a pending stored invite."""
        rows = await self.db.execute("identity_invite_row", "SELECT medium, address_index, room_id"
                                     " FROM identity_invites WHERE token = ?", token)
        return (str(rows[0][0]), str(rows[0][1]), str(rows[0][2])) if rows else None

    async def claim(self, invite_token: str) -> Optional[tuple[str, str]]:
        """(room_id, user_id) of a recorded claim of an invitation."""
        rows = await self.db.execute("identity_claim", "SELECT room_id, user_id FROM email_invite_claims"
                                     " WHERE invite_token = ?", invite_token)
        return (str(rows[0][0]), str(rows[0][1])) if rows else None

    async def record_claim(self, invite_token: str, room_id: str, user_id: str) -> None:
        now = int(time.time() * 1000)

        def txn_fn(txn: Txn) -> None:
            txn.execute("SELECT 1 FROM email_invite_claims WHERE invite_token = ?", (invite_token,))
            if txn.fetchone() is None:
                txn.execute("INSERT INTO email_invite_claims (invite_token, room_id, user_id, claimed_ts)"
                            " VALUES (?,?,?,?)", (invite_token, room_id, user_id, now))

        await self.db.run_interaction("identity_record_claim", txn_fn)
