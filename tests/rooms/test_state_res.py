"""Tests for zhome.rooms.state_res: state resolution (rooms/v1.md, the v2
fragment "State resolution", rooms/v12.md "State resolution").

Rooms are built by hand as a DAG of events with synthetic IDs ("$PA"). Each
event's state before is the resolution of the states after its
prev_events (computed with the code under test), its auth_events are chosen
from that state by ``auth_types_for_event``, and it is checked by the auth
rules, as a homeserver does. The well-known scenarios resolve the states at
the forward extremities of a fork and compare with the expected state.
"""

from __future__ import annotations

import random
from typing import Any, Coroutine, Iterable, Optional, Sequence, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.rooms.builders import auth_event_ids, build_pdu
from zhome.rooms.auth import AuthError, check_auth_rules, creators_of
from zhome.rooms.events import Event, StateMap
from zhome.rooms.state_res import StateResolutionError, is_power_event, resolve_state
from zhome.rooms.versions import EventIdFormat, get_room_version

ALICE = "@alice:a.example"  # creator
BOB = "@bob:b.example"
CHARLIE = "@charlie:c.example"
EVELYN = "@evelyn:e.example"
ZARA = "@zara:z.example"

T = TypeVar("T")

CREATE = "m.room.create"
MEMBER = "m.room.member"
PL = "m.room.power_levels"
JR = "m.room.join_rules"
TOPIC = "m.room.topic"


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Drive a coroutine whose awaits all complete at once."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    coro.close()
    raise AssertionError("coroutine suspended")


class Room:
    """A room DAG. ``add`` creates an event after ``prev`` (default: the last
    event), resolving the states after the prev events when there are
    several."""

    def __init__(self, version: str, creator: str = ALICE) -> None:
        self.rv = get_room_version(version)
        self.events: dict[str, Event] = {}
        self.state_after: dict[str, StateMap] = {}
        self.ts = 0
        self.last: Optional[str] = None
        self.loads: list[list[str]] = []
        content: dict[str, Any] = {"room_version": version}
        if not self.rv.implicit_room_creator:
            content["creator"] = creator
        self.room_id = "!CREATE" if self.rv.hydra else "!room:a.example"
        self.create = self.add("$CREATE", CREATE, creator, content, state_key="", prev=[])
        self.creators = creators_of(self.create)

    # -- loading -------------------------------------------------------
    async def load(self, ids: Iterable[str]) -> dict[str, Event]:
        ids = list(ids)
        self.loads.append(ids)
        return {i: self.events[i] for i in ids if i in self.events}

    def resolve(self, sets: Sequence[StateMap], **kw: Any) -> StateMap:
        return run(resolve_state(self.rv, sets, self.load, **kw))

    # -- building ------------------------------------------------------
    def _refs(self, ids: Sequence[str]) -> list[Any]:
        if self.rv.event_id_format is EventIdFormat.SERVER_CHOSEN:
            return [[i, {"sha256": "x"}] for i in ids]
        return list(ids)

    def state_before(self, prev: Sequence[str]) -> StateMap:
        if not prev:
            return {}
        return self.resolve([self.state_after[p] for p in prev])

    def add(
        self,
        event_id: str,
        type: str,
        sender: str,
        content: dict[str, Any],
        state_key: Optional[str] = None,
        prev: Optional[Sequence[str]] = None,
        allowed: Optional[bool] = True,
    ) -> Event:
        """Add an event; ``allowed`` True/False asserts the auth outcome
        (a refused event is stored as rejected), None accepts either."""
        if prev is None:
            prev = [self.last] if self.last else []
        before = self.state_before(prev)
        if type == PL and self.rv.hydra and "users" in content:
            # v12: creators may not be listed; they have infinite power.
            content = dict(content)
            content["users"] = {u: v for u, v in content["users"].items() if u not in self.creators}
        auth_ids = auth_event_ids(self.rv, type, state_key, sender, content, before)
        self.ts += 1
        pdu = build_pdu(
            type,
            sender,
            content,
            prev_events=self._refs(prev),
            auth_events=self._refs(auth_ids),
            depth=max((self.events[p].depth for p in prev), default=0) + 1,
            origin_server_ts=self.ts,
            state_key=state_key,
            room_id=None if self.rv.hydra and type == CREATE else self.room_id,
        )
        ev = Event(pdu, event_id, self.rv)
        auth_map = {self.events[a].state_tuple(): self.events[a] for a in auth_ids}
        if self.rv.hydra and type != CREATE:
            auth_map[(CREATE, "")] = self.events["$CREATE"]
        try:
            check_auth_rules(ev, auth_map)
            ok = True
        except AuthError:
            ok = False
        if allowed is not None:
            assert ok == allowed, f"{event_id} allowed={ok}"
        if not ok:
            ev.rejected_reason = "auth"
        self.events[event_id] = ev
        after = dict(before)
        if ok and state_key is not None:
            after[(type, state_key)] = event_id
        self.state_after[event_id] = after
        self.last = event_id
        return ev

    # -- shorthands ----------------------------------------------------
    def member(self, eid: str, sender: str, target: str, membership: str, **kw: Any) -> Event:
        return self.add(eid, MEMBER, sender, {"membership": membership}, state_key=target, **kw)

    def pl(self, eid: str, sender: str, users: dict[str, int], **kw: Any) -> Event:
        return self.add(eid, PL, sender, {"users": users}, state_key="", **kw)

    def topic(self, eid: str, sender: str, **kw: Any) -> Event:
        return self.add(eid, TOPIC, sender, {"topic": eid}, state_key="", **kw)

    def jr(self, eid: str, sender: str, rule: str, **kw: Any) -> Event:
        return self.add(eid, JR, sender, {"join_rule": rule}, state_key="", **kw)

    def message(self, eid: str, sender: str, **kw: Any) -> Event:
        return self.add(eid, "m.room.message", sender, {"body": eid}, **kw)


