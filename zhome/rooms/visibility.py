"""History visibility: which events a user may see.

Spec: client-server-api "History visibility" (the algorithm in "Room
History Visibility"): world_readable; the user's membership at the event
was join; shared and the user joined at some point after the event;
invited and the user's membership at the event was invite.
"""

from __future__ import annotations

from typing import Optional

from zhome.rooms.events import Event
from zhome.storage.events import EventsStore


# History visibility values from the most closed to the most open.
_OPENNESS = {"joined": 0, "invited": 1, "shared": 2, "world_readable": 3}


class Visibility:
    def __init__(self, events: EventsStore) -> None:
        self.events = events

    async def filter_events(self, user_id: str, events: list[Event]) -> list[Event]:
        if not events:
            return []
        groups: dict[int, tuple[str, Optional[str]]] = {}
        out = []
        latest_join: dict[str, int] = {}
        for ev in events:
            g = ev.internal.get("state_group")
            if g is None:
                continue
            if g not in groups:
                state = await self.events.get_state_group(g)
                hv = "shared"
                hv_id = state.get(("m.room.history_visibility", ""))
                membership = None
                ids = [i for i in (hv_id, state.get(("m.room.member", user_id))) if i]
                evs = await self.events.get_events(ids)
                if hv_id and hv_id in evs:
                    v = evs[hv_id].content.get("history_visibility")
                    if v in ("world_readable", "shared", "invited", "joined"):
                        hv = v
                mid = state.get(("m.room.member", user_id))
                if mid and mid in evs:
                    membership = evs[mid].membership
                groups[g] = (hv, membership)
            hv, membership = groups[g]
            if ev.type == "m.room.history_visibility" and ev.state_key == "":
                # A change of history visibility is seen by whoever could see
                # the room on either side of it, so members see the boundary.
                before = await self._history_visibility(await self.events.get_state_before_event(ev))
                if _OPENNESS[before] > _OPENNESS[hv]:
                    hv = before
            # A user always sees their own membership events: the state
            # group is the state after the event, so a leave, kick or ban
            # would otherwise hide itself and the client never learns of it.
            if hv == "world_readable" or membership == "join" or (
                    ev.type == "m.room.member" and ev.state_key == user_id):
                out.append(ev)
                continue
            if hv == "invited" and membership == "invite":
                out.append(ev)
                continue
            if hv == "shared":
                room = ev.room_id
                if room not in latest_join:
                    latest_join[room] = await self._latest_join(user_id, room)
                if latest_join[room] > ev.internal.get("stream_ordering", 0):
                    out.append(ev)
        return out

    async def _history_visibility(self, state: dict[tuple[str, str], str]) -> str:
        hv_id = state.get(("m.room.history_visibility", ""))
        ev = await self.events.get_event(hv_id) if hv_id else None
        v = ev.content.get("history_visibility") if ev is not None else None
        return v if isinstance(v, str) and v in _OPENNESS else "shared"

    async def is_world_readable(self, room_id: str) -> bool:
        """Whether the room's current history visibility is world_readable: anyone may read it without
        joining (spec: "Room History Visibility", world_readable)."""
        eid = await self.events.get_current_state_event_id(room_id, "m.room.history_visibility", "")
        ev = await self.events.get_event(eid) if eid else None
        return ev is not None and ev.content.get("history_visibility") == "world_readable"

    async def _latest_join(self, user_id: str, room_id: str) -> int:
        rows = await self.events.db.execute(
            "latest_join",
            "SELECT MAX(stream_ordering) FROM room_memberships WHERE user_id = ? AND room_id = ? AND membership = 'join'",
            user_id,
            room_id,
        )
        return int(rows[0][0] or 0) if rows else 0
