"""Third-party identifiers (3PIDs), their validation sessions and OpenID tokens.

Spec: client-server-api "Adding Account Administrative Contact
Information" (the 3PIDs of an account, validation sessions with sid,
client_secret and send_attempt), "OpenID" (tokens for third parties).

No address is stored in the clear: each is sealed (zhome/storage/at_rest.py)
and found through a blind index, the HMAC-SHA256 of the medium and the
normalised address under a key kept in the key store. A user's addresses
are sealed under that user's own data key, so erasing the user shreds
them even in backups.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from typing import Any, Optional

from zhome.storage.at_rest import Sealer, open_text, seal_text
from zhome.storage.database import Database, IntegrityError, Txn

#: The owner of validation sessions' sealed addresses (no user ID starts with "zhome:").
SESSION_OWNER = "zhome:3pid-sessions"
#: The spec's client_secret grammar.
CLIENT_SECRET_RE = re.compile(r"^[0-9a-zA-Z.=_\-]{1,255}$")
#: Addresses longer than this are refused (RFC 5321 path limit).
MAX_ADDRESS = 254
_EMAIL_RE = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,253}$")


def normalise_email(address: str) -> Optional[str]:
    """The canonical form of an email address (trimmed, lower-cased), or None when it is not one."""
    addr = address.strip().lower()
    if len(addr) > MAX_ADDRESS or not _EMAIL_RE.match(addr):
        return None
    domain = addr.rsplit("@", 1)[1]
    if domain.startswith(".") or domain.endswith(".") or ".." in domain:
        return None
    return addr


def digest(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


class ThreepidStore:
    def __init__(self, db: Database, sealer: Optional[Sealer]) -> None:
        self.db = db
        self.sealer = sealer
        self._index_key: Optional[bytes] = None

    # -- the blind index ---------------------------------------------------------------------
    def index(self, medium: str, address: str) -> str:
        """The blind index of a normalised address."""
        if self._index_key is None:
            if self.sealer is not None:
                self._index_key = self.sealer.named_key("threepid-index")
            else:
                self._index_key = b"\x00" * 32
        return hmac.new(self._index_key, f"{medium}\x00{address}".encode("utf-8"), hashlib.sha256).hexdigest()

    # -- the 3PIDs of accounts ---------------------------------------------------------------
    def _aad(self, medium: str, idx: str) -> str:
        return f"user_threepids.address\x00{medium}\x00{idx}"

    async def add(self, user_id: str, medium: str, address: str, validated_at: int,
                  added_at: Optional[int] = None) -> bool:
        """Add (or refresh) the user's 3PID; False when another account has it."""
        idx = self.index(medium, address)
        sealed = seal_text(self.sealer, user_id, address, self._aad(medium, idx))
        now = int(time.time() * 1000)

        def txn_fn(txn: Txn) -> bool:
            txn.execute("SELECT user_id FROM user_threepids WHERE medium = ? AND address_index = ?", (medium, idx))
            row = txn.fetchone()
            if row is not None:
                if row[0] != user_id:
                    return False
                txn.execute("UPDATE user_threepids SET validated_at = ? WHERE medium = ? AND address_index = ?",
                            (validated_at, medium, idx))
                return True
            txn.execute("INSERT INTO user_threepids (medium, address_index, user_id, address, added_at, validated_at)"
                        " VALUES (?,?,?,?,?,?)", (medium, idx, user_id, sealed, added_at or now, validated_at))
            return True

        try:
            return await self.db.run_interaction("add_threepid", txn_fn)
        except IntegrityError:
            return False

    async def list_for_user(self, user_id: str) -> list[dict[str, Any]]:
        rows = await self.db.execute(
            "list_threepids", "SELECT medium, address_index, address, added_at, validated_at FROM user_threepids"
            " WHERE user_id = ? ORDER BY added_at, address_index", user_id)
        out = []
        for medium, idx, sealed, added, validated in rows:
            address = open_text(self.sealer, sealed, self._aad(medium, idx))
            if address is None:
                continue  # shredded
            out.append({"medium": medium, "address": address, "added_at": int(added),
                        "validated_at": int(validated)})
        return out

    async def user_for(self, medium: str, address: str) -> Optional[str]:
        rows = await self.db.execute("threepid_user", "SELECT user_id FROM user_threepids WHERE medium = ?"
                                     " AND address_index = ?", medium, self.index(medium, address))
        return str(rows[0][0]) if rows else None

    async def delete(self, user_id: str, medium: str, address: str) -> bool:
        idx = self.index(medium, address)

        def txn_fn(txn: Txn) -> bool:
            txn.execute("DELETE FROM user_threepids WHERE user_id = ? AND medium = ? AND address_index = ?",
                        (user_id, medium, idx))
            return txn.rowcount > 0

        return await self.db.run_interaction("delete_threepid", txn_fn)

    async def delete_for_user(self, user_id: str) -> None:
        def txn_fn(txn: Txn) -> None:
            txn.execute("DELETE FROM user_threepids WHERE user_id = ?", (user_id,))
            txn.execute("DELETE FROM user_threepid_id_servers WHERE user_id = ?", (user_id,))

        await self.db.run_interaction("delete_threepids_for_user", txn_fn)

    # -- where the user's 3PIDs are bound -----------------------------------------------------
    def _bound_aad(self, user_id: str, medium: str, idx: str, id_server: str) -> str:
        return f"user_threepid_id_servers.address\x00{user_id}\x00{medium}\x00{idx}\x00{id_server}"

    async def add_id_server(self, user_id: str, medium: str, address: str, id_server: str) -> None:
        idx = self.index(medium, address)
        sealed = seal_text(self.sealer, user_id, address, self._bound_aad(user_id, medium, idx, id_server))

        def txn_fn(txn: Txn) -> None:
            txn.execute("DELETE FROM user_threepid_id_servers WHERE user_id = ? AND medium = ? AND address_index = ?"
                        " AND id_server = ?", (user_id, medium, idx, id_server))
            txn.execute("INSERT INTO user_threepid_id_servers (user_id, medium, address_index, id_server, address)"
                        " VALUES (?,?,?,?,?)", (user_id, medium, idx, id_server, sealed))

        await self.db.run_interaction("add_threepid_id_server", txn_fn)

    async def id_servers(self, user_id: str, medium: Optional[str] = None,
                         address: Optional[str] = None) -> list[tuple[str, str, str]]:
        """(medium, address, id_server) the user's 3PIDs are bound at (one 3PID's, when given)."""
        sql = "SELECT medium, address_index, id_server, address FROM user_threepid_id_servers WHERE user_id = ?"
        args: list[Any] = [user_id]
        if medium is not None and address is not None:
            sql += " AND medium = ? AND address_index = ?"
            args += [medium, self.index(medium, address)]
        rows = await self.db.execute("threepid_id_servers", sql + " ORDER BY id_server", *args)
        out = []
        for m, idx, id_server, sealed in rows:
            addr = open_text(self.sealer, sealed, self._bound_aad(user_id, m, idx, id_server))
            if addr is not None:
                out.append((str(m), addr, str(id_server)))
        return out

    async def remove_id_server(self, user_id: str, medium: str, address: str, id_server: str) -> None:
        idx = self.index(medium, address)
        await self.db.run_interaction("remove_threepid_id_server", lambda txn: txn.execute(
            "DELETE FROM user_threepid_id_servers WHERE user_id = ? AND medium = ? AND address_index = ?"
            " AND id_server = ?", (user_id, medium, idx, id_server)))

    async def replace_for_user(self, user_id: str, threepids: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Make ``threepids`` (medium, normalised address) the user's set, as
        validated now (the admin API); returns those another account has."""
        now = int(time.time() * 1000)
        wanted = {(m, self.index(m, a)): a for m, a in threepids}
        taken: list[tuple[str, str]] = []

        def txn_fn(txn: Txn) -> None:
            for (medium, idx), address in wanted.items():
                txn.execute("SELECT user_id FROM user_threepids WHERE medium = ? AND address_index = ?",
                            (medium, idx))
                row = txn.fetchone()
                if row is not None and row[0] != user_id:
                    taken.append((medium, address))
            if taken:
                return
            txn.execute("SELECT medium, address_index FROM user_threepids WHERE user_id = ?", (user_id,))
            have = {(r[0], r[1]) for r in txn.fetchall()}
            for medium, idx in have - set(wanted):
                txn.execute("DELETE FROM user_threepids WHERE user_id = ? AND medium = ? AND address_index = ?",
                            (user_id, medium, idx))
            for (medium, idx), address in wanted.items():
                if (medium, idx) in have:
                    continue
                sealed = seal_text(self.sealer, user_id, address, self._aad(medium, idx))
                txn.execute("INSERT INTO user_threepids (medium, address_index, user_id, address, added_at,"
                            " validated_at) VALUES (?,?,?,?,?,?)", (medium, idx, user_id, sealed, now, now))

        await self.db.run_interaction("replace_threepids", txn_fn)
        return taken

    # -- validation sessions -----------------------------------------------------------------
    def _session_aad(self, sid: str) -> str:
        return f"threepid_sessions.address\x00{sid}"

    async def request_session(self, service: str, medium: str, address: str, client_secret: str,
                              send_attempt: int, lifetime_ms: int,
                              next_link: Optional[str] = None) -> tuple[str, Optional[str]]:
        """(sid, token to send) for a requestToken call. The token is None
        when this send_attempt was already seen for the same address and
        secret: the same session, and no new mail (spec: send_attempt)."""
        idx = self.index(medium, address)
        secret_hash = digest(client_secret)
        now = int(time.time() * 1000)
        token = secrets.token_urlsafe(24)
        new_sid = secrets.token_urlsafe(18)
        sealed = seal_text(self.sealer, SESSION_OWNER, address, self._session_aad(new_sid))

        def txn_fn(txn: Txn) -> tuple[str, Optional[str]]:
            txn.execute("DELETE FROM threepid_sessions WHERE expires_ts < ?", (now,))
            txn.execute("SELECT sid, send_attempt FROM threepid_sessions WHERE service = ? AND medium = ?"
                        " AND address_index = ? AND client_secret_hash = ?", (service, medium, idx, secret_hash))
            row = txn.fetchone()
            if row is not None:
                sid, last = row
                if send_attempt <= int(last):
                    return str(sid), None
                txn.execute("UPDATE threepid_sessions SET send_attempt = ?, token_hash = ?, next_link = ?"
                            " WHERE sid = ?", (send_attempt, digest(token), next_link, sid))
                return str(sid), token
            txn.execute(
                "INSERT INTO threepid_sessions (sid, service, medium, address_index, address, client_secret_hash,"
                " token_hash, send_attempt, created_ts, expires_ts, validated_at, next_link)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,NULL,?)",
                (new_sid, service, medium, idx, sealed, secret_hash, digest(token), send_attempt, now,
                 now + lifetime_ms, next_link))
            return new_sid, token

        return await self.db.run_interaction("request_threepid_session", txn_fn)

    async def get_session(self, service: str, sid: str, client_secret: str) -> Optional[dict[str, Any]]:
        """The session (medium, address, validated_at, next_link) when sid
        and client secret match and it has not expired."""
        rows = await self.db.execute(
            "get_threepid_session", "SELECT medium, address, client_secret_hash, expires_ts, validated_at,"
            " next_link FROM threepid_sessions WHERE sid = ? AND service = ?", sid, service)
        if not rows:
            return None
        medium, sealed, secret_hash, expires, validated, next_link = rows[0]
        if not hmac.compare_digest(secret_hash, digest(client_secret)) or int(expires) < time.time() * 1000:
            return None
        address = open_text(self.sealer, sealed, self._session_aad(sid))
        if address is None:
            return None
        return {"sid": sid, "medium": medium, "address": address, "validated_at": validated,
                "next_link": next_link}

    async def submit_token(self, service: str, sid: str, client_secret: str, token: str) -> Optional[dict[str, Any]]:
        """Mark the session validated when the token matches; the session, or None."""
        session = await self.get_session(service, sid, client_secret)
        if session is None:
            return None
        now = int(time.time() * 1000)

        def txn_fn(txn: Txn) -> bool:
            txn.execute("SELECT token_hash, validated_at FROM threepid_sessions WHERE sid = ?", (sid,))
            row = txn.fetchone()
            if row is None or not hmac.compare_digest(row[0], digest(token)):
                return False
            if row[1] is None:
                txn.execute("UPDATE threepid_sessions SET validated_at = ? WHERE sid = ?", (now, sid))
            return True

        if not await self.db.run_interaction("submit_threepid_token", txn_fn):
            return None
        session["validated_at"] = session["validated_at"] or now
        return session

    async def delete_session(self, sid: str) -> None:
        await self.db.run_interaction("delete_threepid_session", lambda txn: txn.execute(
            "DELETE FROM threepid_sessions WHERE sid = ?", (sid,)))

    # -- OpenID tokens -----------------------------------------------------------------------
    async def create_openid_token(self, token: str, user_id: str, valid_until_ms: int) -> None:
        now = int(time.time() * 1000)

        def txn_fn(txn: Txn) -> None:
            txn.execute("DELETE FROM openid_tokens WHERE valid_until_ms < ?", (now,))
            txn.execute("INSERT INTO openid_tokens (token_hash, user_id, valid_until_ms) VALUES (?,?,?)",
                        (digest(token), user_id, valid_until_ms))

        await self.db.run_interaction("create_openid_token", txn_fn)

    async def openid_user(self, token: str) -> Optional[str]:
        """The user an unexpired OpenID token was issued to."""
        rows = await self.db.execute("openid_user", "SELECT user_id, valid_until_ms FROM openid_tokens"
                                     " WHERE token_hash = ?", digest(token))
        if not rows or int(rows[0][1]) < time.time() * 1000:
            return None
        return str(rows[0][0])

    async def delete_openid_for_user(self, user_id: str) -> None:
        await self.db.run_interaction("delete_openid_tokens", lambda txn: txn.execute(
            "DELETE FROM openid_tokens WHERE user_id = ?", (user_id,)))