def initial_room(version: str) -> Room:
    """create, alice joins, power levels, public join rule, bob, charlie and
    zara join (the events IMA IPOWER IJR IMB IMC IMZ)."""
    room = Room(version)
    room.member("$IMA", ALICE, ALICE, "join")
    room.pl("$IPOWER", ALICE, {ALICE: 100})
    room.jr("$IJR", ALICE, "public")
    room.member("$IMB", BOB, BOB, "join")
    room.member("$IMC", CHARLIE, CHARLIE, "join")
    room.member("$IMZ", ZARA, ZARA, "join")
    return room


def expected_state(room: Room, base: str, ids: Iterable[str], removed: Iterable[tuple[str, str]] = ()) -> StateMap:
    out = dict(room.state_after[base])
    for eid in ids:
        ev = room.events[eid]
        out[ev.state_tuple()] = eid
    for key in removed:
        out.pop(key, None)
    return out


def resolve_end(room: Room, tips: Sequence[str]) -> StateMap:
    """The state before an event whose prev_events are ``tips``; checks it
    does not depend on their order."""
    result = room.resolve([room.state_after[t] for t in tips])
    assert room.resolve([room.state_after[t] for t in reversed(tips)]) == result
    return result


V2_VERSIONS = ["2", "10", "11", "12"]


# ---------------------------------------------------------------------------
# the well-known scenarios


@pytest.mark.parametrize("version", V2_VERSIONS)
def test_ban_vs_power_levels(version: str) -> None:
    # Alice bans Bob while Bob concurrently (re)sends the power levels: the
    # ban is a power event by a more powerful sender, so it is applied first
    # and Bob's power levels fail because he is no longer joined.
    room = initial_room(version)
    room.pl("$PA", ALICE, {ALICE: 100, BOB: 50})
    room.member("$MA", ALICE, ALICE, "join")
    room.member("$MB", ALICE, BOB, "ban")
    room.pl("$PB", BOB, {ALICE: 100, BOB: 50}, prev=["$PA"])
    result = resolve_end(room, ["$MB", "$PB"])
    assert result == expected_state(room, "$IMZ", ["$PA", "$MA", "$MB"])


