"""State resolution for room versions 1 to 12.

Spec: rooms/v1.md "State resolution" (room version 1), rooms/v2.md and the
``v2-state-res`` fragment "State resolution" (versions 2 to 11), and
rooms/v12.md "State resolution" (version 12, "state resolution v2.1": the
conflicted state subgraph joins the full conflicted set and the first
iterative auth checks start from an empty state map).

The code is pure: events are read only through the injected ``load_events``
(batched, bounded by ``max_events``); nothing here touches a database or the
network. The result never depends on the order of the state sets nor on the
order of any dict: every choice is made by a total order (power level,
``origin_server_ts``, event ID; for v1 depth and ``sha1(event_id)``).

Choices where the specification leaves room (also in the report of the change
that added this module):

* Rejected events (``Event.rejected_reason``) are never state: they are
  skipped by the iterative auth checks, never selected by v1, and dropped from
  the unconflicted state map. They still take part in the graph (their auth
  events count in auth chains), as the spec's "handled as usual" suggests.
* Step 1 of the v2 algorithm adds to the power events "the events in the auth
  chain of P which also belong to the full conflicted set" -- the wording of
  rooms/v12.md; older wording of the v2 fragment says "the union of their auth
  chains", which would replay the room's whole history. Both versions use the
  v12 wording; the auth chain is walked in full, then intersected.
* The reverse topological power ordering uses the DAG of auth events induced
  on the sorted set.
* A missing state event (a value of a state map) is an error. A missing auth
  event of an accepted event is an error too (such an event could not have
  been accepted); a missing auth event cited only by rejected events is
  skipped, since rejected events never become state.
* v12: the room's create event is never conflicted. State maps that lack it
  take it from the others; two different create events are an error.
* v1: a key is conflicting when the state maps holding it disagree (a map
  without the key does not conflict); conflicted member keys are resolved in
  order of state key, other keys in order of (type, state key); when no
  candidate for an "other" key passes the auth rules, the key is left out.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import deque
from typing import Awaitable, Callable, Iterable, Mapping, Optional, Sequence

from zhome.rooms.auth import (
    CREATE,
    JOIN_RULES,
    MEMBER,
    POWER_LEVELS,
    AuthError,
    auth_types_for_event,
    check_auth_rules,
    get_user_power_level,
)
from zhome.rooms.events import Event, StateMap
from zhome.rooms.versions import RoomVersion, StateResAlgorithm

StateKey = tuple[str, str]
EventLoader = Callable[[Iterable[str]], Awaitable[dict[str, Event]]]

__all__ = ["StateMap", "StateResolutionError", "resolve_state", "is_power_event"]

_CREATE_KEY: StateKey = (CREATE, "")
_PL_KEY: StateKey = (POWER_LEVELS, "")
_JR_KEY: StateKey = (JOIN_RULES, "")

# Malformed content that slips past validation must make an event "not
# allowed", never abort the resolution.
_NOT_ALLOWED = (AuthError, KeyError, TypeError, ValueError, AttributeError, IndexError)


class StateResolutionError(Exception):
    """The state sets cannot be resolved: events are missing, the auth graph
    is cyclic or too big (``max_events``), or the state maps are malformed."""


async def resolve_state(
    room_version: RoomVersion,
    state_sets: Sequence[StateMap],
    load_events: EventLoader,
    max_events: int = 100_000,
) -> StateMap:
    """The resolution of ``state_sets`` under ``room_version``'s algorithm.

    ``load_events(ids)`` returns the events it knows among ``ids`` (absent
    ones are left out); it is called with batches, and at most
    ``max_events`` distinct events are asked for.
    """
    sets = [dict(s) for s in state_sets]
    if not sets:
        return {}
    loader = _Loader(load_events, max_events)
    first = sets[0]
    if all(s == first for s in sets[1:]):
        # Nothing conflicts and every auth chain is the same: the spec's
        # result is the state itself (without rejected events).
        await loader.require(first.values())
        _validate_state_maps(sets, loader.events)
        return {k: v for k, v in first.items() if loader.events[v].rejected_reason is None}
    if room_version.state_res is StateResAlgorithm.V1:
        return await _resolve_v1(room_version, sets, loader)
    return await _resolve_v2(
        room_version, sets, loader, v2_1=room_version.state_res is StateResAlgorithm.V2_1
    )


def is_power_event(event: Event) -> bool:
    """v2 "Power events": events that might take an ability away."""
    if not event.is_state():
        return False
    if event.type in (POWER_LEVELS, JOIN_RULES):
        return event.state_key == ""
    if event.type == MEMBER:
        return event.membership in ("leave", "ban") and event.sender != event.state_key
    return False


# ---------------------------------------------------------------------------
# loading


class _Loader:
    """Batches calls to ``load_events`` and enforces ``max_events``."""

    def __init__(self, load: EventLoader, max_events: int) -> None:
        self._load = load
        self._max = max_events
        self._asked: set[str] = set()
        self.events: dict[str, Event] = {}

    async def fetch(self, ids: Iterable[str]) -> None:
        want = sorted({i for i in ids if i not in self._asked})
        if not want:
            return
        if len(self._asked) + len(want) > self._max:
            raise StateResolutionError(f"state resolution needs more than {self._max} events")
        self._asked.update(want)
        got = await self._load(want)
        for eid in want:
            ev = got.get(eid)
            if ev is not None and ev.event_id == eid:
                self.events[eid] = ev

    async def require(self, ids: Iterable[str]) -> None:
        ids = list(ids)
        await self.fetch(ids)
        missing = sorted(i for i in set(ids) if i not in self.events)
        if missing:
            raise StateResolutionError(f"state events not found: {', '.join(missing[:10])}")

    async def load_auth_closure(self, start: Iterable[str]) -> None:
        """Load every event reachable from ``start`` along auth_events."""
        frontier = [i for i in set(start) if i in self.events]
        seen = set(frontier)
        while frontier:
            need: list[str] = []
            for eid in frontier:
                for aid in _auth_ids(self.events[eid]):
                    if aid not in seen:
                        seen.add(aid)
                        need.append(aid)
            await self.fetch(need)
            frontier = [a for a in need if a in self.events]
        for eid in seen:
            ev = self.events.get(eid)
            if ev is None or ev.rejected_reason is not None:
                continue
            for aid in _auth_ids(ev):
                if aid not in self.events:
                    raise StateResolutionError(f"auth event {aid} of {eid} not found")


def _auth_ids(event: Event) -> list[str]:
    try:
        ids = event.auth_event_ids
    except (TypeError, IndexError, KeyError):
        return []
    # dict.fromkeys: drop duplicates, keep the event's own order.
    return [i for i in dict.fromkeys(ids) if isinstance(i, str)]


def _validate_state_maps(sets: Sequence[StateMap], events: Mapping[str, Event]) -> None:
    checked: set[tuple[StateKey, str]] = set()
    for s in sets:
        for key, eid in s.items():
            if (key, eid) in checked:
                continue
            checked.add((key, eid))
            ev = events[eid]
            if not ev.is_state() or ev.state_tuple() != key:
                raise StateResolutionError(f"state map holds {eid} under {key}, which is not its key")


# ---------------------------------------------------------------------------
# shared helpers


def _int_or_zero(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _create_for(event: Event, events: Mapping[str, Event]) -> Optional[Event]:
    """v12: the create event named by the event's room ID."""
    rid = event.room_id
    if not isinstance(rid, str) or not rid.startswith("!"):
        return None
    create = events.get("$" + rid[1:])
    if create is None or create.type != CREATE or create.state_key != "":
        return None
    return create


