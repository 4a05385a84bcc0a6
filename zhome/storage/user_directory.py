"""The user directory: who a search may return, and what it shows of them.

Spec: client-server-api "User directory": the results include at least the
users who share a room with the searcher and the users in public rooms; a
server may return more. zhome returns exactly that by default: local and
remote users joined to a room the searcher is joined to, or to a room this
server is in that is public for the directory (join rule ``public`` or
history visibility ``world_readable``). ``user_directory.search_all_users``
widens it to every active local user. Deactivated users and users who left
drop out at once, because membership is read from current state at query
time; the persistence path only keeps the two facts current state does not
give cheaply (``0009_txn_ids_and_user_directory.sql``).
"""

from __future__ import annotations

import json
from typing import Any, Optional

from zhome.storage.at_rest import Sealer, open_text, seal_text
from zhome.storage.database import Database, Txn, escape_like, in_chunks
from zhome.storage.events import PersistItem

JOIN_RULES = "m.room.join_rules"
HISTORY_VISIBILITY = "m.room.history_visibility"
MEMBER = "m.room.member"


def is_public_for_directory(join_rules: Optional[dict[str, Any]], history: Optional[dict[str, Any]]) -> bool:
    return (join_rules or {}).get("join_rule") == "public" or (history or {}).get(
        "history_visibility") == "world_readable"


