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

    async def filter_events(self, user_id: str, events: list[Event],
                            known: Optional[Mapping[int, tuple[str, Optional[str]]]] = None,
                            latest_joins: Optional[Mapping[str, int]] = None) -> list[Event]:
        """The events ``user_id`` may see. ``known``: groups_visibility of
        this user already read for (some of) the events' state groups;
        ``latest_joins``: latest_joins of this user for (some of) the rooms."""
        if not events:
            return []
        groups: Mapping[int, tuple[str, Optional[str]]] = known or {}
        missing = [ev for ev in events if ev.internal.get("state_group") not in groups]
        if missing:
            extra = await self.groups_visibility(user_id, missing)
            groups = {**groups, **extra} if groups else extra
        out = []
        latest_join: dict[str, int] = dict(latest_joins or {})
        for ev in events:
            g = ev.internal.get("state_group")
            if g is None:
                continue
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

    async def groups_visibility(self, user_id: str, events: list[Event]) -> dict[int, tuple[str, Optional[str]]]:
        """(history visibility, the user's membership) in the state of each
        event's group, from only those two keys of each group, read together."""
        keys = [("m.room.history_visibility", ""), ("m.room.member", user_id)]
        groups = [g for g in (ev.internal.get("state_group") for ev in events) if g is not None]
        states = await self.events.get_state_keys_for_groups(groups, keys)
        evs = await self.events.get_events(list({eid for st in states.values() for eid in st.values()}))
        return {g: _hv_and_membership(st, user_id, evs) for g, st in states.items()}

    async def _visibility_and_membership(self, user_id: str,
                                         state: Mapping[tuple[str, str], str]) -> tuple[str, Optional[str]]:
        hv_id = state.get(("m.room.history_visibility", ""))
        mid = state.get(("m.room.member", user_id))
        evs = await self.events.get_events([i for i in (hv_id, mid) if i])
        return _hv_and_membership(state, user_id, evs)

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

    async def latest_joins(self, user_id: str, room_ids: list[str]) -> dict[str, int]:
        """For each room, the stream position of the user's latest join (0: never)."""
        rows = await self.events.db.select_in(
            "latest_joins",
            "SELECT room_id, MAX(stream_ordering) FROM room_memberships WHERE user_id = ? AND membership = 'join'"
            " AND room_id IN ({in}) GROUP BY room_id", room_ids, before=(user_id,))
        out = {r: 0 for r in room_ids}
        out.update({r: int(so or 0) for r, so in rows})
        return out

    async def _latest_join(self, user_id: str, room_id: str) -> int:
        rows = await self.events.db.execute(
            "latest_join",
            "SELECT MAX(stream_ordering) FROM room_memberships WHERE user_id = ? AND room_id = ? AND membership = 'join'",
            user_id,
            room_id,
        )
        return int(rows[0][0] or 0) if rows else 0


def _hv_and_membership(state: Mapping[tuple[str, str], str], user_id: str,
                       evs: Mapping[str, Event]) -> tuple[str, Optional[str]]:
    hv = "shared"
    hv_id = state.get(("m.room.history_visibility", ""))
    mid = state.get(("m.room.member", user_id))
    if hv_id and hv_id in evs:
        v = evs[hv_id].content.get("history_visibility")
        if v in ("world_readable", "shared", "invited", "joined"):
            hv = v
    membership = evs[mid].membership if mid and mid in evs else None
    return hv, membership
