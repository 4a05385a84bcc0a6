"""Legacy Client-Server endpoints: deprecated since r0, still called by older
clients and by sytest.

Spec: client-server-api r0.6 "Syncing" (GET /events, GET /initialSync,
GET /events/{eventId}), "Room initial sync" (GET /rooms/{roomId}/initialSync),
"Peeking events" (GET /events with ``room_id``, for rooms the user is not in
whose history is world_readable), and the POST forms of
/rooms/{roomId}/send/{eventType} and /rooms/{roomId}/redact/{eventId} that
take no transaction ID.

The event stream's tokens are the ``StreamToken`` of /sync, so a client may
move between /initialSync, /events, /sync and /messages with one token.
"""

from __future__ import annotations

import time
from dataclasses import astuple, dataclass, replace
from typing import TYPE_CHECKING, Any, Iterable, Optional

from twisted.web.server import Request

from zhome.client.account import CS
from zhome.client.serialize import receipt_contents, serialize_events
from zhome.http.auth import Auth, Requester
from zhome.http.errors import forbidden, guest_access_forbidden, invalid_param, not_found
from zhome.http.server import JsonResource, query_arg, query_int
from zhome.rooms.events import Event
from zhome.rooms.visibility import Visibility
from zhome.storage.events import EventsStore
from zhome.storage.rooms import RoomsStore
from zhome.storage.user_data import UserDataStore
from zhome.sync.notifier import Notifier, StreamToken
from zhome.sync.typing import TypingService

if TYPE_CHECKING:
    from zhome.client.rooms import RoomServlets
    from zhome.sync.presence import PresenceService

ROOM = r"(?P<room_id>(?:!|%21)[^/]+)"
DEFAULT_EVENTS_TIMEOUT_MS = 30_000
MAX_EVENTS_TIMEOUT_MS = 5 * 60 * 1000
DEFAULT_STREAM_LIMIT = 100
MAX_STREAM_LIMIT = 1000
DEFAULT_INITIAL_SYNC_LIMIT = 10
MAX_INITIAL_SYNC_LIMIT = 1000
# Wake-ups for nothing visible go back to waiting, at most this many times.
MAX_WAIT_ROUNDS = 1000
# Rounds of fetching history for a room's messages when visibility hides
# events; each round reads at most PAGE_BATCH events.
MAX_PAGE_ROUNDS = 20
PAGE_BATCH = 100
EARLIEST = -(2**62)


@dataclass
class _Scope:
    """What one /events request streams: room -> the highest stream position to read from it (None: all)."""

    rooms: dict[str, Optional[int]]
    # Rooms the user is joined to -> stream position of their join, for the visibility shortcut.
    joined_at: dict[str, int]
    peek: bool


