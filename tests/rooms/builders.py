"""Room events built by hand, shared by the state resolution tests and the
hostile-federation end-to-end tests.

An event cites as auth events what ``auth_types_for_event`` selects from the
state it is built on, as a homeserver does.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from zhome.rooms.auth import auth_types_for_event
from zhome.rooms.versions import RoomVersion


def auth_event_ids(rv: RoomVersion, etype: str, state_key: Optional[str], sender: str, content: dict[str, Any],
                   state: Mapping[tuple[str, str], str]) -> list[str]:
    """The IDs in ``state`` ((type, state_key) -> event ID) that an event
    of this shape cites as its auth events."""
    return [state[k] for k in auth_types_for_event(rv, etype, state_key, sender, content) if k in state]


def build_pdu(etype: str, sender: str, content: dict[str, Any], *, prev_events: list[Any],
              auth_events: list[Any], depth: int, origin_server_ts: int, state_key: Optional[str] = None,
              room_id: Optional[str] = None) -> dict[str, Any]:
    """An unsigned PDU; ``state_key`` and ``room_id`` only when given."""
    pdu: dict[str, Any] = {
        "type": etype,
        "sender": sender,
        "content": content,
        "prev_events": prev_events,
        "auth_events": auth_events,
        "depth": depth,
        "origin_server_ts": origin_server_ts,
    }
    if state_key is not None:
        pdu["state_key"] = state_key
    if room_id is not None:
        pdu["room_id"] = room_id
    return pdu
