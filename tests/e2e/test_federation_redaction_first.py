"""A redaction that reaches a real zhome before the event it redacts.

Over federation a redaction can arrive before its target (the target is
not among its prev events, so nothing makes the sender send it first).
zhome records it then, before it can tell the target's room. A fake
remote server "E" (the one of test_federation_hostile.py) sends the
redaction first and the target after, as raw signed PDUs.

Spec: rooms/v3 and later "Handling redactions" and client-server-api
"Redactions" (a redaction applies only to an event of its own room; a
server should remove the redacted content), client-server-api "Receiving
notifications" (counts are of notifying events: a redacted one is none),
"Server Side Search".
"""

from __future__ import annotations

import time
from typing import Any, Iterator, Optional

import pytest

from tests.e2e.harness import q
from tests.e2e.test_federation_hostile import FED, RemoteRoom, World, _join, hostile_world

WAIT_S = 10.0


@pytest.fixture(scope="module", params=["sqlite3", "postgres"])
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """A with alice's public room, and E with @mallory joined to it."""
    yield from hostile_world(request.param, tmp_path_factory.mktemp(f"redaction-first-{request.param}"))


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
