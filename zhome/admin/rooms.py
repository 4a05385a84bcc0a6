"""The admin API's rooms, in the shape of Synapse's room admin API: the
room list (search, ordering, paging), one room's details, members, state
and forward extremities, and blocking a room (no local user may join it).
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any, Optional

from twisted.internet import defer
from twisted.web.server import Request

from zhome.admin.common import backwards_arg, int_arg, require_admin
from zhome.http.errors import MatrixError, bad_json, invalid_param, not_found
from zhome.http.server import JsonResource, query_arg, read_json_body
from zhome.client.serialize import serialize_events
from zhome.storage.database import Txn
from zhome.util.ids import is_valid_room_id, random_string

if TYPE_CHECKING:
    from zhome.server import HomeServer

logger = logging.getLogger(__name__)

SYN1 = r"/_synapse/admin/v1"
ROOM = r"(?P<room_id>[^/]+)"
MAX_PAGE = 1000

#: order_by values of the room list and whether they sort as text.
ROOM_ORDER = {
    "name": True, "canonical_alias": True, "joined_members": False, "joined_local_members": False,
    "version": True, "creator": True, "encryption": True, "federatable": False, "public": False,
    "join_rules": True, "guest_access": True, "history_visibility": True, "state_events": False,
}
LIST_FIELDS = ("room_id", "name", "canonical_alias", "joined_members", "joined_local_members", "version",
               "creator", "encryption", "federatable", "public", "join_rules", "guest_access",
               "history_visibility", "state_events", "room_type")


def _sort_key(order_by: str) -> Any:
    textual = ROOM_ORDER[order_by]

    def key(room: dict[str, Any]) -> tuple[Any, ...]:
        v = room.get(order_by)
        if textual:
            return (v is None, (v or "").lower() if isinstance(v, str) else "", room["room_id"])
        return (v is None, int(v or 0), room["room_id"])
    return key


class AdminRoomServlets:
    def __init__(self, hs: "HomeServer") -> None:
        self.hs = hs
        self.store = hs.admin_store

    def register_routes(self, r: JsonResource) -> None:
        r.register("GET", SYN1 + r"/rooms", self.on_list, "admin_rooms")
        r.register("GET", SYN1 + r"/rooms/" + ROOM, self.on_room, "admin_room")
        r.register("GET", SYN1 + r"/rooms/" + ROOM + r"/members", self.on_members, "admin_room_members")
        r.register("GET", SYN1 + r"/rooms/" + ROOM + r"/state", self.on_state, "admin_room_state")
        r.register("GET", SYN1 + r"/rooms/" + ROOM + r"/forward_extremities", self.on_forward_extremities,
                   "admin_room_forward_extremities")
        r.register("DELETE", SYN1 + r"/rooms/" + ROOM, self.on_delete_v1, "admin_room_delete")
        r.register("DELETE", r"/_synapse/admin/v2/rooms/" + ROOM, self.on_delete_v2, "admin_room_delete")
        r.register("GET", r"/_synapse/admin/v2/rooms/" + ROOM + r"/delete_status", self.on_status_by_room,
                   "admin_room_delete_status")
        r.register("GET", r"/_synapse/admin/v2/rooms/delete_status/(?P<delete_id>[^/]+)", self.on_status_by_id,
                   "admin_room_delete_status")
        r.register("POST", SYN1 + r"/purge_history/" + ROOM + r"(?:/(?P<event_id>[^/]+))?", self.on_purge_history,
                   "admin_purge_history")
        r.register("GET", SYN1 + r"/purge_history_status/(?P<purge_id>[^/]+)", self.on_purge_status,
                   "admin_purge_history_status")
        r.register("GET", SYN1 + r"/rooms/" + ROOM + r"/block", self.on_get_block, "admin_room_block")
        r.register("PUT", SYN1 + r"/rooms/" + ROOM + r"/block", self.on_put_block, "admin_room_block")

    async def _require_admin(self, request: Request) -> str:
        return (await require_admin(self.hs, request)).user_id

    async def _summary(self, room_id: str) -> dict[str, Any]:
        if not is_valid_room_id(room_id):
            raise invalid_param("Invalid room ID")
        got = (await self.store.room_summaries([room_id])).get(room_id)
        if got is None:
            raise not_found("Room not found")
        return got

    async def on_list(self, request: Request) -> tuple[int, Any]:
        await self._require_admin(request)

        offset, limit = int_arg(request, "from", 0), min(int_arg(request, "limit", 100), MAX_PAGE)
        order_by = query_arg(request, "order_by") or "name"
        # Synapse's older names for two orderings.
        order_by = {"size": "joined_members", "alphabetical": "name"}.get(order_by, order_by)
        if order_by not in ROOM_ORDER:
            raise invalid_param(f"Unknown value for order_by: {order_by}")
        backwards = backwards_arg(request, "f")
        term = (query_arg(request, "search_term") or "").lower()
        public = query_arg(request, "public_rooms")
        empty = query_arg(request, "empty_rooms")
        rooms = list((await self.store.room_summaries()).values())
        if term:
            rooms = [r for r in rooms if any(term in (r.get(k) or "").lower()
                                             for k in ("name", "canonical_alias", "room_id"))]
        if public in ("true", "false"):
            rooms = [r for r in rooms if r["public"] == (public == "true")]
        if empty in ("true", "false"):
            rooms = [r for r in rooms if (r["joined_members"] == 0) == (empty == "true")]
        rooms.sort(key=_sort_key(order_by), reverse=backwards)
        if order_by == "name":
            # Synapse orders unnamed rooms last whichever the direction.
            rooms.sort(key=lambda r: r.get("name") is None)
        page = rooms[offset: offset + limit]
        body: dict[str, Any] = {"rooms": [{k: r[k] for k in LIST_FIELDS} for r in page], "offset": offset,
                                "total_rooms": len(rooms)}
        if offset + len(page) < len(rooms):
            body["next_batch"] = offset + len(page)
        if offset > 0:
            body["prev_batch"] = max(0, offset - limit)
        return 200, body

    async def on_room(self, request: Request, room_id: str) -> tuple[int, Any]:
        await self._require_admin(request)
        summary = await self._summary(room_id)
        members = await self._joined(room_id)
        local = [m for m in members if m.endswith(":" + self.hs.server_name)]
        devices = sum(len(d) for d in (await self.hs.accounts.get_device_names(local)).values()) if local else 0
        out = {k: summary[k] for k in LIST_FIELDS}
        out.update(avatar=summary["avatar"], topic=summary["topic"], joined_local_devices=devices,
                   forgotten=False)
        return 200, out

    async def _joined(self, room_id: str) -> list[str]:
        return sorted(await self.hs.events.get_joined_users(room_id))

    async def on_members(self, request: Request, room_id: str) -> tuple[int, Any]:
        await self._require_admin(request)
        await self._summary(room_id)
        members = await self._joined(room_id)
        return 200, {"members": members, "total": len(members)}

    async def on_state(self, request: Request, room_id: str) -> tuple[int, Any]:
        await self._require_admin(request)
        await self._summary(room_id)
        state = await self.hs.events.get_current_state_ids(room_id)
        evs = await self.hs.events.get_events(list(state.values()))
        ordered = sorted(evs.values(), key=lambda e: (e.type, e.state_key or ""))
        return 200, {"state": await serialize_events(self.hs.events, ordered)}

    async def on_forward_extremities(self, request: Request, room_id: str) -> tuple[int, Any]:
        """The events new events in the room will follow (the synapse-admin
        UI shows them on a room's page)."""
        await self._require_admin(request)
        await self._summary(room_id)
        results = await self.store.forward_extremities(room_id)
        return 200, {"count": len(results), "results": results}

    # -- deleting a room ------------------------------------------------------------
    async def _check_delete(self, room_id: str, body: dict[str, Any]) -> dict[str, Any]:
        if not is_valid_room_id(room_id):
            raise invalid_param("Invalid room ID")
        opts = {"block": body.get("block", False), "purge": body.get("purge", True),
                "force_purge": body.get("force_purge", False), "new_room_user_id": body.get("new_room_user_id"),
                "room_name": body.get("room_name", "Content Violation Notification"),
                "message": body.get("message", "Sharing illegal content on this server is not permitted and "
                                               "rooms in violation will be blocked.")}
        for key in ("block", "purge", "force_purge"):
            if not isinstance(opts[key], bool):
                raise bad_json(f"{key} must be a boolean")
        for key in ("room_name", "message"):
            if not isinstance(opts[key], str):
                raise bad_json(f"{key} must be a string")
        new_owner = opts["new_room_user_id"]
        if new_owner is not None:
            if not isinstance(new_owner, str) or not new_owner.endswith(":" + self.hs.server_name) or \
                    await self.hs.accounts.get_user(new_owner) is None:
                raise invalid_param("new_room_user_id must be an existing local user")
        known = await self.hs.rooms.get_room_version(room_id) is not None
        if not known and not opts["block"]:
            raise not_found("Room not found")
        if known and opts["purge"]:
            # What a legal hold or a retention floor covers is never deleted.
            holds = await self.hs.privacy_store.list_holds("room", room_id)
            if holds:
                raise MatrixError(403, "M_FORBIDDEN", f"The room is under legal hold {holds[0]['id']}: "
                                  f"{holds[0]['reason']}; delete it with purge false, or lift the hold")
            floor = await self.hs.privacy_store.get_floor(room_id)
            if floor is not None:
                raise MatrixError(403, "M_FORBIDDEN", f"The room has a retention floor ({floor['reason']}); "
                                  "its events cannot be purged")
        opts["known"] = known
        return opts

    async def _shutdown(self, admin: str, room_id: str, opts: dict[str, Any]) -> dict[str, Any]:
        """Block (when asked), move local members out (and into a new room when
        asked), remove local aliases, then purge (when asked)."""
        result: dict[str, Any] = {"kicked_users": [], "failed_to_kick_users": [], "local_aliases": [],
                                  "new_room_id": None}
        if opts["block"]:
            await self.store.set_room_blocked(room_id, admin, True)
        if not opts["known"]:
            return result
        members = await self._joined(room_id)
        local = [m for m in members if m.endswith(":" + self.hs.server_name)]
        new_owner = opts["new_room_user_id"]
        if new_owner and local:
            new_room, _ = await self.hs.room_creation.create_room(new_owner, {
                "preset": "public_chat", "name": opts["room_name"],
                "power_level_content_override": {"events_default": 100}})
            result["new_room_id"] = new_room
            await self.hs.event_creator.send(new_room, "m.room.message", new_owner,
                                             {"msgtype": "m.text", "body": opts["message"]})
        for user in local:
            try:
                await self.hs.membership.update(user, user, room_id, "leave")
                if result["new_room_id"] and user != new_owner:
                    await self.hs.membership.update(user, user, result["new_room_id"], "join")
                result["kicked_users"].append(user)
            except MatrixError as e:
                logger.info("room deletion %s: %s could not leave: %s", room_id, user, e.msg)
                result["failed_to_kick_users"].append(user)
        for alias in await self.hs.rooms.get_aliases_for_room(room_id):
            await self.hs.rooms.delete_alias(alias)
            if result["new_room_id"]:
                # The alias now leads to the room the members were moved to.
                await self.hs.rooms.create_alias(alias, result["new_room_id"], new_owner)
            result["local_aliases"].append(alias)
        await self.hs.rooms.set_public(room_id, False)
        if opts["purge"] and (not result["failed_to_kick_users"] or opts["force_purge"]):
            await self.hs.privacy_store.purge_room(room_id)
            self.hs.rooms.drop_room_caches(room_id)
        return result

    async def on_delete_v1(self, request: Request, room_id: str) -> tuple[int, Any]:
        admin = await self._require_admin(request)
        opts = await self._check_delete(room_id, read_json_body(request, allow_empty=True))
        return 200, await self._shutdown(admin, room_id, opts)

    async def on_delete_v2(self, request: Request, room_id: str) -> tuple[int, Any]:
        admin = await self._require_admin(request)
        opts = await self._check_delete(room_id, read_json_body(request, allow_empty=True))
        if await self._deletions(room_id, active_only=True):
            raise MatrixError(400, "M_UNKNOWN", "The room is already being deleted")
        delete_id = random_string(16)
        await self._save_deletion(delete_id, room_id, "scheduled", None, {})

        async def run() -> None:
            try:
                await self._save_deletion(delete_id, room_id, "active", None, {})
                result = await self._shutdown(admin, room_id, opts)
                await self._save_deletion(delete_id, room_id, "complete", None, result)
            except Exception as e:
                logger.exception("room deletion %s of %s failed", delete_id, room_id)
                await self._save_deletion(delete_id, room_id, "failed", str(e)[:500], {})

        defer.ensureDeferred(run())
        return 200, {"delete_id": delete_id}

    async def _save_deletion(self, delete_id: str, room_id: str, status: str, error: Optional[str],
                             result: dict[str, Any]) -> None:
        def txn_fn(txn: Txn) -> None:
            txn.execute("DELETE FROM room_deletions WHERE delete_id = ?", (delete_id,))
            txn.execute("INSERT INTO room_deletions (delete_id, room_id, status, error, result_json, started_ts)"
                        " VALUES (?,?,?,?,?,?)", (delete_id, room_id, status, error, json.dumps(result),
                                                  int(time.time() * 1000)))

        await self.hs.db.run_interaction("save_room_deletion", txn_fn)

    async def _deletions(self, room_id: Optional[str] = None, delete_id: Optional[str] = None,
                         active_only: bool = False) -> list[dict[str, Any]]:
        sql = "SELECT delete_id, room_id, status, error, result_json FROM room_deletions WHERE "
        sql += "room_id = ?" if room_id is not None else "delete_id = ?"
        rows = await self.hs.db.execute("room_deletions", sql + " ORDER BY started_ts", room_id or delete_id)
        out = []
        for did, rid, status, error, result in rows:
            if active_only and status not in ("scheduled", "active"):
                continue
            item: dict[str, Any] = {"delete_id": did, "room_id": rid, "status": status,
                                    "shutdown_room": json.loads(result) or {
                                        "kicked_users": [], "failed_to_kick_users": [], "local_aliases": [],
                                        "new_room_id": None}}
            if error:
                item["error"] = error
            out.append(item)
        return out

    async def on_status_by_room(self, request: Request, room_id: str) -> tuple[int, Any]:
        await self._require_admin(request)
        results = await self._deletions(room_id=room_id)
        if not results:
            raise not_found("No deletion of this room")
        return 200, {"results": [{k: v for k, v in r.items() if k != "room_id"} for r in results]}

    async def on_status_by_id(self, request: Request, delete_id: str) -> tuple[int, Any]:
        await self._require_admin(request)
        results = await self._deletions(delete_id=delete_id)
        if not results:
            raise not_found("No such deletion")
        return 200, {k: v for k, v in results[0].items() if k != "delete_id"}

    # -- purging history -------------------------------------------------------------
    async def on_purge_history(self, request: Request, room_id: str, event_id: Optional[str] = None
                               ) -> tuple[int, Any]:
        await self._require_admin(request)
        if not is_valid_room_id(room_id) or await self.hs.rooms.get_room_version(room_id) is None:
            raise not_found("Room not found")
        body = read_json_body(request, allow_empty=True)
        delete_local = body.get("delete_local_events", False)
        if not isinstance(delete_local, bool):
            raise bad_json("delete_local_events must be a boolean")
        event_id = event_id or body.get("purge_up_to_event_id")
        if event_id is not None:
            ev = await self.hs.events.get_event(event_id) if isinstance(event_id, str) else None
            if ev is None or ev.room_id != room_id:
                raise not_found("Event not found in this room")
            before = int(ev.internal["stream_ordering"])
        else:
            ts = body.get("purge_up_to_ts")
            if not isinstance(ts, int) or isinstance(ts, bool):
                raise bad_json("give an event ID, purge_up_to_event_id or purge_up_to_ts")
            rows = await self.hs.db.execute(
                "purge_point", "SELECT MIN(stream_ordering) FROM events WHERE room_id = ? AND origin_server_ts >= ?"
                " AND outlier = 0", room_id, ts)
            before = int(rows[0][0]) if rows and rows[0][0] is not None else self.hs.notifier.current_token().events + 1
        # What a legal hold or a retention floor covers is never purged.
        if await self.hs.privacy_store.list_holds("room", room_id) or \
                await self.hs.privacy_store.get_floor(room_id) is not None:
            raise MatrixError(403, "M_FORBIDDEN", "The room is under a legal hold or has a retention floor")
        purge_id = random_string(16)
        await self._save_purge(purge_id, room_id, "active", None)

        async def run() -> None:
            try:
                # Its unread counts are adjusted from the read marks and
                # notifications it reads: no event stored and no recount
                # written meanwhile (zhome/push/unread.py).
                async with self.hs.persister.writes_paused():
                    await self.hs.privacy_store.purge_history(room_id, before, delete_local,
                                                              ":" + self.hs.server_name)
                await self._save_purge(purge_id, room_id, "complete", None)
            except Exception as e:
                logger.exception("history purge %s of %s failed", purge_id, room_id)
                await self._save_purge(purge_id, room_id, "failed", str(e)[:500])

        defer.ensureDeferred(run())
        return 200, {"purge_id": purge_id}

    async def _save_purge(self, purge_id: str, room_id: str, status: str, error: Optional[str]) -> None:
        def txn_fn(txn: Txn) -> None:
            txn.execute("DELETE FROM history_purges WHERE purge_id = ?", (purge_id,))
            txn.execute("INSERT INTO history_purges (purge_id, room_id, status, error, started_ts) VALUES (?,?,?,?,?)",
                        (purge_id, room_id, status, error, int(time.time() * 1000)))

        await self.hs.db.run_interaction("save_purge", txn_fn)

    async def on_purge_status(self, request: Request, purge_id: str) -> tuple[int, Any]:
        await self._require_admin(request)
        rows = await self.hs.db.execute("purge_status", "SELECT status, error FROM history_purges WHERE purge_id = ?",
                                        purge_id)
        if not rows:
            raise not_found("No such purge")
        status, error = rows[0]
        return 200, ({"status": status, "error": error} if error else {"status": status})

    async def on_get_block(self, request: Request, room_id: str) -> tuple[int, Any]:
        await self._require_admin(request)
        if not is_valid_room_id(room_id):
            raise invalid_param("Invalid room ID")
        by: Optional[str] = await self.store.room_block(room_id)
        return 200, ({"block": True, "user_id": by} if by else {"block": False})

    async def on_put_block(self, request: Request, room_id: str) -> tuple[int, Any]:
        admin = await self._require_admin(request)
        if not is_valid_room_id(room_id):
            raise invalid_param("Invalid room ID")
        body = read_json_body(request)
        block = body.get("block")
        if not isinstance(block, bool):
            raise bad_json("block must be a boolean")
        # A room this server has never seen can be blocked ahead of time.
        await self.store.set_room_blocked(room_id, admin, block)
        return 200, {"block": block}