@pytest.mark.parametrize("version", V2_VERSIONS)
def test_join_rule_evasion(version: str) -> None:
    # Evelyn joins concurrently with the room becoming invite-only: the join
    # rule (a power event) is applied first, so her join fails.
    room = initial_room(version)
    room.jr("$JR", ALICE, "invite")
    room.member("$ME", EVELYN, EVELYN, "join", prev=["$IMZ"])
    result = resolve_end(room, ["$JR", "$ME"])
    assert result == expected_state(room, "$IMZ", ["$JR"])
    assert (MEMBER, EVELYN) not in result


@pytest.mark.parametrize("version", V2_VERSIONS)
def test_offtopic_power_levels(version: str) -> None:
    room = initial_room(version)
    room.pl("$PA", ALICE, {ALICE: 100, BOB: 50})
    room.pl("$PB", BOB, {ALICE: 100, BOB: 50, CHARLIE: 50})
    room.pl("$PC", ALICE, {ALICE: 100, BOB: 50, CHARLIE: 0})
    result = resolve_end(room, ["$PC", "$PA"])
    assert result == expected_state(room, "$IMZ", ["$PC"])


@pytest.mark.parametrize("version", V2_VERSIONS)
def test_topic_basic(version: str) -> None:
    # Bob's branch (his own power levels, then a topic) loses: Alice's demotion
    # of Bob is ordered before Bob's power levels, which then fail.
    room = initial_room(version)
    room.topic("$T1", ALICE)
    room.pl("$PA1", ALICE, {ALICE: 100, BOB: 50})
    room.topic("$T2", ALICE)
    room.pl("$PA2", ALICE, {ALICE: 100, BOB: 0})
    room.pl("$PB", BOB, {ALICE: 100, BOB: 50}, prev=["$PA1"])
    room.topic("$T3", BOB)
    result = resolve_end(room, ["$PA2", "$T3"])
    assert result == expected_state(room, "$IMZ", ["$PA2", "$T2"])


@pytest.mark.parametrize("version", V2_VERSIONS)
def test_topic_reset(version: str) -> None:
    # Bob sets a topic and is then banned; merged with a branch that only
    # saw the first topic, the topic resets to T1: by mainline ordering T1
    # (based on an older power levels event) comes first, and Bob's T2 then
    # fails because he is banned.
    room = initial_room(version)
    room.topic("$T1", ALICE)
    room.pl("$PA", ALICE, {ALICE: 100, BOB: 50})
    room.topic("$T2", BOB)
    room.member("$MB", ALICE, BOB, "ban")
    result = resolve_end(room, ["$MB", "$T1"])
    assert result == expected_state(room, "$IMZ", ["$T1", "$MB", "$PA"])


@pytest.mark.parametrize("version", V2_VERSIONS)
def test_topic_with_merge(version: str) -> None:
    # As topic_basic, then a merge event and a later topic by Alice.
    room = initial_room(version)
    room.topic("$T1", ALICE)
    room.pl("$PA1", ALICE, {ALICE: 100, BOB: 50})
    room.topic("$T2", ALICE)
    room.pl("$PA2", ALICE, {ALICE: 100, BOB: 0})
    room.pl("$PB", BOB, {ALICE: 100, BOB: 50}, prev=["$PA1"])
    room.topic("$T3", BOB)
    room.message("$MZ1", ZARA, prev=["$PA2", "$T3"])
    assert room.state_after["$MZ1"] == expected_state(room, "$IMZ", ["$PA2", "$T2"])
    room.topic("$T4", ALICE)
    result = resolve_end(room, ["$T4", "$MZ1"])
    assert result == expected_state(room, "$IMZ", ["$T4", "$PA2"])


