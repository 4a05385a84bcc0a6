"""The joined members of a room's state, with their display names.

Every new event in a room needs them (push rules run for each local
member; ``room_member_count`` counts them all). Reading every member event
again for every message costs a big room thousands of event loads, most of
them evicted from the event cache by the next message. So each room keeps
the answer for the last state it was asked about: while the state group is
the same (messages do not change state) the answer is reused as is, and a
new state (a join, a leave, a new display name) is answered by loading only
the member events that changed since.
"""

from __future__ import annotations

from typing import Any, Optional

from zhome.storage.lru import LruCache

StateMap = dict[tuple[str, str], str]


class Members:
    """Immutable once built. ``ids``: state key → member event ID;
    ``joined``: joined user → display name (None when unset or not a
    string)."""

    __slots__ = ("group", "epoch", "ids", "joined")

    def __init__(self, group: Optional[int], epoch: int, ids: dict[str, str],
                 joined: dict[str, Optional[str]]) -> None:
        self.group = group
        self.epoch = epoch
        self.ids = ids
        self.joined = joined


class JoinedMembers:
    def __init__(self, events: Any, max_rooms: int = 256, max_members: int = 400_000) -> None:
        self.events = events
        # Weighed by members: a few all-staff rooms must not be evicted by
        # hundreds of small ones, nor hold more than a bounded total.
        self._rooms: LruCache[str, Members] = LruCache(max_rooms, max_weight=max_members,
                                                       weigh=lambda m: len(m.ids) + 1)

    async def of(self, room_id: str, state: StateMap, group: Optional[int] = None) -> Members:
        """The members of ``state``, the state of ``room_id`` at state group
        ``group`` (None when it has none yet: then nothing is reused
        without checking)."""
        epoch = self.events.content_epoch
        last = self._rooms.get(room_id)
        if last is not None and last.epoch != epoch:
            # Stored content was removed or replaced since (a redaction, an
            # erasure): a display name may be gone, so nothing is reused.
            last = None
        if last is not None and group is not None and last.group == group:
            return last
        old_ids = last.ids if last is not None else {}
        old_joined = last.joined if last is not None else {}
        ids: dict[str, str] = {}
        changed: list[tuple[str, str]] = []
        for (etype, state_key), event_id in state.items():
            if etype != "m.room.member":
                continue
            ids[state_key] = event_id
            if old_ids.get(state_key) != event_id:
                changed.append((state_key, event_id))
        evs = await self.events.get_events([eid for _, eid in changed]) if changed else {}
        fresh: dict[str, Optional[str]] = {}
        gone: set[str] = set()
        for state_key, event_id in changed:
            ev = evs.get(event_id)
            if ev is not None and ev.membership == "join":
                name = ev.content.get("displayname")
                fresh[state_key] = name if isinstance(name, str) else None
            else:
                gone.add(state_key)
                if ev is None:
                    # Not loadable now: not a member, and asked for again
                    # next time rather than remembered.
                    del ids[state_key]
        if not changed and len(ids) == len(old_ids):
            joined = old_joined
        else:
            joined = {u: n for u, n in old_joined.items() if u in ids and u not in gone}
            joined.update(fresh)
        members = Members(group, epoch, ids, joined)
        self._rooms.set(room_id, members)
        return members
