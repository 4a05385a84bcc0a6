"""The admin API's federation destinations, in the shape of Synapse's:
every server this one shares a room with or has failed to reach, its retry
state, the rooms shared with it, and resetting its retry timer (the next
transaction goes out at once).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.web.server import Request

from zhome.admin.common import backwards_arg, int_arg, require_admin
from zhome.http.errors import invalid_param, not_found
from zhome.http.server import JsonResource, query_arg
from zhome.storage.database import Txn, escape_like
from zhome.util.ids import is_valid_server_name

if TYPE_CHECKING:
    from zhome.server import HomeServer

SYN1 = r"/_synapse/admin/v1/federation/destinations"
DEST = r"(?P<destination>[^/]+)"
MAX_PAGE = 1000
ORDER = {"destination": "destination", "retry_last_ts": "retry_last_ts", "retry_interval": "retry_interval",
         "failure_ts": "failure_ts", "last_successful_stream_ordering": "destination"}


class DestinationServlets:
    def __init__(self, hs: "HomeServer") -> None:
        self.hs = hs

    def register_routes(self, r: JsonResource) -> None:
        r.register("GET", SYN1, self.on_list, "admin_destinations")
        r.register("GET", SYN1 + "/" + DEST, self.on_get, "admin_destination")
        r.register("GET", SYN1 + "/" + DEST + r"/rooms", self.on_rooms, "admin_destination_rooms")
        r.register("POST", SYN1 + "/" + DEST + r"/reset_connection", self.on_reset, "admin_destination_reset")

    async def _admin(self, request: Request) -> None:
        await require_admin(self.hs, request)

    async def _all(self) -> dict[str, dict[str, Any]]:
        """Every destination: the servers of remote room members, and those with a retry state."""
        own = "%:" + escape_like(self.hs.server_name)

        def txn_fn(txn: Txn) -> dict[str, dict[str, Any]]:
            txn.execute("SELECT DISTINCT state_key FROM current_state_events WHERE type = 'm.room.member'"
                        " AND membership = 'join' AND state_key NOT LIKE ? ESCAPE '\\'", (own,))
            out: dict[str, dict[str, Any]] = {}
            for (user_id,) in txn.fetchall():
                server = user_id.split(":", 1)[1] if ":" in user_id else None
                if server:
                    out.setdefault(server, _row(server, 0, 0, None))
            txn.execute("SELECT destination, failure_count, retry_interval_ms, last_failure_ts"
                        " FROM federation_destinations")
            for dest, failures, interval, last in txn.fetchall():
                out[dest] = _row(dest, failures, interval, last)
            return out

        return await self.hs.db.run_interaction("admin_destinations", txn_fn)

    async def on_list(self, request: Request) -> tuple[int, Any]:
        await self._admin(request)

        offset, limit = int_arg(request, "from", 0), min(int_arg(request, "limit", 100), MAX_PAGE)
        order = query_arg(request, "order_by") or "destination"
        if order not in ORDER:
            raise invalid_param(f"Unknown value for order_by: {order}")
        backwards = backwards_arg(request, "f")
        term = (query_arg(request, "destination") or "").lower()
        rows = [d for d in (await self._all()).values() if term in d["destination"].lower()]
        key = ORDER[order]
        rows.sort(key=lambda d: (d[key] is None, d[key] if d[key] is not None else 0, d["destination"]),
                  reverse=backwards)
        page = rows[offset: offset + limit]
        body: dict[str, Any] = {"destinations": page, "total": len(rows)}
        if offset + len(page) < len(rows):
            body["next_token"] = str(offset + len(page))
        return 200, body

    async def _one(self, destination: str) -> dict[str, Any]:
        if not is_valid_server_name(destination):
            raise invalid_param("Invalid server name")
        got = (await self._all()).get(destination)
        if got is None:
            raise not_found("Unknown destination")
        return got

    async def on_get(self, request: Request, destination: str) -> tuple[int, Any]:
        await self._admin(request)
        return 200, await self._one(destination)

    async def on_rooms(self, request: Request, destination: str) -> tuple[int, Any]:
        await self._admin(request)
        await self._one(destination)
        suffix = "%:" + escape_like(destination)
        rows = await self.hs.db.execute(
            "admin_destination_rooms", "SELECT DISTINCT room_id FROM current_state_events WHERE type ="
            " 'm.room.member' AND membership = 'join' AND state_key LIKE ? ESCAPE '\\' ORDER BY room_id", suffix)
        rooms = [{"room_id": r, "stream_ordering": 0} for (r,) in rows]
        return 200, {"rooms": rooms, "total": len(rooms)}

    async def on_reset(self, request: Request, destination: str) -> tuple[int, Any]:
        await self._admin(request)
        await self._one(destination)
        await self.hs.db.run_interaction("admin_destination_reset", lambda txn: txn.execute(
            "DELETE FROM federation_destinations WHERE destination = ?", (destination,)))
        sender = self.hs.federation_sender
        if sender is not None:
            sender.wake(destination, reset_backoff=True)
        return 200, {}


def _row(destination: str, failures: int, interval: int, last_failure: Any) -> dict[str, Any]:
    return {"destination": destination, "retry_last_ts": last_failure or 0, "retry_interval": interval or 0,
            "failure_ts": last_failure if failures else None, "last_successful_stream_ordering": None}
