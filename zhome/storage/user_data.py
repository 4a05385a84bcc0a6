"""Per-user data with its own streams: account data, receipts, filters,
push rule changes.

Spec: client-server-api "Client Config", "Receipts", "Filtering",
"Push Rules".
"""

from __future__ import annotations

import json
from typing import Any, Callable, Optional

from zhome.storage.at_rest import Sealer, open_text, seal_text
from zhome.storage.database import Database, Txn
from zhome.storage.ids import IdGenerator
from zhome.storage.lru import LruCache

IGNORED_USER_LIST = "m.ignored_user_list"


class UserDataStore:
    def __init__(self, db: Database, account_data_ids: IdGenerator, receipt_ids: IdGenerator,
                 filter_ids: dict[str, int] | None = None, sealer: Optional[Sealer] = None) -> None:
        self.db = db
        #: Encryption at rest of account data content, under the user's key.
        self.sealer = sealer
        self.account_data_ids = account_data_ids
        self.receipt_ids = receipt_ids
        self._ignored: LruCache[str, frozenset[str]] = LruCache(10000)
        #: Called after a receipt is stored: (room_id, receipt_type, user_id, event_id, data, thread_id).
        self.receipt_hooks: list[Callable[[str, str, str, str, dict[str, Any], str], None]] = []
        self._ignored_writes = 0
        #: Called with a user ID after ``delete_for_user`` (caches to drop).
        self.after_user_data_deleted: list[Any] = []

    # -- account data ---------------------------------------------------------
    async def set_account_data(self, user_id: str, room_id: str, data_type: str, content: dict[str, Any]) -> int:
        def txn_fn(txn: Txn) -> int:
            sid = self.account_data_ids.next()
            txn.execute(
                "DELETE FROM account_data WHERE user_id = ? AND room_id = ? AND type = ?", (user_id, room_id, data_type)
            )
            txn.execute(
                "INSERT INTO account_data (user_id, room_id, type, content, stream_id) VALUES (?,?,?,?,?)",
                (user_id, room_id, data_type, self.seal_content(user_id, room_id, data_type, json.dumps(content)), sid),
            )
            return sid

        try:
            return await self.db.run_interaction("set_account_data", txn_fn)
        finally:
            if data_type == IGNORED_USER_LIST and not room_id:
                self._ignored_writes += 1
                self._ignored.pop(user_id)

    async def delete_for_user(self, user_id: str) -> None:
        """Every piece of account data, push rule and filter of ``user_id``
        (a deactivated account keeps none)."""
        def txn_fn(txn: Txn) -> None:
            for table in ("account_data", "push_rules", "push_rules_enable", "user_filters"):
                txn.execute(f"DELETE FROM {table} WHERE user_id = ?", (user_id,))

        try:
            await self.db.run_interaction("delete_user_data", txn_fn)
        finally:
            self._ignored_writes += 1
            self._ignored.pop(user_id)
            for hook in self.after_user_data_deleted:
                hook(user_id)

    async def get_ignored_users(self, user_id: str) -> frozenset[str]:
        """The users in ``user_id``'s ``m.ignored_user_list`` (remembered per
        user; this store writes account data, so it forgets on a change)."""
        cached = self._ignored.get(user_id)
        if cached is not None:
            return cached
        writes_before = self._ignored_writes
        content = await self.get_account_data(user_id, "", IGNORED_USER_LIST)
        ignored = content.get("ignored_users") if isinstance(content, dict) else None
        found = frozenset(u for u in ignored if isinstance(u, str)) if isinstance(ignored, dict) else frozenset()
        if self._ignored_writes == writes_before:
            # Not remembered when a list changed while it was read.
            self._ignored.set(user_id, found)
        return found

    async def get_account_data(self, user_id: str, room_id: str, data_type: str) -> Optional[dict[str, Any]]:
        rows = await self.db.execute(
            "get_account_data",
            "SELECT content FROM account_data WHERE user_id = ? AND room_id = ? AND type = ?",
            user_id,
            room_id,
            data_type,
        )
        return json.loads(self.open_content(user_id, room_id, data_type, rows[0][0])) if rows else None

    def seal_content(self, user_id: str, room_id: str, data_type: str, content: str) -> str:
        sealed = seal_text(self.sealer, user_id, content, f"account_data\x00{user_id}\x00{room_id}\x00{data_type}")
        assert sealed is not None
        return sealed

    def open_content(self, user_id: str, room_id: str, data_type: str, stored: str) -> str:
        """The JSON text of stored account data ("null" when its key was destroyed)."""
        return open_text(self.sealer, stored, f"account_data\x00{user_id}\x00{room_id}\x00{data_type}") or "null"

    async def get_account_data_since(self, user_id: str, since: int) -> list[tuple[str, str, dict[str, Any]]]:
        """(room_id or '', type, content) changed after ``since``."""
        rows = await self.db.execute(
            "account_data_since",
            "SELECT room_id, type, content FROM account_data WHERE user_id = ? AND stream_id > ?",
            user_id,
            since,
        )
        return [(r, t, json.loads(self.open_content(user_id, r, t, c))) for r, t, c in rows]

    # -- receipts ---------------------------------------------------------------
    async def set_receipt(
        self, room_id: str, receipt_type: str, user_id: str, event_id: str, data: dict[str, Any], thread_id: str = ""
    ) -> int:
        def txn_fn(txn: Txn) -> int:
            sid = self.receipt_ids.next()
            txn.execute(
                "DELETE FROM receipts WHERE room_id = ? AND receipt_type = ? AND user_id = ? AND thread_id = ?",
                (room_id, receipt_type, user_id, thread_id),
            )
            txn.execute(
                "INSERT INTO receipts (room_id, receipt_type, user_id, thread_id, event_id, data, stream_id)"
                " VALUES (?,?,?,?,?,?,?)",
                (room_id, receipt_type, user_id, thread_id, event_id, json.dumps(data), sid),
            )
            return sid

        sid = await self.db.run_interaction("set_receipt", txn_fn)
        for hook in self.receipt_hooks:
            hook(room_id, receipt_type, user_id, event_id, data, thread_id)
        return sid

    async def get_receipts_for_rooms(self, room_ids: list[str], since: int) -> list[tuple]:
        """(room_id, receipt_type, user_id, thread_id, event_id, data) after ``since``."""
        rows = await self.db.select_in(
            "receipts_for_rooms",
            "SELECT room_id, receipt_type, user_id, thread_id, event_id, data FROM receipts"
            " WHERE stream_id > ? AND room_id IN ({in})",
            room_ids, before=(since,),
        )
        return [(r, t, u, th, e, json.loads(d)) for r, t, u, th, e, d in rows]

    # -- filters ------------------------------------------------------------------
    async def add_filter(self, user_id: str, filter_json: dict[str, Any]) -> int:
        def txn_fn(txn: Txn) -> int:
            txn.execute("SELECT MAX(filter_id) FROM user_filters WHERE user_id = ?", (user_id,))
            row = txn.fetchone()
            fid = int(row[0]) + 1 if row and row[0] is not None else 0
            txn.execute(
                "INSERT INTO user_filters (user_id, filter_id, filter_json) VALUES (?,?,?)",
                (user_id, fid, json.dumps(filter_json)),
            )
            return fid

        return await self.db.run_interaction("add_filter", txn_fn)

    async def get_filter(self, user_id: str, filter_id: int) -> Optional[dict[str, Any]]:
        rows = await self.db.execute(
            "get_filter", "SELECT filter_json FROM user_filters WHERE user_id = ? AND filter_id = ?", user_id, filter_id
        )
        return json.loads(rows[0][0]) if rows else None

    # -- push rules -----------------------------------------------------------------
    async def get_push_rule_changes(self, user_id: str) -> tuple[list[tuple], list[tuple]]:
        rules = await self.db.execute(
            "push_rules", "SELECT kind, rule_id, priority, rule FROM push_rules WHERE user_id = ? ORDER BY priority",
            user_id,
        )
        enables = await self.db.execute(
            "push_rules_enable", "SELECT kind, rule_id, enabled, actions FROM push_rules_enable WHERE user_id = ?",
            user_id,
        )
        return [(k, r, p, json.loads(j)) for k, r, p, j in rules], [
            (k, r, e, json.loads(a) if a else None) for k, r, e, a in enables
        ]

    async def put_push_rule(self, user_id: str, kind: str, rule_id: str, rule: dict[str, Any],
                            before: Optional[str], after: Optional[str]) -> bool:
        """Insert or replace a user-defined rule; False if before/after is unknown.

        Spec "PUT /pushrules/...": ``before`` wins over ``after``; without
        either a new rule becomes the most important of its kind and an
        existing one keeps its place. Replacing a rule replaces its actions:
        an earlier ``/actions`` override of it goes (its enabled flag stays).
        """

        def txn_fn(txn: Txn) -> bool:
            txn.execute("SELECT rule_id, priority FROM push_rules WHERE user_id = ? AND kind = ? ORDER BY priority",
                        (user_id, kind))
            current = [r for r, _ in txn.fetchall()]
            order = [r for r in current if r != rule_id]
            if before is not None:
                if before not in order:
                    return False
                order.insert(order.index(before), rule_id)
            elif after is not None:
                if after not in order:
                    return False
                order.insert(order.index(after) + 1, rule_id)
            elif rule_id in current:
                order.insert(current.index(rule_id), rule_id)
            else:
                # New rules go first (highest priority) within their kind.
                order.insert(0, rule_id)
            if rule_id in current:
                txn.execute("UPDATE push_rules_enable SET actions = NULL WHERE user_id = ? AND kind = ? AND rule_id = ?",
                            (user_id, kind, rule_id))
            txn.execute("DELETE FROM push_rules WHERE user_id = ? AND kind = ? AND rule_id = ?", (user_id, kind, rule_id))
            txn.execute(
                "INSERT INTO push_rules (user_id, kind, rule_id, priority, rule) VALUES (?,?,?,?,?)",
                (user_id, kind, rule_id, 0, json.dumps(rule)),
            )
            for i, r in enumerate(order):
                txn.execute("UPDATE push_rules SET priority = ? WHERE user_id = ? AND kind = ? AND rule_id = ?",
                            (i, user_id, kind, r))
            return True

        return await self.db.run_interaction("put_push_rule", txn_fn)

    async def delete_push_rule(self, user_id: str, kind: str, rule_id: str) -> bool:
        def txn_fn(txn: Txn) -> bool:
            txn.execute("DELETE FROM push_rules WHERE user_id = ? AND kind = ? AND rule_id = ?", (user_id, kind, rule_id))
            n = txn.rowcount
            txn.execute("DELETE FROM push_rules_enable WHERE user_id = ? AND kind = ? AND rule_id = ?",
                        (user_id, kind, rule_id))
            return n > 0

        return await self.db.run_interaction("delete_push_rule", txn_fn)

    async def set_push_rule_attr(self, user_id: str, kind: str, rule_id: str, enabled: Optional[bool],
                                 actions: Optional[list[Any]]) -> None:
        def txn_fn(txn: Txn) -> None:
            txn.execute("SELECT enabled, actions FROM push_rules_enable WHERE user_id = ? AND kind = ? AND rule_id = ?",
                        (user_id, kind, rule_id))
            row = txn.fetchone()
            cur_en = bool(row[0]) if row else True
            cur_act = row[1] if row else None
            new_en = cur_en if enabled is None else enabled
            new_act = cur_act if actions is None else json.dumps(actions)
            txn.execute("DELETE FROM push_rules_enable WHERE user_id = ? AND kind = ? AND rule_id = ?",
                        (user_id, kind, rule_id))
            txn.execute(
                "INSERT INTO push_rules_enable (user_id, kind, rule_id, enabled, actions) VALUES (?,?,?,?,?)",
                (user_id, kind, rule_id, int(new_en), new_act),
            )

        await self.db.run_interaction("set_push_rule_attr", txn_fn)
