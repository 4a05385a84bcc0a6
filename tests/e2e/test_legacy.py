"""The legacy Client-Server endpoints end to end: the /events stream (with
long-polling, ``limit`` paging, typing, receipts, account data, tags and
peeking into world_readable rooms), GET /events/{eventId}, global and room
/initialSync, POST send and redact without a transaction ID, and reading
world_readable rooms without joining them.

Spec: client-server-api r0.6 "Syncing" (GET /events, GET /initialSync,
GET /events/{eventId}), "Room initial sync", "Peeking events", "Sending
events", "Redactions", "Room History Visibility".
"""

from __future__ import annotations

import itertools
import threading
import time
import urllib.parse
from typing import Any

from tests.e2e.harness import ClientUser, ZhomeProcess, q

_TXN = itertools.count()


class U(ClientUser):
    def say(self, room_id: str, text: str) -> str:
        return str(self.ok("PUT", f"/rooms/{q(room_id)}/send/m.room.message/lg{next(_TXN)}",
                           {"msgtype": "m.text", "body": text})["event_id"])

    def events(self, **params: Any) -> tuple[int, Any]:
        params.setdefault("timeout", 0)
        return self.req("GET", "/events?" + urllib.parse.urlencode({k: str(v) for k, v in params.items()}))

    def events_ok(self, **params: Any) -> Any:
        status, body = self.events(**params)
        assert status == 200, (status, body)
        assert set(body) >= {"chunk", "start", "end"}, body
        return body


def _room(user: U, **body: Any) -> str:
    return str(user.ok("POST", "/createRoom", body)["room_id"])


def _world_readable(user: U, room_id: str) -> None:
    user.ok("PUT", f"/rooms/{q(room_id)}/state/m.room.history_visibility/",
            {"history_visibility": "world_readable"})


def _bodies(chunk: list[dict[str, Any]]) -> list[str]:
    return [e["content"]["body"] for e in chunk if e.get("type") == "m.room.message"]