@pytest.mark.parametrize("version", V2_VERSIONS)
def test_mainline_orders_by_power_levels_not_timestamps(version: str) -> None:
    # Two topics in two branches; the one based on the later power levels
    # event in the mainline wins even though it has the older timestamp.
    room = initial_room(version)
    room.pl("$PA1", ALICE, {ALICE: 100, BOB: 50})
    room.topic("$TB", BOB, prev=["$PA1"])  # based on PA1, older ts
    room.pl("$PA2", ALICE, {ALICE: 100, BOB: 50, CHARLIE: 10}, prev=["$PA1"])
    room.topic("$TA", ALICE)  # based on PA2, newer ts
    room.topic("$TA2", ALICE)  # newest ts, same base
    result = resolve_end(room, ["$TB", "$TA2"])
    assert result[(TOPIC, "")] == "$TA2"
    assert result[(PL, "")] == "$PA2"


@pytest.mark.parametrize("version", V2_VERSIONS)
def test_unconflicted_state_passes_through(version: str) -> None:
    room = initial_room(version)
    room.topic("$T1", ALICE)
    room.member("$ME", EVELYN, EVELYN, "join", prev=["$IMZ"])
    result = resolve_end(room, ["$T1", "$ME"])
    assert result == expected_state(room, "$IMZ", ["$T1", "$ME"])


@pytest.mark.parametrize("version", ["1", "2", "10", "11", "12"])
def test_single_state_set_returns_itself(version: str) -> None:
    room = initial_room(version)
    room.topic("$T1", ALICE)
    state = room.state_after["$T1"]
    assert room.resolve([state]) == state
    assert room.resolve([state, dict(state), state]) == state


@pytest.mark.parametrize("version", ["1", "10", "12"])
def test_empty_input(version: str) -> None:
    room = Room(version)
    room.loads.clear()
    assert room.resolve([]) == {}
    assert room.loads == []


@pytest.mark.parametrize("version", V2_VERSIONS)
def test_rejected_events_never_state(version: str) -> None:
    room = initial_room(version)
    room.topic("$T1", ALICE)
    room.topic("$TX", ALICE, prev=["$IMZ"])
    room.events["$TX"].rejected_reason = "auth"  # e.g. failed its auth chain
    forged = dict(room.state_after["$IMZ"])
    forged[(TOPIC, "")] = "$TX"
    result = room.resolve([room.state_after["$T1"], forged])
    assert result[(TOPIC, "")] == "$T1"
    # Even unconflicted, a rejected event is not state.
    assert (TOPIC, "") not in room.resolve([forged, forged])


@pytest.mark.parametrize("version", V2_VERSIONS)
def test_iterative_auth_checks_use_own_auth_events(version: str) -> None:
    # Evelyn's join was only possible after an invite in her branch; the
    # invite (not a power event) is in the auth difference and re-applied.
    room = initial_room(version)
    room.jr("$JR", ALICE, "invite")
    room.member("$INV", ALICE, EVELYN, "invite")
    room.member("$ME", EVELYN, EVELYN, "join")
    room.topic("$T1", ALICE, prev=["$JR"])
    result = resolve_end(room, ["$ME", "$T1"])
    assert result[(MEMBER, EVELYN)] == "$ME"
    assert result[(TOPIC, "")] == "$T1"
    assert result[(JR, "")] == "$JR"


# ---------------------------------------------------------------------------
# errors and bounds


def test_missing_state_event_is_an_error() -> None:
    room = initial_room("10")
    room.topic("$T1", ALICE, prev=["$IMZ"])
    bad = dict(room.state_after["$IMZ"])
    bad[(TOPIC, "")] = "$NOPE"
    with pytest.raises(StateResolutionError):
        room.resolve([room.state_after["$T1"], bad])


def test_missing_auth_event_of_accepted_event_is_an_error() -> None:
    room = initial_room("10")
    room.topic("$T1", ALICE, prev=["$IMZ"])
    room.topic("$T2", ALICE, prev=["$IMZ"])
    del room.events["$IPOWER"]
    with pytest.raises(StateResolutionError):
        room.resolve([room.state_after["$T1"], {k: v for k, v in room.state_after["$T2"].items() if v != "$IPOWER"}])


