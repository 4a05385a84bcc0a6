"""What the admin API reads and changes about accounts, beyond what the
client API's stores do: listing and searching every local account, and the
account states only an administrator sets (admin flag, lock, suspension,
user type).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Optional

from zhome.storage.accounts import AccountsStore
from zhome.storage.at_rest import Sealer, open_text, seal_text
from zhome.storage.database import Database, Txn, escape_like, in_chunks
from zhome.storage.ids import IdGenerator

#: order_by values of the user list, and the SQL each sorts on.
USER_ORDER_COLUMNS = {
    "name": "u.user_id",
    "is_guest": "u.is_guest",
    "admin": "u.is_admin",
    "user_type": "u.user_type",
    "deactivated": "u.deactivated",
    "shadow_banned": "0",
    "displayname": "p.displayname",
    "avatar_url": "p.avatar_url",
    "creation_ts": "u.created_ts",
    "last_seen_ts": "last_seen_ts",
    "locked": "u.locked",
    "suspended": "u.suspended",
}

_USER_COLUMNS = ("SELECT u.user_id, u.is_guest, u.is_admin, u.user_type, u.deactivated, u.erased, p.displayname,"
                 " p.avatar_url, u.created_ts, u.locked, u.suspended,"
                 " (SELECT MAX(d.last_seen_ts) FROM devices d WHERE d.user_id = u.user_id) AS last_seen_ts"
                 " FROM users u LEFT JOIN profiles p ON p.user_id = u.user_id")


@dataclass
class UserQuery:
    """Filters and paging of the admin user list (Synapse's admin API shape)."""

    name: Optional[str] = None
    user_id: Optional[str] = None
    guests: bool = True
    #: None: both; True: only deactivated; False: only active.
    deactivated: Optional[bool] = False
    admins: Optional[bool] = None
    locked: bool = True
    not_user_types: tuple[str, ...] = ()
    order_by: str = "name"
    backwards: bool = False
    offset: int = 0
    limit: int = 100


def _user_row(row: tuple[Any, ...]) -> dict[str, Any]:
    (uid, guest, adm, utype, deac, erased, dn, av, created, locked, suspended, seen) = row
    return {"name": uid, "is_guest": bool(guest), "admin": bool(adm), "user_type": utype,
            "deactivated": bool(deac), "erased": bool(erased), "shadow_banned": False, "displayname": dn,
            "avatar_url": av, "creation_ts": created, "last_seen_ts": seen, "locked": bool(locked),
            "suspended": bool(suspended)}


_USER_SORT_KEYS = {"name": "name", "is_guest": "is_guest", "admin": "admin", "user_type": "user_type",
                   "deactivated": "deactivated", "shadow_banned": "shadow_banned", "displayname": "displayname",
                   "avatar_url": "avatar_url", "creation_ts": "creation_ts", "last_seen_ts": "last_seen_ts",
                   "locked": "locked", "suspended": "suspended"}


def _sort_value(user: dict[str, Any], order_by: str) -> Any:
    v = user.get(_USER_SORT_KEYS.get(order_by, "name"))
    if isinstance(v, bool):
        return int(v)
    return v


def _report_reason_aad(rid: int, reporter: str) -> str:
    return f"content_reports.reason\x00{rid}\x00{reporter}"


def _report_row(row: tuple[Any, ...], sealer: Optional[Sealer] = None) -> dict[str, Any]:
    rid, kind, ts, reporter, room_id, event_id, target, reason, score = row
    # The reporter's words, sealed under the reporter's key.
    reason = open_text(sealer, reason, _report_reason_aad(rid, reporter))
    return {"id": rid, "kind": kind, "received_ts": ts, "user_id": reporter, "room_id": room_id,
            "event_id": event_id, "target_user_id": target, "reason": reason, "score": score}


_REPORT_COLUMNS = ("SELECT id, kind, received_ts, reporter, room_id, event_id, target_user_id, reason, score"
                   " FROM content_reports")


def _token_row(row: tuple[Any, ...]) -> dict[str, Any]:
    token, allowed, completed, expiry = row
    return {"token": token, "uses_allowed": allowed, "pending": 0, "completed": completed, "expiry_time": expiry}


class AdminStore:
    def __init__(self, db: Database, accounts: AccountsStore, report_ids: IdGenerator, server_name: str,
                 open_pdu: Any = None, sealer: Optional[Sealer] = None) -> None:
        self.db = db
        self.sealer = sealer
        #: (event_id, json, sealed) -> the event dict (encryption at rest).
        self.open_pdu = open_pdu or (lambda _eid, js, _sealed: json.loads(js))
        self.accounts = accounts
        self.report_ids = report_ids
        self.server_name = server_name
        # Whether a room is blocked, asked on every local join.
        self._blocked: dict[str, bool] = {}

    # -- content reports ---------------------------------------------------------
    async def add_report(self, kind: str, reporter: str, *, room_id: Optional[str] = None,
                         event_id: Optional[str] = None, target_user_id: Optional[str] = None,
                         reason: Optional[str] = None, score: Optional[int] = None) -> int:
        rid = self.report_ids.next()
        await self.db.run_interaction("add_report", lambda txn: txn.execute(
            "INSERT INTO content_reports (id, kind, received_ts, reporter, room_id, event_id, target_user_id,"
            " reason, score) VALUES (?,?,?,?,?,?,?,?,?)",
            (rid, kind, int(time.time() * 1000), reporter, room_id, event_id, target_user_id,
             self.seal_report_reason(rid, reporter, reason), score)))
        return rid

    def seal_report_reason(self, rid: int, reporter: str, reason: Optional[str]) -> Optional[str]:
        return seal_text(self.sealer, reporter, reason, _report_reason_aad(rid, reporter))

    async def list_reports(self, kind: str, *, offset: int, limit: int, backwards: bool,
                           user_id: Optional[str] = None, room_id: Optional[str] = None
                           ) -> tuple[list[dict[str, Any]], int]:
        where, args = ["kind = ?"], [kind]
        if user_id:
            where.append("LOWER(reporter) LIKE ? ESCAPE '\\'")
            args.append("%" + escape_like(user_id.lower()) + "%")
        if room_id:
            where.append("LOWER(room_id) LIKE ? ESCAPE '\\'")
            args.append("%" + escape_like(room_id.lower()) + "%")
        cond = " WHERE " + " AND ".join(where)
        order = " ORDER BY received_ts DESC, id DESC" if backwards else " ORDER BY received_ts ASC, id ASC"

        def txn_fn(txn: Txn) -> tuple[list[dict[str, Any]], int]:
            txn.execute("SELECT COUNT(*) FROM content_reports" + cond, tuple(args))
            row = txn.fetchone()
            txn.execute(_REPORT_COLUMNS + cond + order + " LIMIT ? OFFSET ?", (*args, limit, offset))
            return [_report_row(r, self.sealer) for r in txn.fetchall()], int(row[0]) if row else 0

        return await self.db.run_interaction("list_reports", txn_fn)

    async def get_report(self, report_id: int) -> Optional[dict[str, Any]]:
        rows = await self.db.execute("get_report", _REPORT_COLUMNS + " WHERE id = ?", report_id)
        return _report_row(rows[0], self.sealer) if rows else None

    async def delete_report(self, report_id: int) -> bool:
        def txn_fn(txn: Txn) -> bool:
            txn.execute("DELETE FROM content_reports WHERE id = ?", (report_id,))
            return bool(txn.rowcount)

        return await self.db.run_interaction("delete_report", txn_fn)

    # -- registration tokens ---------------------------------------------------------
    async def list_registration_tokens(self, valid: Optional[bool]) -> list[dict[str, Any]]:
        rows = await self.db.execute(
            "list_regtokens", "SELECT token, uses_allowed, completed, expiry_time FROM registration_tokens"
            " ORDER BY token")
        now = int(time.time() * 1000)
        out = [_token_row(r) for r in rows]
        if valid is None:
            return out

        def is_valid(t: dict[str, Any]) -> bool:
            return (t["uses_allowed"] is None or t["completed"] < t["uses_allowed"]) and (
                t["expiry_time"] is None or t["expiry_time"] > now)
        return [t for t in out if is_valid(t) == valid]

    async def get_registration_token(self, token: str) -> Optional[dict[str, Any]]:
        rows = await self.db.execute(
            "get_regtoken", "SELECT token, uses_allowed, completed, expiry_time FROM registration_tokens"
            " WHERE token = ?", token)
        return _token_row(rows[0]) if rows else None

    async def create_registration_token(self, token: str, uses_allowed: Optional[int],
                                        expiry_time: Optional[int]) -> bool:
        def txn_fn(txn: Txn) -> bool:
            txn.execute("SELECT 1 FROM registration_tokens WHERE token = ?", (token,))
            if txn.fetchone():
                return False
            txn.execute("INSERT INTO registration_tokens (token, uses_allowed, completed, expiry_time)"
                        " VALUES (?,?,0,?)", (token, uses_allowed, expiry_time))
            return True

        return await self.db.run_interaction("create_regtoken", txn_fn)

    async def update_registration_token(self, token: str, **fields: Optional[int]) -> bool:
        sets = [f"{k} = ?" for k in fields]

        def txn_fn(txn: Txn) -> bool:
            if sets:
                txn.execute("UPDATE registration_tokens SET " + ", ".join(sets) + " WHERE token = ?",
                            (*fields.values(), token))
            txn.execute("SELECT 1 FROM registration_tokens WHERE token = ?", (token,))
            return txn.fetchone() is not None

        return await self.db.run_interaction("update_regtoken", txn_fn)

    async def delete_registration_token(self, token: str) -> bool:
        def txn_fn(txn: Txn) -> bool:
            txn.execute("DELETE FROM registration_tokens WHERE token = ?", (token,))
            return bool(txn.rowcount)

        return await self.db.run_interaction("delete_regtoken", txn_fn)

    async def list_users(self, q: UserQuery) -> tuple[list[dict[str, Any]], int]:
        """One page of local accounts and the number matching the filters."""
        where: list[str] = []
        args: list[Any] = []
        by_name = bool(q.name) or q.order_by == "displayname"
        if q.name:
            # Display names are sealed at rest: matched against the opened
            # copies below, with the ID match, after the SQL filters.
            pass
        elif q.user_id:
            where.append("LOWER(u.user_id) LIKE ? ESCAPE '\\'")
            args.append("%" + escape_like(q.user_id.lower()) + "%")
        if not q.guests:
            where.append("u.is_guest = 0")
        if q.deactivated is not None:
            where.append("u.deactivated = ?")
            args.append(int(q.deactivated))
        if q.admins is not None:
            where.append("u.is_admin = ?")
            args.append(int(q.admins))
        if not q.locked:
            where.append("u.locked = 0")
        for t in q.not_user_types:
            if t == "":
                where.append("u.user_type IS NOT NULL")
            else:
                where.append("(u.user_type IS NULL OR u.user_type <> ?)")
                args.append(t)
        cond = (" WHERE " + " AND ".join(where)) if where else ""
        if by_name:
            # Filter and order in memory: every account matching the SQL
            # filters is read (bounded by the number of local accounts).
            rows = await self.db.execute("admin_list_users_all", _USER_COLUMNS + cond, *args)
            users = [self._user_row(r) for r in rows]
            if q.name:
                needle = q.name.lower()
                users = [u for u in users if needle in u["name"].lower()
                         or needle in (u["displayname"] or "").lower()]
            key = "displayname" if q.order_by == "displayname" else q.order_by
            users.sort(key=lambda u: u["name"])
            present = [u for u in users if _sort_value(u, key) is not None]
            absent = [u for u in users if _sort_value(u, key) is None]
            present.sort(key=lambda u: _sort_value(u, key), reverse=q.backwards)
            ordered = (present + absent) if q.backwards else (absent + present)
            return ordered[q.offset:q.offset + q.limit], len(users)
        col = USER_ORDER_COLUMNS[q.order_by]
        direction = "DESC" if q.backwards else "ASC"
        if col == "0":
            # A column every user has the same value in (shadow_banned):
            # only the tie-break orders. (A bare 0 would be a column number.)
            order = " ORDER BY u.user_id ASC"
        else:
            # NULLs sort as the smallest value on both engines.
            nulls = f"CASE WHEN {col} IS NULL THEN 0 ELSE 1 END"
            order = f" ORDER BY {nulls} {direction}, {col} {direction}, u.user_id ASC"

        def txn_fn(txn: Txn) -> tuple[list[dict[str, Any]], int]:
            txn.execute("SELECT COUNT(*) FROM users u LEFT JOIN profiles p ON p.user_id = u.user_id" + cond,
                        tuple(args))
            row = txn.fetchone()
            total = int(row[0]) if row else 0
            txn.execute(_USER_COLUMNS + cond + order + " LIMIT ? OFFSET ?", tuple(args) + (q.limit, q.offset))
            return [self._user_row(r) for r in txn.fetchall()], total

        return await self.db.run_interaction("admin_list_users", txn_fn)

    def _user_row(self, row: tuple[Any, ...]) -> dict[str, Any]:
        out = _user_row(row)
        out["displayname"] = self.accounts.open_profile(out["name"], "displayname", out["displayname"])
        out["avatar_url"] = self.accounts.open_profile(out["name"], "avatar_url", out["avatar_url"])
        return out

    async def get_user(self, user_id: str) -> Optional[dict[str, Any]]:
        rows = await self.db.execute("admin_get_user", _USER_COLUMNS + " WHERE u.user_id = ?", user_id)
        return self._user_row(rows[0]) if rows else None

    async def set_flags(self, user_id: str, **flags: Any) -> None:
        """Set ``admin``, ``locked``, ``suspended`` (bools) and ``user_type``
        (str or None) of an account; only the keys given change."""
        columns = {"admin": "is_admin", "locked": "locked", "suspended": "suspended", "user_type": "user_type",
                   "erased": "erased"}
        sets, args = [], []
        for k, v in flags.items():
            sets.append(f"{columns[k]} = ?")
            args.append(v if k == "user_type" else int(bool(v)))
        if not sets:
            return
        await self.db.run_interaction(
            "admin_set_flags",
            lambda txn: txn.execute("UPDATE users SET " + ", ".join(sets) + " WHERE user_id = ?", (*args, user_id)))
        self.accounts.forget_cached_tokens()

    async def sessions(self, user_id: str) -> list[dict[str, Any]]:
        """Each device's last connection, for whois."""
        rows = await self.db.execute(
            "admin_sessions", "SELECT device_id, last_seen_ts, last_seen_ip FROM devices WHERE user_id = ?"
            " ORDER BY device_id", user_id)
        return [{"device_id": d, "last_seen": ts, "ip": self.accounts.open_ip(user_id, d, ip)} for d, ts, ip in rows]

    # -- rooms -------------------------------------------------------------------------
    async def room_summaries(self, room_ids: Optional[list[str]] = None) -> dict[str, dict[str, Any]]:
        """What the admin room list shows of each room (every room when
        ``room_ids`` is None), read from the rooms' current state."""
        suffix = "%:" + escape_like(self.server_name)

        def txn_fn(txn: Txn) -> dict[str, dict[str, Any]]:
            out: dict[str, dict[str, Any]] = {}
            chunks: list[tuple[Optional[list[Any]], str]] = (
                [(None, "")] if room_ids is None else list(in_chunks(room_ids)))
            for chunk, qs in chunks:
                cond = "" if chunk is None else f" AND r.room_id IN ({qs})"
                args: tuple[Any, ...] = () if chunk is None else tuple(chunk)
                txn.execute("SELECT r.room_id, r.room_version, r.creator, r.is_public, b.room_id FROM rooms r"
                            " LEFT JOIN blocked_rooms b ON b.room_id = r.room_id WHERE 1 = 1" + cond, args)
                for rid, version, creator, public, blocked in txn.fetchall():
                    out[rid] = {"room_id": rid, "name": None, "canonical_alias": None, "joined_members": 0,
                                "joined_local_members": 0, "version": version, "creator": creator,
                                "encryption": None, "federatable": True, "public": bool(public),
                                "join_rules": None, "guest_access": None, "history_visibility": None,
                                "state_events": 0, "room_type": None, "avatar": None, "topic": None,
                                "blocked": blocked is not None}
                c_cond = "" if chunk is None else f" AND c.room_id IN ({qs})"
                txn.execute("SELECT c.room_id, c.type, e.event_id, e.json, e.sealed FROM current_state_events c"
                            " JOIN events e"
                            " ON e.event_id = c.event_id WHERE c.state_key = '' AND c.type IN"
                            " ('m.room.create', 'm.room.name', 'm.room.canonical_alias', 'm.room.join_rules',"
                            " 'm.room.guest_access', 'm.room.history_visibility', 'm.room.encryption',"
                            " 'm.room.topic', 'm.room.avatar')" + c_cond, args)
                for rid, etype, eid, raw, sealed in txn.fetchall():
                    if rid not in out:
                        continue
                    content = self.open_pdu(eid, raw, sealed).get("content") or {}
                    _apply_state(out[rid], etype, content)
                txn.execute("SELECT c.room_id, COUNT(*), SUM(CASE WHEN c.state_key LIKE ? ESCAPE '\\' THEN 1"
                            " ELSE 0 END) FROM current_state_events c WHERE c.type = 'm.room.member'"
                            " AND c.membership = 'join'" + c_cond + " GROUP BY c.room_id", (suffix, *args))
                for rid, joined, local in txn.fetchall():
                    if rid in out:
                        out[rid]["joined_members"] = int(joined)
                        out[rid]["joined_local_members"] = int(local or 0)
                txn.execute("SELECT c.room_id, COUNT(*) FROM current_state_events c WHERE 1 = 1" + c_cond
                            + " GROUP BY c.room_id", args)
                for rid, n in txn.fetchall():
                    if rid in out:
                        out[rid]["state_events"] = int(n)
            return out

        return await self.db.run_interaction("admin_room_summaries", txn_fn)

    async def forward_extremities(self, room_id: str) -> list[dict[str, Any]]:
        """The room's forward extremities, with what the admin API shows of each."""
        rows = await self.db.execute(
            "admin_forward_extremities", "SELECT e.event_id, e.state_group, e.depth, e.received_ts"
            " FROM room_forward_extremities f JOIN events e ON e.event_id = f.event_id"
            " WHERE f.room_id = ? ORDER BY e.depth, e.event_id", room_id)
        return [{"event_id": eid, "state_group": group, "depth": int(depth), "received_ts": int(ts or 0)}
                for eid, group, depth, ts in rows]

    async def set_room_blocked(self, room_id: str, by: str, blocked: bool) -> None:
        def txn_fn(txn: Txn) -> None:
            txn.execute("DELETE FROM blocked_rooms WHERE room_id = ?", (room_id,))
            if blocked:
                txn.execute("INSERT INTO blocked_rooms (room_id, user_id, blocked_ts) VALUES (?,?,?)",
                            (room_id, by, int(time.time() * 1000)))

        await self.db.run_interaction("set_room_blocked", txn_fn)
        self._blocked.pop(room_id, None)

    async def room_block(self, room_id: str) -> Optional[str]:
        """Who blocked the room, or None when it is not blocked."""
        rows = await self.db.execute("room_block", "SELECT user_id FROM blocked_rooms WHERE room_id = ?", room_id)
        return rows[0][0] if rows else None

    async def is_room_blocked(self, room_id: str) -> bool:
        got = self._blocked.get(room_id)
        if got is None:
            got = await self.room_block(room_id) is not None
            if len(self._blocked) > 10000:
                self._blocked.clear()
            self._blocked[room_id] = got
        return got


def _apply_state(summary: dict[str, Any], etype: str, content: dict[str, Any]) -> None:
    def text(key: str) -> Optional[str]:
        v = content.get(key)
        return v if isinstance(v, str) else None

    if etype == "m.room.create":
        summary["federatable"] = content.get("m.federate", True) is not False
        summary["room_type"] = text("type")
    elif etype == "m.room.name":
        summary["name"] = text("name")
    elif etype == "m.room.canonical_alias":
        summary["canonical_alias"] = text("alias")
    elif etype == "m.room.join_rules":
        summary["join_rules"] = text("join_rule")
    elif etype == "m.room.guest_access":
        summary["guest_access"] = text("guest_access")
    elif etype == "m.room.history_visibility":
        summary["history_visibility"] = text("history_visibility")
    elif etype == "m.room.encryption":
        summary["encryption"] = text("algorithm")
    elif etype == "m.room.topic":
        summary["topic"] = text("topic")
    elif etype == "m.room.avatar":
        summary["avatar"] = text("url")