def _is_allowed(
    room_version: RoomVersion,
    event: Event,
    state: Mapping[StateKey, str],
    events: Mapping[str, Event],
    use_own_auth_events: bool,
) -> bool:
    """Whether ``event`` passes the auth rules against ``state``; when
    ``use_own_auth_events``, a key missing from ``state`` is taken from the
    event's own (not rejected) auth events, as the v2 iterative auth checks
    say."""
    if event.rejected_reason is not None or not event.is_state():
        return False
    try:
        types = auth_types_for_event(room_version, event.type, event.state_key, event.sender, event.content)
    except _NOT_ALLOWED:
        return False
    own: dict[StateKey, Event] = {}
    if use_own_auth_events:
        for aid in _auth_ids(event):
            a = events.get(aid)
            if a is not None and a.rejected_reason is None and a.is_state():
                own.setdefault(a.state_tuple(), a)
    auth_map: dict[StateKey, Event] = {}
    for key in types:
        sid = state.get(key)
        if sid is not None:
            auth_map[key] = events[sid]
        elif key in own:
            auth_map[key] = own[key]
    if room_version.hydra and event.type != CREATE:
        create = _create_for(event, events)
        if create is not None:
            auth_map[_CREATE_KEY] = create
    try:
        check_auth_rules(event, auth_map)
    except _NOT_ALLOWED:
        return False
    return True


