"""Transfer and residency: a user's right to block the transfer of their
data, and reports of which servers received what.

A user (``PUT /_zhome/client/v1/privacy``) or an admin
(``PUT /_zhome/admin/v1/users/{userId}/privacy``) sets ``do_not_transfer``
and the servers still allowed (``allowed_servers``, server-name globs;
none by default). With it:

* the user cannot send into, or join, a room in which a server outside
  that list takes part: 403 ``M_FORBIDDEN`` naming the servers (leaving and
  redacting stay possible);
* the federation sender never sends their events to such a server, even
  if one joins later.

The transfer log (written by the federation sender) counts, per
destination, room and sender, the events sent and when. The residency
reports read it: ``GET /_zhome/admin/v1/users/{userId}/residency`` (which
servers, in which regions, hold this user's events, since when) and
``/rooms/{roomId}/residency``. Regions come from ``federation.regions``
(server-name glob to region).
"""

from __future__ import annotations

import fnmatch
import json
import time
from typing import TYPE_CHECKING, Any, Optional

from twisted.web.server import Request

from zhome.federation.policy import host_of
from zhome.admin.common import require_admin, require_local_user
from zhome.http.errors import MatrixError, bad_json, invalid_param, not_found
from zhome.http.server import JsonResource, read_json_body
from zhome.storage.database import Database, Txn
from zhome.util.ids import is_valid_room_id, server_of

if TYPE_CHECKING:
    from zhome.rooms.events import Event
    from zhome.server import HomeServer

MAX_GLOBS = 100


def matches_server(globs: list[str], server: str) -> bool:
    names = (server.lower(), host_of(server).lower())
    return any(fnmatch.fnmatchcase(n, g.lower()) for g in globs for n in names)


class TransferStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        #: user_id -> allowed server globs, for every user with do_not_transfer (asked on each send).
        self.blocked: dict[str, list[str]] = {}

    async def load(self) -> None:
        rows = await self.db.execute("privacy_load", "SELECT user_id, allowed_servers FROM user_privacy"
                                     " WHERE do_not_transfer = 1")
        self.blocked = {u: list(json.loads(a)) for u, a in rows}

    async def get(self, user_id: str) -> dict[str, Any]:
        rows = await self.db.execute("privacy_get", "SELECT do_not_transfer, allowed_servers, set_by, set_ts"
                                     " FROM user_privacy WHERE user_id = ?", user_id)
        if not rows:
            return {"do_not_transfer": False, "allowed_servers": []}
        dnt, allowed, by, ts = rows[0]
        return {"do_not_transfer": bool(dnt), "allowed_servers": json.loads(allowed), "set_by": by, "set_ts": ts}

    async def set(self, user_id: str, do_not_transfer: bool, allowed: list[str], by: str) -> None:
        def txn_fn(txn: Txn) -> None:
            txn.execute("DELETE FROM user_privacy WHERE user_id = ?", (user_id,))
            txn.execute("INSERT INTO user_privacy (user_id, do_not_transfer, allowed_servers, set_by, set_ts)"
                        " VALUES (?,?,?,?,?)", (user_id, int(do_not_transfer), json.dumps(allowed), by,
                                                int(time.time() * 1000)))

        await self.db.run_interaction("privacy_set", txn_fn)
        if do_not_transfer:
            self.blocked[user_id] = list(allowed)
        else:
            self.blocked.pop(user_id, None)

    def may_receive(self, sender: str, server: str) -> bool:
        """Whether ``server`` may receive an event ``sender`` sent."""
        allowed = self.blocked.get(sender)
        return allowed is None or matches_server(allowed, server)

    async def log_rows(self, column: str, value: str) -> list[tuple[str, str, str, int, int, int]]:
        assert column in ("sender", "room_id")
        rows = await self.db.execute(
            "transfer_log", "SELECT destination, room_id, sender, events, first_ts, last_ts FROM transfer_log"
            f" WHERE {column} = ? ORDER BY destination, room_id", value)
        return [(d, r, s, int(n), int(f), int(last)) for d, r, s, n, f, last in rows]


def _settings_body(body: dict[str, Any]) -> tuple[bool, list[str]]:
    dnt = body.get("do_not_transfer")
    allowed = body.get("allowed_servers", [])
    if not isinstance(dnt, bool):
        raise bad_json("do_not_transfer must be a boolean")
    if not isinstance(allowed, list) or len(allowed) > MAX_GLOBS or not all(
            isinstance(g, str) and g and len(g) <= 255 for g in allowed):
        raise bad_json(f"allowed_servers must be a list of at most {MAX_GLOBS} server-name globs")
    return dnt, allowed