def test_event_stream(zhome: ZhomeProcess) -> None:
    alice, bob = U(zhome, "alice"), U(zhome, "bob")
    room = _room(alice, preset="public_chat")
    bob.ok("POST", f"/rooms/{q(room)}/join", {})
    token = alice.events_ok()["end"]

    # Room events of joined rooms, as ClientEvents with their room_id.
    eid = bob.say(room, "hello")
    out = alice.events_ok(**{"from": token})
    assert out["start"] == token
    msgs = [e for e in out["chunk"] if e["type"] == "m.room.message"]
    assert [(m["event_id"], m["room_id"], m["sender"]) for m in msgs] == [(eid, room, bob.user_id)]
    token = out["end"]
    assert alice.events_ok(**{"from": token})["chunk"] == []

    # Typing, receipts, account data and tags, each once.
    bob.ok("PUT", f"/rooms/{q(room)}/typing/{q(bob.user_id)}", {"typing": True, "timeout": 30000})
    bob.ok("POST", f"/rooms/{q(room)}/receipt/m.read/{q(eid)}", {})
    alice.ok("PUT", f"/user/{q(alice.user_id)}/account_data/org.example.global", {"cats": 1})
    alice.ok("PUT", f"/user/{q(alice.user_id)}/rooms/{q(room)}/account_data/org.example.room", {"rats": 2})
    alice.ok("PUT", f"/user/{q(alice.user_id)}/rooms/{q(room)}/tags/work", {"order": 0.5})
    out = alice.events_ok(**{"from": token})
    by_type = {e["type"]: e for e in out["chunk"]}
    assert by_type["m.typing"] == {"type": "m.typing", "room_id": room, "content": {"user_ids": [bob.user_id]}}
    assert by_type["m.receipt"]["room_id"] == room
    assert bob.user_id in by_type["m.receipt"]["content"][eid]["m.read"]
    assert by_type["org.example.global"] == {"type": "org.example.global", "content": {"cats": 1}}
    assert by_type["org.example.room"] == {"type": "org.example.room", "room_id": room, "content": {"rats": 2}}
    assert by_type["m.tag"] == {"type": "m.tag", "room_id": room, "content": {"tags": {"work": {"order": 0.5}}}}
    token = out["end"]
    assert alice.events_ok(**{"from": token})["chunk"] == []
    bob.ok("PUT", f"/rooms/{q(room)}/typing/{q(bob.user_id)}", {"typing": False})
    out = alice.events_ok(**{"from": token})
    assert out["chunk"] == [{"type": "m.typing", "room_id": room, "content": {"user_ids": []}}]
    token = out["end"]

    # limit pages through the stream in order, and the pages join up.
    sent = [bob.say(room, f"m{i}") for i in range(7)]
    seen: list[str] = []
    for _ in range(10):
        out = alice.events_ok(**{"from": token, "limit": 3})
        assert len([e for e in out["chunk"] if e["type"] == "m.room.message"]) <= 3
        seen += [e["event_id"] for e in out["chunk"] if e["type"] == "m.room.message"]
        token = out["end"]
        if len(seen) >= len(sent):
            break
    assert seen == sent

    # Long-polling: the request waits and returns when the event arrives.
    threading.Timer(0.7, lambda: bob.say(room, "late")).start()
    t0 = time.monotonic()
    out = alice.events_ok(**{"from": token, "timeout": 10000})
    assert 0.5 < time.monotonic() - t0 < 8
    assert _bodies(out["chunk"]) == ["late"]
    # Nothing new: the request times out with an empty chunk and the same position.
    t0 = time.monotonic()
    out2 = alice.events_ok(**{"from": out["end"], "timeout": 600})
    assert out2["chunk"] == [] and time.monotonic() - t0 >= 0.5

    # A room the user leaves: the leave reaches them, what follows does not.
    token = out2["end"]
    alice.ok("POST", f"/rooms/{q(room)}/leave", {})
    bob.say(room, "after alice left")
    out = alice.events_ok(**{"from": token})
    assert [(e["type"], e["content"].get("membership")) for e in out["chunk"]] == [("m.room.member", "leave")]

    # An invite reaches the invited user's stream while they wait, and nothing else of that room does.
    token = out["end"]
    other = _room(bob)
    bob.say(other, "before the invite")
    threading.Timer(0.5, lambda: bob.ok("POST", f"/rooms/{q(other)}/invite", {"user_id": alice.user_id})).start()
    out = alice.events_ok(**{"from": token, "timeout": 10000})
    assert [(e["type"], e["room_id"], e["content"].get("membership")) for e in out["chunk"]] == [
        ("m.room.member", other, "invite")]

    # The token is /sync's: it works as a since token and the other way round.
    status, synced = alice.req("GET", "/sync?" + urllib.parse.urlencode({"since": out["end"], "timeout": "0"}))
    assert status == 200, synced
    assert alice.events_ok(**{"from": synced["next_batch"]})["chunk"] == []