class LegacyServlets:
    def __init__(self, auth: Auth, events: EventsStore, user_data: UserDataStore, rooms: RoomsStore,
                 notifier: Notifier, typing: TypingService, visibility: Visibility,
                 room_servlets: "RoomServlets", presence: Optional["PresenceService"] = None) -> None:
        self.auth = auth
        self.events = events
        self.user_data = user_data
        self.rooms = rooms
        self.notifier = notifier
        self.typing = typing
        self.visibility = visibility
        self.room_servlets = room_servlets
        self.presence = presence

    def register_routes(self, r: JsonResource) -> None:
        # Guests (spec "Guest Access"): GET /events for room previews (a
        # room_id is required of them, see on_events), the initialSyncs, and
        # sending like the PUT form.
        r.register("GET", CS + r"/events", self.on_events, "events", guests=True)
        r.register("GET", CS + r"/events/(?P<event_id>[^/]+)", self.on_get_event, "legacy_event")
        r.register("GET", CS + r"/initialSync", self.on_initial_sync, "initialSync", guests=True)
        r.register("GET", CS + "/rooms/" + ROOM + r"/initialSync", self.on_room_initial_sync, "room_initialSync",
                   guests=True)
        # The same checks and persistence path as the PUT forms, without a transaction ID to deduplicate by.
        r.register("POST", CS + "/rooms/" + ROOM + r"/send/(?P<etype>[^/]+)", self.room_servlets.on_send,
                   "send_post", guests=True)
        r.register("POST", CS + "/rooms/" + ROOM + r"/redact/(?P<event_id>[^/]+)", self.room_servlets.on_redact,
                   "redact_post")

    # -- GET /events ------------------------------------------------------------------
    async def on_events(self, request: Request) -> tuple[int, Any]:
        req = await self.auth.get_user_by_req(request)
        timeout = query_int(request, "timeout", DEFAULT_EVENTS_TIMEOUT_MS) or 0
        timeout = max(0, min(timeout, MAX_EVENTS_TIMEOUT_MS))
        limit = query_int(request, "limit", DEFAULT_STREAM_LIMIT)
        if limit is None or limit < 0:
            raise invalid_param("'limit' must be a non-negative integer")
        limit = min(limit or DEFAULT_STREAM_LIMIT, MAX_STREAM_LIMIT)
        now = self.notifier.current_token()
        raw = query_arg(request, "from")
        since = _clamp(StreamToken.decode(raw), now) if raw else now
        peek_room = query_arg(request, "room_id")
        if req.is_guest and peek_room is None:
            # The Guest Access module opens /events to guests "as used for
            # room previews" only: one room at a time.
            raise guest_access_forbidden("Guests must give a room_id to GET /events")
        if peek_room is not None:
            await self._check_peek(req.user_id, peek_room)
        start = since
        deadline = time.monotonic() + timeout / 1000.0
        chunk: list[dict[str, Any]] = []
        for _ in range(MAX_WAIT_ROUNDS):
            scope = await self._scope(req.user_id, peek_room, since)
            remaining = max(0, int((deadline - time.monotonic()) * 1000))
            # Rooms the user has left need no waking: nothing more of them reaches this user.
            live = {r for r, bound in scope.rooms.items() if bound is None}
            if await self.notifier.wait_for_change(req.user_id, live, since, remaining):
                # What woke us may be a join, invite or leave: it changes what to read.
                scope = await self._scope(req.user_id, peek_room, since)
            chunk, since = await self._stream(req, scope, since, limit)
            if chunk or time.monotonic() >= deadline:
                break
        return 200, {"chunk": chunk, "start": start.encode(), "end": since.encode()}

    async def _check_peek(self, user_id: str, room_id: str) -> None:
        if await self.rooms.get_room_version(room_id) is None:
            raise forbidden("You are not in this room")
        eid = await self.events.get_current_state_event_id(room_id, "m.room.member", user_id)
        me = await self.events.get_event(eid) if eid else None
        if me is not None and me.membership == "join":
            return
        if not await self.visibility.is_world_readable(room_id):
            raise forbidden("You are not in this room and its history is not world_readable")

    async def _scope(self, user_id: str, peek_room: Optional[str], since: StreamToken) -> _Scope:
        memberships = await self.events.get_rooms_for_user(user_id)
        joined = {r: eid for r, (m, eid) in memberships.items() if m == "join"}
        if peek_room is not None:
            rooms: dict[str, Optional[int]] = {peek_room: None}
            joined = {r: e for r, e in joined.items() if r == peek_room}
        else:
            rooms = {r: None for r in joined}
            # Rooms the user was invited to, left or was removed from since the token: the membership
            # event reaches them, what came after it does not.
            for room_id, _membership, so in await self.events.get_membership_changes_since(user_id, since.events):
                if room_id not in joined:
                    bound = rooms.get(room_id)
                    rooms[room_id] = so if bound is None else max(bound, so)
        member_evs = await self.events.get_events(joined.values())
        joined_at = {r: member_evs[e].internal.get("stream_ordering", 0) for r, e in joined.items() if e in member_evs}
        return _Scope(rooms, joined_at, peek_room is not None)

    async def _stream(self, req: Requester, scope: _Scope, since: StreamToken,
                      limit: int) -> tuple[list[dict[str, Any]], StreamToken]:
        """What happened in ``scope`` after ``since``, and the token to continue from."""
        user_id = req.user_id
        now = self.notifier.current_token()
        room_ids = list(scope.rooms)
        batch = await self.events.get_stream_events_for_rooms(room_ids, since.events, now.events, limit)
        end_pos = batch[-1].internal["stream_ordering"] if len(batch) >= limit else max(now.events, since.events)
        in_bounds = [e for e in batch if _within(e, scope.rooms.get(e.room_id))]
        visible = await self._visible(user_id, in_bounds, scope.joined_at)
        chunk = _v1_format(await serialize_events(self.events, visible, requester=req))

        live_rooms = [r for r, bound in scope.rooms.items() if bound is None]
        if now.typing > since.typing:
            for room_id in live_rooms:
                if self.typing.changed_after(room_id, since.typing):
                    chunk.append({"type": "m.typing", "room_id": room_id,
                                  "content": {"user_ids": self.typing.get_typing(room_id)}})
        if now.receipts > since.receipts and live_rooms:
            rows = await self.user_data.get_receipts_for_rooms(live_rooms, since.receipts)
            chunk.extend(_receipt_events(rows, user_id))
        if not scope.peek and now.account_data > since.account_data:
            for room_id, dtype, content in await self.user_data.get_account_data_since(user_id, since.account_data):
                ev: dict[str, Any] = {"type": dtype, "content": content}
                if room_id:
                    ev["room_id"] = room_id
                chunk.append(ev)
        if self.presence is not None and not scope.peek and now.presence > since.presence:
            changes = await self.presence.changes_for_user(user_id, since.presence, now.presence)
            chunk.extend(_v1_presence(self.presence.event(state)) for state in changes)
        # Every stream but the events one is read to its end here.
        end = replace(_latest(now, since), events=end_pos)
        return chunk, end

    async def _visible(self, user_id: str, events: list[Event], joined_at: dict[str, int]) -> list[Event]:
        """The events the user may see, in their order. Events in a room the user joined before them are
        visible without a look at their state."""
        if not events:
            return []
        by_room: dict[str, list[Event]] = {}
        for e in events:
            by_room.setdefault(e.room_id, []).append(e)
        keep: set[str] = set()
        for room_id, evs in by_room.items():
            joined = joined_at.get(room_id)
            if joined is not None and joined <= evs[0].internal["stream_ordering"]:
                keep.update(e.event_id for e in evs)
            else:
                keep.update(e.event_id for e in await self.visibility.filter_events(user_id, evs))
        return [e for e in events if e.event_id in keep]

    # -- GET /events/{eventId} -----------------------------------------------------------
    async def on_get_event(self, request: Request, event_id: str) -> tuple[int, Any]:
        req = await self.auth.get_user_by_req(request)
        ev = await self.events.get_event(event_id)
        if ev is None or ev.rejected_reason or ev.internal.get("outlier"):
            raise not_found("Event not found")
        if not await self.visibility.filter_events(req.user_id, [ev]):
            # Spec: 404 also when the user may not see the event, so its existence is not revealed.
            raise not_found("Event not found")
        return 200, _v1_format(await serialize_events(self.events, [ev], requester=req))[0]

    # -- GET /initialSync ------------------------------------------------------------------
    async def on_initial_sync(self, request: Request) -> tuple[int, Any]:
        req = await self.auth.get_user_by_req(request)
        user_id = req.user_id
        limit = _initial_sync_limit(request)
        archived = query_arg(request, "archived", "false")
        if archived not in ("true", "false"):
            raise invalid_param("'archived' must be 'true' or 'false'")
        now = self.notifier.current_token()
        memberships = await self.events.get_rooms_for_user(user_id)
        forgotten = await self.events.get_forgotten_rooms(user_id) if archived == "true" else set()
        wanted = {r: (m, eid) for r, (m, eid) in memberships.items()
                  if m in ("join", "invite") or (archived == "true" and m in ("leave", "ban") and r not in forgotten)}
        member_evs = await self.events.get_events(eid for _, eid in wanted.values())
        joined = [r for r, (m, _) in wanted.items() if m == "join"]
        public = set(await self.rooms.get_public_room_ids())

        global_ad: list[dict[str, Any]] = []
        room_ad: dict[str, list[dict[str, Any]]] = {}
        for room_id, dtype, content in await self.user_data.get_account_data_since(user_id, 0):
            if content == {}:  # deleted (MSC3391)
                continue
            if room_id:
                room_ad.setdefault(room_id, []).append({"type": dtype, "content": content})
            else:
                global_ad.append({"type": dtype, "content": content})

        # Joined rooms, fetched together: their recent events and current state.
        recent = await self.events.get_recent_events_for_rooms(joined, EARLIEST, now.events, limit) \
            if joined and limit > 0 else {}
        current = await self.events.get_current_state_for_rooms(joined) if joined else {}
        state_evs = await self.events.get_events(eid for st in current.values() for eid, _ in st.values())

        out_rooms: list[dict[str, Any]] = []
        for room_id, (membership, member_eid) in sorted(wanted.items(), key=lambda kv: kv[0]):
            me = member_evs.get(member_eid)
            if me is None:
                continue
            entry: dict[str, Any] = {"room_id": room_id, "membership": membership,
                                     "visibility": "public" if room_id in public else "private"}
            if membership == "invite":
                entry["invite"] = _v1_format(await serialize_events(self.events, [me], requester=req))[0]
                out_rooms.append(entry)
                continue
            if membership == "join":
                batch = list(reversed(recent.get(room_id, [])))
                visible = await self._visible(user_id, batch, {room_id: me.internal.get("stream_ordering", 0)})
                state = [state_evs[eid] for eid, _ in current.get(room_id, {}).values() if eid in state_evs]
                upper = now.events
            else:
                upper = me.internal.get("stream_ordering", now.events)
                visible = await self._recent_visible(user_id, room_id, upper, limit)
                state_map = await self.events.get_state_after_event(me.event_id)
                state = list((await self.events.get_events(state_map.values())).values())
            entry["messages"] = await self._messages(req, visible, upper, now)
            entry["state"] = await self._state_list(state)
            entry["account_data"] = _ordered_account_data(room_ad.get(room_id, []))
            out_rooms.append(entry)

        receipts = _receipt_events(await self.user_data.get_receipts_for_rooms(joined, 0), user_id) if joined else []
        presence: list[dict[str, Any]] = []
        if self.presence is not None:
            users: set[str] = {user_id}
            for room_id in joined:
                users.update(sk for (t, sk), (_, m) in current.get(room_id, {}).items()
                             if t == "m.room.member" and m == "join")
            presence = await self._presence_of(users)
        return 200, {"end": now.encode(), "rooms": out_rooms, "presence": presence, "account_data": global_ad,
                     "receipts": receipts}

    # -- GET /rooms/{roomId}/initialSync --------------------------------------------------------
    async def on_room_initial_sync(self, request: Request, room_id: str) -> tuple[int, Any]:
        req = await self.auth.get_user_by_req(request)
        user_id = req.user_id
        limit = _initial_sync_limit(request)
        if await self.rooms.get_room_version(room_id) is None:
            raise forbidden("You are not in this room")
        now = self.notifier.current_token()
        eid = await self.events.get_current_state_event_id(room_id, "m.room.member", user_id)
        me = await self.events.get_event(eid) if eid else None
        membership = me.membership if me is not None else None
        departed = membership in ("leave", "ban") and me is not None
        if membership != "join" and not departed and not await self.visibility.is_world_readable(room_id):
            raise forbidden("You are not in this room and its history is not world_readable")
        if departed and me is not None:
            # Spec: a former member sees the room as it was when they left.
            upper = me.internal.get("stream_ordering", now.events)
            state_map = await self.events.get_state_after_event(me.event_id)
        else:
            upper = now.events
            state_map = await self.events.get_current_state_ids(room_id)
        if membership == "join" and me is not None:
            batch = (await self.events.get_recent_events_for_rooms([room_id], EARLIEST, upper, limit)).get(
                room_id, []) if limit > 0 else []
            visible = await self._visible(user_id, list(reversed(batch)),
                                          {room_id: me.internal.get("stream_ordering", 0)})
        else:
            visible = await self._recent_visible(user_id, room_id, upper, limit)
        state = list((await self.events.get_events(state_map.values())).values())
        room_ad = [{"type": t, "content": c} for r, t, c in await self.user_data.get_account_data_since(user_id, 0)
                   if r == room_id and c != {}]
        receipts: list[dict[str, Any]] = []
        presence: list[dict[str, Any]] = []
        if not departed:
            receipts = _receipt_events(await self.user_data.get_receipts_for_rooms([room_id], 0), user_id)
            if self.presence is not None:
                members = [e.state_key for e in state if e.type == "m.room.member" and e.membership == "join"
                           and e.state_key]
                presence = await self._presence_of(members)
        return 200, {
            "room_id": room_id,
            # Someone reading a world_readable room without ever joining it has, in effect, left it.
            "membership": membership if membership is not None else "leave",
            "visibility": "public" if await self.rooms.is_public(room_id) else "private",
            "messages": await self._messages(req, visible, upper, now),
            "state": await self._state_list(state),
            "presence": presence,
            "receipts": receipts,
            "account_data": _ordered_account_data(room_ad),
        }

    # -- helpers ------------------------------------------------------------------------------------------
    async def _recent_visible(self, user_id: str, room_id: str, upper: int, limit: int) -> list[Event]:
        """The newest ``limit`` events at or below ``upper`` the user may see, oldest first."""
        out: list[Event] = []
        cursor = upper
        for _ in range(MAX_PAGE_ROUNDS):
            if len(out) >= limit:
                break
            batch = await self.events.get_room_events_between(room_id, EARLIEST, cursor, PAGE_BATCH, True)
            if not batch:
                break
            cursor = batch[-1].internal["stream_ordering"] - 1
            out.extend(await self.visibility.filter_events(user_id, batch))
            if len(batch) < PAGE_BATCH:
                break
        return list(reversed(out[:limit]))

    async def _messages(self, req: Requester, events: list[Event], upper: int, now: StreamToken) -> dict[str, Any]:
        """A pagination chunk: ``start`` leads to /messages before the events, ``end`` to what follows them
        (for a joined room, the present: a token for /events)."""
        first = events[0].internal["stream_ordering"] - 1 if events else upper
        return {"chunk": _v1_format(await serialize_events(self.events, events, requester=req)),
                "start": _token_at(now, first), "end": _token_at(now, upper)}

    async def _state_list(self, state: list[Event]) -> list[dict[str, Any]]:
        ordered = sorted(state, key=lambda e: e.internal.get("stream_ordering", 0))
        return _v1_format(await serialize_events(self.events, ordered))

    async def _presence_of(self, user_ids: Iterable[str]) -> list[dict[str, Any]]:
        """Every one of these users' presence, offline for those never seen."""
        assert self.presence is not None
        states = await self.presence.get_presence(sorted(set(user_ids)))
        return [_v1_presence(self.presence.event(s)) for s in states.values()]


