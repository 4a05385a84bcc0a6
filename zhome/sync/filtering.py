"""Filters for /sync, /messages and /context.

Spec: client-server-api "Filtering" (Filter, RoomFilter, RoomEventFilter,
EventFilter). A filter is checked on upload so bad filters fail with
``M_BAD_JSON`` / ``M_INVALID_PARAM`` instead of when used.
"""

from __future__ import annotations

import copy
import fnmatch
import json
from typing import Any, Optional

from zhome.http.errors import bad_json
from zhome.rooms.events import Event
from zhome.util.ids import is_valid_room_id, is_valid_user_id

_STR_LISTS = ("types", "not_types", "senders", "not_senders", "rooms", "not_rooms")


def _check_ids(f: dict[str, Any], where: str) -> None:
    """Room and sender lists hold IDs; a filter naming something else would
    silently match nothing."""
    for key in ("rooms", "not_rooms"):
        for room_id in f.get(key, ()):
            if not is_valid_room_id(room_id):
                raise bad_json(f"{where}.{key}: {room_id[:100]!r} is not a room ID")
    for key in ("senders", "not_senders"):
        for user_id in f.get(key, ()):
            if not is_valid_user_id(user_id):
                raise bad_json(f"{where}.{key}: {user_id[:100]!r} is not a user ID")


def _check_event_filter(f: Any, where: str) -> dict[str, Any]:
    if f is None:
        return {}
    if not isinstance(f, dict):
        raise bad_json(f"{where} must be an object")
    for key in _STR_LISTS:
        if key in f and (not isinstance(f[key], list) or not all(isinstance(x, str) for x in f[key])):
            raise bad_json(f"{where}.{key} must be a list of strings")
    _check_ids(f, where)
    if "limit" in f:
        lim = f["limit"]
        # The spec asks for more than 0; clients send 0 to get no events
        # (state only), which is what it then gives.
        if not isinstance(lim, int) or isinstance(lim, bool) or lim < 0:
            raise bad_json(f"{where}.limit must be a non-negative integer")
    for key in ("lazy_load_members", "include_redundant_members", "contains_url", "unread_thread_notifications"):
        if key in f and not isinstance(f[key], bool):
            raise bad_json(f"{where}.{key} must be a boolean")
    return f


def validate_filter(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad_json("Filter must be an object")
    if "event_format" in body and body["event_format"] not in ("client", "federation"):
        raise bad_json("event_format must be 'client' or 'federation'")
    if "event_fields" in body and (
        not isinstance(body["event_fields"], list) or not all(isinstance(x, str) for x in body["event_fields"])
    ):
        raise bad_json("event_fields must be a list of strings")
    for key in ("presence", "account_data"):
        _check_event_filter(body.get(key), key)
    room = body.get("room")
    if room is not None:
        if not isinstance(room, dict):
            raise bad_json("room must be an object")
        for key in ("rooms", "not_rooms"):
            if key in room and (not isinstance(room[key], list) or not all(isinstance(x, str) for x in room[key])):
                raise bad_json(f"room.{key} must be a list of strings")
        _check_ids({k: room[k] for k in ("rooms", "not_rooms") if k in room}, "room")
        if "include_leave" in room and not isinstance(room["include_leave"], bool):
            raise bad_json("room.include_leave must be a boolean")
        for key in ("timeline", "state", "ephemeral", "account_data"):
            _check_event_filter(room.get(key), f"room.{key}")
    return body


def parse_filter_param(raw: Optional[str]) -> Optional[dict[str, Any]]:
    """The inline RoomEventFilter of /messages or /context (None if absent).

    These endpoints take a JSON object only, never a stored filter ID.
    """
    if not raw:
        return None
    try:
        parsed = json.loads(raw)
    except ValueError:
        raise bad_json("Filter is not valid JSON")
    if not isinstance(parsed, dict):
        raise bad_json("Filter is not a JSON object")
    # Check the RoomEventFilter's own keys too, or a wrong type (e.g.
    # "types": 5) would fail later as a 500.
    return _check_event_filter(validate_filter(parsed), "filter")


def _match(pattern: str, value: str) -> bool:
    return value == pattern or ("*" in pattern and fnmatch.fnmatchcase(value, pattern))


class EventFilter:
    """A RoomEventFilter / EventFilter compiled for matching."""

    def __init__(self, f: Optional[dict[str, Any]]) -> None:
        f = f or {}
        self.types = f.get("types")
        self.not_types = f.get("not_types", [])
        self.senders = f.get("senders")
        self.not_senders = f.get("not_senders", [])
        self.rooms = f.get("rooms")
        self.not_rooms = f.get("not_rooms", [])
        self.limit: Optional[int] = f.get("limit")
        self.lazy_load_members = bool(f.get("lazy_load_members", False))
        self.include_redundant_members = bool(f.get("include_redundant_members", False))
        self.contains_url = f.get("contains_url")
        # Per-thread notification counts in /sync ("Receiving notifications").
        self.unread_thread_notifications = bool(f.get("unread_thread_notifications", False))
        self.ignored: frozenset[str] = frozenset()

    def matches_type(self, etype: str) -> bool:
        if any(_match(p, etype) for p in self.not_types):
            return False
        if self.types is not None and not any(_match(p, etype) for p in self.types):
            return False
        return True

    def matches_nothing(self) -> bool:
        """True for ``types: []``: no event can pass."""
        return self.types is not None and not self.types

    def matches_sender(self, sender: str) -> bool:
        if sender in self.not_senders:
            return False
        return self.senders is None or sender in self.senders

    def matches_room(self, room_id: str) -> bool:
        if room_id in self.not_rooms:
            return False
        return self.rooms is None or room_id in self.rooms

    def ignoring(self, users: frozenset[str]) -> "EventFilter":
        """This filter, also leaving out what ``users`` sent except state
        events (client-server-api "Ignoring Users")."""
        out = copy.copy(self)
        out.ignored = self.ignored | users
        return out

    def matches(self, ev: Event) -> bool:
        if not self.matches_type(ev.type):
            return False
        if ev.sender in self.not_senders:
            return False
        if self.ignored and ev.sender in self.ignored and not ev.is_state():
            return False
        if self.senders is not None and ev.sender not in self.senders:
            return False
        if not self.matches_room(ev.room_id):
            return False
        if self.contains_url is not None:
            has = isinstance(ev.content.get("url"), str)
            if has != self.contains_url:
                return False
        return True


class SyncFilter:
    def __init__(self, f: Optional[dict[str, Any]]) -> None:
        f = f or {}
        room = f.get("room", {}) or {}
        self.rooms = room.get("rooms")
        self.not_rooms = room.get("not_rooms", [])
        self.include_leave = bool(room.get("include_leave", False))
        self.timeline = EventFilter(room.get("timeline"))
        self.state = EventFilter(room.get("state"))
        self.ephemeral = EventFilter(room.get("ephemeral"))
        self.room_account_data = EventFilter(room.get("account_data"))
        self.account_data = EventFilter(f.get("account_data"))
        self.presence = EventFilter(f.get("presence"))
        self.event_format = f.get("event_format", "client")

    def room_included(self, room_id: str) -> bool:
        if room_id in self.not_rooms:
            return False
        return self.rooms is None or room_id in self.rooms
