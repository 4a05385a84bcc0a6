"""POST /_matrix/client/v3/search: server-side search of room events.

Spec: client-server-api "Server Side Search" (search.yaml): category
``room_events`` (others are ignored), ``search_term``, ``keys``,
``filter`` (a RoomEventFilter), ``order_by`` (``rank`` or ``recent``),
``event_context``, ``include_state``, ``groupings`` (``room_id``,
``sender``) and pagination by ``next_batch``, at the top level or inside
a group.

What is searched: the rooms the user is joined to and those they left
(not rooms only invited to, not forgotten rooms); in a room they left,
only what came before they left. Every hit then passes the history
visibility check /messages uses (``zhome/rooms/visibility.py``), so a
user who joined a ``joined``-visibility room later does not find what was
said before. Events from ignored users are left out.

The index and what it can match (whole words, no prefixes, no stemming:
the words are blind HMAC tokens) are described in
``zhome/storage/event_search.py``. A message is found by the words of its
latest valid edit ("Event replacements"); the hit is the original event,
whose bundled ``m.replace`` aggregation carries that edit. The user must
be able to see the edit too, or the hit is left out (a former member does
not find a message by what an edit after they left made it say).

``count``: the hits a client may see are only known once they are checked,
and counting the unchecked ones would tell a user how often a word occurs
in history they may not read. So ``count`` is the number of results given
so far, this page included: a lower bound, exact on the last page (the one
without ``next_batch``).

``next_batch`` is opaque: base64 of the last hit returned (its rank and
stream position), how many results were given before, the order, and the
group it is scoped to, if any.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import TYPE_CHECKING, Any, Optional

from twisted.web.server import Request

from zhome.client.account import CS
from zhome.client.serialize import serialize_events
from zhome.http.errors import bad_json, invalid_param, missing_param
from zhome.http.server import JsonResource, query_arg, read_json_body
from zhome.rooms.events import Event
from zhome.storage.event_search import MAX_QUERY_WORDS, SEARCH_KEYS, UNBOUNDED, EventSearchStore, Hit, parse_query
from zhome.sync.filtering import EventFilter, parse_filter_param

if TYPE_CHECKING:
    from zhome.rooms.visibility import Visibility
    from zhome.storage.events import EventsStore
    from zhome.storage.user_data import UserDataStore
    from zhome.sync.notifier import Notifier

DEFAULT_LIMIT = 10
MAX_LIMIT = 500
DEFAULT_CONTEXT = 5
MAX_CONTEXT = 100
#: Batches of hits read per request at most: a search whose hits are
#: mostly invisible to the user ends with a next_batch, not a long wait.
MAX_ROUNDS = 10
GROUP_KEYS = ("room_id", "sender")


class SearchServlets:
    def __init__(self, auth: Any, events: "EventsStore", visibility: "Visibility", index: EventSearchStore,
                 user_data: "UserDataStore", notifier: "Notifier") -> None:
        self.auth = auth
        self.events = events
        self.visibility = visibility
        self.index = index
        self.user_data = user_data
        self.notifier = notifier

    def register_routes(self, r: JsonResource) -> None:
        r.register("POST", CS + r"/search", self.on_search, "search")

    async def on_search(self, request: Request) -> tuple[int, Any]:
        req = await self.auth.get_user_by_req(request)
        body = read_json_body(request)
        cats = body.get("search_categories")
        if cats is None:
            raise missing_param("Missing search_categories")
        if not isinstance(cats, dict):
            raise bad_json("search_categories must be an object")
        crit = cats.get("room_events")
        if crit is None:
            # Only room_events is a category; others are ignored.
            return 200, {"search_categories": {}}
        search = _parse_criteria(crit)
        raw_batch = query_arg(request, "next_batch")
        batch = _decode_batch(raw_batch, search.order_by) if raw_batch is not None else None
        result = await self._search_room_events(req, search, batch)
        return 200, {"search_categories": {"room_events": result}}

    # -- the rooms searched ----------------------------------------------------------------------
    async def _rooms(self, user_id: str) -> dict[str, int]:
        """Room ID -> the highest stream position searched there: all of a
        joined room, a left room up to the leave."""
        current = await self.events.get_rooms_for_user(user_id)
        forgotten = await self.events.get_forgotten_rooms(user_id)
        out: dict[str, int] = {}
        left: dict[str, str] = {}
        for room_id, (membership, event_id) in current.items():
            if room_id in forgotten:
                continue
            if membership == "join":
                out[room_id] = UNBOUNDED
            elif membership in ("leave", "ban"):
                left[room_id] = event_id
        if left:
            joins = await self.visibility.latest_joins(user_id, sorted(left))
            evs = await self.events.get_events(left.values())
            for room_id, event_id in left.items():
                ev = evs.get(event_id)
                if joins.get(room_id, 0) and ev is not None:
                    out[room_id] = int(ev.internal.get("stream_ordering", 0))
        return out

    async def _search_room_events(self, req: Any, s: "_Criteria", batch: Optional["_Batch"]) -> dict[str, Any]:
        user_id = req.user_id
        flt = s.filter
        ignored = await self.user_data.get_ignored_users(user_id)
        if ignored:
            flt = flt.ignoring(ignored)
        rooms = await self._rooms(user_id)
        rooms = {r: upto for r, upto in rooms.items() if flt.matches_room(r)}
        senders: Optional[list[str]] = list(flt.senders) if flt.senders is not None else None
        group = batch.group if batch is not None else None
        if group is not None:
            key, value = group
            if key == "room_id":
                rooms = {r: u for r, u in rooms.items() if r == value}
            else:
                senders = [value] if senders is None or value in senders else []
        out: dict[str, Any] = {"highlights": s.query.words}
        limit = s.limit
        hits: list[tuple[Hit, Event]] = []
        more = False
        cursor = (batch.rank, batch.stream_ordering) if batch is not None else None
        if s.query.phrases and rooms and not flt.matches_nothing() and limit > 0:
            hits, cursor, more = await self._collect(user_id, s, flt, rooms, senders, cursor)
        given = (batch.given if batch is not None else 0) + len(hits)
        out["count"] = given
        serialized = await serialize_events(self.events, [ev for _, ev in hits], requester=req)
        results: list[dict[str, Any]] = []
        for (hit, ev), client_ev in zip(hits, serialized):
            entry: dict[str, Any] = {"rank": hit.rank, "result": client_ev}
            if s.context is not None:
                entry["context"] = await self._context(req, ev, rooms.get(ev.room_id, UNBOUNDED), flt, s.context)
            results.append(entry)
        out["results"] = results
        token = None
        if more and cursor is not None:
            token = _Batch(s.order_by, cursor[0], cursor[1], given, group)
            out["next_batch"] = token.encode()
        if s.group_by:
            out["groups"] = _groups(s.group_by, hits, token)
        if s.include_state:
            out["state"] = await self._room_states(user_id, sorted({ev.room_id for _, ev in hits}))
        return out

    async def _collect(self, user_id: str, s: "_Criteria", flt: EventFilter, rooms: dict[str, int],
                       senders: Optional[list[str]], cursor: Optional[tuple[float, int]],
                       ) -> tuple[list[tuple[Hit, Event]], Optional[tuple[float, int]], bool]:
        """The next ``s.limit`` hits the user may see after ``cursor``; also
        the cursor after the last one looked at and whether there may be more."""
        limit = s.limit
        size = max(limit * 2, 50)
        bounds = sorted(rooms.items())
        out: list[tuple[Hit, Event]] = []
        stale: list[str] = []
        more = True
        for _ in range(MAX_ROUNDS):
            found = await self.index.search(s.query, bounds, s.keys, s.order_by, size, cursor, senders)
            if not found:
                more = False
                break
            evs = await self.events.get_events([h.event_id for h in found] + [h.edit_id for h in found if h.edit_id])
            candidates = []
            for h in found:
                ev = evs.get(h.event_id)
                if ev is None or ev.rejected_reason:
                    continue
                if ev.internal.get("redacted_by"):
                    # Indexed while its redaction was on its way: it goes now.
                    stale.append(h.event_id)
                    continue
                if flt.matches(ev):
                    candidates.append(ev)
                    edit = evs.get(h.edit_id) if h.edit_id else None
                    if edit is not None:
                        candidates.append(edit)
            visible = {e.event_id for e in await self.visibility.filter_events(user_id, candidates)}
            for i, h in enumerate(found):
                cursor = (h.rank, h.stream_ordering)
                # Found by the words of its latest edit: that edit must be visible too.
                if h.event_id in visible and (h.edit_id is None or h.edit_id in visible):
                    out.append((h, evs[h.event_id]))
                    if len(out) >= limit:
                        more = i < len(found) - 1 or len(found) == size
                        break
            if len(out) >= limit:
                break
            if len(found) < size:
                more = False
                break
        if stale:
            await self.index.forget(stale)
        return out, cursor, more

    # -- context, profiles, state ----------------------------------------------------------------
    async def _around(self, user_id: str, ev: Event, upto: int, n: int, backwards: bool,
                      flt: EventFilter) -> list[Event]:
        """Up to ``n`` events the user may see next to ``ev`` in its room."""
        out: list[Event] = []
        if n <= 0:
            return out
        so = int(ev.internal["stream_ordering"])
        cursor = so - 1 if backwards else so
        upper = min(upto, self.notifier.events_pos)
        for _ in range(MAX_ROUNDS):
            size = max(n * 2, 20)
            if backwards:
                batch = await self.events.get_room_events_between(ev.room_id, -UNBOUNDED, cursor, size, True)
            else:
                if cursor >= upper:
                    break
                batch = await self.events.get_room_events_between(ev.room_id, cursor, upper, size, False)
            if not batch:
                break
            cursor = int(batch[-1].internal["stream_ordering"]) + (-1 if backwards else 0)
            for e in await self.visibility.filter_events(user_id, [e for e in batch if flt.matches(e)]):
                out.append(e)
                if len(out) >= n:
                    return out
            if len(batch) < size:
                break
        return out

    async def _context(self, req: Any, ev: Event, upto: int, flt: EventFilter,
                       ctx: tuple[int, int, bool]) -> dict[str, Any]:
        before_n, after_n, include_profile = ctx
        before = await self._around(req.user_id, ev, upto, before_n, True, flt)
        after = await self._around(req.user_id, ev, upto, after_n, False, flt)
        so = int(ev.internal["stream_ordering"])
        base = self.notifier.current_token()
        start = int(before[-1].internal["stream_ordering"]) - 1 if before else so - 1
        end = int(after[-1].internal["stream_ordering"]) if after else so
        out: dict[str, Any] = {
            "start": base.with_events(start).encode(),
            "end": base.with_events(end).encode(),
            "events_before": await serialize_events(self.events, before, requester=req),
            "events_after": await serialize_events(self.events, after, requester=req),
        }
        if include_profile:
            out["profile_info"] = await self._profiles(ev, {e.sender for e in [*before, ev, *after]})
        return out

    async def _profiles(self, ev: Event, senders: set[str]) -> dict[str, dict[str, str]]:
        """Display names and avatars of ``senders`` as the room's state at
        ``ev`` had them (the historic profiles)."""
        group = ev.internal.get("state_group")
        if group is None:
            return {}
        keys = [("m.room.member", s) for s in sorted(senders)]
        states = await self.events.get_state_keys_for_groups([group], keys)
        ids = states.get(group, {})
        members = await self.events.get_events(ids.values())
        out: dict[str, dict[str, str]] = {}
        for (_, user), eid in ids.items():
            m = members.get(eid)
            if m is None:
                continue
            profile = {k: m.content[k] for k in ("displayname", "avatar_url") if isinstance(m.content.get(k), str)}
            out[user] = profile
        return out

    async def _room_states(self, user_id: str, room_ids: list[str]) -> dict[str, list[dict[str, Any]]]:
        """Current state of each room; of a room the user left, the state
        when they left."""
        out: dict[str, list[dict[str, Any]]] = {}
        current = await self.events.get_rooms_for_user(user_id)
        for room_id in room_ids:
            membership, event_id = current.get(room_id, (None, None))
            if membership == "join" or event_id is None:
                state = await self.events.get_current_state_ids(room_id)
            else:
                state = await self.events.get_state_after_event(event_id)
            evs = await self.events.get_events(state.values())
            out[room_id] = await serialize_events(self.events, list(evs.values()))
        return out


# -- request parsing ------------------------------------------------------------------------------
class _Criteria:
    def __init__(self) -> None:
        self.query = parse_query("")
        self.keys: list[str] = list(SEARCH_KEYS)
        self.filter = EventFilter(None)
        self.limit = DEFAULT_LIMIT
        self.order_by = "rank"
        self.context: Optional[tuple[int, int, bool]] = None
        self.include_state = False
        self.group_by: list[str] = []


def _int_in(obj: dict[str, Any], name: str, default: int, where: str) -> int:
    v = obj.get(name, default)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise bad_json(f"{where}.{name} must be a non-negative integer")
    return min(v, MAX_CONTEXT)


def _parse_criteria(crit: Any) -> _Criteria:
    if not isinstance(crit, dict):
        raise bad_json("search_categories.room_events must be an object")
    s = _Criteria()
    term = crit.get("search_term")
    if term is None:
        raise missing_param("Missing search_term")
    if not isinstance(term, str):
        raise bad_json("search_term must be a string")
    s.query = parse_query(term)
    if len(s.query.words) > MAX_QUERY_WORDS:
        raise invalid_param(f"search_term has more than {MAX_QUERY_WORDS} words")
    if "keys" in crit:
        keys = crit["keys"]
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise bad_json("keys must be a list of strings")
        unknown = [k for k in keys if k not in SEARCH_KEYS]
        if unknown:
            raise invalid_param(f"unknown search key {unknown[0][:100]!r}")
        s.keys = list(dict.fromkeys(keys))
    raw_filter = crit.get("filter")
    if raw_filter is not None:
        if not isinstance(raw_filter, dict):
            raise bad_json("filter must be an object")
        s.filter = EventFilter(parse_filter_param(json.dumps(raw_filter)))
        if s.filter.limit is not None:
            s.limit = min(s.filter.limit, MAX_LIMIT)
    order = crit.get("order_by", "rank")
    if order not in ("rank", "recent"):
        raise invalid_param("order_by must be 'rank' or 'recent'")
    s.order_by = order
    ctx = crit.get("event_context")
    if ctx is not None:
        if not isinstance(ctx, dict):
            raise bad_json("event_context must be an object")
        profile = ctx.get("include_profile", False)
        if not isinstance(profile, bool):
            raise bad_json("event_context.include_profile must be a boolean")
        s.context = (_int_in(ctx, "before_limit", DEFAULT_CONTEXT, "event_context"),
                     _int_in(ctx, "after_limit", DEFAULT_CONTEXT, "event_context"), profile)
    inc = crit.get("include_state", False)
    if not isinstance(inc, bool):
        raise bad_json("include_state must be a boolean")
    s.include_state = inc
    groupings = crit.get("groupings")
    if groupings is not None:
        if not isinstance(groupings, dict):
            raise bad_json("groupings must be an object")
        group_by = groupings.get("group_by", [])
        if not isinstance(group_by, list):
            raise bad_json("groupings.group_by must be a list")
        for g in group_by:
            if not isinstance(g, dict) or not isinstance(g.get("key"), str):
                raise bad_json("each of groupings.group_by must be an object with a key")
            if g["key"] not in GROUP_KEYS:
                raise invalid_param(f"cannot group by {g['key'][:100]!r}")
            if g["key"] not in s.group_by:
                s.group_by.append(g["key"])
    return s


# -- pagination -------------------------------------------------------------------------------------
class _Batch:
    def __init__(self, order_by: str, rank: float, stream_ordering: int, given: int,
                 group: Optional[tuple[str, str]]) -> None:
        self.order_by = order_by
        self.rank = rank
        self.stream_ordering = stream_ordering
        self.given = given
        self.group = group

    def encode(self) -> str:
        d: dict[str, Any] = {"o": self.order_by, "r": self.rank, "s": self.stream_ordering, "n": self.given}
        if self.group is not None:
            d["g"] = list(self.group)
        raw = json.dumps(d, separators=(",", ":")).encode("utf-8")
        return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")

    def in_group(self, key: str, value: str) -> "_Batch":
        return _Batch(self.order_by, self.rank, self.stream_ordering, self.given, (key, value))


def _decode_batch(raw: str, order_by: str) -> _Batch:
    try:
        d = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode("utf-8"))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise invalid_param("Invalid next_batch") from None
    if not isinstance(d, dict):
        raise invalid_param("Invalid next_batch")
    rank, so, given, order, group = d.get("r"), d.get("s"), d.get("n"), d.get("o"), d.get("g")
    if (not isinstance(rank, (int, float)) or isinstance(rank, bool) or rank != rank
            or rank in (float("inf"), float("-inf"))
            or not isinstance(so, int) or isinstance(so, bool) or not -UNBOUNDED <= so <= UNBOUNDED
            or not isinstance(given, int) or isinstance(given, bool) or given < 0
            or order not in ("rank", "recent")):
        raise invalid_param("Invalid next_batch")
    if order != order_by:
        raise invalid_param("next_batch belongs to a search in another order")
    parsed_group: Optional[tuple[str, str]] = None
    if group is not None:
        if (not isinstance(group, list) or len(group) != 2 or group[0] not in GROUP_KEYS
                or not isinstance(group[1], str)):
            raise invalid_param("Invalid next_batch")
        parsed_group = (group[0], group[1])
    return _Batch(order, float(rank), so, given, parsed_group)


def _groups(group_by: list[str], hits: list[tuple[Hit, Event]],
            token: Optional[_Batch]) -> dict[str, dict[str, dict[str, Any]]]:
    """The page's results partitioned by each key; a group's next_batch
    (given while the search has more) goes on within that group."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for key in group_by:
        groups: dict[str, dict[str, Any]] = {}
        for hit, ev in hits:
            value = ev.room_id if key == "room_id" else ev.sender
            g = groups.get(value)
            if g is None:
                g = groups[value] = {"order": len(groups) + 1, "results": []}
                if token is not None and (token.group is None or token.group == (key, value)):
                    g["next_batch"] = token.in_group(key, value).encode()
            g["results"].append(ev.event_id)
        out[key] = groups
    return out
