"""The bridge's own database, apart from the homeserver's: SQLite by default
(``email_bridge.database_path``), or PostgreSQL (``email_bridge.database_url``,
a database of its own, never the homeserver's).

``inbound_mail`` holds each accepted mail from the moment before the SMTP
``250`` until it is posted: the raw message is sealed at rest (AES-256-GCM,
zhome/storage/at_rest.py, under a key ring and key store of the bridge's
own, scoped by room) and deleted from the row once posted or ignored; a
mail that failed (malformed MIME) keeps its sealed copy for inspection.
No address or body is stored in clear.

Sender checks (senderauth.py) add: a mail held for an administrator
(``state = 'held'``, the room address's ``unauthenticated: quarantine``)
keeps its sealed copy until ``zhome bridge-email quarantine release`` or
``delete``; the checks' results travel sealed in the row's payload.
``room_auth_policies`` holds each room address's policy for
unauthenticated mail, ``held_notices`` the rooms already told that mail is
held (told once until their held mail is released or deleted), and
``bouncing_addresses`` the participants' addresses a hard bounce stopped,
as a blind index (HMAC-SHA256 under a named key of the key store), never
in clear.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from zhome.storage.at_rest import Sealer
from zhome.storage.database import ENGINE_POSTGRES, ENGINE_SQLITE, Database, Txn, in_chunks

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS bridge_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS room_addresses (
        localpart TEXT PRIMARY KEY,
        room_id TEXT NOT NULL UNIQUE,
        policy TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS inbound_mail (
        id {serial},
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
        n {serial},
        room_id TEXT NOT NULL,
        event_id TEXT NOT NULL UNIQUE,
        message_id TEXT UNIQUE)""",
    """CREATE TABLE IF NOT EXISTS outbound_events (
        id {serial},
        room_id TEXT NOT NULL,
        event_id TEXT NOT NULL UNIQUE,
        payload TEXT NOT NULL,
        due_ts BIGINT NOT NULL)""",
    # Every Message-ID the bridge mailed and the events that mail carried
    # (a coalesced mail carries several), so a reply's In-Reply-To or
    # References finds them and a Matrix reply to any of them threads.
    # Rooms whose state has m.room.encryption: the bridge cannot read
    # them, so it posts no mail there.
    "CREATE TABLE IF NOT EXISTS encrypted_rooms (room_id TEXT PRIMARY KEY)",
    """CREATE TABLE IF NOT EXISTS sent_mail_events (
        message_id TEXT NOT NULL,
        room_id TEXT NOT NULL,
        event_id TEXT NOT NULL,
        PRIMARY KEY (message_id, event_id))""",
    "CREATE INDEX IF NOT EXISTS sent_mail_events_event ON sent_mail_events (event_id)",
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
    """CREATE TABLE IF NOT EXISTS room_auth_policies (
        room_id TEXT PRIMARY KEY,
        unauthenticated TEXT NOT NULL)""",
    "CREATE TABLE IF NOT EXISTS held_notices (room_id TEXT PRIMARY KEY, notified_ts BIGINT NOT NULL)",
    # Each outbox mail of the bridge: its room and participant (the ghost),
    # until the relay took it or the outbox gave it up, so the room can be
    # told of a mail that never went out.
    """CREATE TABLE IF NOT EXISTS outbox_mail_rooms (
        outbox_id BIGINT PRIMARY KEY,
        room_id TEXT NOT NULL,
        ghost TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS bouncing_addresses (
        address_index TEXT PRIMARY KEY,
        since_ts BIGINT NOT NULL,
        status TEXT NOT NULL)""",
)

#: A room that never goes quiet gets its mail this long after the oldest
#: queued message's quiet period was over.
MAX_HOLD_MS = 10 * 60 * 1000

PENDING, POSTED, FAILED, IGNORED, HELD = "pending", "posted", "failed", "ignored", "held"
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
    #: The sender checks' results (senderauth.AuthResult.as_dict) and verdict.
    auth: Optional[dict[str, Any]] = None
    #: A delivery report addressed to the bridge.
    bounce: bool = False


