"""A redaction that reaches a real zhome before the event it redacts.

Over federation a redaction can arrive before its target (the target is
not among its prev events, so nothing makes the sender send it first).
zhome records it then, before it can tell the target's room. A fake
remote server "E" (the one of test_federation_hostile.py) sends the
redaction first and the target after, as raw signed PDUs.

A redaction takes effect only when its sender is on the target sender's
server or had the redact level in the state before the redaction; one
that may not is a valid event without effect. The cases here have a
third server "T" (another fake, @trudy's) besides E: a redaction sent
before its target over /send, and redactions in history A backfills from
a room that lives on E.

Spec: rooms/v3 and later "Handling redactions" and client-server-api
"Redactions" (a redaction applies only to an event of its own room; a
server should remove the redacted content), client-server-api "Receiving
notifications" (counts are of notifying events: a redacted one is none),
"Server Side Search", "Relationships"; server-server-api "Backfilling and
retrieving missing events".
"""

from __future__ import annotations

import time
import urllib.parse
from typing import Any, Iterator, Optional

import pytest

from tests.e2e.harness import q
from tests.e2e.test_federation_hostile import FED, FakeServer, RemoteRoom, World, _join, hostile_world
from tests.rooms.builders import auth_event_ids, build_pdu
from zhome.crypto.event_hashing import hash_and_sign_event
from zhome.rooms.versions import get_room_version

WAIT_S = 10.0
V1 = "/_matrix/client/v1"


@pytest.fixture(scope="module", params=["sqlite3", "postgres"])
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """A with alice's public room, E with @mallory joined to it, and T."""
    yield from hostile_world(request.param, tmp_path_factory.mktemp(f"redaction-first-{request.param}"),
                             third_server=True)


def _new_room(world: World) -> RemoteRoom:
    status, created = world.client("POST", "/createRoom", {"preset": "public_chat"})
    assert status == 200, (status, created)
    return _join(world.a, world.e, created["room_id"], world.mallory)


def _redaction_of(room: RemoteRoom, target: str, sender: str) -> dict[str, Any]:
    red = room.build("m.room.redaction", {"redacts": target} if room.rv.redacts_in_content else {}, sender)
    red["redacts"] = target
    return red


def _send(world: World, signed: dict[str, Any], event_id: str) -> None:
    status, body = world.send_txn([signed])
    assert status == 200 and body["pdus"] == {event_id: {}}, (status, body, world.a.log())


def _search(world: World, term: str) -> list[str]:
    status, body = world.client("POST", "/search", {"search_categories": {"room_events": {"search_term": term}}})
    assert status == 200, (status, body)
    return [r["result"]["event_id"] for r in body["search_categories"]["room_events"]["results"]]


def _event(world: World, room_id: str, event_id: str) -> dict[str, Any]:
    status, ev = world.client("GET", f"/rooms/{q(room_id)}/event/{q(event_id)}")
    assert status == 200, (status, ev)
    return dict(ev)


def _unread(world: World, room_id: str) -> dict[str, Any]:
    status, body = world.client("GET", "/sync?timeout=0")
    assert status == 200, (status, body)
    return dict(body["rooms"]["join"][room_id].get("unread_notifications", {}))


def _notified(world: World) -> list[str]:
    status, body = world.client("GET", "/notifications?limit=100")
    assert status == 200, (status, body)
    return [n["event"]["event_id"] for n in body["notifications"]]


def _wait_notified(world: World, event_id: str) -> list[str]:
    deadline = time.monotonic() + WAIT_S
    while True:
        got = _notified(world)
        if event_id in got or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def test_redaction_from_another_room_does_not_apply(world: World) -> None:
    """E names an event of room B in a redaction sent in room A, before B's
    event exists. Once the event is stored it is in another room than the
    redaction: it is indexed for search and served as it is, also after a
    restart (nothing read from the database takes the redaction as
    applying)."""
    a_room, b_room = world.room, _new_room(world)
    msg = b_room.build("m.room.message", {"msgtype": "m.text", "body": "crossroom needle"}, world.mallory)
    mid, msigned = b_room.sign(msg)
    red = _redaction_of(a_room, mid, world.mallory)
    rid, rsigned = a_room.sign(red)
    _send(world, rsigned, rid)
    a_room.accepted(rid, red)
    _send(world, msigned, mid)
    b_room.accepted(mid, msg)

    def check() -> None:
        found = _search(world, "needle")
        assert mid in found, (mid, found)
        ev = _event(world, b_room.room_id, mid)
        assert ev["content"].get("body") == "crossroom needle", ev
        assert "redacted_because" not in ev.get("unsigned", {}), ev

    check()
    world.a.restart()
    check()


