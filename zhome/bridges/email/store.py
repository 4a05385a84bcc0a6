"""The bridge's own database (SQLite, apart from the homeserver's).

``inbound_mail`` holds each accepted mail from the moment before the SMTP
``250`` until it is posted: the raw message is sealed at rest (AES-256-GCM,
zhome/storage/at_rest.py, under a key ring and key store of the bridge's
own, scoped by room) and deleted from the row once posted or ignored; a
mail that failed (malformed MIME) keeps its sealed copy for inspection.
No address or body is stored in clear.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any, Optional

from zhome.storage.at_rest import Sealer
from zhome.storage.database import Database, Txn

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS bridge_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS room_addresses (
        localpart TEXT PRIMARY KEY,
        room_id TEXT NOT NULL UNIQUE,
        policy TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS inbound_mail (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        received_ts BIGINT NOT NULL,
        room_id TEXT NOT NULL,
        reply_event TEXT,
        message TEXT NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_ts BIGINT NOT NULL,
        outcome TEXT)""",
    "CREATE INDEX IF NOT EXISTS inbound_mail_due ON inbound_mail (state, next_attempt_ts)",
    """CREATE TABLE IF NOT EXISTS known_events (
        n INTEGER PRIMARY KEY AUTOINCREMENT,
        room_id TEXT NOT NULL,
        event_id TEXT NOT NULL UNIQUE,
        message_id TEXT UNIQUE)""",
    """CREATE TABLE IF NOT EXISTS outbound_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        room_id TEXT NOT NULL,
        event_id TEXT NOT NULL UNIQUE,
        payload TEXT NOT NULL,
        due_ts BIGINT NOT NULL)""",
    # A mail to an invitation's reply address (invite+TOKEN.MAC): its
    # ghost claims the invitation before the mail is posted.
    """CREATE TABLE IF NOT EXISTS invite_replies (
        inbound_id INTEGER PRIMARY KEY,
        invite_token TEXT NOT NULL,
        mac TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS ghost_members (
        room_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        membership TEXT NOT NULL,
        PRIMARY KEY (room_id, user_id))""",
)

PENDING, POSTED, FAILED, IGNORED = "pending", "posted", "failed", "ignored"
_OWNER = "zhome:email_bridge"


@dataclass(frozen=True)
class InboundMail:
    id: int
    room_id: str
    reply_event: Optional[str]
    raw: Optional[bytes]
    #: The address a reply token was made for (None for room addresses).
    token_address: Optional[str]
    attempts: int
    #: Its sealed copy is damaged (or not this row's): it cannot be posted.
    unreadable: bool = False