class TransferServlets:
    def __init__(self, hs: "HomeServer") -> None:
        self.hs = hs
        self.store: TransferStore = hs.transfer_store

    def register_routes(self, r: JsonResource) -> None:
        r.register("GET", r"/_zhome/client/v1/privacy", self.on_get_own, "privacy_settings")
        r.register("PUT", r"/_zhome/client/v1/privacy", self.on_put_own, "privacy_settings")
        user = r"/_zhome/admin/v1/users/(?P<user_id>[^/]+)"
        r.register("GET", user + r"/privacy", self.on_get_user, "zadmin_privacy")
        r.register("PUT", user + r"/privacy", self.on_put_user, "zadmin_privacy")
        r.register("GET", user + r"/residency", self.on_user_residency, "zadmin_user_residency")
        r.register("GET", r"/_zhome/admin/v1/rooms/(?P<room_id>[^/]+)/residency", self.on_room_residency,
                   "zadmin_room_residency")

    # -- the user's own settings -------------------------------------------------------
    async def on_get_own(self, request: Request) -> tuple[int, Any]:
        req = await self.hs.auth.get_user_by_req(request)
        return 200, await self.store.get(req.user_id)

    async def on_put_own(self, request: Request) -> tuple[int, Any]:
        req = await self.hs.auth.get_user_by_req(request)
        dnt, allowed = _settings_body(read_json_body(request))
        await self.store.set(req.user_id, dnt, allowed, req.user_id)
        return 200, await self.store.get(req.user_id)

    async def _admin(self, request: Request) -> str:
        return (await require_admin(self.hs, request)).user_id

    async def on_get_user(self, request: Request, user_id: str) -> tuple[int, Any]:
        await self._admin(request)
        await require_local_user(self.hs, user_id)
        return 200, await self.store.get(user_id)

    async def on_put_user(self, request: Request, user_id: str) -> tuple[int, Any]:
        admin = await self._admin(request)
        await require_local_user(self.hs, user_id)
        dnt, allowed = _settings_body(read_json_body(request))
        await self.store.set(user_id, dnt, allowed, admin)
        return 200, await self.store.get(user_id)

    # -- residency reports ----------------------------------------------------------------
    def region_of(self, server: str) -> Optional[str]:
        for glob, region in self.hs.config.federation.regions.items():
            if matches_server([glob], server):
                return region
        return None

    def _by_server(self, rows: list[tuple[str, str, str, int, int, int]], key_index: int, key_name: str
                   ) -> list[dict[str, Any]]:
        servers: dict[str, dict[str, Any]] = {}
        for row in rows:
            dest, _room, _sender, n, first, last = row
            s = servers.setdefault(dest, {"server": dest, "region": self.region_of(dest), "events": 0,
                                          "first_ts": first, "last_ts": last, key_name: {}})
            s["events"] += n
            s["first_ts"] = min(s["first_ts"], first)
            s["last_ts"] = max(s["last_ts"], last)
            s[key_name][row[key_index]] = s[key_name].get(row[key_index], 0) + n
        return [servers[d] for d in sorted(servers)]

    async def on_user_residency(self, request: Request, user_id: str) -> tuple[int, Any]:
        await self._admin(request)
        await require_local_user(self.hs, user_id)
        rows = await self.store.log_rows("sender", user_id)
        return 200, {"user_id": user_id, "home_server": self.hs.server_name,
                     "home_region": self.region_of(self.hs.server_name),
                     "servers": self._by_server(rows, 1, "rooms"),
                     "transfer": await self.store.get(user_id)}

    async def on_room_residency(self, request: Request, room_id: str) -> tuple[int, Any]:
        await self._admin(request)
        if not is_valid_room_id(room_id):
            raise invalid_param("Invalid room ID")
        if await self.hs.rooms.get_room_version(room_id) is None:
            raise not_found("Room not found")
        rows = await self.store.log_rows("room_id", room_id)
        return 200, {"room_id": room_id, "home_server": self.hs.server_name,
                     "servers": self._by_server(rows, 2, "senders")}


async def check_transfer(hs: "HomeServer", event: "Event", state: dict[tuple[str, str], str]) -> None:
    """Before a local event is sent: a do-not-transfer sender may not send
    into a room in which a server they do not allow takes part (leaving and
    redacting stay possible)."""
    store: TransferStore = hs.transfer_store
    allowed = store.blocked.get(event.sender)
    if allowed is None:
        return
    if event.type == "m.room.redaction" or (event.type == "m.room.member" and event.membership == "leave"
                                             and event.state_key == event.sender):
        return
    member_ids = [eid for (t, sk), eid in state.items() if t == "m.room.member" and server_of(sk) != hs.server_name]
    evs = await hs.events.get_events(member_ids) if member_ids else {}
    servers = sorted({server_of(e.state_key) for e in evs.values() if e.membership == "join" and e.state_key})
    refused = [s for s in servers if not matches_server(allowed, s)]
    if refused:
        raise MatrixError(403, "M_FORBIDDEN", "Your data may not be transferred to " + ", ".join(refused)
                          + ", which take part in this room (your do-not-transfer setting)",
                          servers=refused)
