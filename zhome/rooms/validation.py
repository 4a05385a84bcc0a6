"""Event size and field limits.

Spec: client-server-api "Size limits": the whole event at most 65536 bytes
of canonical JSON; sender, room_id, state_key, type and event_id at most
255 bytes each.
"""

from __future__ import annotations

from typing import Any

from zhome.crypto.canonical import check_canonical_json_value, encode_canonical_json
from zhome.http.errors import MatrixError, bad_json, too_large
from zhome.rooms.versions import RoomVersion

MAX_EVENT_SIZE = 65536
MAX_FIELD_BYTES = 255


def check_client_content(room_version: RoomVersion, content: Any) -> None:
    """Content a client wants to send: a JSON object, canonical-JSON safe."""
    if not isinstance(content, dict):
        raise bad_json("Event content must be a JSON object")
    try:
        check_canonical_json_value(content, strict=room_version.strict_canonical_json)
    except ValueError as e:
        raise bad_json(f"Bad event content: {e}")


def check_field_lengths(etype: str, state_key: str | None) -> None:
    if len(etype.encode("utf-8")) > MAX_FIELD_BYTES:
        raise MatrixError(400, "M_BAD_JSON", "Event type longer than 255 bytes")
    if state_key is not None and len(state_key.encode("utf-8")) > MAX_FIELD_BYTES:
        raise MatrixError(400, "M_BAD_JSON", "State key longer than 255 bytes")


def check_pdu_size(pdu: dict[str, Any]) -> None:
    for key in ("sender", "room_id", "type", "state_key", "event_id"):
        v = pdu.get(key)
        if isinstance(v, str) and len(v.encode("utf-8")) > MAX_FIELD_BYTES:
            raise bad_json(f"'{key}' longer than 255 bytes")
    size = len(encode_canonical_json(pdu))
    if size > MAX_EVENT_SIZE:
        raise too_large(f"Event is {size} bytes; the limit is {MAX_EVENT_SIZE}")
