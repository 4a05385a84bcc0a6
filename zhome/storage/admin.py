"""What the admin API reads and changes about accounts, beyond what the
client API's stores do: listing and searching every local account, and the
account states only an administrator sets (admin flag, lock, suspension,
user type).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

from zhome.storage.accounts import AccountsStore
from zhome.storage.database import Database, Txn, escape_like
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


def _report_row(row: tuple[Any, ...]) -> dict[str, Any]:
    rid, kind, ts, reporter, room_id, event_id, target, reason, score = row
    return {"id": rid, "kind": kind, "received_ts": ts, "user_id": reporter, "room_id": room_id,
            "event_id": event_id, "target_user_id": target, "reason": reason, "score": score}


_REPORT_COLUMNS = ("SELECT id, kind, received_ts, reporter, room_id, event_id, target_user_id, reason, score"
                   " FROM content_reports")


def _token_row(row: tuple[Any, ...]) -> dict[str, Any]:
    token, allowed, completed, expiry = row
    return {"token": token, "uses_allowed": allowed, "pending": 0, "completed": completed, "expiry_time": expiry}


class AdminStore:
    def __init__(self, db: Database, accounts: AccountsStore, report_ids: IdGenerator) -> None:
        self.db = db
        self.accounts = accounts
        self.report_ids = report_ids

    # -- content reports ---------------------------------------------------------
    async def add_report(self, kind: str, reporter: str, *, room_id: Optional[str] = None,
                         event_id: Optional[str] = None, target_user_id: Optional[str] = None,
                         reason: Optional[str] = None, score: Optional[int] = None) -> int:
        rid = self.report_ids.next()
        await self.db.run_interaction("add_report", lambda txn: txn.execute(
            "INSERT INTO content_reports (id, kind, received_ts, reporter, room_id, event_id, target_user_id,"
            " reason, score) VALUES (?,?,?,?,?,?,?,?,?)",
            (rid, kind, int(time.time() * 1000), reporter, room_id, event_id, target_user_id, reason, score)))
        return rid

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
            return [_report_row(r) for r in txn.fetchall()], int(row[0]) if row else 0

        return await self.db.run_interaction("list_reports", txn_fn)

    async def get_report(self, report_id: int) -> Optional[dict[str, Any]]:
        rows = await self.db.execute("get_report", _REPORT_COLUMNS + " WHERE id = ?", report_id)
        return _report_row(rows[0]) if rows else None

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
        if q.name:
            pat = "%" + escape_like(q.name.lower()) + "%"
            where.append("(LOWER(u.user_id) LIKE ? ESCAPE '\\' OR LOWER(COALESCE(p.displayname, '')) LIKE ? ESCAPE '\\')")
            args += [pat, pat]
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
        col = USER_ORDER_COLUMNS[q.order_by]
        direction = "DESC" if q.backwards else "ASC"
        # NULLs sort as the smallest value on both engines.
        nulls = "0" if col in ("0",) else f"CASE WHEN {col} IS NULL THEN 0 ELSE 1 END"
        order = f" ORDER BY {nulls} {direction}, {col} {direction}, u.user_id ASC"

        def txn_fn(txn: Txn) -> tuple[list[dict[str, Any]], int]:
            txn.execute("SELECT COUNT(*) FROM users u LEFT JOIN profiles p ON p.user_id = u.user_id" + cond,
                        tuple(args))
            row = txn.fetchone()
            total = int(row[0]) if row else 0
            txn.execute(_USER_COLUMNS + cond + order + " LIMIT ? OFFSET ?", tuple(args) + (q.limit, q.offset))
            return [_user_row(r) for r in txn.fetchall()], total

        return await self.db.run_interaction("admin_list_users", txn_fn)

    async def get_user(self, user_id: str) -> Optional[dict[str, Any]]:
        rows = await self.db.execute("admin_get_user", _USER_COLUMNS + " WHERE u.user_id = ?", user_id)
        return _user_row(rows[0]) if rows else None

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
        return [{"device_id": d, "last_seen": ts, "ip": ip} for d, ts, ip in rows]