def test_event_stream_errors_and_peeking(zhome: ZhomeProcess) -> None:
    alice, bob = U(zhome, "alice"), U(zhome, "bob")
    for params in ({"from": "garbage"}, {"from": "s1_2"}, {"limit": "-2"}, {"limit": "hello"},
                   {"timeout": "hello"}):
        status, body = alice.events(**params)
        assert status == 400 and body["errcode"] == "M_INVALID_PARAM", (params, status, body)
    status, body = zhome.request("GET", "/_matrix/client/v3/events?timeout=0")
    assert status == 401 and body["errcode"] == "M_MISSING_TOKEN"

    private = _room(alice)
    alice.say(private, "secret")
    for room_id in (private, "!nosuchroom:localhost"):
        status, body = bob.events(room_id=room_id)
        assert status == 403 and body["errcode"] == "M_FORBIDDEN", (status, body)
    # Private rooms never leak into the stream of a user not in them.
    token = bob.events_ok()["end"]
    alice.say(private, "still secret")
    assert bob.events_ok(**{"from": token})["chunk"] == []

    # A world_readable room streams to anyone who names it, typing and receipts included.
    public = _room(alice)
    _world_readable(alice, public)
    token = bob.events_ok(room_id=public)["end"]
    eid = alice.say(public, "mice")
    out = bob.events_ok(room_id=public, **{"from": token})
    assert _bodies(out["chunk"]) == ["mice"] and out["chunk"][0]["room_id"] == public
    alice.ok("POST", f"/rooms/{q(public)}/receipt/m.read/{q(eid)}", {})
    alice.ok("PUT", f"/rooms/{q(public)}/typing/{q(alice.user_id)}", {"typing": True, "timeout": 30000})
    out = bob.events_ok(room_id=public, **{"from": out["end"]})
    types = {e["type"]: e for e in out["chunk"]}
    assert types["m.typing"]["content"]["user_ids"] == [alice.user_id]
    assert alice.user_id in types["m.receipt"]["content"][eid]["m.read"]
    # Without room_id, bob's own stream does not carry the room he is not in.
    assert bob.events_ok(**{"from": token})["chunk"] == []


def test_get_single_event(zhome: ZhomeProcess) -> None:
    alice, bob = U(zhome, "alice"), U(zhome, "bob")
    room = _room(alice)
    eid = alice.say(room, "one")
    got = alice.ok("GET", f"/events/{q(eid)}")
    assert (got["event_id"], got["room_id"], got["content"]["body"]) == (eid, room, "one")
    status, body = bob.req("GET", f"/events/{q(eid)}")
    assert status == 404 and body["errcode"] == "M_NOT_FOUND"
    status, body = alice.req("GET", f"/events/{q('$nosuchevent')}")
    assert status == 404 and body["errcode"] == "M_NOT_FOUND"
    # Visible to a non-member once the room is world_readable, from then on.
    _world_readable(alice, room)
    later = alice.say(room, "two")
    assert bob.ok("GET", f"/events/{q(later)}")["content"]["body"] == "two"
    assert bob.req("GET", f"/events/{q(eid)}")[0] == 404