def test_target_redacted_before_it_arrives_notifies_no_one(world: World) -> None:
    """E sends the redaction of its message first, then the message (which
    mentions alice), then a plain message. The redacted one is stored and
    served redacted, counts for no one and is not in alice's
    notifications; the plain one counts as usual."""
    room = _new_room(world)
    assert _unread(world, room.room_id).get("notification_count", 0) == 0
    msg = room.build("m.room.message", {"msgtype": "m.text", "body": "vanishing needle",
                                        "m.mentions": {"user_ids": [world.alice]}}, world.mallory)
    mid, msigned = room.sign(msg)
    red = _redaction_of(room, mid, world.mallory)
    rid, rsigned = room.sign(red)
    _send(world, rsigned, rid)
    _send(world, msigned, mid)
    room.accepted(mid, msg)
    plain = room.build("m.room.message", {"msgtype": "m.text", "body": "plain"}, world.mallory)
    pid, psigned = room.sign(plain)
    _send(world, psigned, pid)
    room.accepted(pid, plain)

    def check(notified: Optional[list[str]] = None) -> None:
        counts = _unread(world, room.room_id)
        assert (counts.get("notification_count"), counts.get("highlight_count", 0)) == (1, 0), counts
        got = notified if notified is not None else _notified(world)
        assert pid in got and mid not in got, (mid, pid, got)
        ev = _event(world, room.room_id, mid)
        assert "body" not in ev["content"], ev
        assert ev.get("unsigned", {}).get("redacted_because", {}).get("event_id") == rid, ev
        assert mid not in _search(world, "needle")

    # The later event's notification is there: the redacted one's would be too.
    check(_wait_notified(world, pid))
    world.a.restart()
    check()
    status, got = world.e.request(world.a, "GET", f"{FED}/v1/event/{q(mid)}")
    assert status == 200, (status, got)
    assert "body" not in got["pdus"][0]["content"], got


# -- whose redactions take effect ------------------------------------------------------


def _third(world: World) -> FakeServer:
    assert world.t is not None
    return world.t


def _server_of(world: World, user_id: str) -> FakeServer:
    name = user_id.split(":", 1)[1]
    for server in (world.e, world.t):
        if server is not None and server.server_name == name:
            return server
    raise AssertionError(f"no fake server for {user_id}")