# The event format of these endpoints' own era (r0 and before), which their
# callers still read: ``user_id`` beside ``sender``, and what later versions
# moved into ``unsigned`` also at the top level.
_V1_UNSIGNED_KEYS = ("age", "prev_content", "redacted_because", "replaces_state")


def _v1_format(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for d in events:
        if "sender" in d:
            d["user_id"] = d["sender"]
        unsigned = d.get("unsigned")
        if isinstance(unsigned, dict):
            for key in _V1_UNSIGNED_KEYS:
                if key in unsigned:
                    d[key] = unsigned[key]
    return events


def _v1_presence(ev: dict[str, Any]) -> dict[str, Any]:
    """``m.presence`` as these endpoints served it: the user also in the content."""
    return {**ev, "content": {**ev["content"], "user_id": ev["sender"]}}


def _within(ev: Event, bound: Optional[int]) -> bool:
    return bound is None or ev.internal["stream_ordering"] <= bound


def _initial_sync_limit(request: Request) -> int:
    limit = query_int(request, "limit", DEFAULT_INITIAL_SYNC_LIMIT)
    if limit is None or limit < 0:
        raise invalid_param("'limit' must be a non-negative integer")
    return min(limit, MAX_INITIAL_SYNC_LIMIT)


def _clamp(token: StreamToken, now: StreamToken) -> StreamToken:
    """A token from the future (a restart lost the typing position, a restored database) reads from now."""
    return StreamToken(*(min(a, b) for a, b in zip(astuple(token), astuple(now))))


def _latest(a: StreamToken, b: StreamToken) -> StreamToken:
    return StreamToken(*(max(x, y) for x, y in zip(astuple(a), astuple(b))))


def _token_at(now: StreamToken, events_pos: int) -> str:
    return replace(now, events=events_pos).encode()


def _ordered_account_data(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Tags first: clients of this API read a room's m.tag from the front of the list.
    return sorted(items, key=lambda d: (d["type"] != "m.tag", d["type"]))


def _receipt_events(rows: list[tuple], user_id: str) -> list[dict[str, Any]]:
    """One m.receipt event per room."""
    contents = receipt_contents(rows, user_id)
    return [{"type": "m.receipt", "room_id": r, "content": c} for r, c in sorted(contents.items())]