"""/sync state, lazy-loaded members and filters, through a real zhome on
SQLite and PostgreSQL.

Spec: client-server-api "Syncing" (state is the delta from ``since`` to the
start of the timeline), "Lazy-loading room members", "Filtering".
"""

from __future__ import annotations

import json
import time
from typing import Any, Optional
from urllib.parse import quote

from tests.e2e.harness import ClientUser, ZhomeProcess

LL = {"room": {"state": {"lazy_load_members": True}, "timeline": {"limit": 10}}}


def q(s: str) -> str:
    return quote(s, safe="")


class U(ClientUser):
    def sync(self, since: Optional[str] = None, flt: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        path = "/sync?timeout=0"
        if since:
            path += "&since=" + q(since)
        if flt is not None:
            path += "&filter=" + q(json.dumps(flt))
        return dict(self.ok("GET", path))

    def room(self, body: dict[str, Any], room_id: str, section: str = "join") -> dict[str, Any]:
        return dict(body.get("rooms", {}).get(section, {}).get(room_id) or {})

    def create(self, **body: Any) -> str:
        return str(self.ok("POST", "/createRoom", body)["room_id"])

    def join(self, room_id: str) -> None:
        self.ok("POST", f"/join/{q(room_id)}", {})

    def leave(self, room_id: str) -> None:
        self.ok("POST", f"/rooms/{q(room_id)}/leave", {})

    def send(self, room_id: str, body: str = "hi", etype: str = "m.room.message") -> str:
        txn = f"t{time.monotonic_ns()}"
        return str(self.ok("PUT", f"/rooms/{q(room_id)}/send/{etype}/{txn}",
                           {"msgtype": "m.text", "body": body})["event_id"])

    def put_state(self, room_id: str, etype: str, content: dict[str, Any], state_key: str = "") -> str:
        return str(self.ok("PUT", f"/rooms/{q(room_id)}/state/{etype}/{q(state_key)}", content)["event_id"])


def state_of(room: dict[str, Any]) -> list[dict[str, Any]]:
    return list(room.get("state", {}).get("events", []))


def members_in_state(room: dict[str, Any]) -> dict[str, str]:
    return {e["state_key"]: e["content"]["membership"] for e in state_of(room) if e["type"] == "m.room.member"}


def test_gapped_sync_has_state_changes_of_the_gap(zhome: ZhomeProcess) -> None:
    alice = U(zhome, "alice")
    flt = {"room": {"timeline": {"types": ["a.filler"], "limit": 1}, "state": {"types": ["a.state"]}}}
    room = alice.create()
    alice.put_state(room, "a.state", {"v": 1}, "changes")
    alice.put_state(room, "a.state", {"v": 1}, "stays")
    first = alice.sync(flt=flt)
    # No filler yet: the timeline is empty and the state is all of it.
    assert sorted(e["state_key"] for e in state_of(alice.room(first, room))) == ["changes", "stays"]
    assert alice.room(first, room)["timeline"]["events"] == []
    alice.put_state(room, "a.state", {"v": 2}, "changes")
    for i in range(5):
        alice.send(room, f"f{i}", etype="a.filler")
    body = alice.sync(first["next_batch"], flt)
    r = alice.room(body, room)
    assert r["timeline"]["limited"] is True and len(r["timeline"]["events"]) == 1
    assert [(e["state_key"], e["content"]["v"]) for e in state_of(r)] == [("changes", 2)], state_of(r)


def test_newly_joined_room_has_full_state(zhome: ZhomeProcess) -> None:
    alice, bob = U(zhome, "alice"), U(zhome, "bob")
    flt = {"room": {"timeline": {"types": []}, "state": {"types": ["a.state"]}}}
    room = alice.create(preset="public_chat")
    alice.put_state(room, "a.state", {"v": 1})
    first = bob.sync(flt=flt)
    bob.join(room)
    r = bob.room(bob.sync(first["next_batch"], flt), room)
    assert [(e["type"], e["content"]) for e in state_of(r)] == [("a.state", {"v": 1})], r


def test_join_and_leave_in_one_batch_gives_full_state(zhome: ZhomeProcess) -> None:
    alice, bob = U(zhome, "alice"), U(zhome, "bob")
    flt = {"room": {"timeline": {"types": []}, "state": {"types": ["a.state"]}, "include_leave": True}}
    room = alice.create(preset="public_chat")
    alice.put_state(room, "a.state", {"v": 1})
    first = bob.sync(flt=flt)
    bob.join(room)
    bob.leave(room)
    r = bob.room(bob.sync(first["next_batch"], flt), room, "leave")
    assert [(e["type"], e["content"]) for e in state_of(r)] == [("a.state", {"v": 1})], r


def test_displayname_change_is_incremental(zhome: ZhomeProcess) -> None:
    alice = U(zhome, "alice")
    room = alice.create()
    first = alice.sync()
    member = alice.put_state(room, "m.room.member", {"membership": "join", "displayname": "boris"},
                             alice.user_id)
    msg = alice.send(room, "after the rename")
    r = alice.room(alice.sync(first["next_batch"]), room)
    assert [e["event_id"] for e in r["timeline"]["events"]] == [member, msg], r["timeline"]
    assert r["timeline"]["limited"] is False and state_of(r) == []
    # With members and messages filtered out, nothing at all is left to say.
    flt = {"room": {"timeline": {"types": []}, "state": {"types": ["a.state"]}}}
    alice.put_state(room, "a.state", {"v": 1})
    mid = alice.sync(flt=flt)
    alice.put_state(room, "m.room.member", {"membership": "join", "displayname": "natasha"}, alice.user_id)
    alice.send(room, "again")
    assert room not in alice.sync(mid["next_batch"], flt).get("rooms", {}).get("join", {})


def test_current_state_appears_in_timeline_in_private_history(zhome: ZhomeProcess) -> None:
    creator, syncer, invitee = U(zhome, "creator"), U(zhome, "syncer"), U(zhome, "invitee")
    room = creator.create(preset="public_chat")
    syncer.join(room)
    creator.put_state(room, "m.room.history_visibility", {"history_visibility": "joined"})
    creator.ok("POST", f"/rooms/{q(room)}/invite", {"user_id": invitee.user_id})
    first = syncer.sync()
    syncer.leave(room)
    invitee.join(room)
    for i in range(15):
        creator.send(room, f"while away {i}")
    syncer.join(room)
    r = syncer.room(syncer.sync(first["next_batch"]), room)
    joins = [e for e in r["timeline"]["events"]
             if e["type"] == "m.room.member" and e["state_key"] == invitee.user_id]
    assert joins and joins[-1]["content"]["membership"] == "join", r["timeline"]
    # What was said while the syncer was away stays hidden.
    assert not any(e["content"].get("body", "").startswith("while away") for e in r["timeline"]["events"])


def test_lazy_loading_members(zhome: ZhomeProcess) -> None:
    alice, bob, charlie, dave = U(zhome, "alice"), U(zhome, "bob"), U(zhome, "charlie"), U(zhome, "dave")
    room = alice.create(preset="public_chat")
    alice.put_state(room, "m.room.name", {"name": "LL"})
    bob.join(room)
    charlie.join(room)
    for i in range(10):
        bob.send(room, f"bob {i}")
    # Initial: only senders of the timeline and the user themself.
    first = alice.sync(flt=LL)
    r = alice.room(first, room)
    assert members_in_state(r) == {alice.user_id: "join", bob.user_id: "join"}, state_of(r)
    assert any(e["type"] == "m.room.name" for e in state_of(r))
    # Incremental: a new speaker's member event comes with their message.
    charlie.send(room, "hello from charlie")
    second = alice.sync(first["next_batch"], LL)
    assert members_in_state(alice.room(second, room)) == {charlie.user_id: "join"}
    # ... and is not sent again when they speak again (not redundantly).
    charlie.send(room, "charlie again")
    third = alice.sync(second["next_batch"], LL)
    r = alice.room(third, room)
    assert len(r["timeline"]["events"]) == 1 and members_in_state(r) == {}, r
    # Unless the filter asks for redundant members.
    redundant = {"room": {"state": {"lazy_load_members": True, "include_redundant_members": True},
                          "timeline": {"limit": 10}}}
    bob.send(room, "bob again")
    charlie.send(room, "and charlie")
    r = alice.room(alice.sync(third["next_batch"], redundant), room)
    assert members_in_state(r) == {bob.user_id: "join", charlie.user_id: "join"}, state_of(r)
    for i in range(10):
        bob.send(room, f"bob fill {i}")
    # A fresh initial sync (a new device would do the same) knows only bob.
    pos = alice.sync(flt=LL)["next_batch"]

    # Gapped: members who changed in the gap are included though silent,
    # and old members who start speaking.
    dave.join(room)
    for i in range(15):
        charlie.send(room, f"charlie fill {i}")
    body = alice.sync(pos, LL)
    r = alice.room(body, room)
    assert r["timeline"]["limited"] is True
    assert members_in_state(r) == {charlie.user_id: "join", dave.user_id: "join"}, state_of(r)
    # An old leave is in the next gapped sync; charlie is known by now.
    dave.leave(room)
    for i in range(15):
        charlie.send(room, f"charlie more {i}")
    r = alice.room(alice.sync(body["next_batch"], LL), room)
    assert members_in_state(r) == {dave.user_id: "leave"}, state_of(r)


def test_context_lazy_loads_members(zhome: ZhomeProcess) -> None:
    alice, bob = U(zhome, "alice"), U(zhome, "bob")
    room = alice.create(preset="public_chat")
    bob.join(room)
    alice.send(room, "one")
    eid = alice.send(room, "two")
    flt = q(json.dumps({"lazy_load_members": True}))
    body = alice.ok("GET", f"/rooms/{q(room)}/context/{q(eid)}?limit=2&filter={flt}")
    members = [e["state_key"] for e in body["state"] if e["type"] == "m.room.member"]
    assert members == [alice.user_id], body["state"]
    body = alice.ok("GET", f"/rooms/{q(room)}/context/{q(eid)}?limit=2")
    assert {e["state_key"] for e in body["state"] if e["type"] == "m.room.member"} == {alice.user_id, bob.user_id}


def test_sync_filters(zhome: ZhomeProcess) -> None:
    alice = U(zhome, "alice")
    room = alice.create()
    msg = alice.send(room, "my message")
    for i in range(12):
        alice.send(room, f"f{i}", etype="a.filler")
    # A JSON filter in the query, limit 0: state only.
    r = alice.room(alice.sync(flt={"room": {"timeline": {"limit": 0}, "state": {"types": ["m.room.member"]}}}),
                   room)
    assert r["timeline"]["events"] == [] and r["timeline"]["limited"] is True
    assert [e["type"] for e in state_of(r)] == ["m.room.member"]
    # A filtered timeline reaches back for its limit, and is not limited
    # when that is all there is.
    r = alice.room(alice.sync(flt={"room": {"timeline": {"limit": 1, "types": ["m.room.message"]},
                                            "state": {"types": []}}}), room)
    assert [e["event_id"] for e in r["timeline"]["events"]] == [msg] and r["timeline"]["limited"] is False
    assert state_of(r) == []
    # The federation format.
    r = alice.room(alice.sync(flt={"event_format": "federation", "room": {"timeline": {"limit": 1}}}), room)
    ev = r["timeline"]["events"][0]
    for key in ("event_id", "room_id", "sender", "origin_server_ts", "type", "content", "prev_events",
                "auth_events", "depth", "hashes", "signatures"):
        assert key in ev, (key, ev)
    # Bad filters are 400s.
    for raw in ("{not json", json.dumps({"room": {"timeline": {"limit": -1}}}), json.dumps({"room": []})):
        code, body = alice.req("GET", "/sync?timeout=0&filter=" + q(raw))
        assert code == 400 and body["errcode"] in ("M_BAD_JSON", "M_INVALID_PARAM", "M_NOT_JSON"), (raw, body)


def test_state_never_runs_ahead_of_the_timeline(zhome: ZhomeProcess) -> None:
    """Events persisted while a sync response is being assembled belong to
    the next one: no response may carry in ``state`` an event that a later
    response then brings in its timeline (the client would apply it as
    state from before events that precede it). createRoom writes its
    events one by one, so syncs racing it see the room mid-creation."""
    import threading

    u = U(zhome, "racer")
    token = u.sync()["next_batch"]
    creating = threading.Event()
    errors: list[BaseException] = []

    def create_rooms() -> None:
        try:
            for i in range(8):
                u.create(name=f"room {i}", topic="t", preset="private_chat", initial_state=[
                    {"type": "m.room.encryption", "state_key": "", "content": {"algorithm": "m.megolm.v1.aes-sha2"}},
                    {"type": "x.extra", "state_key": "a", "content": {}},
                    {"type": "x.extra", "state_key": "b", "content": {}},
                ])
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
        finally:
            creating.set()

    t = threading.Thread(target=create_rooms)
    t.start()
    responses: list[dict[str, Any]] = []
    deadline = time.monotonic() + 60
    while not creating.is_set() and time.monotonic() < deadline:
        body = u.sync(token)
        responses.append(body)
        token = body["next_batch"]
    t.join(timeout=60)
    assert not errors, errors
    responses.append(u.sync(token))
    assert len(responses) > 2

    seen_in_state: dict[str, int] = {}
    for i, body in enumerate(responses):
        for room_id, room in body.get("rooms", {}).get("join", {}).items():
            for e in room.get("timeline", {}).get("events", []):
                assert e["event_id"] not in seen_in_state, (
                    f"{e['type']} {e['event_id']} came as state in sync {seen_in_state.get(e['event_id'])}"
                    f" and again in the timeline of sync {i}")
            for e in state_of(room):
                seen_in_state[e["event_id"]] = i