@dataclass
class InboundContext:
    """What BridgeStore.inbound_context found for a batch of mails."""

    #: inbound row ID -> (invitation token, MAC) of a reply to an invitation.
    invites: dict[int, tuple[str, str]] = field(default_factory=dict)
    #: (room, ghost) -> its membership as the bridge last saw it.
    memberships: dict[tuple[str, str], str] = field(default_factory=dict)
    #: (room, Message-ID) -> the event posted for it.
    known: dict[tuple[str, str], str] = field(default_factory=dict)
    #: The addresses a hard bounce stopped.
    bouncing: set[str] = field(default_factory=set)


def open_bridge_database(cfg: Any) -> Database:
    """The bridge's database as ``email_bridge`` configures it."""
    if cfg.database_url is not None:
        from zhome.config import parse_database_url

        db_cfg = parse_database_url(cfg.database_url, "email_bridge.database_url")
        return Database(db_cfg.engine, dict(db_cfg.args))
    return Database(ENGINE_SQLITE, {"database": cfg.database_path})


class BridgeStore:
    def __init__(self, db: Database, sealer: Optional[Sealer]) -> None:
        self.db = db
        self.sealer = sealer

    async def setup(self) -> None:
        # Row numbers that only grow: SQLite's AUTOINCREMENT, PostgreSQL's sequences.
        serial = "BIGSERIAL PRIMARY KEY" if self.db.engine == ENGINE_POSTGRES else "INTEGER PRIMARY KEY AUTOINCREMENT"

        def txn_fn(txn: Txn) -> None:
            for stmt in _SCHEMA:
                txn.execute(stmt.replace("{serial}", serial))

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
        """When the next room becomes due (due_outbound_rooms)."""
        rows = await self.db.execute(
            "email_bridge_next_outbound",
            "SELECT MIN(CASE WHEN mx < mn + ? THEN mx ELSE mn + ? END) FROM"
            " (SELECT MAX(due_ts) AS mx, MIN(due_ts) AS mn FROM outbound_events GROUP BY room_id) AS rooms",
            MAX_HOLD_MS, MAX_HOLD_MS)
        return int(rows[0][0]) if rows and rows[0][0] is not None else None

    async def postpone_outbound(self, row_id: int, delay_ms: int) -> None:
        due = int(time.time() * 1000) + delay_ms
        await self.db.run_interaction("email_bridge_postpone_outbound", lambda txn: txn.execute(
            "UPDATE outbound_events SET due_ts = ? WHERE id = ?", (due, row_id)))

    async def finish_outbound(self, row_id: int) -> None:
        await self.db.run_interaction("email_bridge_finish_outbound", lambda txn: txn.execute(
            "DELETE FROM outbound_events WHERE id = ?", (row_id,)))

    async def add_outbound_event(self, room_id: str, event_id: str, data: dict[str, Any], due_ts: int) -> None:
        """Queue a room message (``data``: sender, content) for mail; the
        first copy of an event wins (a transaction delivered twice)."""
        payload = self._seal_json(f"outbound_events\x00{event_id}".encode(), room_id, data)

        def txn_fn(txn: Txn) -> None:
            txn.execute("SELECT 1 FROM outbound_events WHERE event_id = ?", (event_id,))
            if txn.fetchone() is None:
                txn.execute("INSERT INTO outbound_events (room_id, event_id, payload, due_ts) VALUES (?,?,?,?)",
                            (room_id, event_id, payload, due_ts))

        await self.db.run_interaction("email_bridge_add_outbound", txn_fn)

    async def remember_and_queue(self, room_id: str, event_id: str, data: Optional[dict[str, Any]], due_ts: int,
                                 ghost_prefix: str) -> bool:
        """remember_event(room_id, event_id) and, when ``data`` is given and
        the room has email participants, add_outbound_event: one
        transaction (a room message from a transaction). True when queued."""
        from zhome.bridges.email.tokens import address_of_ghost

        payload = None if data is None else self._seal_json(f"outbound_events\x00{event_id}".encode(), room_id, data)

        def txn_fn(txn: Txn) -> bool:
            self.remember_event_txn(txn, room_id, event_id)
            if payload is None:
                return False
            txn.execute("SELECT user_id FROM ghost_members WHERE room_id = ? AND membership IN ('join', 'invite')"
                        " ORDER BY user_id LIMIT 1000", (room_id,))
            if not any(address_of_ghost(ghost_prefix, str(r[0])) is not None for r in txn.fetchall()):
                return False
            txn.execute("SELECT 1 FROM outbound_events WHERE event_id = ?", (event_id,))
            if txn.fetchone() is None:
                txn.execute("INSERT INTO outbound_events (room_id, event_id, payload, due_ts) VALUES (?,?,?,?)",
                            (room_id, event_id, payload, due_ts))
            return True

        return await self.db.run_interaction("email_bridge_remember_and_queue", txn_fn)

    async def due_outbound_rooms(self, limit: int) -> list[str]:
        """Rooms whose queued messages are due, oldest first: a room is due
        once its newest message's quiet period is over (the room went quiet:
        a burst becomes one mail), or once its oldest waited MAX_HOLD_MS
        past its own (a room that never goes quiet still gets mail)."""
        now = int(time.time() * 1000)
        rows = await self.db.execute(
            "email_bridge_due_rooms", "SELECT room_id, MIN(id) FROM outbound_events GROUP BY room_id"
            " HAVING MAX(due_ts) <= ? OR MIN(due_ts) <= ? ORDER BY MIN(id) LIMIT ?", now, now - MAX_HOLD_MS, limit)
        return [str(r[0]) for r in rows]

    async def room_outbound(self, room_id: str, limit: int) -> list[tuple[int, str, Optional[dict[str, Any]]]]:
        """The queued messages of ``room_id`` in event order: (row ID, event
        ID, data or None when its sealed copy does not open)."""
        rows = await self.db.execute("email_bridge_room_outbound", "SELECT id, event_id, payload FROM outbound_events"
                                     " WHERE room_id = ? ORDER BY id LIMIT ?", room_id, limit)
        out: list[tuple[int, str, Optional[dict[str, Any]]]] = []
        for row_id, event_id, payload in rows:
            text: Optional[str] = str(payload)
            if text and text.startswith("zk1:") and self.sealer is not None:
                try:
                    plain = self.sealer.open(text, f"outbound_events\x00{event_id}".encode())
                except Exception:
                    plain = None
                text = None if plain is None else plain.decode("utf-8")
            data = json.loads(text) if text else None
            out.append((int(row_id), str(event_id), data if isinstance(data, dict) else None))
        return out

    async def postpone_outbound_rows(self, row_ids: list[int], delay_ms: int) -> None:
        due = int(time.time() * 1000) + delay_ms

        def txn_fn(txn: Txn) -> None:
            for row_id in row_ids:
                txn.execute("UPDATE outbound_events SET due_ts = ? WHERE id = ?", (due, row_id))

        await self.db.run_interaction("email_bridge_postpone_outbound", txn_fn)

    @staticmethod
    def finish_outbound_txn(txn: Txn, row_ids: list[int], room_id: str, message_id: Optional[str],
                            event_ids: list[str], outbox_ghosts: Optional[list[tuple[int, str]]] = None) -> None:
        """In the transaction that hands the batch's mails to the outbox: the
        rows are done, the Message-ID remembered for the events it carried,
        and each outbox mail's room and participant (``outbox_ghosts``)."""
        for outbox_id, ghost in outbox_ghosts or ():
            txn.execute("INSERT INTO outbox_mail_rooms (outbox_id, room_id, ghost) VALUES (?,?,?)",
                        (outbox_id, room_id, ghost))
        for row_id in row_ids:
            txn.execute("DELETE FROM outbound_events WHERE id = ?", (row_id,))
        if message_id is not None:
            for event_id in event_ids:
                txn.execute("SELECT 1 FROM sent_mail_events WHERE message_id = ? AND event_id = ?",
                            (message_id, event_id))
                if txn.fetchone() is None:
                    txn.execute("INSERT INTO sent_mail_events (message_id, room_id, event_id) VALUES (?,?,?)",
                                (message_id, room_id, event_id))

    @staticmethod
    def forget_outbox_mails_txn(txn: Txn, outbox_ids: list[int]) -> None:
        """The outbox mails the relay took: their records go (in the
        outbox's transaction that deletes them)."""
        for chunk, qs in in_chunks(outbox_ids):
            txn.execute(f"DELETE FROM outbox_mail_rooms WHERE outbox_id IN ({qs})", chunk)

    async def take_outbox_mail(self, outbox_id: int) -> Optional[tuple[str, str]]:
        """The (room, ghost) of an outbox mail that was sent or given up; the
        record goes."""
        def txn_fn(txn: Txn) -> Optional[tuple[str, str]]:
            txn.execute("SELECT room_id, ghost FROM outbox_mail_rooms WHERE outbox_id = ?", (outbox_id,))
            row = txn.fetchone()
            if row is None:
                return None
            txn.execute("DELETE FROM outbox_mail_rooms WHERE outbox_id = ?", (outbox_id,))
            return str(row[0]), str(row[1])

        return await self.db.run_interaction("email_bridge_take_outbox_mail", txn_fn)

    async def message_ids_of(self, event_id: str) -> list[str]:
        """The Message-IDs an event is known by: the inbound mail it came
        from, or the mails of ours that carried it."""
        rows = await self.db.execute("email_bridge_mids_of", "SELECT message_id FROM known_events"
                                     " WHERE event_id = ? AND message_id IS NOT NULL", event_id)
        out = [str(r[0]) for r in rows]
        rows = await self.db.execute("email_bridge_sent_mids_of", "SELECT message_id FROM sent_mail_events"
                                     " WHERE event_id = ? ORDER BY message_id LIMIT 5", event_id)
        out.extend(str(r[0]) for r in rows if str(r[0]) not in out)
        return out

    async def message_id_of(self, event_id: str) -> Optional[str]:
        rows = await self.db.execute("email_bridge_mid_of", "SELECT message_id FROM known_events"
                                     " WHERE event_id = ?", event_id)
        return str(rows[0][0]) if rows and rows[0][0] is not None else None

    # -- known events -------------------------------------------------------------------
    async def remember_event(self, room_id: str, event_id: str, message_id: Optional[str] = None) -> int:
        """The number N of an event (for reply tokens), made on first sight."""
        return await self.db.run_interaction("email_bridge_remember_event", self.remember_event_txn, room_id,
                                             event_id, message_id)

    @staticmethod
    def remember_event_txn(txn: Txn, room_id: str, event_id: str, message_id: Optional[str] = None) -> int:
        txn.execute("SELECT n, message_id FROM known_events WHERE event_id = ?", (event_id,))
        row = txn.fetchone()
        if row is not None:
            if message_id is not None and row[1] is None:
                txn.execute("SELECT 1 FROM known_events WHERE message_id = ?", (message_id,))
                if txn.fetchone() is None:
                    txn.execute("UPDATE known_events SET message_id = ? WHERE n = ?", (message_id, row[0]))
            return int(row[0])
        message_id_: Optional[str] = None
        if message_id is not None:
            # A Message-ID names one event: the first one posted for it.
            txn.execute("SELECT n FROM known_events WHERE message_id = ?", (message_id,))
            if txn.fetchone() is None:
                message_id_ = message_id
        return txn.insert_returning_id(
            "INSERT INTO known_events (room_id, event_id, message_id) VALUES (?,?,?)",
            (room_id, event_id, message_id_), column="n")

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
                          raw: bytes, auth: Optional[dict[str, Any]] = None, held: bool = False,
                          bounce: bool = False) -> int:
        """Commit one accepted mail; durable when this returns. ``held``:
        quarantined, not posted until released."""
        now = int(time.time() * 1000)
        data: dict[str, Any] = {"raw": base64.b64encode(raw).decode("ascii"), "token_address": token_address}
        if auth is not None:
            data["auth"] = auth
        if bounce:
            data["bounce"] = True
        payload = json.dumps(data)
        state = HELD if held else PENDING
        return await self.db.run_interaction(
            "email_bridge_add_inbound", self._insert_inbound_txn, now, room_id, reply_event, state, payload)

    def _insert_inbound_txn(self, txn: Txn, now: int, room_id: str, reply_event: Optional[str], state: str,
                            payload: str) -> int:
        """One inbound_mail row, its message sealed under the row's own AAD."""
        row_id = txn.insert_returning_id(
            "INSERT INTO inbound_mail (received_ts, room_id, reply_event, message, state, next_attempt_ts)"
            " VALUES (?,?,?,'',?,?)", (now, room_id, reply_event, state, now))
        if self.sealer is not None and self.sealer.enabled:
            period = time.strftime("%Y-%m", time.gmtime(now / 1000))
            sealed = self.sealer.seal(_OWNER, room_id, period, payload.encode("utf-8"), self._aad(row_id))[1]
        else:
            sealed = payload
        txn.execute("UPDATE inbound_mail SET message = ? WHERE id = ?", (sealed, row_id))
        return row_id

    def _open(self, row_id: int, value: str) -> tuple[Optional[bytes], Optional[str], dict[str, Any]]:
        if not value:
            return None, None, {}
        if self.sealer is not None and value.startswith("zk1:"):
            plain = self.sealer.open(value, self._aad(row_id))
            if plain is None:
                return None, None, {}
            value = plain.decode("utf-8")
        data: dict[str, Any] = json.loads(value)
        return base64.b64decode(data["raw"]), data.get("token_address"), data

    async def due_inbound(self, limit: int) -> list[InboundMail]:
        now = int(time.time() * 1000)
        rows = await self.db.execute(
            "email_bridge_due", "SELECT id, room_id, reply_event, message, attempts FROM inbound_mail"
            " WHERE state = ? AND next_attempt_ts <= ? ORDER BY id LIMIT ?", PENDING, now, limit)
        out = []
        for row_id, room_id, reply_event, message, attempts in rows:
            try:
                raw, token_address, data = self._open(int(row_id), str(message))
            except Exception:
                out.append(InboundMail(int(row_id), str(room_id), reply_event, None, None, int(attempts), True))
                continue
            auth = data.get("auth")
            out.append(InboundMail(int(row_id), str(room_id), reply_event, raw, token_address, int(attempts),
                                   auth=auth if isinstance(auth, dict) else None,
                                   bounce=bool(data.get("bounce"))))
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

    async def inbound_context(self, inbound_ids: list[int], members: list[tuple[str, str]],
                              references: list[tuple[str, str]], addresses: list[str]) -> "InboundContext":
        """What posting a batch of mails needs to know, in one transaction:
        the invitation tokens of ``inbound_ids`` (invite_reply), the
        memberships of (room, ghost) ``members``, the events of (room,
        Message-ID) ``references`` and which ``addresses`` are bouncing."""
        indexes = {a: self._address_index(a) for a in addresses}

        def txn_fn(txn: Txn) -> InboundContext:
            ctx = InboundContext()
            for chunk, qs in in_chunks(sorted(set(inbound_ids))):
                txn.execute(f"SELECT inbound_id, invite_token, mac FROM invite_replies WHERE inbound_id IN ({qs})",
                            chunk)
                for row_id, token, mac in txn.fetchall():
                    ctx.invites[int(row_id)] = (str(token), str(mac))
            for room_id, user_id in sorted(set(members)):
                txn.execute("SELECT membership FROM ghost_members WHERE room_id = ? AND user_id = ?",
                            (room_id, user_id))
                row = txn.fetchone()
                if row is not None:
                    ctx.memberships[(room_id, user_id)] = str(row[0])
            for room_id, mid in sorted(set(references)):
                txn.execute("SELECT event_id FROM known_events WHERE message_id = ? AND room_id = ?", (mid, room_id))
                row = txn.fetchone()
                if row is not None:
                    ctx.known[(room_id, mid)] = str(row[0])
            for address, index in indexes.items():
                txn.execute("SELECT 1 FROM bouncing_addresses WHERE address_index = ?", (index,))
                if txn.fetchone() is not None:
                    ctx.bouncing.add(address)
            return ctx

        return await self.db.run_interaction("email_bridge_inbound_context", txn_fn)

    async def finish_inbound_batch(self, remembered: list[tuple[str, str, Optional[str]]],
                                   finished: list[tuple[int, str, str]],
                                   retries: list[tuple[int, int, int, str]],
                                   not_bouncing: list[str]) -> None:
        """A batch's results in one transaction: the events posted, in
        order (room, event ID, Message-ID: remember_event), the rows done
        (row ID, state, outcome: finish_inbound), the rows to try again
        (row ID, attempts, delay ms, outcome: retry_inbound_later) and the
        addresses whose mail works again (clear_bouncing)."""
        now = int(time.time() * 1000)
        indexes = [self._address_index(a) for a in not_bouncing]

        def txn_fn(txn: Txn) -> None:
            for room_id, event_id, message_id in remembered:
                self.remember_event_txn(txn, room_id, event_id, message_id)
            for row_id, state, outcome in finished:
                if state == FAILED:
                    txn.execute("UPDATE inbound_mail SET state = ?, outcome = ? WHERE id = ?",
                                (state, outcome, row_id))
                else:
                    txn.execute("UPDATE inbound_mail SET state = ?, outcome = ?, message = '' WHERE id = ?",
                                (state, outcome, row_id))
            for row_id, attempts, delay_ms, outcome in retries:
                txn.execute("UPDATE inbound_mail SET attempts = ?, next_attempt_ts = ?, outcome = ? WHERE id = ?",
                            (attempts, now + delay_ms, outcome, row_id))
            for index in indexes:
                txn.execute("DELETE FROM bouncing_addresses WHERE address_index = ?", (index,))

        await self.db.run_interaction("email_bridge_finish_batch", txn_fn)

    async def retry_inbound_later(self, row_id: int, attempts: int, delay_ms: int, outcome: str) -> None:
        nxt = int(time.time() * 1000) + delay_ms
        await self.db.run_interaction("email_bridge_retry", lambda txn: txn.execute(
            "UPDATE inbound_mail SET attempts = ?, next_attempt_ts = ?, outcome = ? WHERE id = ?",
            (attempts, nxt, outcome, row_id)))

    async def inbound_states(self) -> list[tuple[int, str, str]]:
        rows = await self.db.execute("email_bridge_states", "SELECT id, state, COALESCE(outcome, '')"
                                     " FROM inbound_mail ORDER BY id")
        return [(int(a), str(b), str(c)) for a, b, c in rows]

    # -- sender checks: room policies, quarantine, bounces ------------------------------------
    async def set_room_auth_policy(self, room_id: str, unauthenticated: Optional[str]) -> None:
        def txn_fn(txn: Txn) -> None:
            txn.execute("DELETE FROM room_auth_policies WHERE room_id = ?", (room_id,))
            if unauthenticated is not None:
                txn.execute("INSERT INTO room_auth_policies (room_id, unauthenticated) VALUES (?,?)",
                            (room_id, unauthenticated))

        await self.db.run_interaction("email_bridge_set_auth_policy", txn_fn)

    async def room_auth_policy(self, room_id: str) -> str:
        rows = await self.db.execute("email_bridge_auth_policy", "SELECT unauthenticated FROM room_auth_policies"
                                     " WHERE room_id = ?", room_id)
        return str(rows[0][0]) if rows else "mark"

    async def held_mail(self) -> list[tuple[int, int, str, Optional[dict[str, Any]]]]:
        """(row ID, received ts, room ID, check results) of each held mail."""
        rows = await self.db.execute("email_bridge_held", "SELECT id, received_ts, room_id, message"
                                     " FROM inbound_mail WHERE state = ? ORDER BY id", HELD)
        out: list[tuple[int, int, str, Optional[dict[str, Any]]]] = []
        for row_id, ts, room_id, message in rows:
            try:
                auth = self._open(int(row_id), str(message))[2].get("auth")
            except Exception:
                auth = None
            out.append((int(row_id), int(ts), str(room_id), auth if isinstance(auth, dict) else None))
        return out

    async def release_held(self, row_id: int) -> bool:
        """A held mail becomes due to be posted (marked). False: no such held mail."""
        now = int(time.time() * 1000)

        def txn_fn(txn: Txn) -> bool:
            txn.execute("SELECT room_id FROM inbound_mail WHERE id = ? AND state = ?", (row_id, HELD))
            row = txn.fetchone()
            if row is None:
                return False
            txn.execute("UPDATE inbound_mail SET state = ?, next_attempt_ts = ?, outcome = 'released'"
                        " WHERE id = ?", (PENDING, now, row_id))
            self._clear_notice_txn(txn, str(row[0]))
            return True

        return await self.db.run_interaction("email_bridge_release", txn_fn)

    async def delete_held(self, row_id: int) -> bool:
        def txn_fn(txn: Txn) -> bool:
            txn.execute("SELECT room_id FROM inbound_mail WHERE id = ? AND state = ?", (row_id, HELD))
            row = txn.fetchone()
            if row is None:
                return False
            txn.execute("UPDATE inbound_mail SET state = ?, outcome = 'deleted from quarantine', message = ''"
                        " WHERE id = ?", (IGNORED, row_id))
            self._clear_notice_txn(txn, str(row[0]))
            return True

        return await self.db.run_interaction("email_bridge_delete_held", txn_fn)

    @staticmethod
    def _clear_notice_txn(txn: Txn, room_id: str) -> None:
        txn.execute("SELECT 1 FROM inbound_mail WHERE room_id = ? AND state = ? LIMIT 1", (room_id, HELD))
        if txn.fetchone() is None:
            txn.execute("DELETE FROM held_notices WHERE room_id = ?", (room_id,))

    async def rooms_to_tell_of_held_mail(self) -> list[tuple[str, int]]:
        """(room ID, its first held row) of rooms not yet told of their held mail."""
        rows = await self.db.execute(
            "email_bridge_held_rooms", "SELECT room_id, MIN(id) FROM inbound_mail WHERE state = ? AND room_id"
            " NOT IN (SELECT room_id FROM held_notices) GROUP BY room_id ORDER BY room_id LIMIT 50", HELD)
        return [(str(r[0]), int(r[1])) for r in rows]

    async def held_notice_sent(self, room_id: str) -> None:
        now = int(time.time() * 1000)

        def txn_fn(txn: Txn) -> None:
            txn.execute("DELETE FROM held_notices WHERE room_id = ?", (room_id,))
            txn.execute("INSERT INTO held_notices (room_id, notified_ts) VALUES (?,?)", (room_id, now))

        await self.db.run_interaction("email_bridge_held_notice", txn_fn)

    def _address_index(self, address: str) -> str:
        import hashlib
        import hmac as hmac_lib

        from zhome.bridges.email.tokens import normalise_address

        key = getattr(self, "_bounce_key", None)
        if key is None:
            if self.sealer is not None:
                key = self.sealer.named_key("email_bridge:bouncing_addresses")
            else:
                key = b"zhome:email_bridge:bouncing_addresses"
            self._bounce_key: Optional[bytes] = key
        return hmac_lib.new(key, normalise_address(address).encode("utf-8"), hashlib.sha256).hexdigest()

    async def mark_bouncing(self, address: str, status: str) -> bool:
        """Record a hard bounce; False when the address was bouncing already."""
        index = self._address_index(address)
        now = int(time.time() * 1000)

        def txn_fn(txn: Txn) -> bool:
            txn.execute("SELECT 1 FROM bouncing_addresses WHERE address_index = ?", (index,))
            if txn.fetchone() is not None:
                return False
            txn.execute("INSERT INTO bouncing_addresses (address_index, since_ts, status) VALUES (?,?,?)",
                        (index, now, status))
            return True

        return await self.db.run_interaction("email_bridge_mark_bouncing", txn_fn)

    async def clear_bouncing(self, address: str) -> bool:
        """The address works again; False when it was not stopped."""
        index = self._address_index(address)

        def txn_fn(txn: Txn) -> bool:
            txn.execute("DELETE FROM bouncing_addresses WHERE address_index = ?", (index,))
            return txn.rowcount > 0

        return await self.db.run_interaction("email_bridge_clear_bouncing", txn_fn)

    async def is_bouncing(self, address: str) -> bool:
        rows = await self.db.execute("email_bridge_is_bouncing", "SELECT 1 FROM bouncing_addresses"
                                     " WHERE address_index = ?", self._address_index(address))
        return bool(rows)

    async def bouncing_among(self, addresses: list[str]) -> set[str]:
        """Those of ``addresses`` that a hard bounce stopped (is_bouncing), in one query."""
        if not addresses:
            return set()
        by_index = {self._address_index(a): a for a in addresses}
        rows = await self.db.select_in("email_bridge_bouncing_among", "SELECT address_index FROM bouncing_addresses"
                                       " WHERE address_index IN ({in})", list(by_index))
        return {by_index[str(r[0])] for r in rows if str(r[0]) in by_index}

    async def set_encrypted(self, room_id: str) -> bool:
        """Record that the room is encrypted; False when it was known already."""
        def txn_fn(txn: Txn) -> bool:
            txn.execute("SELECT 1 FROM encrypted_rooms WHERE room_id = ?", (room_id,))
            if txn.fetchone() is not None:
                return False
            txn.execute("INSERT INTO encrypted_rooms (room_id) VALUES (?)", (room_id,))
            return True

        return await self.db.run_interaction("email_bridge_set_encrypted", txn_fn)

    async def is_encrypted(self, room_id: str) -> bool:
        rows = await self.db.execute("email_bridge_is_encrypted", "SELECT 1 FROM encrypted_rooms WHERE room_id = ?",
                                     room_id)
        return bool(rows)

    async def room_of_message_id(self, message_id: str) -> Optional[str]:
        """The room of a mail the bridge sent with this Message-ID (every
        mail, coalesced ones too); None for any other (a stranger's)."""
        rows = await self.db.execute("email_bridge_room_mid", "SELECT room_id FROM sent_mail_events"
                                     " WHERE message_id = ? LIMIT 1", message_id)
        return str(rows[0][0]) if rows else None

    # -- replies to invitation mails -----------------------------------------------------
    async def add_invite_reply(self, room_id: str, address: str, invite_token: str, mac: str, raw: bytes) -> int:
        """Commit a mail to an invitation's reply address, with its token, in one transaction."""
        now = int(time.time() * 1000)
        payload = json.dumps({"raw": base64.b64encode(raw).decode("ascii"), "token_address": address})

        def txn_fn(txn: Txn) -> int:
            row_id = self._insert_inbound_txn(txn, now, room_id, None, PENDING, payload)
            txn.execute("INSERT INTO invite_replies (inbound_id, invite_token, mac) VALUES (?,?,?)",
                        (row_id, invite_token, mac))
            return row_id

        return await self.db.run_interaction("email_bridge_add_invite_reply", txn_fn)

    async def invite_reply(self, inbound_id: int) -> Optional[tuple[str, str]]:
        """(invite token, MAC) when the mail was sent to an invitation's reply address."""
        rows = await self.db.execute("email_bridge_invite_reply", "SELECT invite_token, mac FROM invite_replies"
                                     " WHERE inbound_id = ?", inbound_id)
        return (str(rows[0][0]), str(rows[0][1])) if rows else None