def test_max_events_bound() -> None:
    room = initial_room("10")
    room.topic("$T1", ALICE, prev=["$IMZ"])
    room.topic("$T2", ALICE, prev=["$IMZ"])
    sets = [room.state_after["$T1"], room.state_after["$T2"]]
    with pytest.raises(StateResolutionError):
        room.resolve(sets, max_events=5)
    assert room.resolve(sets, max_events=100)[(TOPIC, "")] in ("$T1", "$T2")


def test_loads_are_batched() -> None:
    room = initial_room("10")
    room.topic("$T1", ALICE, prev=["$IMZ"])
    room.topic("$T2", ALICE, prev=["$IMZ"])
    room.loads.clear()
    room.resolve([room.state_after["$T1"], room.state_after["$T2"]])
    # One batch for the state, then one per level of the auth graph.
    assert len(room.loads) <= 8
    asked = [i for batch in room.loads for i in batch]
    assert len(asked) == len(set(asked))


def test_state_map_with_wrong_key_is_an_error() -> None:
    room = initial_room("10")
    room.topic("$T1", ALICE, prev=["$IMZ"])
    bad = dict(room.state_after["$IMZ"])
    bad[("m.room.name", "")] = "$T1"
    with pytest.raises(StateResolutionError):
        room.resolve([room.state_after["$T1"], bad])


def test_power_events() -> None:
    room = initial_room("10")
    assert is_power_event(room.events["$IPOWER"])
    assert is_power_event(room.events["$IJR"])
    assert not is_power_event(room.events["$IMB"])
    room.member("$KB", ALICE, BOB, "leave")
    room.member("$LC", CHARLIE, CHARLIE, "leave")
    assert is_power_event(room.events["$KB"])
    assert not is_power_event(room.events["$LC"])
    assert not is_power_event(room.events["$CREATE"])


# ---------------------------------------------------------------------------
# room version 12


def test_v12_create_event_never_conflicted() -> None:
    room = initial_room("12")
    room.topic("$T1", ALICE, prev=["$IMZ"])
    room.topic("$T2", ALICE, prev=["$IMZ"])
    s1 = room.state_after["$T1"]
    s2 = {k: v for k, v in room.state_after["$T2"].items() if k != (CREATE, "")}
    result = room.resolve([s1, s2])
    assert result[(CREATE, "")] == "$CREATE"
    assert result[(TOPIC, "")] == "$T2"  # later ts, same mainline position

    other = Room("12")
    other.create.pdu["content"]["x"] = 1
    other.events["$CREATE2"] = Event(dict(other.create.pdu), "$CREATE2", other.rv)
    room.events["$CREATE2"] = other.events["$CREATE2"]
    s3 = dict(room.state_after["$T2"])
    s3[(CREATE, "")] = "$CREATE2"
    with pytest.raises(StateResolutionError):
        room.resolve([s1, s3])


@pytest.mark.parametrize("alice_later", [False, True])
def test_v12_creator_wins_power_levels_conflict(alice_later: bool) -> None:
    # Bob (100) and Alice concurrently change the power levels, each demoting
    # the other side. In v12 Alice is a creator with infinite power: her event
    # sorts first, whatever the timestamps, and Bob's then fails.
    room = initial_room("12")
    room.pl("$P0", ALICE, {BOB: 100, CHARLIE: 50})
    if alice_later:
        room.pl("$PB", BOB, {BOB: 100, CHARLIE: 100}, prev=["$P0"])
        room.pl("$PA", ALICE, {BOB: 0, CHARLIE: 50}, prev=["$P0"])
    else:
        room.pl("$PA", ALICE, {BOB: 0, CHARLIE: 50}, prev=["$P0"])
        room.pl("$PB", BOB, {BOB: 100, CHARLIE: 100}, prev=["$P0"])
    result = resolve_end(room, ["$PA", "$PB"])
    assert result[(PL, "")] == "$PA"