def test_initial_sync(zhome: ZhomeProcess) -> None:
    alice, bob = U(zhome, "alice"), U(zhome, "bob")
    room = _room(alice, preset="public_chat", visibility="public", topic="the topic",
                 room_version="10", power_level_content_override={"users": {alice.user_id: 100, bob.user_id: 50}})
    bob.ok("POST", f"/rooms/{q(room)}/join", {})
    first = bob.say(room, "m1")
    bob.say(room, "m2")
    alice.ok("POST", f"/rooms/{q(room)}/receipt/m.read/{q(first)}", {})
    alice.ok("PUT", f"/user/{q(alice.user_id)}/account_data/org.example.global", {"cats": 1})
    alice.ok("PUT", f"/user/{q(alice.user_id)}/rooms/{q(room)}/account_data/org.example.room", {"rats": 2})
    alice.ok("PUT", f"/user/{q(alice.user_id)}/rooms/{q(room)}/tags/work", {})
    invite_room = _room(bob)
    bob.ok("POST", f"/rooms/{q(invite_room)}/invite", {"user_id": alice.user_id})

    out = alice.ok("GET", "/initialSync?limit=3")
    assert set(out) >= {"end", "rooms", "presence", "account_data", "receipts"}
    # Presence of the user and of those sharing a room, the user also in the content, as these endpoints served it.
    presence = {p["content"]["user_id"]: p for p in out["presence"]}
    assert set(presence) == {alice.user_id, bob.user_id}
    assert all(p["type"] == "m.presence" and p["sender"] == u for u, p in presence.items())
    rooms = {r["room_id"]: r for r in out["rooms"]}
    assert set(rooms) == {room, invite_room}
    joined = rooms[room]
    assert (joined["membership"], joined["visibility"]) == ("join", "public")
    assert _bodies(joined["messages"]["chunk"]) == ["m1", "m2"]
    assert len(joined["messages"]["chunk"]) == 3
    assert all(e["room_id"] == room for e in joined["messages"]["chunk"])
    state = {(e["type"], e["state_key"]): e for e in joined["state"]}
    assert state[("m.room.topic", "")]["content"]["topic"] == "the topic"
    assert state[("m.room.member", bob.user_id)]["content"]["membership"] == "join"
    assert joined["account_data"][0]["type"] == "m.tag"
    assert {e["type"] for e in joined["account_data"]} == {"m.tag", "org.example.room"}
    assert {"type": "org.example.global", "content": {"cats": 1}} in out["account_data"]
    receipt = [r for r in out["receipts"] if r["room_id"] == room][0]
    assert alice.user_id in receipt["content"][first]["m.read"]
    invited = rooms[invite_room]
    assert invited["membership"] == "invite" and invited["invite"]["content"]["membership"] == "invite"

    # The end token continues as an /events stream; start pages back with /messages.
    later = bob.say(room, "m3")
    assert [e["event_id"] for e in alice.events_ok(**{"from": out["end"]})["chunk"]] == [later]
    back = alice.ok("GET", f"/rooms/{q(room)}/messages?" + urllib.parse.urlencode(
        {"from": joined["messages"]["start"], "dir": "b", "limit": "50"}))
    assert not {e["event_id"] for e in back["chunk"]} & {e["event_id"] for e in joined["messages"]["chunk"]}
    assert back["chunk"], "the start token leads to earlier history"

    none = {r["room_id"]: r for r in alice.ok("GET", "/initialSync?limit=0")["rooms"]}
    assert none[room]["messages"]["chunk"] == []
    for bad in ("limit=hello", "limit=-1", "archived=maybe"):
        status, body = alice.req("GET", "/initialSync?" + bad)
        assert status == 400 and body["errcode"] == "M_INVALID_PARAM", (bad, status, body)

    # A departed room shows only with archived=true, as it was when the user left.
    bob.ok("PUT", f"/rooms/{q(room)}/state/m.room.topic/", {"topic": "before"})
    alice.ok("POST", f"/rooms/{q(room)}/leave", {})
    bob.ok("PUT", f"/rooms/{q(room)}/state/m.room.topic/", {"topic": "after"})
    bob.say(room, "after alice left")
    assert room not in {r["room_id"] for r in alice.ok("GET", "/initialSync")["rooms"]}
    left = {r["room_id"]: r for r in alice.ok("GET", "/initialSync?archived=true&limit=2")["rooms"]}[room]
    assert left["membership"] == "leave"
    assert [e["type"] for e in left["messages"]["chunk"]] == ["m.room.topic", "m.room.member"]
    assert {(e["type"], e["state_key"]): e for e in left["state"]}[("m.room.topic", "")]["content"] == {
        "topic": "before"}