class UserDirectoryStore:
    def __init__(self, db: Database, server_name: str, search_all_users: bool,
                 open_pdu: Any = None, accounts: Any = None, sealer: Optional[Sealer] = None) -> None:
        self.db = db
        #: Local display names (sealed in the database) come from the accounts store.
        self.accounts = accounts
        self.sealer = sealer
        # Remote users' display names, opened: a cache of
        # user_directory_remote_profiles for name searches (see search()).
        self._remote_names: Optional[dict[str, Optional[str]]] = None
        #: (event_id, json, sealed) -> the event dict (encryption at rest).
        self.open_pdu = open_pdu or (lambda _eid, js, _sealed: json.loads(js))
        self.server_name = server_name
        self.search_all_users = search_all_users

    # -- kept by the persistence path ------------------------------------------
    def persist_txn_hook(self, txn: Txn, item: PersistItem) -> None:
        """Runs inside the transaction that persists ``item`` (after its
        current state is written)."""
        ev = item.event
        if item.outlier or item.soft_failed or item.backfilled or ev.rejected_reason:
            return
        if item.current_state is not None:
            # Current state replaced (events over federation, a join over
            # federation, a merge): what changed may touch the room's
            # publicness and its members.
            delta = item.current_state_delta
            if any(t in (JOIN_RULES, HISTORY_VISIBILITY) and sk == "" for t, sk in delta):
                self._update_public_txn(txn, ev.room_id)
            member_ids = [eid for (t, _), eid in delta.items() if t == MEMBER and eid is not None]
            for chunk, qs in in_chunks(member_ids):
                txn.execute(f"SELECT event_id, json, sealed FROM events WHERE event_id IN ({qs})", chunk)
                for eid, js, sealed in txn.fetchall():
                    pdu = self.open_pdu(eid, js, sealed)
                    content = pdu.get("content")
                    if isinstance(content, dict) and content.get("membership") == "join":
                        self._remember_remote_txn(txn, pdu.get("state_key"), content)
            return
        if ev.state_key == "" and ev.type in (JOIN_RULES, HISTORY_VISIBILITY):
            self._update_public_txn(txn, ev.room_id)
        elif ev.type == MEMBER and ev.membership == "join":
            self._remember_remote_txn(txn, ev.state_key, ev.content)

    def _update_public_txn(self, txn: Txn, room_id: str) -> None:
        txn.execute(
            "SELECT c.type, e.json FROM current_state_events c JOIN events e ON e.event_id = c.event_id"
            " WHERE c.room_id = ? AND c.type IN (?, ?) AND c.state_key = ''",
            (room_id, JOIN_RULES, HISTORY_VISIBILITY),
        )
        contents: dict[str, Any] = {}
        # The redacted form keeps join_rule and history_visibility: no need to open.
        for etype, js in txn.fetchall():
            content = json.loads(js).get("content")
            contents[etype] = content if isinstance(content, dict) else {}
        txn.execute("DELETE FROM user_directory_public_rooms WHERE room_id = ?", (room_id,))
        if is_public_for_directory(contents.get(JOIN_RULES), contents.get(HISTORY_VISIBILITY)):
            txn.execute("INSERT INTO user_directory_public_rooms (room_id) VALUES (?)", (room_id,))

    def _remember_remote_txn(self, txn: Txn, user_id: Any, content: dict[str, Any]) -> None:
        if not isinstance(user_id, str) or user_id.endswith(":" + self.server_name):
            # Local users are shown from their profiles.
            return
        name = content.get("displayname")
        avatar = content.get("avatar_url")
        name = name if isinstance(name, str) else None
        avatar = avatar if isinstance(avatar, str) else None
        txn.execute("DELETE FROM user_directory_remote_profiles WHERE user_id = ?", (user_id,))
        txn.execute(
            "INSERT INTO user_directory_remote_profiles (user_id, display_name, avatar_url) VALUES (?,?,?)",
            (user_id, seal_text(self.sealer, user_id, name, f"remote_profiles.display_name\x00{user_id}"),
             seal_text(self.sealer, user_id, avatar, f"remote_profiles.avatar_url\x00{user_id}")),
        )
        if self._remote_names is not None:
            self._remote_names[user_id] = name

    # -- searching ----------------------------------------------------------------
    async def search(self, searcher: str, term: str, limit: int) -> list[tuple[str, Optional[str], Optional[str]]]:
        """(user ID, display name, avatar URL) of up to ``limit`` users the
        searcher may find whose ID or display name contains ``term``."""
        like = "%" + escape_like(term.lower()) + "%"
        local_suffix = "%:" + escape_like(self.server_name)
        # A room counts when the searcher shares it with the user (the
        # searcher does not find themself through a private room), or when
        # it is public and this server is still in it (some local user joined).
        shares_room = (
            "EXISTS (SELECT 1 FROM current_state_events m WHERE m.type = 'm.room.member'"
            " AND m.state_key = d.user_id AND m.membership = 'join' AND ("
            "  (d.user_id <> ? AND m.room_id IN (SELECT s.room_id FROM current_state_events s"
            "   WHERE s.type = 'm.room.member' AND s.state_key = ? AND s.membership = 'join'))"
            "  OR m.room_id IN (SELECT p.room_id FROM user_directory_public_rooms p WHERE EXISTS ("
            "   SELECT 1 FROM current_state_events l WHERE l.room_id = p.room_id AND l.type = 'm.room.member'"
            "   AND l.membership = 'join' AND l.state_key LIKE ? ESCAPE '\\'))))"
        )
        visible = f"(d.is_local = 1 OR {shares_room})" if self.search_all_users else shares_room
        base = (
            "SELECT d.user_id, d.display_name, d.avatar_url, d.is_local FROM ("
            " SELECT p.user_id AS user_id, p.displayname AS display_name, p.avatar_url AS avatar_url,"
            " 1 AS is_local FROM profiles p JOIN users u ON u.user_id = p.user_id WHERE u.deactivated = 0"
            " UNION ALL"
            " SELECT r.user_id, r.display_name, r.avatar_url, 0 FROM user_directory_remote_profiles r"
            ") d WHERE "
        )
        visible_args = (searcher, searcher, local_suffix)
        # Display names are sealed at rest, so they are matched here against
        # the opened copies; the database then says which of them the
        # searcher may see. Display-name matches first, then matches by ID,
        # each by user ID, so a full name finds its person.
        needle = term.lower()
        names = dict(await self._remote_name_map())
        if self.accounts is not None:
            names.update(await self.accounts.display_names())
        by_name = sorted(u for u, n in names.items() if n and needle in n.lower())
        found: list[tuple[Any, ...]] = []
        for chunk, qs in in_chunks(by_name):
            if len(found) >= limit:
                break
            found += await self.db.execute(
                "user_directory_search_names", base + f"d.user_id IN ({qs}) AND {visible}"
                " ORDER BY d.user_id LIMIT ?", *chunk, *visible_args, limit - len(found))
        if len(found) < limit:
            seen = [r[0] for r in found]
            not_seen = f" AND d.user_id NOT IN ({','.join('?' * len(seen))})" if seen else ""
            found += await self.db.execute(
                "user_directory_search_ids", base + "LOWER(d.user_id) LIKE ? ESCAPE '\\'" + not_seen
                + f" AND {visible} ORDER BY d.user_id LIMIT ?", like, *seen, *visible_args, limit - len(found))
        return [(u, *self._open_profile(u, n, a, bool(local))) for u, n, a, local in found]

    def _open_profile(self, user_id: str, name: Optional[str], avatar: Optional[str],
                      local: bool) -> tuple[Optional[str], Optional[str]]:
        if local and self.accounts is not None:
            return (self.accounts.open_profile(user_id, "displayname", name),
                    self.accounts.open_profile(user_id, "avatar_url", avatar))
        return (open_text(self.sealer, name, f"remote_profiles.display_name\x00{user_id}"),
                open_text(self.sealer, avatar, f"remote_profiles.avatar_url\x00{user_id}"))

    async def _remote_name_map(self) -> dict[str, Optional[str]]:
        if self._remote_names is None:
            rows = await self.db.execute("load_remote_names",
                                         "SELECT user_id, display_name FROM user_directory_remote_profiles")
            self._remote_names = {u: open_text(self.sealer, n, f"remote_profiles.display_name\x00{u}")
                                  for u, n in rows}
        return self._remote_names
