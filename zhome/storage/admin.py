"""What the admin API reads and changes about accounts, beyond what the
client API's stores do: listing and searching every local account, and the
account states only an administrator sets (admin flag, lock, suspension,
user type).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from zhome.storage.accounts import AccountsStore
from zhome.storage.database import Database, Txn, escape_like

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


class AdminStore:
    def __init__(self, db: Database, accounts: AccountsStore) -> None:
        self.db = db
        self.accounts = accounts

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
