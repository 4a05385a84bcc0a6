"""/sync assembly.

Spec: client-server-api "Syncing" and GET /sync: initial and incremental
sync, long-polling, ``full_state``, filters (timeline limit, types,
lazy-loading members), joined/invited/knocked/left rooms with state,
timeline (``limited``, ``prev_batch``), ephemeral events (typing,
receipts), account data and unread notification counts (by thread when
the timeline filter sets ``unread_thread_notifications``); and for
end-to-end encryption ``to_device``, ``device_lists``,
``device_one_time_keys_count`` and ``device_unused_fallback_key_types``.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Optional

from zhome.client.serialize import receipt_contents, serialize_events
from zhome.http.auth import Requester
from zhome.push.rules import load_ruleset
from zhome.rooms.events import Event, StateMap
from zhome.storage.lru import LruCache
from zhome.storage.relations import MAIN_THREAD
from zhome.sync.filtering import EventFilter, SyncFilter
from zhome.sync.notifier import StreamToken

if TYPE_CHECKING:
    from zhome.server import HomeServer

DEFAULT_TIMELINE_LIMIT = 10
MAX_TIMELINE_LIMIT = 500
# A filtered timeline short of its limit reads further back this many
# events at a time, at most this many times.
FILL_CHUNK = 50
MAX_FILL_ROUNDS = 4
STRIPPED_STATE_TYPES = (
    "m.room.create", "m.room.join_rules", "m.room.canonical_alias", "m.room.avatar", "m.room.name",
    "m.room.encryption", "m.room.topic",
)


class SyncHandler:
    def __init__(self, hs: "HomeServer") -> None:
        self.hs = hs
        self.events = hs.events
        self.notifier = hs.notifier
        # (user, device, room) -> user_id -> the member event last sent to
        # that device under lazy loading.
        self._ll_sent: LruCache[tuple[str, str, str], dict[str, str]] = LruCache(20000)

    async def sync(self, requester: Requester, since: Optional[StreamToken], timeout_ms: int, full_state: bool,
                   flt: SyncFilter, rooms_out: Optional[set[str]] = None) -> dict[str, Any]:
        """The /sync answer. ``rooms_out``: the rooms the user is in (any
        membership) are added to it, for the answer cache."""
        user_id = requester.user_id
        if since is None or full_state:
            return await self._build(requester, since, full_state, flt, rooms_out)
        deadline = time.monotonic() + timeout_ms / 1000.0
        # Wait for a change that concerns this user; a wake-up for nothing
        # visible goes back to waiting until the deadline (bounded rounds).
        for _ in range(1000):
            rooms = await self.events.get_rooms_for_user(user_id)
            interesting = {r for r, (m, _) in rooms.items() if m in ("join", "invite", "knock")}
            remaining = max(0, int((deadline - time.monotonic()) * 1000))
            await self.notifier.wait_for_change(user_id, interesting, since, remaining)
            result = await self._build(requester, since, False, flt, rooms_out)
            if has_content(result) or time.monotonic() >= deadline:
                return result
            since_now = StreamToken.decode(result["next_batch"])
            since = since_now
        return await self._build(requester, since, False, flt, rooms_out)

    async def _build(self, requester: Requester, since: Optional[StreamToken], full_state: bool,
                     flt: SyncFilter, rooms_out: Optional[set[str]] = None) -> dict[str, Any]:
        user_id = requester.user_id
        now = self.notifier.current_token()
        memberships = await self.events.get_rooms_for_user(user_id)
        if rooms_out is not None:
            rooms_out.update(memberships)
        forgotten = await self.events.get_forgotten_rooms(user_id) if memberships else set()
        join: dict[str, Any] = {}
        invite: dict[str, Any] = {}
        knock: dict[str, Any] = {}
        leave: dict[str, Any] = {}

        changed_rooms: set[str] = set()
        newly: dict[str, str] = {}
        # Rooms the user was not joined to at ``since`` but joined since
        # (and may have left again): their entry starts from nothing, with
        # the room's full state, as on an initial sync.
        fresh: set[str] = set()
        if since is not None:
            changed_rooms = await self.events.get_rooms_changed_since(list(memberships), since.events)
            joined_in_range: set[str] = set()
            for room_id, membership, so in await self.events.get_membership_changes_since(user_id, since.events):
                if so <= now.events:
                    newly[room_id] = membership
                    if membership == "join":
                        joined_in_range.add(room_id)
            if joined_in_range and not full_state:
                before = await self.events.get_memberships_at(user_id, sorted(joined_in_range), since.events)
                fresh = {r for r in joined_in_range if before.get(r) != "join"
                         and newly.get(r) in ("join", "leave", "ban")}

        joined_rooms = [r for r, (m, _) in memberships.items() if m == "join" and flt.room_included(r)]
        ignored = await self.hs.user_data.get_ignored_users(user_id)
        receipts_by_room: dict[str, list[tuple]] = {}
        if joined_rooms and (since is None or full_state or now.receipts > since.receipts):
            for row in await self.hs.user_data.get_receipts_for_rooms(
                    joined_rooms, since.receipts if since and not full_state else 0):
                receipts_by_room.setdefault(row[0], []).append(row)
        room_account_data: dict[str, list[dict[str, Any]]] = {}
        global_account_data: list[dict[str, Any]] = []
        ad_since = since.account_data if since is not None and not full_state else 0
        if since is None or full_state or now.account_data > since.account_data:
            for room_id, dtype, content in await self.hs.user_data.get_account_data_since(user_id, ad_since):
                if ad_since == 0 and content == {}:
                    # Deleted (MSC3391): an incremental sync says so with {},
                    # a full one simply leaves it out.
                    continue
                if room_id:
                    if flt.room_account_data.matches_type(dtype):
                        room_account_data.setdefault(room_id, []).append({"type": dtype, "content": content})
                elif flt.account_data.matches_type(dtype):
                    global_account_data.append({"type": dtype, "content": content})

        if since is None and flt.account_data.matches_type("m.push_rules") and not any(
                e["type"] == "m.push_rules" for e in global_account_data):
            # Clients expect their push rules in the first sync even before
            # they ever changed one.
            global_account_data.append(
                {"type": "m.push_rules", "content": await load_ruleset(self.hs.user_data, user_id)})

        # Rooms that get a full entry, fetched together: one query per kind
        # of data for all of them rather than several per room.
        full_rooms = [r for r in joined_rooms
                      if since is None or full_state or r in changed_rooms or r in fresh]
        tl_limit = _timeline_limit(flt)
        pre = _Prefetch()
        if full_rooms:
            initial_rooms = [r for r in full_rooms if since is None or full_state or r in fresh]
            later_rooms = [r for r in full_rooms if r not in set(initial_rooms)]
            if initial_rooms:
                pre.batches.update(await self.events.get_recent_events_for_rooms(
                    initial_rooms, -(2**62), now.events, tl_limit + 1))
            if later_rooms and since is not None:
                pre.batches.update(await self.events.get_recent_events_for_rooms(
                    later_rooms, since.events, now.events, tl_limit + 1))
            pre.current = await self.events.get_current_state_for_rooms(full_rooms)
            # Events persisted while this response is assembled lie past
            # ``now`` and belong to the next sync. A room that got one has a
            # current state ahead of its timeline: its state is read as it
            # was at ``now`` instead (asked after reading current state, so
            # no such room is missed).
            pre.ahead = await self.events.get_rooms_changed_since(full_rooms, now.events)
            pre.members = await self.events.get_events(
                [memberships[r][1] for r in full_rooms if memberships[r][1]])
            # Rooms whose batch reaches back before the user joined have
            # their events' visibility read together, for all of them.
            check: list[Event] = []
            for r, batch in pre.batches.items():
                me = pre.members.get(memberships[r][1] or "")
                oldest = min((e.internal.get("stream_ordering", 0) for e in batch), default=0)
                if batch and not (me is not None and me.membership == "join"
                                  and me.internal.get("stream_ordering", 1 << 62) <= oldest):
                    check.extend(batch)
            if check:
                pre.visibility = await self.hs.visibility.groups_visibility(user_id, check)
                pre.latest_joins = await self.hs.visibility.latest_joins(user_id, sorted({e.room_id for e in check}))
        pre.unread = await self.events.get_unread_counts_by_thread(user_id, joined_rooms) if joined_rooms else {}
        by_thread = flt.timeline.unread_thread_notifications
        # Rooms where the user's own read receipts moved: their counts were
        # recounted, so the room is reported even when the client's filter
        # leaves the receipts themselves out.
        recounted = {row[0] for rows in receipts_by_room.values() for row in rows
                     if row[2] == user_id and row[1] in ("m.read", "m.read.private")} if since is not None else set()

        for room_id in joined_rooms:
            newly_joined = room_id in fresh
            if since is not None and not full_state and room_id not in changed_rooms and not newly_joined:
                eph = self._ephemeral(user_id, room_id, receipts_by_room.get(room_id, []), since, now, flt)
                ad = room_account_data.get(room_id)
                if eph or ad or room_id in recounted:
                    entry: dict[str, Any] = {"timeline": {"events": [], "limited": False,
                                                          "prev_batch": now.encode()},
                                             "state": {"events": []}, "ephemeral": {"events": eph},
                                             "account_data": {"events": ad or []}}
                    _add_unread(entry, pre, room_id, by_thread)
                    entry["summary"] = {}
                    join[room_id] = entry
                continue
            entry = await self._room_entry(requester, room_id, since if not newly_joined else None, now, full_state,
                                           flt, upto=None, pre=pre, member_event_id=memberships[room_id][1],
                                           fresh=newly_joined, ignored=ignored)
            entry["ephemeral"] = {"events": self._ephemeral(user_id, room_id, receipts_by_room.get(room_id, []), since, now,
                                                            flt)}
            entry["account_data"] = {"events": room_account_data.get(room_id, [])}
            if (since is not None and not full_state and not newly_joined and not entry["timeline"]["events"]
                    and not entry["state"]["events"] and not entry["ephemeral"]["events"]
                    and not entry["account_data"]["events"] and room_id not in recounted):
                # Everything that changed was filtered out.
                continue
            _add_unread(entry, pre, room_id, by_thread)
            entry["summary"] = _summary(pre.current.get(room_id, {}), user_id)
            join[room_id] = entry

        for room_id, (membership, member_eid) in memberships.items():
            if not flt.room_included(room_id):
                continue
            if membership in ("invite", "knock"):
                if since is not None and not full_state and room_id not in newly:
                    continue
                member_ev = await self.events.get_event(member_eid)
                if member_ev is None:
                    continue
                if member_ev.sender in ignored:
                    # Spec "Ignoring Users": invites from ignored users never reach the client.
                    continue
                stripped = await self._stripped_state(room_id, member_ev)
                if membership == "invite":
                    invite[room_id] = {"invite_state": {"events": stripped}}
                else:
                    knock[room_id] = {"knock_state": {"events": stripped}}
            elif membership in ("leave", "ban"):
                if room_id in forgotten:
                    continue
                if since is None or full_state:
                    if not flt.include_leave:
                        continue
                elif room_id not in newly:
                    continue
                member_ev = await self.events.get_event(member_eid)
                if member_ev is None:
                    continue
                entry = await self._room_entry(requester, room_id, None if room_id in fresh else since, now,
                                               full_state, flt, upto=member_ev.internal.get("stream_ordering"),
                                               member_event_id=member_eid, fresh=room_id in fresh, ignored=ignored)
                if member_ev.internal.get("outlier"):
                    # A rejected invite or retracted knock in a room this
                    # server is not in: the leave is all the timeline there is.
                    events = entry.setdefault("timeline", {}).setdefault("events", [])
                    if not any(e.get("event_id") == member_ev.event_id for e in events):
                        events.extend(await serialize_events(self.events, [member_ev], with_room_id=False,
                                                             requester=requester))
                entry["account_data"] = {"events": room_account_data.get(room_id, [])}
                leave[room_id] = entry

        rooms: dict[str, Any] = {}
        if join:
            rooms["join"] = join
        if invite:
            rooms["invite"] = invite
        if knock:
            rooms["knock"] = knock
        if leave:
            rooms["leave"] = leave
        to_device, to_device_pos = await self.hs.to_device.for_sync(
            user_id, requester.device_id, since.to_device if since is not None else None, now.to_device)
        changed: list[str] = []
        left: list[str] = []
        if since is None:
            # No token: every user sharing a room whose devices ever changed
            # (and the user), so a client starting afresh re-queries them.
            if now.device_lists > 0:
                changed = await self.hs.device_lists.changed_since_start(user_id, now.device_lists, now.events)
        else:
            # Rooms whose whole timeline since the token was fetched: their
            # membership changes are read from it, not queried again.
            known = {r: [(e.state_key, e.membership or "") for e in pre.batches[r]
                         if e.type == "m.room.member" and e.state_key]
                     for r in changed_rooms if not full_state and r in pre.batches and r not in newly
                     and len(pre.batches[r]) <= tl_limit}
            changed, left = await self.hs.device_lists.changes_for(
                user_id, since.device_lists, now.device_lists, sorted(changed_rooms), newly, since.events, now.events,
                known)
        otk_counts, fallback_types = await self.hs.e2e_keys.sync_summary(user_id, requester.device_id)
        return {
            "next_batch": replace(now, to_device=to_device_pos).encode(),
            "rooms": rooms,
            "account_data": {"events": global_account_data},
            "presence": {"events": await self._presence(user_id, since, now, full_state, flt, pre, fresh)},
            "to_device": {"events": to_device},
            "device_lists": {"changed": changed, "left": left},
            "device_one_time_keys_count": otk_counts,
            "device_unused_fallback_key_types": fallback_types,
        }

    async def _presence(self, user_id: str, since: Optional[StreamToken], now: StreamToken, full_state: bool,
                        flt: SyncFilter, pre: "_Prefetch", fresh: set[str]) -> list[dict[str, Any]]:
        """``m.presence`` of the user and of those sharing a room with them:
        everyone not offline on an initial sync; what changed, plus the
        members of newly joined rooms and new members of rooms, later."""
        presence = self.hs.presence
        if not presence.enabled or not flt.presence.matches_type("m.presence") or now.presence == 0:
            return []
        initial = since is None or full_state
        if initial:
            users = {sk for cur in pre.current.values() for (t, sk), (_, m) in cur.items()
                     if t == "m.room.member" and m == "join"} | {user_id}
            states = [st for st in await presence.get_present(users, user_id)
                      if flt.presence.matches_sender(st.user_id)]
        else:
            assert since is not None
            by_user = {}
            if now.presence > since.presence:
                by_user = {st.user_id: st for st in await presence.changes_for_user(user_id, since.presence,
                                                                                     now.presence)}
            # Who now shares a room with the user without their presence
            # having changed: members of rooms the user joined, and members
            # who joined (seen in this sync's timelines; no extra query).
            extra: set[str] = set()
            for room_id in fresh:
                if room_id in pre.current:
                    extra.update(sk for (t, sk), (_, m) in pre.current.get(room_id, {}).items()
                                 if t == "m.room.member" and m == "join")
            for batch in pre.batches.values():
                for ev in batch:
                    if ev.type == "m.room.member" and ev.membership == "join" and ev.state_key:
                        extra.add(ev.state_key)
            extra -= set(by_user) | {user_id}
            if extra:
                # Offline (even never seen) counts: the client learns it.
                for st in (await presence.get_presence(extra)).values():
                    if st.stream_id <= now.presence:
                        by_user[st.user_id] = st
            states = [st for st in by_user.values() if flt.presence.matches_sender(st.user_id)]
        states.sort(key=lambda st: st.user_id)
        limit = flt.presence.limit
        return [presence.event(st) for st in (states[:limit] if limit else states)]

    async def _room_entry(self, requester: Requester, room_id: str, since: Optional[StreamToken], now: StreamToken,
                          full_state: bool, flt: SyncFilter, upto: Optional[int], pre: Optional["_Prefetch"] = None,
                          member_event_id: Optional[str] = None, fresh: bool = False,
                          ignored: frozenset[str] = frozenset()) -> dict[str, Any]:
        """One room's timeline and state.

        ``state`` brings the client from the state it had at ``since``
        (nothing, when ``since`` is None) to the state at the start of the
        timeline; state changes the timeline filter left out come as their
        latest value, so that state plus timeline is the room's state at the
        end. With lazy-loaded members only the members who sent a timeline
        event (and the user) are included, plus, incrementally, every
        membership change of the gap.
        """
        user_id = requester.user_id
        # Events of ignored users stay out of the timeline, their state events excepted.
        tl_filter: EventFilter = flt.timeline.ignoring(ignored) if ignored else flt.timeline
        limit = _timeline_limit(flt)
        upper = now.events if upto is None else min(upto, now.events)
        lower = since.events if since is not None else -(2**62)
        full = since is None or full_state
        if pre is not None and room_id in pre.batches:
            raw = list(pre.batches[room_id])
        else:
            raw = await self.events.get_room_events_between(room_id, lower, upper, limit + 1, backwards=True)
        if upto is not None:
            # A room left: its state as the user left it.
            end_state = (await self.events.get_state_after_event(member_event_id) if member_event_id
                         else await self._state_at_pos(room_id, upper))
        elif pre is not None and room_id in pre.ahead:
            end_state = await self._state_at_pos(room_id, upper)
        elif pre is not None and room_id in pre.current:
            end_state = {k: v[0] for k, v in pre.current[room_id].items()}
        else:
            end_state = await self.events.get_current_state_ids(room_id)
        # Current state is always visible in the timeline (a member who
        # joined while the user was away must still show as joined).
        always = frozenset(end_state.values()) if upto is None else frozenset()
        timeline, limited, complete = await self._timeline(user_id, room_id, raw, lower, limit, tl_filter,
                                                           member_event_id, always, pre)
        if fresh and not complete:
            # A room joined since the last sync has history before this
            # timeline that the client has never had.
            limited = True
        tl_ids = {e.event_id for e in timeline}
        start_state: Optional[StateMap] = None
        if not full and complete:
            # The timeline holds every event since ``since``: no state to add.
            state_ids: StateMap = {}
        else:
            start_state = await self._start_state(timeline, end_state, tl_ids, flt, tl_filter)
            assert since is not None or full
            base = {} if full or since is None else await self._state_at_pos(room_id, since.events)
            state_ids = {}
            for k in set(end_state) | set(start_state):
                e_end = end_state.get(k)
                val = start_state.get(k) if e_end in tl_ids else e_end
                if val is not None and val != base.get(k) and val not in tl_ids:
                    state_ids[k] = val
        lazy = tl_filter.lazy_load_members or flt.state.lazy_load_members
        if lazy:
            state_ids = self._lazy_members(requester, room_id, full, state_ids,
                                           start_state if start_state is not None else end_state, timeline,
                                           tl_ids, flt)
        state_evs = await self.events.get_events(state_ids.values())
        state_list = sorted((e for e in state_evs.values() if flt.state.matches_type(e.type)
                             and flt.state.matches_sender(e.sender)),
                            key=lambda e: e.internal.get("stream_ordering", 0))
        first_pos = timeline[0].internal["stream_ordering"] if timeline else upper + 1
        return {
            "timeline": {
                "events": await self._serialize(timeline, requester, flt),
                "limited": limited,
                "prev_batch": now.with_events(first_pos - 1).encode(),
            },
            "state": {"events": await self._serialize(state_list, requester, flt)},
        }

    async def _start_state(self, timeline: list[Event], end_state: StateMap, tl_ids: set[str], flt: SyncFilter,
                           tl_filter: EventFilter) -> StateMap:
        """The state before the timeline, for the keys the response needs:
        those whose value at the end is an event of the timeline (the state
        section gives their earlier value) and, with lazy-loaded members,
        the members of the timeline's senders. Read for those keys only, not
        as the room's whole state map."""
        if not timeline:
            return end_state
        keys = {k for k, v in end_state.items() if v in tl_ids}
        if tl_filter.lazy_load_members or flt.state.lazy_load_members:
            keys |= {("m.room.member", e.sender) for e in timeline}
        group = await self.events.state_group_before(timeline[0])
        if group is None:
            return {}
        return (await self.events.get_state_keys_for_groups([group], sorted(keys))).get(group, {})

    def _lazy_members(self, requester: Requester, room_id: str, full: bool, state_ids: StateMap,
                      start_state: StateMap, timeline: list[Event], tl_ids: set[str], flt: SyncFilter) -> StateMap:
        user_id = requester.user_id
        senders = {e.sender for e in timeline}
        key = (user_id, requester.device_id, room_id)
        if full:
            wanted = senders | {user_id}
            out = {k: v for k, v in state_ids.items() if k[0] != "m.room.member" or k[1] in wanted}
            sent: dict[str, str] = {}
        else:
            # Membership changes of the gap stay; senders' members are added
            # unless this device already has them (a cache: forgetting it
            # only means sending a member twice).
            out = dict(state_ids)
            sent = dict(self._ll_sent.get(key) or {})
            redundant = flt.state.include_redundant_members or flt.timeline.include_redundant_members
            for u in sorted(senders):
                k = ("m.room.member", u)
                eid = start_state.get(k)
                if k in out or eid is None or eid in tl_ids:
                    continue
                if not redundant and sent.get(u) == eid:
                    continue
                out[k] = eid
        for (t, sk), eid in out.items():
            if t == "m.room.member":
                sent[sk] = eid
        for e in timeline:
            if e.type == "m.room.member" and e.state_key is not None:
                sent[e.state_key] = e.event_id
        self._ll_sent.set(key, sent)
        return out

    async def _timeline(self, user_id: str, room_id: str, raw: list[Event], lower: int, limit: int,
                        tl_filter: EventFilter, member_event_id: Optional[str],
                        always: frozenset[str], pre: Optional["_Prefetch"] = None) -> tuple[list[Event], bool, bool]:
        """The newest ``limit`` events of ``raw`` (newest first, ``limit`` + 1
        of them fetched) that pass the filter and visibility, reading further
        back when those leave too few.

        Returns (events oldest first, limited, complete): complete when the
        events are every event after ``lower``.
        """
        if tl_filter.matches_nothing():
            return [], False, not raw
        fetch = limit + 1
        complete = len(raw) <= limit
        exhausted = len(raw) < fetch
        picked: list[Event] = []
        chunk = raw
        for _ in range(MAX_FILL_ROUNDS):
            wanted = [e for e in reversed(chunk) if tl_filter.matches(e)]
            visible = await self._visible(user_id, room_id, wanted, member_event_id, always, pre)
            if len(visible) != len(chunk):
                complete = False
            picked.extend(reversed(visible))
            if len(picked) > limit or exhausted or not chunk:
                break
            oldest = chunk[-1].internal["stream_ordering"]
            chunk = await self.events.get_room_events_between(room_id, lower, oldest - 1, FILL_CHUNK, backwards=True)
            exhausted = len(chunk) < FILL_CHUNK
        limited = len(picked) > limit or not exhausted
        return list(reversed(picked[:limit])), limited, complete

    async def _serialize(self, events: list[Event], requester: Requester, flt: SyncFilter) -> list[dict[str, Any]]:
        if flt.event_format != "federation":
            return await serialize_events(self.events, events, with_room_id=False, requester=requester)
        # The federation format: the PDU as servers exchange it, with the
        # client view's fields (a redacted event keeps only its pruned
        # content) and its event ID.
        views = await serialize_events(self.events, events, with_room_id=True, requester=requester)
        return [{**ev.pdu, **view} for ev, view in zip(events, views)]

    async def _state_at_pos(self, room_id: str, pos: int) -> StateMap:
        rows = await self.events.db.execute(
            "state_at_pos", "SELECT event_id FROM events WHERE room_id = ? AND stream_ordering <= ?"
            " AND rejected_reason IS NULL ORDER BY stream_ordering DESC LIMIT 1", room_id, pos)
        if not rows:
            return {}
        return await self.events.get_state_after_event(rows[0][0])

    async def _visible(self, user_id: str, room_id: str, events: list[Event],
                       member_event_id: Optional[str] = None, always: frozenset[str] = frozenset(),
                       pre: Optional["_Prefetch"] = None) -> list[Event]:
        if not events:
            return events
        eid = member_event_id or await self.events.get_current_state_event_id(room_id, "m.room.member", user_id)
        me = (pre.members.get(eid) if pre is not None and eid else None) or (
            await self.events.get_event(eid) if eid else None)
        first = events[0].internal.get("stream_ordering", 0)
        if me is not None and me.membership == "join" and me.internal.get("stream_ordering", 1 << 62) <= first:
            # Joined throughout the timeline: every event is visible.
            return events
        allowed = await self.hs.visibility.filter_events(user_id, events,
                                                         known=pre.visibility if pre is not None else None,
                                                         latest_joins=({room_id: pre.latest_joins[room_id]}
                                                                       if pre is not None and room_id in pre.latest_joins
                                                                       else None))
        if always and len(allowed) != len(events):
            ok = {e.event_id for e in allowed} | always
            return [e for e in events if e.event_id in ok]
        return allowed

    def _ephemeral(self, user_id: str, room_id: str, receipts: list[tuple], since: Optional[StreamToken],
                   now: StreamToken, flt: SyncFilter) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if flt.ephemeral.matches_type("m.typing") and (since is None or now.typing > since.typing):
            typing = self.hs.typing.get_typing(room_id)
            if typing or since is not None:
                out.append({"type": "m.typing", "content": {"user_ids": typing}})
        if receipts and flt.ephemeral.matches_type("m.receipt"):
            content = receipt_contents(receipts, user_id).get(room_id)
            if content:
                out.append({"type": "m.receipt", "content": content})
        return out

    async def _stripped_state(self, room_id: str, member_ev: Event) -> list[dict[str, Any]]:
        unsigned = member_ev.pdu.get("unsigned")
        given = None
        if isinstance(unsigned, dict):
            given = unsigned.get("invite_room_state") or unsigned.get("knock_room_state")
        if isinstance(given, list) and not await self.hs.membership.host_in_room(room_id):
            # An invite or knock over federation: the other server told us
            # what the room looks like.
            out = [s for s in given if isinstance(s, dict)]
            out.append({"type": member_ev.type, "state_key": member_ev.state_key, "content": member_ev.content,
                        "sender": member_ev.sender, "event_id": member_ev.event_id,
                        "origin_server_ts": member_ev.origin_server_ts})
            return out
        state = await self.events.get_current_state_ids(room_id)
        ids = [state[(t, "")] for t in STRIPPED_STATE_TYPES if (t, "") in state]
        evs = await self.events.get_events(ids)
        out = [{"type": e.type, "state_key": e.state_key, "content": e.content, "sender": e.sender}
               for e in evs.values()]
        inviter_key = ("m.room.member", member_ev.sender)
        if inviter_key in state and member_ev.sender != member_ev.state_key:
            inv = await self.events.get_event(state[inviter_key])
            if inv is not None:
                out.append({"type": inv.type, "state_key": inv.state_key, "content": inv.content,
                            "sender": inv.sender})
        out.append({"type": member_ev.type, "state_key": member_ev.state_key, "content": member_ev.content,
                    "sender": member_ev.sender, "event_id": member_ev.event_id,
                    "origin_server_ts": member_ev.origin_server_ts})
        return out