# ---------------------------------------------------------------------------
# room version 1


def _sha1(event_id: str) -> bytes:
    return hashlib.sha1(event_id.encode("utf-8")).digest()


def _inverted(digest: bytes) -> bytes:
    return bytes(255 - b for b in digest)


async def _resolve_v1(rv: RoomVersion, sets: list[StateMap], loader: _Loader) -> StateMap:
    values: dict[StateKey, set[str]] = {}
    for s in sets:
        for key, eid in s.items():
            values.setdefault(key, set()).add(eid)
    await loader.require(i for ids in values.values() for i in ids)
    events = loader.events
    _validate_state_maps(sets, events)

    resolved: dict[StateKey, str] = {}
    conflicted: dict[StateKey, list[Event]] = {}
    for key, ids in values.items():
        if len(ids) == 1:
            (eid,) = ids
            if events[eid].rejected_reason is None:
                resolved[key] = eid
        else:
            conflicted[key] = [events[i] for i in ids if events[i].rejected_reason is None]

    def auth_ordered(key: StateKey) -> None:
        # Ascending depth, then descending sha1(event_id); the first is taken
        # as is, each next one only while the auth rules allow it.
        cands = sorted(conflicted[key], key=lambda e: (_int_or_zero(e.depth), _inverted(_sha1(e.event_id))))
        if not cands:
            return
        resolved[key] = cands[0].event_id
        for ev in cands[1:]:
            if not _is_allowed(rv, ev, resolved, events, use_own_auth_events=False):
                break
            resolved[key] = ev.event_id

    for key in (_PL_KEY, _JR_KEY):
        if key in conflicted:
            auth_ordered(key)
    for key in sorted(k for k in conflicted if k[0] == MEMBER):
        auth_ordered(key)
    for key in sorted(k for k in conflicted if k not in (_PL_KEY, _JR_KEY) and k[0] != MEMBER):
        # Highest depth, then lowest sha1(event_id), that passes auth.
        cands = sorted(conflicted[key], key=lambda e: (-_int_or_zero(e.depth), _sha1(e.event_id)))
        for ev in cands:
            if _is_allowed(rv, ev, resolved, events, use_own_auth_events=False):
                resolved[key] = ev.event_id
                break
    return resolved


# ---------------------------------------------------------------------------
# room versions 2 to 12


