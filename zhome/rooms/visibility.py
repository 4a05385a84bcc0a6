"""History visibility: which events a user may see.

Spec: client-server-api "History visibility" (the algorithm in "Room
History Visibility"): world_readable; the user's membership at the event
was join; shared and the user joined at some point after the event;
invited and the user's membership at the event was invite. A
history_visibility event is also visible when the visibility before it
allows it, and users always see their own membership events.
"""

from __future__ import annotations

from typing import Mapping, Optional

from zhome.rooms.events import Event
from zhome.storage.events import EventsStore


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
                groups[g] = await self._visibility_and_membership(user_id, await self.events.get_state_group(g))
            hv, membership = groups[g]
            # A user always sees their own membership events: the state
            # group is the state after the event, so a leave, kick or ban
            # would otherwise hide itself and the client never learns of it.
            if (ev.type == "m.room.member" and ev.state_key == user_id) or await self._allowed(
                    user_id, ev, hv, membership, latest_join):
                out.append(ev)
                continue
            if ev.type == "m.room.history_visibility" and ev.state_key == "":
                # Spec: a history_visibility event is visible if the
                # visibility before *or* after it allows it.
                hv_before, membership_before = await self._visibility_and_membership(
                    user_id, await self.events.get_state_before_event(ev))
                if await self._allowed(user_id, ev, hv_before, membership_before, latest_join):
                    out.append(ev)
        return out

    async def _visibility_and_membership(self, user_id: str,
                                         state: Mapping[tuple[str, str], str]) -> tuple[str, Optional[str]]:
        hv = "shared"
        hv_id = state.get(("m.room.history_visibility", ""))
        mid = state.get(("m.room.member", user_id))
        evs = await self.events.get_events([i for i in (hv_id, mid) if i])
        if hv_id and hv_id in evs:
            v = evs[hv_id].content.get("history_visibility")
            if v in ("world_readable", "shared", "invited", "joined"):
                hv = v
        membership = evs[mid].membership if mid and mid in evs else None
        return hv, membership

    async def _allowed(self, user_id: str, ev: Event, hv: str, membership: Optional[str],
                       latest_join: dict[str, int]) -> bool:
        if hv == "world_readable" or membership == "join":
            return True
        if hv == "invited" and membership == "invite":
            return True
        if hv == "shared":
            room = ev.room_id
            if room not in latest_join:
                latest_join[room] = await self._latest_join(user_id, room)
            return latest_join[room] > ev.internal.get("stream_ordering", 0)
        return False

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