def test_room_initial_sync(zhome: ZhomeProcess) -> None:
    alice, bob, carol = U(zhome, "alice"), U(zhome, "bob"), U(zhome, "carol")
    room = _room(alice, preset="public_chat",
                 room_version="10", power_level_content_override={"users": {alice.user_id: 100, bob.user_id: 50}})
    bob.ok("POST", f"/rooms/{q(room)}/join", {})
    eid = alice.say(room, "private")
    bob.ok("POST", f"/rooms/{q(room)}/receipt/m.read/{q(eid)}", {})
    alice.ok("PUT", f"/user/{q(alice.user_id)}/rooms/{q(room)}/tags/fun", {})

    out = alice.ok("GET", f"/rooms/{q(room)}/initialSync")
    assert set(out) >= {"room_id", "membership", "messages", "state", "presence", "receipts", "account_data"}
    assert (out["room_id"], out["membership"]) == (room, "join")
    assert {p["content"]["user_id"] for p in out["presence"]} == {alice.user_id, bob.user_id}
    assert set(out["messages"]) >= {"chunk", "start", "end"}
    assert _bodies(out["messages"]["chunk"]) == ["private"]
    assert {e["type"] for e in out["state"]} >= {"m.room.create", "m.room.join_rules", "m.room.member"}
    assert out["account_data"] == [{"type": "m.tag", "content": {"tags": {"fun": {}}}}]
    assert bob.user_id in out["receipts"][0]["content"][eid]["m.read"]
    assert alice.ok("GET", f"/rooms/{q(room)}/initialSync?limit=0")["messages"]["chunk"] == []
    status, body = alice.req("GET", f"/rooms/{q(room)}/initialSync?limit=x")
    assert status == 400 and body["errcode"] == "M_INVALID_PARAM"

    # Not a member of a room that is not world_readable, or no such room: forbidden.
    for room_id in (room, "!nosuchroom:localhost"):
        status, body = carol.req("GET", f"/rooms/{q(room_id)}/initialSync")
        assert status == 403 and body["errcode"] == "M_FORBIDDEN", (status, body)

    # A departed member sees the room as it was when they left.
    bob.ok("PUT", f"/rooms/{q(room)}/state/m.room.name/", {"name": "before"})
    bob.say(room, "bob before leaving")
    bob.ok("POST", f"/rooms/{q(room)}/leave", {})
    alice.ok("PUT", f"/rooms/{q(room)}/state/m.room.name/", {"name": "after"})
    alice.say(room, "after bob left")
    gone = bob.ok("GET", f"/rooms/{q(room)}/initialSync?limit=2")
    assert gone["membership"] == "leave"
    assert _bodies(gone["messages"]["chunk"]) == ["bob before leaving"]
    assert gone["messages"]["chunk"][1]["content"]["membership"] == "leave"
    assert {(e["type"], e["state_key"]): e for e in gone["state"]}[("m.room.name", "")]["content"] == {
        "name": "before"}
    assert gone["receipts"] == [] and gone["presence"] == []

    # world_readable: a user who never joined reads from the change on.
    _world_readable(alice, room)
    alice.say(room, "public")
    peek = carol.ok("GET", f"/rooms/{q(room)}/initialSync")
    assert peek["room_id"] == room
    assert [e["type"] for e in peek["messages"]["chunk"]] == ["m.room.history_visibility", "m.room.message"]
    assert _bodies(peek["messages"]["chunk"]) == ["public"]
    assert ("m.room.name", "") in {(e["type"], e["state_key"]) for e in peek["state"]}
    # Its messages.end is an /events token for the room.
    later = alice.say(room, "later")
    streamed = carol.events_ok(room_id=room, **{"from": peek["messages"]["end"]})
    assert [e["event_id"] for e in streamed["chunk"] if e["type"] == "m.room.message"] == [later]