async def _resolve_v2(rv: RoomVersion, sets: list[StateMap], loader: _Loader, *, v2_1: bool) -> StateMap:
    n = len(sets)
    all_ids = {eid for s in sets for eid in s.values()}
    await loader.require(all_ids)
    events = loader.events
    _validate_state_maps(sets, events)

    # Unconflicted state map and conflicted state set.
    by_key: dict[StateKey, list[str]] = {}
    for s in sets:
        for key, eid in s.items():
            by_key.setdefault(key, []).append(eid)
    unconflicted: dict[StateKey, str] = {}
    conflicted: set[str] = set()
    for key, ids in by_key.items():
        distinct = set(ids)
        if rv.hydra and key == _CREATE_KEY:
            if len(distinct) != 1:
                raise StateResolutionError("state maps disagree on the room's create event")
            unconflicted[key] = ids[0]
        elif len(ids) == n and len(distinct) == 1:
            unconflicted[key] = ids[0]
        else:
            conflicted.update(distinct)

    await loader.load_auth_closure(all_ids)
    auth = {eid: [a for a in _auth_ids(ev) if a in events] for eid, ev in events.items()}
    order = _citers_first(auth)

    # Auth difference: bit i of chain_mask[e] says e is in the auth chain of
    # some event of state set i.
    state_mask: dict[str, int] = {}
    for i, s in enumerate(sets):
        for eid in s.values():
            state_mask[eid] = state_mask.get(eid, 0) | (1 << i)
    chain_mask: dict[str, int] = {}
    for eid in order:
        m = chain_mask.get(eid, 0) | state_mask.get(eid, 0)
        if m:
            for a in auth[eid]:
                chain_mask[a] = chain_mask.get(a, 0) | m
    full = (1 << n) - 1
    full_conflicted = set(conflicted)
    full_conflicted.update(e for e, m in chain_mask.items() if m != full)

    if v2_1:
        full_conflicted |= _conflicted_subgraph(conflicted, auth, order)

    create_id = unconflicted.get(_CREATE_KEY) if rv.hydra else None
    full_conflicted = {e for e in full_conflicted if events[e].is_state() and e != create_id}

    # Step 1: power events and the part of their auth chains in the full
    # conflicted set, in reverse topological power ordering.
    power = {e for e in full_conflicted if is_power_event(events[e])}
    selected = set(power)
    stack = list(power)
    reached: set[str] = set(power)
    while stack:
        for a in auth[stack.pop()]:
            if a not in reached:
                reached.add(a)
                stack.append(a)
                if a in full_conflicted:
                    selected.add(a)
    power_sorted = _reverse_topological_power_order(rv, selected, auth, events)

    # Step 2.
    state: dict[StateKey, str] = (
        {} if v2_1 else {k: v for k, v in unconflicted.items() if events[v].rejected_reason is None}
    )
    _iterative_auth_checks(rv, power_sorted, state, events)

    # Steps 3 and 4: the rest, in mainline order of the resolved power levels.
    rest = [events[e] for e in full_conflicted - selected]
    rest_sorted = _mainline_order(state.get(_PL_KEY), rest, auth, events)
    _iterative_auth_checks(rv, rest_sorted, state, events)

    # Step 5.
    for key, eid in unconflicted.items():
        if events[eid].rejected_reason is None:
            state[key] = eid
        else:
            state.pop(key, None)
    return state


def _citers_first(auth: Mapping[str, list[str]]) -> list[str]:
    """A topological order of the auth graph where every event comes before
    its auth events (Kahn's algorithm); StateResolutionError on a cycle."""
    cited_by = {e: 0 for e in auth}
    for e, parents in auth.items():
        for a in parents:
            cited_by[a] += 1
    queue = deque(e for e, c in cited_by.items() if c == 0)
    order: list[str] = []
    while queue:
        e = queue.popleft()
        order.append(e)
        for a in auth[e]:
            cited_by[a] -= 1
            if cited_by[a] == 0:
                queue.append(a)
    if len(order) != len(auth):
        raise StateResolutionError("the auth events form a cycle")
    return order


def _conflicted_subgraph(conflicted: set[str], auth: Mapping[str, list[str]], order: list[str]) -> set[str]:
    """v12 "Conflicted state subgraph": events on an auth_events path from one
    conflicted state event to another, endpoints included."""
    below: set[str] = set()  # reachable from a conflicted event
    for e in order:
        if e in conflicted or e in below:
            below.update(auth[e])
    above: set[str] = set()  # reaches a conflicted event
    for e in reversed(order):
        if any(a in conflicted or a in above for a in auth[e]):
            above.add(e)
    return conflicted | (below & above)


