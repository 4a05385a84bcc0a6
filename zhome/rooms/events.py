"""The event format (PDUs) of room versions 1 to 12.

Spec: server-server-api "PDUs" and rooms/v*.md "Event format". An ``Event``
wraps the PDU JSON exactly as signed, plus its event ID and room version.
It is immutable in intent: code that needs a changed event builds a new one.
Local-only data (``unsigned`` additions such as ``transaction_id`` or
``age``) is added when an event is served, never stored in the PDU.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

from zhome.rooms.versions import EventIdFormat, RoomVersion


class Event:
    __slots__ = ("pdu", "event_id", "room_version", "rejected_reason", "internal")

    def __init__(
        self,
        pdu: dict[str, Any],
        event_id: str,
        room_version: RoomVersion,
        rejected_reason: Optional[str] = None,
    ) -> None:
        self.pdu = pdu
        self.event_id = event_id
        self.room_version = room_version
        self.rejected_reason = rejected_reason
        # Server-local facts about the event (stream ordering, txn id,
        # soft-failed...). Never sent over federation.
        self.internal: dict[str, Any] = {}

    # -- fields ---------------------------------------------------------
    @property
    def room_id(self) -> str:
        rid = self.pdu.get("room_id")
        if rid is None and self.type == "m.room.create" and self.room_version.hydra:
            # v12: the create event has no room_id; the room ID derives
            # from its event ID.
            return "!" + self.event_id[1:]
        return rid  # type: ignore[return-value]

    @property
    def type(self) -> str:
        return self.pdu["type"]

    @property
    def sender(self) -> str:
        return self.pdu["sender"]

    @property
    def state_key(self) -> Optional[str]:
        return self.pdu.get("state_key")

    def is_state(self) -> bool:
        return "state_key" in self.pdu

    @property
    def content(self) -> dict[str, Any]:
        return self.pdu.get("content", {})

    @property
    def depth(self) -> int:
        return self.pdu.get("depth", 0)

    @property
    def origin_server_ts(self) -> int:
        return self.pdu.get("origin_server_ts", 0)

    @property
    def membership(self) -> Optional[str]:
        return self.content.get("membership") if self.type == "m.room.member" else None

    @property
    def redacts(self) -> Optional[str]:
        if self.type != "m.room.redaction":
            return None
        if self.room_version.redacts_in_content:
            r = self.content.get("redacts")
            return r if isinstance(r, str) else None
        r = self.pdu.get("redacts")
        return r if isinstance(r, str) else None

    def _refs(self, key: str) -> list[str]:
        refs = self.pdu.get(key, [])
        if self.room_version.event_id_format is EventIdFormat.SERVER_CHOSEN:
            # v1/v2 reference other events as [event_id, {hashes}] pairs.
            return [r[0] for r in refs]
        return list(refs)

    @property
    def prev_event_ids(self) -> list[str]:
        return self._refs("prev_events")

    @property
    def auth_event_ids(self) -> list[str]:
        return self._refs("auth_events")

    def state_tuple(self) -> tuple[str, str]:
        assert self.state_key is not None
        return (self.type, self.state_key)

    def __repr__(self) -> str:
        return f"<Event {self.event_id} {self.type} {self.state_key!r}>"

    # -- client format --------------------------------------------------
    def client_dict(self, unsigned: Optional[dict[str, Any]] = None, with_room_id: bool = True) -> dict[str, Any]:
        """The ClientEvent form of the spec's client-server API."""
        d: dict[str, Any] = {
            "event_id": self.event_id,
            "type": self.type,
            "sender": self.sender,
            "content": self.content,
            "origin_server_ts": self.origin_server_ts,
        }
        if with_room_id:
            d["room_id"] = self.room_id
        if self.is_state():
            d["state_key"] = self.state_key
        r = self.redacts
        if r is not None:
            d["redacts"] = r
        d["unsigned"] = dict(unsigned or {})
        return d


StateMap = dict[tuple[str, str], str]
"""(event type, state key) -> event ID."""


def state_map_of(events: Iterable[Event]) -> dict[tuple[str, str], Event]:
    return {e.state_tuple(): e for e in events if e.is_state()}
