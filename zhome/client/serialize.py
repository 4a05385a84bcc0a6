"""Events as clients see them (ClientEvent), with redactions applied.

Spec: client-server-api "Room Events" (ClientEvent, ``unsigned``:
``age``, ``redacted_because``, ``transaction_id``, ``prev_content``),
"Aggregations of child events" (``unsigned["m.relations"]``, from
``EventsStore.bundle_aggregations``: zhome/client/aggregations.py).
"""

from __future__ import annotations

import time
from typing import Any, Optional

from zhome.http.auth import Requester
from zhome.rooms.events import Event
from zhome.rooms.redaction import prune_event_dict
from zhome.storage.events import EventsStore


async def serialize_events(
    store: EventsStore, events: list[Event], with_room_id: bool = True,
    requester: Optional[Requester] = None, bundle: bool = True,
) -> list[dict[str, Any]]:
    """Client views of ``events``. ``requester`` is who they are served to: an event that device sent carries its
    ``transaction_id``, for that device only; events served to a requester carry their bundled aggregations
    (unless ``bundle`` is false)."""
    redaction_ids = [e.internal["redacted_by"] for e in events if e.internal.get("redacted_by")]
    redactions = await store.get_events(redaction_ids) if redaction_ids else {}
    now = int(time.time() * 1000)
    out = []
    for ev in events:
        unsigned: dict[str, Any] = {"age": max(0, now - ev.origin_server_ts)}
        red_id = ev.internal.get("redacted_by")
        if red_id and red_id in redactions:
            pruned = prune_event_dict(ev.room_version, ev.pdu)
            view = Event(pruned, ev.event_id, ev.room_version)
            unsigned["redacted_because"] = redactions[red_id].client_dict({}, with_room_id)
            # Not in the spec's ClientEvent, but served by other homeservers and read by clients.
            unsigned["redacted_by"] = red_id
            d = view.client_dict(unsigned, with_room_id)
        else:
            txn = ev.internal.get("txn")
            if txn is not None and requester is not None and ev.sender == requester.user_id and txn[0] == requester.device_id:
                unsigned["transaction_id"] = txn[1]
            d = ev.client_dict(unsigned, with_room_id)
        out.append(d)
    if bundle and requester is not None and store.bundle_aggregations is not None and events:
        bundles = await store.bundle_aggregations(events, requester, with_room_id)
        for ev, d in zip(events, out):
            relations = bundles.get(ev.event_id)
            if relations:
                d["unsigned"]["m.relations"] = relations
    return out


def receipt_contents(rows: list[tuple], user_id: str) -> dict[str, dict[str, Any]]:
    """The ``m.receipt`` content of each room, from (room_id, receipt type,
    user, thread_id, event_id, data) rows, as ``user_id`` may see them:
    private read receipts are for their owner only."""
    by_room: dict[str, dict[str, Any]] = {}
    for room_id, rtype, ruser, thread_id, event_id, data in rows:
        if rtype == "m.read.private" and ruser != user_id:
            continue
        d = dict(data)
        if thread_id:
            d["thread_id"] = thread_id
        by_room.setdefault(room_id, {}).setdefault(event_id, {}).setdefault(rtype, {})[ruser] = d
    return by_room