@pytest.mark.parametrize("version", ["11", "12"])
@pytest.mark.parametrize("alice_later", [False, True])
def test_power_levels_race_between_compatible_changes(version: str, alice_later: bool) -> None:
    # Alice and Bob (100) both change Charlie's level; each change is allowed
    # after the other, so the one sorted last wins. In v11 both senders have
    # 100 and the timestamp decides (the later one is applied last); in v12
    # Alice's infinite power sorts her event first, so Bob's always wins.
    room = initial_room(version)
    room.pl("$P00", ALICE, {ALICE: 100, BOB: 100})
    # Sent by Bob so that his join is in both sides' auth chains (otherwise
    # it is in the auth difference, sorts between the two and changes the
    # outcome).
    room.pl("$P0", BOB, {ALICE: 100, BOB: 100, CHARLIE: 50})
    specs = {
        "$PA": (ALICE, {ALICE: 100, BOB: 100, CHARLIE: 10}),
        "$PB": (BOB, {ALICE: 100, BOB: 100, CHARLIE: 20}),
    }
    order = ["$PB", "$PA"] if alice_later else ["$PA", "$PB"]
    for eid in order:
        sender, users = specs[eid]
        room.pl(eid, sender, users, prev=["$P0"])
    expected = "$PB" if version == "12" else order[-1]
    assert resolve_end(room, ["$PA", "$PB"])[(PL, "")] == expected


def test_v12_starts_from_empty_state() -> None:
    # v2.1: the first iterative auth checks start from an empty state map, so
    # keys not yet resolved come from each event's own auth events (and the
    # create event from the room ID). P2 supersedes P1 and must still win.
    room = initial_room("12")
    room.pl("$P1", ALICE, {BOB: 50})
    room.member("$JB", BOB, BOB, "leave", prev=["$P1"])
    room.member("$JB2", BOB, BOB, "join")
    room.pl("$P2", BOB, {BOB: 50, CHARLIE: 50})
    result = resolve_end(room, ["$P1", "$P2"])
    assert result == expected_state(room, "$IMZ", ["$P2", "$JB2"])


def test_conflicted_state_subgraph() -> None:
    # A -> B -> C and A -> D, E -> B: with A and C conflicted, the events on
    # paths between them are A, B and C.
    from zhome.rooms.state_res import _citers_first, _conflicted_subgraph

    auth = {"A": ["B", "D"], "B": ["C"], "C": [], "D": [], "E": ["B"]}
    assert _conflicted_subgraph({"A", "C"}, auth, _citers_first(auth)) == {"A", "B", "C"}
    assert _conflicted_subgraph({"A", "D"}, auth, _citers_first(auth)) == {"A", "D"}
    assert _conflicted_subgraph({"E", "A", "C"}, auth, _citers_first(auth)) == {"A", "B", "C", "E"}
    with pytest.raises(StateResolutionError):
        _citers_first({"A": ["B"], "B": ["A"]})


# ---------------------------------------------------------------------------
# room version 1


def test_v1_ban_vs_power_levels() -> None:
    room = initial_room("1")
    room.pl("$PA", ALICE, {ALICE: 100, BOB: 50})
    room.member("$MA", ALICE, ALICE, "join")
    room.member("$MB", ALICE, BOB, "ban")
    room.pl("$PB", BOB, {ALICE: 100, BOB: 50}, prev=["$PA"])
    result = resolve_end(room, ["$MB", "$PB"])
    assert result == expected_state(room, "$IMZ", ["$PA", "$MA", "$MB"])


def test_v1_other_conflicts_pick_highest_depth() -> None:
    room = initial_room("1")
    room.topic("$T1", ALICE)
    room.topic("$T2", ALICE)
    room.topic("$T3", BOB, prev=["$IMZ"], allowed=None)
    result = resolve_end(room, ["$T2", "$T3"])
    assert result[(TOPIC, "")] == "$T2"


