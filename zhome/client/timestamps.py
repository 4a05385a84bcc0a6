"""GET /_matrix/client/v1/rooms/{roomId}/timestamp_to_event: jump to a
date in a room's history (zhome/rooms/timestamps.py finds the event).

Spec: client-server-api "GET /_matrix/client/v1/rooms/{roomId}/timestamp_to_event"
(MSC3030). Members and former members, or anyone in a world_readable room,
may ask; the answer is the first event in that direction that the user's
history visibility shows them. The federation endpoint of the same name
(zhome/federation/servlets.py) answers servers with members in the room.

What this server does not do: when it has no event in that direction (its
history of the room starts later, e.g. it joined recently), it answers 404
rather than asking other servers in the room, because it could not serve
an event it does not hold to the client anyway (``/context`` on it would
fail); backfill through ``/messages`` brings the older part in.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.web.server import Request

from zhome.http.errors import forbidden, not_found
from zhome.http.server import JsonResource
from zhome.rooms.events import Event
from zhome.rooms.timestamps import closest_event, parse_timestamp_query
from zhome.storage.events import EventsStore


class TimestampServlets:
    def __init__(self, auth: Any, events: EventsStore, visibility: Any, room_version: Callable[[str], Any]) -> None:
        self.auth = auth
        self.events = events
        self.visibility = visibility
        self.room_version = room_version

    def register_routes(self, r: JsonResource) -> None:
        r.register("GET", r"/_matrix/client/v1/rooms/(?P<room_id>[^/]+)/timestamp_to_event", self.on_get,
                   "timestamp_to_event")

    async def on_get(self, request: Request, room_id: str) -> tuple[int, Any]:
        req = await self.auth.get_user_by_req(request)
        ts, forwards = parse_timestamp_query(request)
        if await self.room_version(room_id) is None:
            raise forbidden("You are not in this room")
        eid = await self.events.get_current_state_event_id(room_id, "m.room.member", req.user_id)
        member = await self.events.get_event(eid) if eid is not None else None
        if member is None and not await self.visibility.is_world_readable(room_id):
            raise forbidden("You are not in this room")

        async def visible(batch: list[Event]) -> list[Event]:
            return list(await self.visibility.filter_events(req.user_id, batch))

        ev = await closest_event(self.events, room_id, ts, forwards, visible)
        if ev is None:
            raise not_found("No event found in that direction")
        return 200, {"event_id": ev.event_id, "origin_server_ts": ev.origin_server_ts}