def test_post_send_and_redact(zhome: ZhomeProcess) -> None:
    alice, bob = U(zhome, "alice"), U(zhome, "bob")
    room = _room(alice)
    post = f"/rooms/{q(room)}/send/m.room.message"
    eid = alice.ok("POST", post, {"msgtype": "m.text", "body": "posted"})["event_id"]
    eid2 = alice.ok("POST", post, {"msgtype": "m.text", "body": "posted"})["event_id"]
    assert eid != eid2, "without a transaction ID every POST is a new event"
    got = alice.ok("GET", f"/rooms/{q(room)}/event/{q(eid)}")
    assert got["content"]["body"] == "posted" and "transaction_id" not in got.get("unsigned", {})

    status, body = bob.req("POST", f"/rooms/{q(room)}/send/m.room.message", {"msgtype": "m.text", "body": "x"})
    assert status == 403 and body["errcode"] == "M_FORBIDDEN"
    status, body = alice.req("POST", f"/rooms/{q(room)}/send/m.room.redaction", {"redacts": eid})
    assert status == 400
    status, body = alice.hs.request("POST", f"/_matrix/client/v3/rooms/{q(room)}/send/m.room.message",
                                    raw=b"{not json", token=alice.token)
    assert status == 400 and body["errcode"] == "M_NOT_JSON"
    status, body = alice.req("POST", f"/rooms/{q(room)}/send/m.room.message",
                             {"msgtype": "m.text", "body": "A" * 70000})
    assert status == 413, (status, body)

    red = alice.ok("POST", f"/rooms/{q(room)}/redact/{q(eid)}", {"reason": "oops"})["event_id"]
    got = alice.ok("GET", f"/rooms/{q(room)}/event/{q(eid)}")
    assert got["content"] == {} and got["unsigned"]["redacted_because"]["event_id"] == red
    assert got["unsigned"]["redacted_by"] == red
    status, body = alice.req("POST", f"/rooms/{q(room)}/redact/{q('$nosuchevent')}", {})
    assert status == 404 and body["errcode"] == "M_NOT_FOUND"
    status, body = bob.req("POST", f"/rooms/{q(room)}/redact/{q(eid2)}", {})
    assert status == 403, (status, body)


def test_world_readable_rooms_without_joining(zhome: ZhomeProcess) -> None:
    alice, bob = U(zhome, "alice"), U(zhome, "bob")
    room = _room(alice)
    alice.say(room, "shared history")
    paths = ("/state", f"/state/m.room.member/{q(alice.user_id)}", "/messages?dir=b&limit=10")
    for path in paths:
        status, body = bob.req("GET", f"/rooms/{q(room)}{path}")
        assert status == 403 and body["errcode"] == "M_FORBIDDEN", (path, status, body)

    _world_readable(alice, room)
    alice.say(room, "world readable")
    state = bob.ok("GET", f"/rooms/{q(room)}/state")
    assert ("m.room.history_visibility", "") in {(e["type"], e["state_key"]) for e in state}
    member = bob.ok("GET", f"/rooms/{q(room)}/state/m.room.member/{q(alice.user_id)}")
    assert member["membership"] == "join"
    status, body = bob.req("GET", f"/rooms/{q(room)}/state/m.room.member/{q(bob.user_id)}")
    assert status == 404 and body["errcode"] == "M_NOT_FOUND"
    msgs = bob.ok("GET", f"/rooms/{q(room)}/messages?dir=b&limit=10")
    assert _bodies(msgs["chunk"]) == ["world readable"], msgs
    # Sending still needs membership.
    status, body = bob.req("PUT", f"/rooms/{q(room)}/send/m.room.message/x1", {"msgtype": "m.text", "body": "hi"})
    assert status == 403


def test_history_visibility_boundaries(zhome: ZhomeProcess) -> None:
    """A member joining later sees each change of history visibility that either side of it lets them see."""
    alice, bob = U(zhome, "alice"), U(zhome, "bob")
    room = _room(alice, preset="public_chat")
    ids = {}
    for hv in ("joined", "invited", "shared"):
        ids[hv] = alice.ok("PUT", f"/rooms/{q(room)}/state/m.room.history_visibility/",
                           {"history_visibility": hv})["event_id"]
        alice.say(room, f"under {hv}")
    bob.ok("POST", f"/rooms/{q(room)}/join", {})
    chunk = list(reversed(bob.ok("GET", f"/rooms/{q(room)}/messages?dir=b&limit=50")["chunk"]))
    seen = [e.get("content", {}).get("history_visibility") or e["content"].get("body") or e["type"]
            for e in chunk if e["type"] in ("m.room.history_visibility", "m.room.message")]
    # "joined" is seen (the room was shared before it), "invited" is not (joined before, invited after),
    # "shared" is; of the messages only the one under "shared".
    assert seen[-3:] == ["joined", "shared", "under shared"], seen
    assert ids["invited"] not in {e["event_id"] for e in chunk}