def _signed(world: World, room: RemoteRoom, pdu: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``pdu`` signed by its sender's server (E or T)."""
    server = _server_of(world, pdu["sender"])
    return hash_and_sign_event(room.rv, pdu, server.server_name, server.key)


def _send_from_sender(world: World, signed: dict[str, Any], event_id: str) -> None:
    """``signed`` in a transaction from its sender's server."""
    status, body = world.send_txn([signed], server=_server_of(world, signed["sender"]))
    assert status == 200 and body["pdus"] == {event_id: {}}, (status, body, world.a.log())


def _room_of_four(world: World) -> tuple[RemoteRoom, str, str]:
    """A new public room of alice's that @mallory and @eve of E and @trudy
    of T have joined (none of them with more than the default level);
    T's view of it, and eve's and trudy's IDs."""
    t = _third(world)
    status, created = world.client("POST", "/createRoom", {"preset": "public_chat"})
    assert status == 200, (status, created)
    room_id = created["room_id"]
    eve, trudy = f"@eve:{world.e.server_name}", f"@trudy:{t.server_name}"
    _join(world.a, world.e, room_id, world.mallory)
    _join(world.a, world.e, room_id, eve)
    return _join(world.a, t, room_id, trudy), eve, trudy


def _relations(world: World, room_id: str, parent: str) -> list[str]:
    status, body = world.a.request("GET", f"{V1}/rooms/{q(room_id)}/relations/{q(parent)}", token=world.token)
    assert status == 200, (status, body)
    return [ev["event_id"] for ev in body["chunk"]]


def _timeline(world: World, room_id: str) -> list[str]:
    status, body = world.client("GET", f"/rooms/{q(room_id)}/messages?dir=b&limit=100")
    assert status == 200, (status, body)
    return [ev["event_id"] for ev in body["chunk"]]


def _assert_unredacted(world: World, room_id: str, event_id: str, body: str) -> None:
    ev = _event(world, room_id, event_id)
    assert ev["content"].get("body") == body, ev
    assert "redacted_because" not in ev.get("unsigned", {}), ev


def _assert_redacted(world: World, room_id: str, event_id: str, redaction_id: str) -> None:
    ev = _event(world, room_id, event_id)
    assert "body" not in ev["content"], ev
    assert ev.get("unsigned", {}).get("redacted_because", {}).get("event_id") == redaction_id, ev


def test_redaction_first_from_another_server_without_power_does_not_apply(world: World) -> None:
    """trudy (T, default level) redacts mallory's (E) message, eve (E,
    default level) another of mallory's, both before the messages arrive.
    eve's takes effect (same server as the original's sender); trudy's
    does not: her redaction is in the timeline, and the message is served
    as it was, counts and notifies alice (it mentions her), is found by
    search and in its parent's relations, also after a restart and over
    federation."""
    room, eve, trudy = _room_of_four(world)
    parent = room.build("m.room.message", {"msgtype": "m.text", "body": "parent"}, world.mallory)
    parent_id, signed = _signed(world, room, parent)
    _send_from_sender(world, signed, parent_id)
    room.accepted(parent_id, parent)
    kept_body = "unredactable firstneedle"
    kept = room.build("m.room.message", {
        "msgtype": "m.text", "body": kept_body, "m.mentions": {"user_ids": [world.alice]},
        "m.relates_to": {"rel_type": "m.reference", "event_id": parent_id}}, world.mallory)
    kept_id, kept_signed = _signed(world, room, kept)
    gone = room.build("m.room.message", {"msgtype": "m.text", "body": "sameserver firstneedle"}, world.mallory)
    gone_id, gone_signed = _signed(world, room, gone)
    # The redactions are built on what the messages are built on.
    by_trudy_id, by_trudy = _signed(world, room, _redaction_of(room, kept_id, trudy))
    by_eve_id, by_eve = _signed(world, room, _redaction_of(room, gone_id, eve))
    for signed, event_id in ((by_trudy, by_trudy_id), (by_eve, by_eve_id), (kept_signed, kept_id),
                             (gone_signed, gone_id)):
        _send_from_sender(world, signed, event_id)

    def check(notified: Optional[list[str]] = None) -> None:
        _assert_unredacted(world, room.room_id, kept_id, kept_body)
        _assert_redacted(world, room.room_id, gone_id, by_eve_id)
        timeline = _timeline(world, room.room_id)
        assert {kept_id, gone_id, by_trudy_id, by_eve_id} <= set(timeline), timeline
        # parent and kept notify alice, kept highlights; the redacted one counts for no one.
        counts = _unread(world, room.room_id)
        assert (counts.get("notification_count"), counts.get("highlight_count", 0)) == (2, 1), counts
        got = notified if notified is not None else _notified(world)
        assert kept_id in got and gone_id not in got, (kept_id, gone_id, got)
        found = _search(world, "firstneedle")
        assert kept_id in found and gone_id not in found, (kept_id, gone_id, found)
        assert kept_id in _relations(world, room.room_id, parent_id)

    check(_wait_notified(world, kept_id))
    world.a.restart()
    check()
    status, got = world.e.request(world.a, "GET", f"{FED}/v1/event/{q(kept_id)}")
    assert status == 200 and got["pdus"][0]["content"].get("body") == kept_body, (status, got)


def _set_level(world: World, room: RemoteRoom, user_id: str, level: int) -> None:
    """alice sets ``user_id``'s power level; ``room`` builds on it then."""
    path = f"/rooms/{q(room.room_id)}/state/m.room.power_levels/"
    status, pl = world.client("GET", path)
    assert status == 200, (status, pl)
    pl["users"] = dict(pl.get("users") or {}, **{user_id: level})
    status, sent = world.client("PUT", path, pl)
    assert status == 200, (status, sent)
    status, got = world.e.request(world.a, "GET", f"{FED}/v1/event/{q(sent['event_id'])}")
    assert status == 200, (status, got)
    room.accepted(sent["event_id"], got["pdus"][0])


def test_redaction_first_by_a_user_with_power_applies_by_the_state_before_it(world: World) -> None:
    """trudy (T) redacts two of mallory's (E) messages before they arrive:
    one redaction built on state where alice had given her the redact
    level, one built on the state before. The level is judged in the state
    before each redaction, not at the time its target arrives: the first
    takes effect although alice has taken the level back by then, the
    second does not although trudy had the level when its target came."""
    room, _, trudy = _room_of_four(world)
    early = room.build("m.room.message", {"msgtype": "m.text", "body": "early powerneedle"}, world.mallory)
    early_id, early_signed = _signed(world, room, early)
    late_body = "late powerneedle"
    late = room.build("m.room.message", {"msgtype": "m.text", "body": late_body}, world.mallory)
    late_id, late_signed = _signed(world, room, late)
    without_id, without = _signed(world, room, _redaction_of(room, late_id, trudy))
    _set_level(world, room, trudy, 50)
    with_id, with_level = _signed(world, room, _redaction_of(room, early_id, trudy))
    _send_from_sender(world, with_level, with_id)
    _send_from_sender(world, without, without_id)
    _send_from_sender(world, late_signed, late_id)
    _set_level(world, room, trudy, 0)
    _send_from_sender(world, early_signed, early_id)

    def check() -> None:
        _assert_redacted(world, room.room_id, early_id, with_id)
        _assert_unredacted(world, room.room_id, late_id, late_body)
        found = _search(world, "powerneedle")
        assert late_id in found and early_id not in found, (early_id, late_id, found)
        timeline = _timeline(world, room.room_id)
        assert {early_id, late_id, with_id, without_id} <= set(timeline), timeline

    check()
    world.a.restart()
    check()


class RoomOnE:
    """A version 12 room that lives on E, with history from before A's
    user joins it: built here, each event signed by its sender's server
    (E or T). E answers make_join and send_join for it, E and T answer
    /backfill with all of its history."""

    def __init__(self, world: World, founder: str) -> None:
        self.world = world
        self.rv = get_room_version("12")
        self.pdus: dict[str, dict[str, Any]] = {}
        self.depths: dict[str, int] = {}
        self.state: dict[tuple[str, str], str] = {}
        self.extremities: list[str] = []
        self.room_id = ""
        create_id = self.add("m.room.create", {"room_version": "12"}, founder, state_key="")
        self.room_id = "!" + create_id[1:]

    def add(self, etype: str, content: dict[str, Any], sender: str, state_key: Optional[str] = None,
            prev: Optional[list[str]] = None, redacts: Optional[str] = None) -> str:
        prev = list(self.extremities) if prev is None else prev
        if redacts is not None:
            content = dict(content, redacts=redacts)
        pdu = build_pdu(etype, sender, content, state_key=state_key, room_id=self.room_id or None,
                        prev_events=prev, depth=max((self.depths[p] for p in prev), default=0) + 1,
                        auth_events=auth_event_ids(self.rv, etype, state_key, sender, content, self.state),
                        origin_server_ts=int(time.time() * 1000))
        if redacts is not None:
            pdu["redacts"] = redacts
        server = _server_of(self.world, sender)
        event_id, signed = hash_and_sign_event(self.rv, pdu, server.server_name, server.key)
        self.pdus[event_id] = signed
        self.depths[event_id] = pdu["depth"]
        self.extremities = [e for e in self.extremities if e not in prev] + [event_id]
        if state_key is not None:
            self.state[(etype, state_key)] = event_id
        return event_id

    def message(self, sender: str, body: str, prev: Optional[list[str]] = None, **extra: Any) -> str:
        return self.add("m.room.message", dict({"msgtype": "m.text", "body": body}, **extra), sender, prev=prev)

    def redact(self, sender: str, target: str, prev: Optional[list[str]] = None) -> str:
        return self.add("m.room.redaction", {}, sender, prev=prev, redacts=target)

    def join(self, user_id: str) -> str:
        return self.add("m.room.member", {"membership": "join"}, user_id, state_key=user_id)

    def serve(self) -> None:
        e, t = self.world.e, _third(self.world)

        def make_join(path: str, body: Any) -> tuple[int, Any]:
            user = urllib.parse.unquote(path.split("?")[0].rsplit("/", 1)[1])
            content = {"membership": "join"}
            return 200, {"room_version": "12", "event": build_pdu(
                "m.room.member", user, content, state_key=user, room_id=self.room_id,
                prev_events=list(self.extremities), depth=max(self.depths[p] for p in self.extremities) + 1,
                auth_events=auth_event_ids(self.rv, "m.room.member", user, user, content, self.state),
                origin_server_ts=int(time.time() * 1000))}

        def send_join(path: str, body: Any) -> tuple[int, Any]:
            state = [self.pdus[i] for i in self.state.values()]
            return 200, {"origin": e.server_name, "state": state, "auth_chain": state}

        state_ids = set(self.state.values())

        def backfill(path: str, body: Any) -> tuple[int, Any]:
            history = [p for i, p in self.pdus.items() if i not in state_ids]
            return 200, {"origin": e.server_name, "origin_server_ts": int(time.time() * 1000), "pdus": history}

        e.handlers[:] = [("GET", f"{FED}/v1/make_join/{self.room_id}/", make_join),
                         ("PUT", f"{FED}/v2/send_join/{self.room_id}/", send_join),
                         ("GET", f"{FED}/v1/backfill/{self.room_id}", backfill)]
        t.handlers[:] = [("GET", f"{FED}/v1/backfill/{self.room_id}", backfill)]

    def stop_serving(self) -> None:
        self.world.e.handlers.clear()
        _third(self.world).handlers.clear()


def test_backfilled_redactions_apply_only_from_the_targets_server_or_with_power(world: World) -> None:
    """alice joins a room on E whose earlier history has redactions, and
    pages back into it (A backfills it from E). trudy (T, default level)
    redacted two of mallory's (E) messages: one redaction reaches A before
    its target (it is later in the graph), one after (it is earlier).
    Neither takes effect: both messages are served as they were, found by
    search, one in its parent's relations, and the redactions are in the
    timeline. The founder (E, the room's creator) redacted two of
    trudy's messages, one each way, and eve (E, default level) one of
    mallory's: those take effect."""
    founder, eve, trudy = (f"@founder{time.time_ns()}:{world.e.server_name}", f"@eve:{world.e.server_name}",
                           f"@trudy:{_third(world).server_name}")
    room = RoomOnE(world, founder)
    room.join(founder)
    room.add("m.room.power_levels", {"users": {}, "users_default": 0, "events_default": 0, "state_default": 50,
                                     "redact": 50, "ban": 50, "kick": 50, "invite": 0}, founder, state_key="")
    room.add("m.room.join_rules", {"join_rule": "public"}, founder, state_key="")
    room.add("m.room.history_visibility", {"history_visibility": "shared"}, founder, state_key="")
    room.join(world.mallory)
    room.join(eve)
    trudy_join = room.join(trudy)
    parent = room.message(world.mallory, "parent")
    kept = room.message(world.mallory, "kept backneedle",
                        **{"m.relates_to": {"rel_type": "m.reference", "event_id": parent}})
    kept_first = room.message(world.mallory, "first backneedle")
    by_trudy = room.message(trudy, "by trudy backneedle")
    same_server = room.message(world.mallory, "same server backneedle")
    by_trudy_later = room.message(trudy, "later by trudy backneedle")
    # Later in the graph than their targets: A stores them first.
    refused_first = room.redact(trudy, kept_first)
    founder_first = room.redact(founder, by_trudy)
    eve_first = room.redact(eve, same_server)
    # Earlier in the graph than their targets (side branches): stored after them.
    refused_after = room.redact(trudy, kept, prev=[trudy_join])
    founder_after = room.redact(founder, by_trudy_later, prev=[parent])
    assert room.depths[refused_after] < room.depths[kept]
    assert room.depths[founder_after] < room.depths[by_trudy_later]
    room.serve()
    try:
        status, joined = world.client("POST", f"/join/{q(room.room_id)}?server_name={q(world.e.server_name)}", {})
        assert status == 200, (status, joined, world.a.log())
        seen = len(world.e.requests_seen) + len(_third(world).requests_seen)
        timeline = _timeline(world, room.room_id)
        asked = world.e.requests_seen + _third(world).requests_seen
        assert len(asked) > seen and any("/backfill/" in p for _, p in asked), asked
    finally:
        room.stop_serving()
    history = {parent, kept, kept_first, by_trudy, same_server, by_trudy_later, refused_first, founder_first,
               eve_first, refused_after, founder_after}
    assert history <= set(timeline), (history - set(timeline), timeline)

    def check() -> None:
        assert history <= set(_timeline(world, room.room_id))
        _assert_unredacted(world, room.room_id, kept, "kept backneedle")
        _assert_unredacted(world, room.room_id, kept_first, "first backneedle")
        _assert_redacted(world, room.room_id, by_trudy, founder_first)
        _assert_redacted(world, room.room_id, same_server, eve_first)
        _assert_redacted(world, room.room_id, by_trudy_later, founder_after)
        found = set(_search(world, "backneedle"))
        assert found == {kept, kept_first}, (found, kept, kept_first)
        assert kept in _relations(world, room.room_id, parent)

    check()
    world.a.restart()
    check()