# ---------------------------------------------------------------------------
# properties

USERS = [ALICE, BOB, CHARLIE, ZARA]


@st.composite
def random_rooms(draw: st.DrawFn, version: str) -> tuple[Room, list[str]]:
    """A room with forks and merges; returns it and 2-3 events whose states
    will be resolved."""
    room = Room(version)
    room.member("$IMA", ALICE, ALICE, "join")
    room.pl("$IPOWER", ALICE, {ALICE: 100, BOB: 50, CHARLIE: 50})
    room.jr("$IJR", ALICE, "public")
    room.member("$IMB", BOB, BOB, "join")
    room.member("$IMC", CHARLIE, CHARLIE, "join")
    ids = ["$IMB", "$IMC"]
    steps = draw(st.integers(min_value=2, max_value=9))
    for i in range(steps):
        eid = f"$E{i}"
        prev = [draw(st.sampled_from(ids))]
        if draw(st.booleans()) and len(ids) > 1:
            other = draw(st.sampled_from(ids))
            if other not in prev:
                prev.append(other)
        sender = draw(st.sampled_from(USERS))
        kind = draw(st.sampled_from(["topic", "pl", "member", "jr", "name"]))
        kw: dict[str, Any] = {"prev": prev, "allowed": None}
        if kind == "topic":
            room.topic(eid, sender, **kw)
        elif kind == "name":
            room.add(eid, "m.room.name", sender, {"name": eid}, state_key="", **kw)
        elif kind == "pl":
            users = {u: draw(st.sampled_from([0, 50, 100])) for u in USERS}
            room.pl(eid, sender, users, **kw)
        elif kind == "jr":
            room.jr(eid, sender, draw(st.sampled_from(["public", "invite"])), **kw)
        else:
            target = draw(st.sampled_from(USERS))
            membership = draw(st.sampled_from(["join", "leave", "ban", "invite"]))
            room.member(eid, sender, target, membership, **kw)
        if room.events[eid].rejected_reason is None:
            ids.append(eid)
        else:
            del room.events[eid]  # never referenced: a server would drop it
            room.last = ids[-1]
    tips = draw(st.lists(st.sampled_from(ids), min_size=2, max_size=3, unique=True))
    return room, tips


def shuffled(state: StateMap, rnd: random.Random) -> StateMap:
    items = list(state.items())
    rnd.shuffle(items)
    return dict(items)


PROPERTY_SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


# Not parametrised: pytest-twisted wraps a hypothesis test's inner function
# once per parametrised item, which nests its reactor calls.
@PROPERTY_SETTINGS
@given(data=st.data())
def test_order_does_not_matter(data: st.DataObject) -> None:
    version = data.draw(st.sampled_from(["1", "2", "10", "11", "12"]))
    room, tips = data.draw(random_rooms(version))
    rnd = data.draw(st.randoms(use_true_random=False))
    sets = [room.state_after[t] for t in tips]
    expected = room.resolve(sets)

    perm = data.draw(st.permutations(sets))
    assert room.resolve([shuffled(s, rnd) for s in perm]) == expected
    assert room.resolve(list(reversed(sets))) == expected

    # The loader's answer order does not matter either.
    async def scrambled(ids: Iterable[str]) -> dict[str, Event]:
        items = list((await room.load(ids)).items())
        rnd.shuffle(items)
        return dict(items)

    assert run(resolve_state(room.rv, sets, scrambled)) == expected

    # Resolving a state with itself gives it back.
    for s in sets:
        assert room.resolve([s]) == s
        assert room.resolve([s, shuffled(s, rnd)]) == s

    # Pairs commute.
    s1, s2 = sets[0], sets[1]
    assert room.resolve([s1, s2]) == room.resolve([s2, s1])

    # The result only holds accepted state events under their own key.
    for key, eid in expected.items():
        ev = room.events[eid]
        assert ev.rejected_reason is None
        assert ev.state_tuple() == key
