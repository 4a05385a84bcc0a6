"""Finding the event of a room sent closest to a point in time.

Spec: client-server-api "GET /_matrix/client/v1/rooms/{roomId}/timestamp_to_event"
(MSC3030) and server-server-api "GET /_matrix/federation/v1/timestamp_to_event/{roomId}":
the event of the room's timeline sent closest to ``ts`` in direction
``dir``: the first at or after it for ``f``, the last at or before it for
``b``, by ``origin_server_ts`` (the sender's clock, which is what a client
showing dates means). The client and the federation endpoints share this;
each says who may see what.
"""

from __future__ import annotations

from typing import Awaitable, Callable, Optional

from twisted.web.server import Request

from zhome.http.errors import invalid_param, missing_param, not_found
from zhome.http.server import query_arg, query_int
from zhome.rooms.events import Event
from zhome.storage.events import EventsStore

# Candidates read per round while looking for one the requester may see.
BATCH = 20
# Rounds before giving up: bounded, however much history is hidden.
MAX_ROUNDS = 10


def parse_timestamp_query(request: Request) -> tuple[int, bool]:
    direction = query_arg(request, "dir")
    if direction is None:
        raise missing_param("Missing 'dir'")
    if direction not in ("f", "b"):
        raise invalid_param("'dir' must be 'f' or 'b'")
    ts = query_int(request, "ts")
    if ts is None:
        raise missing_param("Missing 'ts'")
    return ts, direction == "f"


async def closest_event(events: EventsStore, room_id: str, ts: int, forwards: bool,
                        visible: Callable[[list[Event]], Awaitable[list[Event]]]) -> Optional[Event]:
    """The first event from ``ts`` in the direction that ``visible`` keeps."""
    after: Optional[tuple[int, int]] = None
    for _ in range(MAX_ROUNDS):
        batch = await events.get_room_events_near_ts(room_id, ts, forwards, BATCH, after)
        if not batch:
            return None
        kept = {e.event_id for e in await visible(batch)}
        for e in batch:
            if e.event_id in kept:
                return e
        last = batch[-1]
        after = (last.origin_server_ts, int(last.internal.get("stream_ordering", 0)))
    return None


async def timestamp_to_event_for_server(events: EventsStore, request: Request, room_id: str) -> dict[str, object]:
    """The federation endpoint's answer; the caller has checked that the
    requesting server is in the room, so every timeline event counts."""
    ts, forwards = parse_timestamp_query(request)

    async def every(batch: list[Event]) -> list[Event]:
        return batch

    ev = await closest_event(events, room_id, ts, forwards, every)
    if ev is None:
        raise not_found("No event found in that direction")
    return {"event_id": ev.event_id, "origin_server_ts": ev.origin_server_ts}