def _sender_power(rv: RoomVersion, event: Event, events: Mapping[str, Event]) -> float:
    """The sender's power level by the event's own auth events."""
    auth_map: dict[StateKey, Event] = {}
    for aid in _auth_ids(event):
        a = events.get(aid)
        if a is not None and a.is_state() and a.state_tuple() in (_PL_KEY, _CREATE_KEY):
            auth_map.setdefault(a.state_tuple(), a)
    if rv.hydra:
        create = _create_for(event, events)
        if create is not None:
            auth_map[_CREATE_KEY] = create
    try:
        return float(get_user_power_level(event.sender, auth_map))
    except _NOT_ALLOWED:
        return 0.0


def _reverse_topological_power_order(
    rv: RoomVersion, selected: set[str], auth: Mapping[str, list[str]], events: Mapping[str, Event]
) -> list[Event]:
    """Kahn's algorithm on the auth DAG induced on ``selected``, earliest
    first, choosing the smallest by (-power level, origin_server_ts, ID)."""
    waiting: dict[str, int] = {}
    citers: dict[str, list[str]] = {e: [] for e in selected}
    for e in selected:
        parents = [a for a in auth[e] if a in selected]
        waiting[e] = len(parents)
        for a in parents:
            citers[a].append(e)

    def key(eid: str) -> tuple[float, int, str]:
        ev = events[eid]
        return (-_sender_power(rv, ev, events), _int_or_zero(ev.origin_server_ts), eid)

    heap = [key(e) for e, w in waiting.items() if w == 0]
    heapq.heapify(heap)
    out: list[Event] = []
    while heap:
        eid = heapq.heappop(heap)[2]
        out.append(events[eid])
        for c in citers[eid]:
            waiting[c] -= 1
            if waiting[c] == 0:
                heapq.heappush(heap, key(c))
    return out


def _pl_parent(event: Event, auth: Mapping[str, list[str]], events: Mapping[str, Event]) -> Optional[str]:
    for a in auth.get(event.event_id, ()):
        ev = events[a]
        if ev.type == POWER_LEVELS and ev.state_key == "":
            return a
    return None


def _mainline_order(
    pl_id: Optional[str], rest: list[Event], auth: Mapping[str, list[str]], events: Mapping[str, Event]
) -> list[Event]:
    """v2 "Mainline ordering" based on the power levels event ``pl_id``."""
    mainline: dict[str, int] = {}
    p = pl_id
    while p is not None and p not in mainline:
        mainline[p] = len(mainline)
        p = _pl_parent(events[p], auth, events)

    inf = float("inf")
    # Mainline position of an event found as e_j (j >= 1), memoised so that
    # each power levels event is walked once.
    position: dict[str, float] = {}

    def position_of(ev: Event) -> float:
        path: list[str] = []
        q = _pl_parent(ev, auth, events)
        result = inf
        while q is not None:
            if q in mainline:
                result = mainline[q]
                break
            if q in position:
                result = position[q]
                break
            path.append(q)
            q = _pl_parent(events[q], auth, events)
        for x in path:
            position[x] = result
        return result

    keyed = [(-position_of(ev), _int_or_zero(ev.origin_server_ts), ev.event_id) for ev in rest]
    keyed.sort()
    return [events[k[2]] for k in keyed]


def _iterative_auth_checks(
    rv: RoomVersion, ordered: list[Event], state: dict[StateKey, str], events: Mapping[str, Event]
) -> None:
    """v2 "Iterative auth checks", updating ``state`` in place."""
    for ev in ordered:
        if _is_allowed(rv, ev, state, events, use_own_auth_events=True):
            state[ev.state_tuple()] = ev.event_id