def _timeline_limit(flt: SyncFilter) -> int:
    lim = flt.timeline.limit
    return DEFAULT_TIMELINE_LIMIT if lim is None else min(lim, MAX_TIMELINE_LIMIT)


class _Prefetch:
    """Data for many rooms fetched in a few queries."""

    def __init__(self) -> None:
        self.batches: dict[str, list[Event]] = {}
        self.current: dict[str, dict[tuple[str, str], tuple[str, Optional[str]]]] = {}
        # Room -> thread ID -> the user's (notifications, highlights).
        self.unread: dict[str, dict[str, tuple[int, int]]] = {}
        # Rooms with events past the response's token.
        self.ahead: set[str] = set()
        # The user's own membership events, by event ID.
        self.members: dict[str, Event] = {}
        # State group -> (history visibility, the user's membership), for
        # the batches' events where visibility must be checked.
        self.visibility: dict[int, tuple[str, Optional[str]]] = {}
        # Room -> the stream position of the user's latest join there.
        self.latest_joins: dict[str, int] = {}


def _add_unread(entry: dict[str, Any], pre: _Prefetch, room_id: str, by_thread: bool) -> None:
    """The room's unread counts: summed over its threads; or, when the
    filter asks for ``unread_thread_notifications``, the main timeline's
    in ``unread_notifications`` and each thread with any by its root."""
    counts = pre.unread.get(room_id, {})
    if not by_thread:
        entry["unread_notifications"] = {"notification_count": sum(n for n, _ in counts.values()),
                                         "highlight_count": sum(h for _, h in counts.values())}
        return
    n, h = counts.get(MAIN_THREAD, (0, 0))
    entry["unread_notifications"] = {"notification_count": n, "highlight_count": h}
    entry["unread_thread_notifications"] = {
        root: {"notification_count": n, "highlight_count": h}
        for root, (n, h) in sorted(counts.items()) if root != MAIN_THREAD and (n or h)}


def _summary(current: dict[tuple[str, str], tuple[str, Optional[str]]], user_id: str) -> dict[str, Any]:
    joined = [sk for (t, sk), (_, m) in current.items() if t == "m.room.member" and m == "join"]
    invited = [sk for (t, sk), (_, m) in current.items() if t == "m.room.member" and m == "invite"]
    out: dict[str, Any] = {"m.joined_member_count": len(joined), "m.invited_member_count": len(invited)}
    if ("m.room.name", "") not in current and ("m.room.canonical_alias", "") not in current:
        # The first five by user ID, joined before invited: no need to sort
        # an all-staff room's thousands of members for them.
        heroes = heapq.nsmallest(5, (u for u in joined if u != user_id))
        if len(heroes) < 5:
            heroes += heapq.nsmallest(5 - len(heroes), (u for u in invited if u != user_id))
        out["m.heroes"] = heroes
    return out


def has_content(result: dict[str, Any]) -> bool:
    """Whether a /sync answer carries anything (else it is an empty long poll)."""
    return bool(result["rooms"] or result["account_data"]["events"] or result["presence"]["events"]
                or result["to_device"]["events"] or result["device_lists"]["changed"]
                or result["device_lists"]["left"])