class BridgeStore:
    def __init__(self, db: Database, sealer: Optional[Sealer]) -> None:
        self.db = db
        self.sealer = sealer

    async def setup(self) -> None:
        def txn_fn(txn: Txn) -> None:
            for stmt in _SCHEMA:
                txn.execute(stmt)

        await self.db.run_interaction("email_bridge_schema", txn_fn)

    async def secret(self) -> bytes:
        """The bridge's HMAC secret for reply tokens, made on first use."""
        def txn_fn(txn: Txn) -> str:
            txn.execute("SELECT value FROM bridge_meta WHERE name = 'reply_secret'")
            row = txn.fetchone()
            if row is not None:
                return str(row[0])
            value = secrets.token_hex(32)
            txn.execute("INSERT INTO bridge_meta (name, value) VALUES ('reply_secret', ?)", (value,))
            return value

        return bytes.fromhex(await self.db.run_interaction("email_bridge_secret", txn_fn))

    # -- room addresses -----------------------------------------------------------------
    async def set_room_address(self, room_id: str, localpart: Optional[str], policy: str) -> bool:
        """Give ``room_id`` the address ``localpart`` (None: no address).
        False when another room already has that localpart."""
        def txn_fn(txn: Txn) -> bool:
            if localpart is not None:
                txn.execute("SELECT room_id FROM room_addresses WHERE localpart = ?", (localpart,))
                row = txn.fetchone()
                if row is not None and row[0] != room_id:
                    return False
            txn.execute("DELETE FROM room_addresses WHERE room_id = ?", (room_id,))
            if localpart is not None:
                txn.execute("INSERT INTO room_addresses (localpart, room_id, policy) VALUES (?,?,?)",
                            (localpart, room_id, policy))
            return True

        return await self.db.run_interaction("email_bridge_set_address", txn_fn)

    async def room_for_localpart(self, localpart: str) -> Optional[tuple[str, str]]:
        rows = await self.db.execute("email_bridge_address", "SELECT room_id, policy FROM room_addresses"
                                     " WHERE localpart = ?", localpart)
        return (str(rows[0][0]), str(rows[0][1])) if rows else None

    # -- ghost memberships ----------------------------------------------------------------
    async def set_membership(self, room_id: str, user_id: str, membership: str) -> None:
        def txn_fn(txn: Txn) -> None:
            txn.execute("DELETE FROM ghost_members WHERE room_id = ? AND user_id = ?", (room_id, user_id))
            txn.execute("INSERT INTO ghost_members (room_id, user_id, membership) VALUES (?,?,?)",
                        (room_id, user_id, membership))

        await self.db.run_interaction("email_bridge_membership", txn_fn)

    async def membership(self, room_id: str, user_id: str) -> Optional[str]:
        rows = await self.db.execute("email_bridge_get_membership", "SELECT membership FROM ghost_members"
                                     " WHERE room_id = ? AND user_id = ?", room_id, user_id)
        return str(rows[0][0]) if rows else None

    async def email_participants(self, room_id: str, ghost_prefix: str) -> list[str]:
        """The addresses of the ghosts joined or invited in ``room_id``."""
        from zhome.bridges.email.tokens import address_of_ghost

        rows = await self.db.execute("email_bridge_participants", "SELECT user_id, membership FROM ghost_members"
                                     " WHERE room_id = ? ORDER BY user_id LIMIT 1000", room_id)
        out = []
        for user_id, membership in rows:
            if membership in ("join", "invite"):
                address = address_of_ghost(ghost_prefix, str(user_id))
                if address is not None:
                    out.append(address)
        return out

    # -- the outbound queue ---------------------------------------------------------------
    def _seal_json(self, aad: bytes, room_id: str, data: dict[str, Any]) -> str:
        text = json.dumps(data)
        if self.sealer is not None and self.sealer.enabled:
            return self.sealer.seal(_OWNER, room_id, time.strftime("%Y-%m"), text.encode("utf-8"), aad)[1]
        return text

    async def add_outbound(self, room_id: str, event_id: str, sender: str, body: str, reply_to: Optional[str],
                           due_ts: int) -> None:
        payload = self._seal_json(f"outbound_events\x00{event_id}".encode(), room_id,
                                  {"sender": sender, "body": body, "reply_to": reply_to})

        def txn_fn(txn: Txn) -> None:
            txn.execute("SELECT 1 FROM outbound_events WHERE event_id = ?", (event_id,))
            if txn.fetchone() is None:
                txn.execute("INSERT INTO outbound_events (room_id, event_id, payload, due_ts) VALUES (?,?,?,?)",
                            (room_id, event_id, payload, due_ts))

        await self.db.run_interaction("email_bridge_add_outbound", txn_fn)

    async def due_outbound(self, limit: int) -> list[tuple[int, str, str, str, Optional[str], Optional[str]]]:
        now = int(time.time() * 1000)
        rows = await self.db.execute("email_bridge_due_outbound", "SELECT id, room_id, event_id, payload"
                                     " FROM outbound_events WHERE due_ts <= ? ORDER BY id LIMIT ?", now, limit)
        out: list[tuple[int, str, str, str, Optional[str], Optional[str]]] = []
        for row_id, room_id, event_id, payload in rows:
            text: Optional[str] = str(payload)
            if text and text.startswith("zk1:") and self.sealer is not None:
                plain = self.sealer.open(text, f"outbound_events\x00{event_id}".encode())
                text = None if plain is None else plain.decode("utf-8")
            data = json.loads(text) if text else {}
            out.append((int(row_id), str(room_id), str(event_id), str(data.get("sender", "")), data.get("body"),
                        data.get("reply_to")))
        return out

    async def next_outbound_ts(self) -> Optional[int]:
        rows = await self.db.execute("email_bridge_next_outbound", "SELECT MIN(due_ts) FROM outbound_events")
        return int(rows[0][0]) if rows and rows[0][0] is not None else None

    async def postpone_outbound(self, row_id: int, delay_ms: int) -> None:
        due = int(time.time() * 1000) + delay_ms
        await self.db.run_interaction("email_bridge_postpone_outbound", lambda txn: txn.execute(
            "UPDATE outbound_events SET due_ts = ? WHERE id = ?", (due, row_id)))

    async def finish_outbound(self, row_id: int) -> None:
        await self.db.run_interaction("email_bridge_finish_outbound", lambda txn: txn.execute(
            "DELETE FROM outbound_events WHERE id = ?", (row_id,)))

    async def message_id_of(self, event_id: str) -> Optional[str]:
        rows = await self.db.execute("email_bridge_mid_of", "SELECT message_id FROM known_events"
                                     " WHERE event_id = ?", event_id)
        return str(rows[0][0]) if rows and rows[0][0] is not None else None

    # -- known events -------------------------------------------------------------------
    async def remember_event(self, room_id: str, event_id: str, message_id: Optional[str] = None) -> int:
        """The number N of an event (for reply tokens), made on first sight."""
        def txn_fn(txn: Txn) -> int:
            txn.execute("SELECT n, message_id FROM known_events WHERE event_id = ?", (event_id,))
            row = txn.fetchone()
            if row is not None:
                if message_id is not None and row[1] is None:
                    txn.execute("UPDATE known_events SET message_id = ? WHERE n = ?", (message_id, row[0]))
                return int(row[0])
            if message_id is not None:
                # A Message-ID names one event: the first one posted for it.
                txn.execute("SELECT n FROM known_events WHERE message_id = ?", (message_id,))
                if txn.fetchone() is not None:
                    message_id_ = None
                else:
                    message_id_ = message_id
            else:
                message_id_ = None
            return txn.insert_returning_id(
                "INSERT INTO known_events (room_id, event_id, message_id) VALUES (?,?,?)",
                (room_id, event_id, message_id_), column="n")

        return await self.db.run_interaction("email_bridge_remember_event", txn_fn)

    async def event_by_number(self, n: int) -> Optional[tuple[str, str]]:
        rows = await self.db.execute("email_bridge_event_n", "SELECT room_id, event_id FROM known_events"
                                     " WHERE n = ?", n)
        return (str(rows[0][0]), str(rows[0][1])) if rows else None

    async def event_for_message_ids(self, room_id: str, message_ids: list[str]) -> Optional[str]:
        """The event of the first of ``message_ids`` known in ``room_id``."""
        for mid in message_ids[:50]:
            rows = await self.db.execute("email_bridge_event_mid", "SELECT event_id FROM known_events"
                                         " WHERE message_id = ? AND room_id = ?", mid, room_id)
            if rows:
                return str(rows[0][0])
        return None

    # -- the inbound table ----------------------------------------------------------------
    def _aad(self, row_id: int) -> bytes:
        return f"inbound_mail.message\x00{row_id}".encode()

    async def add_inbound(self, room_id: str, reply_event: Optional[str], token_address: Optional[str],
                          raw: bytes) -> int:
        """Commit one accepted mail; durable when this returns."""
        now = int(time.time() * 1000)
        payload = json.dumps({"raw": base64.b64encode(raw).decode("ascii"), "token_address": token_address})

        def txn_fn(txn: Txn) -> int:
            row_id = txn.insert_returning_id(
                "INSERT INTO inbound_mail (received_ts, room_id, reply_event, message, state, next_attempt_ts)"
                " VALUES (?,?,?,'',?,?)", (now, room_id, reply_event, PENDING, now))
            if self.sealer is not None and self.sealer.enabled:
                period = time.strftime("%Y-%m", time.gmtime(now / 1000))
                sealed = self.sealer.seal(_OWNER, room_id, period, payload.encode("utf-8"), self._aad(row_id))[1]
            else:
                sealed = payload
            txn.execute("UPDATE inbound_mail SET message = ? WHERE id = ?", (sealed, row_id))
            return row_id

        return await self.db.run_interaction("email_bridge_add_inbound", txn_fn)

    def _open(self, row_id: int, value: str) -> tuple[Optional[bytes], Optional[str]]:
        if not value:
            return None, None
        if self.sealer is not None and value.startswith("zk1:"):
            plain = self.sealer.open(value, self._aad(row_id))
            if plain is None:
                return None, None
            value = plain.decode("utf-8")
        data: dict[str, Any] = json.loads(value)
        return base64.b64decode(data["raw"]), data.get("token_address")

    async def due_inbound(self, limit: int) -> list[InboundMail]:
        now = int(time.time() * 1000)
        rows = await self.db.execute(
            "email_bridge_due", "SELECT id, room_id, reply_event, message, attempts FROM inbound_mail"
            " WHERE state = ? AND next_attempt_ts <= ? ORDER BY id LIMIT ?", PENDING, now, limit)
        out = []
        for row_id, room_id, reply_event, message, attempts in rows:
            try:
                raw, token_address = self._open(int(row_id), str(message))
            except Exception:
                out.append(InboundMail(int(row_id), str(room_id), reply_event, None, None, int(attempts), True))
                continue
            out.append(InboundMail(int(row_id), str(room_id), reply_event, raw, token_address, int(attempts)))
        return out

    async def next_due_ts(self) -> Optional[int]:
        rows = await self.db.execute("email_bridge_next", "SELECT MIN(next_attempt_ts) FROM inbound_mail"
                                     " WHERE state = ?", PENDING)
        return int(rows[0][0]) if rows and rows[0][0] is not None else None

    async def finish_inbound(self, row_id: int, state: str, outcome: str) -> None:
        """Posted or ignored: the message is deleted; failed: it stays sealed."""
        def txn_fn(txn: Txn) -> None:
            if state == FAILED:
                txn.execute("UPDATE inbound_mail SET state = ?, outcome = ? WHERE id = ?", (state, outcome, row_id))
            else:
                txn.execute("UPDATE inbound_mail SET state = ?, outcome = ?, message = '' WHERE id = ?",
                            (state, outcome, row_id))

        await self.db.run_interaction("email_bridge_finish", txn_fn)

    async def retry_inbound_later(self, row_id: int, attempts: int, delay_ms: int, outcome: str) -> None:
        nxt = int(time.time() * 1000) + delay_ms
        await self.db.run_interaction("email_bridge_retry", lambda txn: txn.execute(
            "UPDATE inbound_mail SET attempts = ?, next_attempt_ts = ?, outcome = ? WHERE id = ?",
            (attempts, nxt, outcome, row_id)))

    async def inbound_states(self) -> list[tuple[int, str, str]]:
        rows = await self.db.execute("email_bridge_states", "SELECT id, state, COALESCE(outcome, '')"
                                     " FROM inbound_mail ORDER BY id")
        return [(int(a), str(b), str(c)) for a, b, c in rows]

    # -- replies to invitation mails -----------------------------------------------------
    async def add_invite_reply(self, room_id: str, address: str, invite_token: str, mac: str, raw: bytes) -> int:
        """Commit a mail to an invitation's reply address, with its token, in one transaction."""
        now = int(time.time() * 1000)
        payload = json.dumps({"raw": base64.b64encode(raw).decode("ascii"), "token_address": address})

        def txn_fn(txn: Txn) -> int:
            row_id = txn.insert_returning_id(
                "INSERT INTO inbound_mail (received_ts, room_id, reply_event, message, state, next_attempt_ts)"
                " VALUES (?,?,NULL,'',?,?)", (now, room_id, PENDING, now))
            if self.sealer is not None and self.sealer.enabled:
                period = time.strftime("%Y-%m", time.gmtime(now / 1000))
                sealed = self.sealer.seal(_OWNER, room_id, period, payload.encode("utf-8"), self._aad(row_id))[1]
            else:
                sealed = payload
            txn.execute("UPDATE inbound_mail SET message = ? WHERE id = ?", (sealed, row_id))
            txn.execute("INSERT INTO invite_replies (inbound_id, invite_token, mac) VALUES (?,?,?)",
                        (row_id, invite_token, mac))
            return row_id

        return await self.db.run_interaction("email_bridge_add_invite_reply", txn_fn)

    async def invite_reply(self, inbound_id: int) -> Optional[tuple[str, str]]:
        """(invite token, MAC) when the mail was sent to an invitation's reply address."""
        rows = await self.db.execute("email_bridge_invite_reply", "SELECT invite_token, mac FROM invite_replies"
                                     " WHERE inbound_id = ?", inbound_id)
        return (str(rows[0][0]), str(rows[0][1])) if rows else None
