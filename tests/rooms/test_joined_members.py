"""The joined members of a room's state (zhome.rooms.joined_members): the
same answer as reading every member event, while reading only what changed."""

from __future__ import annotations

from typing import Any, Iterable, Optional

from twisted.internet import defer

from zhome.rooms.events import Event
from zhome.rooms.joined_members import JoinedMembers
from zhome.rooms.versions import get_room_version

RV = get_room_version("10")
ROOM = "!r:hs"


class FakeEvents:
    def __init__(self) -> None:
        self.by_id: dict[str, Event] = {}
        self.loaded: list[str] = []
        self.content_epoch = 0

    def member(self, user: str, membership: str, name: Optional[str] = None, n: int = 0) -> str:
        content: dict[str, Any] = {"membership": membership}
        if name is not None:
            content["displayname"] = name
        eid = f"${user}-{membership}-{n}"
        self.by_id[eid] = Event({"type": "m.room.member", "state_key": user, "sender": user, "room_id": ROOM,
                                 "content": content}, eid, RV)
        return eid

    async def get_events(self, ids: Iterable[str]) -> dict[str, Event]:
        ids = list(ids)
        self.loaded += ids
        return {i: self.by_id[i] for i in ids if i in self.by_id}


def result(d: "defer.Deferred[Any]") -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "still waiting"
    return out[0]


def test_members_reused_by_group_and_only_changes_read() -> None:
    evs = FakeEvents()
    jm = JoinedMembers(evs)
    state = {("m.room.create", ""): "$c"}
    for i in range(100):
        state[("m.room.member", f"@u{i}:hs")] = evs.member(f"@u{i}:hs", "join", f"User {i}")
    m = result(defer.ensureDeferred(jm.of(ROOM, state, 1)))
    assert len(m.joined) == 100 and m.joined["@u5:hs"] == "User 5"
    assert len(evs.loaded) == 100
    assert result(defer.ensureDeferred(jm.of(ROOM, state, 1))) is m
    assert len(evs.loaded) == 100

    # A leave, a new name, a join: three events read, not a hundred.
    state = dict(state)
    state[("m.room.member", "@u1:hs")] = evs.member("@u1:hs", "leave", n=1)
    state[("m.room.member", "@u2:hs")] = evs.member("@u2:hs", "join", "Renamed", n=1)
    state[("m.room.member", "@new:hs")] = evs.member("@new:hs", "join")
    m2 = result(defer.ensureDeferred(jm.of(ROOM, state, 2)))
    assert len(evs.loaded) == 103
    assert "@u1:hs" not in m2.joined and m2.joined["@u2:hs"] == "Renamed" and m2.joined["@new:hs"] is None
    assert len(m2.joined) == 100
    assert len(m.joined) == 100 and m.joined["@u2:hs"] == "User 2"  # the old answer is unchanged

    # Content removed somewhere (a redaction): everything is read again.
    evs.content_epoch += 1
    m3 = result(defer.ensureDeferred(jm.of(ROOM, state, 2)))
    assert m3 is not m2 and m3.joined == m2.joined
    assert len(evs.loaded) == 103 + 101

    # An unknown group is checked against the last answer, not trusted.
    assert result(defer.ensureDeferred(jm.of(ROOM, state, None))).joined == m2.joined
    assert len(evs.loaded) == 204


def test_a_member_event_that_cannot_be_read_is_not_a_member_and_is_asked_for_again() -> None:
    evs = FakeEvents()
    jm = JoinedMembers(evs)
    state = {("m.room.member", "@a:hs"): evs.member("@a:hs", "join"), ("m.room.member", "@b:hs"): "$missing"}
    assert set(result(defer.ensureDeferred(jm.of(ROOM, state, 1))).joined) == {"@a:hs"}
    evs.by_id["$missing"] = Event({"type": "m.room.member", "state_key": "@b:hs", "sender": "@b:hs",
                                   "room_id": ROOM, "content": {"membership": "join"}}, "$missing", RV)
    assert set(result(defer.ensureDeferred(jm.of(ROOM, state, 2))).joined) == {"@a:hs", "@b:hs"}
