"""Rooms end to end: creation (presets, versions, initial state, power
levels, direct invites), membership (join by alias and ID, invite, kick,
ban, unban, knock, forget), sending with transaction IDs, redaction,
/context, /members, /joined_members, aliases, the room directory and state
for former members.

Spec: client-server-api "Rooms", "Room membership", "Redactions",
"Room directory", "Room aliases".
"""

from __future__ import annotations

import itertools
import json
import urllib.parse
from typing import Any, Optional

from tests.e2e.harness import CS, ClientUser, ZhomeProcess, q

_TXN = itertools.count()


class U(ClientUser):
    """A registered user with small helpers around ``zhome.request``."""

    def create(self, **body: Any) -> str:
        return str(self.ok("POST", "/createRoom", body)["room_id"])

    def send(self, room_id: str, text: str, txn: Optional[str] = None) -> str:
        txn = txn or f"t{next(_TXN)}"
        return str(self.ok("PUT", f"/rooms/{q(room_id)}/send/m.room.message/{txn}",
                           {"msgtype": "m.text", "body": text})["event_id"])

    def state(self, room_id: str) -> list[dict[str, Any]]:
        return list(self.ok("GET", f"/rooms/{q(room_id)}/state"))

    def state_event(self, room_id: str, etype: str, key: str = "") -> tuple[int, Any]:
        return self.req("GET", f"/rooms/{q(room_id)}/state/{etype}/{q(key)}")

    def sync(self, since: Optional[str] = None, flt: Optional[dict[str, Any]] = None) -> Any:
        params = {"timeout": "0"}
        if since:
            params["since"] = since
        if flt is not None:
            params["filter"] = json.dumps(flt)
        return self.ok("GET", "/sync?" + urllib.parse.urlencode(params))

    def messages(self, room_id: str, limit: int = 50) -> list[dict[str, Any]]:
        return list(self.ok("GET", f"/rooms/{q(room_id)}/messages?dir=b&limit={limit}")["chunk"])


def _by_type(state: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(e["type"], e["state_key"]): e for e in state}


# -- creation -------------------------------------------------------------------


def test_create_room_presets_and_options(zhome: ZhomeProcess) -> None:
    alice, bob = U(zhome, "alice"), U(zhome, "bob")

    public = alice.create(preset="public_chat", name="Lobby", topic="Say hi")
    st = _by_type(alice.state(public))
    assert st[("m.room.join_rules", "")]["content"]["join_rule"] == "public"
    assert st[("m.room.history_visibility", "")]["content"]["history_visibility"] == "shared"
    assert st[("m.room.guest_access", "")]["content"]["guest_access"] == "forbidden"
    assert st[("m.room.name", "")]["content"]["name"] == "Lobby"
    assert st[("m.room.topic", "")]["content"]["topic"] == "Say hi"
    assert st[("m.room.member", alice.user_id)]["content"]["membership"] == "join"

    private = alice.create(preset="private_chat")
    st = _by_type(alice.state(private))
    assert st[("m.room.join_rules", "")]["content"]["join_rule"] == "invite"
    assert st[("m.room.guest_access", "")]["content"]["guest_access"] == "can_join"

    # trusted_private_chat: invitees get the creator's power (v11: a power
    # level of 100; v12: they become additional creators).
    trusted11 = alice.create(preset="trusted_private_chat", invite=[bob.user_id], room_version="11")
    st = _by_type(alice.state(trusted11))
    assert st[("m.room.join_rules", "")]["content"]["join_rule"] == "invite"
    users = st[("m.room.power_levels", "")]["content"]["users"]
    assert users[bob.user_id] == users[alice.user_id] == 100
    assert st[("m.room.member", bob.user_id)]["content"]["membership"] == "invite"
    trusted12 = alice.create(preset="trusted_private_chat", invite=[bob.user_id], room_version="12")
    st = _by_type(alice.state(trusted12))
    assert st[("m.room.create", "")]["content"]["additional_creators"] == [bob.user_id]

    # initial_state and a power level override.
    custom = alice.create(
        preset="private_chat",
        initial_state=[
            {"type": "org.example.ward", "state_key": "", "content": {"ward": "7B"}},
            {"type": "m.room.history_visibility", "content": {"history_visibility": "joined"}},
        ],
        power_level_content_override={"events_default": 7, "state_default": 60},
    )
    st = _by_type(alice.state(custom))
    assert st[("org.example.ward", "")]["content"] == {"ward": "7B"}
    assert st[("m.room.history_visibility", "")]["content"]["history_visibility"] == "joined"
    pl = st[("m.room.power_levels", "")]["content"]
    assert pl["events_default"] == 7 and pl["state_default"] == 60
    status, body = alice.state_event(custom, "org.example.ward")
    assert status == 200 and body == {"ward": "7B"}

    # Invalid presets and versions are refused.
    status, body = alice.req("POST", "/createRoom", {"preset": "party"})
    assert status == 400
    status, body = alice.req("POST", "/createRoom", {"room_version": "999"})
    assert status == 400 and body["errcode"] == "M_UNSUPPORTED_ROOM_VERSION"


def test_room_versions(zhome: ZhomeProcess) -> None:
    alice = U(zhome, "alice")
    for version in ("10", "11", "12"):
        room_id = alice.create(room_version=version)
        create = _by_type(alice.state(room_id))[("m.room.create", "")]
        assert create["content"]["room_version"] == version
        assert create["sender"] == alice.user_id
        if version == "10":
            assert create["content"]["creator"] == alice.user_id
        else:
            assert "creator" not in create["content"]
        if version == "12":
            assert create["event_id"].startswith("$")
            assert room_id == "!" + create["event_id"][1:]
        else:
            assert room_id.endswith(":localhost")
        # The room works: a message can be sent and read back.
        eid = alice.send(room_id, f"hello v{version}")
        assert alice.messages(room_id, 1)[0]["event_id"] == eid


def test_is_direct_invite(zhome: ZhomeProcess) -> None:
    alice, bob = U(zhome, "alice"), U(zhome, "bob")
    room_id = alice.create(preset="trusted_private_chat", invite=[bob.user_id], is_direct=True)
    invite = bob.sync()["rooms"]["invite"][room_id]["invite_state"]["events"]
    mine = [e for e in invite if e["type"] == "m.room.member" and e["state_key"] == bob.user_id]
    assert mine and mine[0]["content"]["membership"] == "invite"
    assert mine[0]["content"].get("is_direct") is True
    assert mine[0]["sender"] == alice.user_id


# -- membership -------------------------------------------------------------------


def test_join_by_alias_and_id(zhome: ZhomeProcess) -> None:
    alice, bob, carol = U(zhome, "alice"), U(zhome, "bob"), U(zhome, "carol")
    body = alice.ok("POST", "/createRoom", {"preset": "public_chat", "room_alias_name": "lobby"})
    room_id = body["room_id"]
    assert body["room_alias"] == "#lobby:localhost"
    assert bob.ok("POST", "/join/" + q("#lobby:localhost"), {})["room_id"] == room_id
    assert carol.ok("POST", f"/rooms/{q(room_id)}/join", {})["room_id"] == room_id
    joined = alice.ok("GET", f"/rooms/{q(room_id)}/joined_members")["joined"]
    assert set(joined) == {alice.user_id, bob.user_id, carol.user_id}
    assert bob.ok("GET", "/joined_rooms")["joined_rooms"] == [room_id]
    status, body = bob.req("POST", "/join/" + q("#nothing:localhost"), {})
    assert status == 404 and body["errcode"] == "M_NOT_FOUND"


def test_invite_kick_ban_unban(zhome: ZhomeProcess) -> None:
    alice, bob = U(zhome, "alice"), U(zhome, "bob")
    room_id = alice.create(preset="private_chat")

    status, body = bob.req("POST", f"/rooms/{q(room_id)}/join", {})
    assert status == 403 and body["errcode"] == "M_FORBIDDEN"

    alice.ok("POST", f"/rooms/{q(room_id)}/invite", {"user_id": bob.user_id})
    assert bob.sync()["rooms"]["invite"].get(room_id) is not None
    bob.ok("POST", f"/rooms/{q(room_id)}/join", {})

    alice.ok("POST", f"/rooms/{q(room_id)}/kick", {"user_id": bob.user_id, "reason": "too noisy"})
    status, member = alice.state_event(room_id, "m.room.member", bob.user_id)
    assert status == 200 and member["membership"] == "leave" and member["reason"] == "too noisy"
    # Kicked from an invite-only room: no way back without a new invite.
    status, _ = bob.req("POST", f"/rooms/{q(room_id)}/join", {})
    assert status == 403
    # A member without power cannot kick.
    alice.ok("POST", f"/rooms/{q(room_id)}/invite", {"user_id": bob.user_id})
    bob.ok("POST", f"/rooms/{q(room_id)}/join", {})
    status, _ = bob.req("POST", f"/rooms/{q(room_id)}/kick", {"user_id": alice.user_id})
    assert status == 403

    alice.ok("POST", f"/rooms/{q(room_id)}/ban", {"user_id": bob.user_id, "reason": "spam"})
    status, member = alice.state_event(room_id, "m.room.member", bob.user_id)
    assert member["membership"] == "ban" and member["reason"] == "spam"
    status, body = bob.req("POST", f"/rooms/{q(room_id)}/join", {})
    assert status == 403
    # A banned user no longer reads the room's state (a kicked one reads it as it was when they left).
    status, body = bob.state_event(room_id, "m.room.member", bob.user_id)
    assert status == 403 and body["errcode"] == "M_FORBIDDEN", body
    # Even an invite cannot bring a banned user back.
    status, _ = alice.req("POST", f"/rooms/{q(room_id)}/invite", {"user_id": bob.user_id})
    assert status == 403

    alice.ok("POST", f"/rooms/{q(room_id)}/unban", {"user_id": bob.user_id})
    status, member = alice.state_event(room_id, "m.room.member", bob.user_id)
    assert member["membership"] == "leave"
    alice.ok("POST", f"/rooms/{q(room_id)}/invite", {"user_id": bob.user_id})
    bob.ok("POST", f"/rooms/{q(room_id)}/join", {})
    assert set(alice.ok("GET", f"/rooms/{q(room_id)}/joined_members")["joined"]) == {alice.user_id, bob.user_id}


def test_forget_after_leave(zhome: ZhomeProcess) -> None:
    alice, bob = U(zhome, "alice"), U(zhome, "bob")
    room_id = alice.create(preset="public_chat")
    bob.ok("POST", f"/rooms/{q(room_id)}/join", {})
    status, body = bob.req("POST", f"/rooms/{q(room_id)}/forget", {})
    assert status == 400  # still joined
    bob.ok("POST", f"/rooms/{q(room_id)}/leave", {})
    with_leave = {"room": {"include_leave": True}}
    assert room_id in bob.sync(flt=with_leave)["rooms"]["leave"]
    bob.ok("POST", f"/rooms/{q(room_id)}/forget", {})
    assert room_id not in bob.sync(flt=with_leave)["rooms"].get("leave", {})
    # Alice still sees the room (forgetting is per user).
    assert room_id in alice.sync()["rooms"]["join"]


def test_knock(zhome: ZhomeProcess) -> None:
    alice, bob = U(zhome, "alice"), U(zhome, "bob")
    room_id = alice.create(preset="private_chat")
    status, _ = bob.req("POST", "/knock/" + q(room_id), {"reason": "let me in"})
    assert status == 403  # join rule is invite
    alice.ok("PUT", f"/rooms/{q(room_id)}/state/m.room.join_rules/", {"join_rule": "knock"})
    assert bob.ok("POST", "/knock/" + q(room_id), {"reason": "let me in"})["room_id"] == room_id
    status, member = alice.state_event(room_id, "m.room.member", bob.user_id)
    assert member["membership"] == "knock" and member["reason"] == "let me in"
    knocks = alice.ok("GET", f"/rooms/{q(room_id)}/members?membership=knock")["chunk"]
    assert [e["state_key"] for e in knocks] == [bob.user_id]
    # A knock is not a join.
    status, _ = bob.req("PUT", f"/rooms/{q(room_id)}/send/m.room.message/x1", {"msgtype": "m.text", "body": "x"})
    assert status == 403

    alice.ok("POST", f"/rooms/{q(room_id)}/invite", {"user_id": bob.user_id})
    bob.ok("POST", f"/rooms/{q(room_id)}/join", {})
    status, member = alice.state_event(room_id, "m.room.member", bob.user_id)
    assert member["membership"] == "join"


# -- sending and redaction ----------------------------------------------------------


def test_send_transaction_idempotent(zhome: ZhomeProcess) -> None:
    alice = U(zhome, "alice")
    room_id = alice.create()
    first = alice.send(room_id, "only once", txn="txn-1")
    second = alice.send(room_id, "only once", txn="txn-1")
    assert first == second
    bodies = [e["content"].get("body") for e in alice.messages(room_id) if e["type"] == "m.room.message"]
    assert bodies == ["only once"]
    # A new transaction ID is a new event.
    third = alice.send(room_id, "only once", txn="txn-2")
    assert third != first
    assert len([e for e in alice.messages(room_id) if e["type"] == "m.room.message"]) == 2


def test_a_retried_send_answers_its_first_event_even_when_it_could_not_be_sent_now(zhome: ZhomeProcess) -> None:
    """The transaction ID decides before the event's checks: a repeated
    reaction is the first one (no M_DUPLICATE_ANNOTATION), and a send
    repeated after leaving the room is the first event (no 403)."""
    alice = U(zhome, "alice")
    room_id = alice.create()
    target = alice.send(room_id, "react to me")
    path = f"/rooms/{q(room_id)}/send/m.reaction/react-1"
    body = {"m.relates_to": {"rel_type": "m.annotation", "event_id": target, "key": "👍"}}
    first = alice.ok("PUT", path, body)["event_id"]
    assert alice.ok("PUT", path, body)["event_id"] == first
    # The same reaction under a new transaction ID is the duplicate.
    code, err = alice.req("PUT", f"/rooms/{q(room_id)}/send/m.reaction/react-2", body)
    assert code == 400 and err["errcode"] == "M_DUPLICATE_ANNOTATION", (code, err)

    sent = alice.send(room_id, "before leaving", txn="leave-txn")
    alice.ok("POST", f"/rooms/{q(room_id)}/leave", {})
    assert alice.send(room_id, "before leaving", txn="leave-txn") == sent
    code, err = alice.req("PUT", f"/rooms/{q(room_id)}/send/m.room.message/new-after-leave",
                          {"msgtype": "m.text", "body": "now"})
    assert code == 403, (code, err)


def test_transaction_id_only_to_the_sending_device(zhome: ZhomeProcess) -> None:
    alice = U(zhome, "alice")
    bob = U(zhome, "bob")
    room_id = alice.create(preset="public_chat")
    bob.ok("POST", f"/join/{q(room_id)}", {})
    # A second device of alice's.
    status, login = zhome.request("POST", CS + "/login", {
        "type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"},
        "password": "correct horse battery"})
    assert status == 200
    other_device = ClientUser.__new__(U)
    other_device.hs, other_device.user_id, other_device.token = zhome, alice.user_id, login["access_token"]

    event_id = alice.send(room_id, "echo me", txn="my-txn-7")

    def unsigned_of(u: U, ev: dict[str, Any]) -> dict[str, Any]:
        assert ev["event_id"] == event_id
        return dict(ev.get("unsigned", {}))

    def from_sync(u: U) -> dict[str, Any]:
        tl = u.sync()["rooms"]["join"][room_id]["timeline"]["events"]
        return unsigned_of(u, [e for e in tl if e["event_id"] == event_id][0])

    def from_messages(u: U) -> dict[str, Any]:
        return unsigned_of(u, [e for e in u.messages(room_id) if e["event_id"] == event_id][0])

    def from_event(u: U) -> dict[str, Any]:
        return unsigned_of(u, u.ok("GET", f"/rooms/{q(room_id)}/event/{q(event_id)}"))

    for read in (from_sync, from_messages, from_event):
        assert read(alice).get("transaction_id") == "my-txn-7", read.__name__
        assert "transaction_id" not in read(other_device), read.__name__
        assert "transaction_id" not in read(bob), read.__name__
    # Still so once the event is read back from the database, not the cache.
    zhome.restart()
    assert from_messages(alice).get("transaction_id") == "my-txn-7"
    assert "transaction_id" not in from_messages(other_device)


def test_concurrent_create_room_gives_each_call_its_own_room(zhome: ZhomeProcess) -> None:
    import concurrent.futures

    alice = U(zhome, "alice")
    # The same body in the same millisecond: in room version 12 the room ID
    # is the create event's hash, so the creates must still differ.
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: alice.req("POST", "/createRoom", {"room_version": "12"}), range(8)))
    assert [status for status, _ in answers] == [200] * 8, answers
    rooms = {body["room_id"] for _, body in answers}
    assert len(rooms) == 8
    joined = alice.ok("GET", "/joined_rooms")["joined_rooms"]
    assert rooms <= set(joined)
    for room_id in rooms:
        assert alice.state_event(room_id, "m.room.power_levels")[0] == 200


def test_redaction(zhome: ZhomeProcess) -> None:
    alice, bob, carol = U(zhome, "alice"), U(zhome, "bob"), U(zhome, "carol")
    room_id = alice.create(preset="public_chat")
    bob.ok("POST", f"/rooms/{q(room_id)}/join", {})
    carol.ok("POST", f"/rooms/{q(room_id)}/join", {})
    since = bob.sync()["next_batch"]

    own = bob.send(room_id, "oops, wrong room")
    other = bob.send(room_id, "something offensive")
    kept = alice.send(room_id, "alice's message")

    r1 = bob.ok("PUT", f"/rooms/{q(room_id)}/redact/{q(own)}/r1", {"reason": "mine"})["event_id"]
    r2 = alice.ok("PUT", f"/rooms/{q(room_id)}/redact/{q(other)}/r2", {"reason": "moderation"})["event_id"]
    status, body = carol.req("PUT", f"/rooms/{q(room_id)}/redact/{q(kept)}/r3", {})
    assert status == 403 and body["errcode"] == "M_FORBIDDEN"
    status, body = bob.req("PUT", f"/rooms/{q(room_id)}/redact/{q(kept)}/r4", {})
    assert status == 403

    for eid, red_id in ((own, r1), (other, r2)):
        ev = carol.ok("GET", f"/rooms/{q(room_id)}/event/{q(eid)}")
        assert ev["content"] == {}
        assert ev["unsigned"]["redacted_because"]["event_id"] == red_id
        assert ev["unsigned"]["redacted_because"]["type"] == "m.room.redaction"
    ev = carol.ok("GET", f"/rooms/{q(room_id)}/event/{q(kept)}")
    assert ev["content"]["body"] == "alice's message"

    msgs = {e["event_id"]: e for e in carol.messages(room_id)}
    assert msgs[own]["content"] == {} and "redacted_because" in msgs[own]["unsigned"]
    assert msgs[other]["content"] == {} and "redacted_because" in msgs[other]["unsigned"]
    assert msgs[kept]["content"]["body"] == "alice's message"
    assert msgs[r2]["content"].get("reason") == "moderation"

    timeline = bob.sync(since)["rooms"]["join"][room_id]["timeline"]["events"]
    tl = {e["event_id"]: e for e in timeline}
    assert tl[own]["content"] == {} and "redacted_because" in tl[own]["unsigned"]
    assert tl[other]["content"] == {}
    assert r1 in tl and r2 in tl
    # An initial sync also shows them redacted.
    timeline = carol.sync()["rooms"]["join"][room_id]["timeline"]["events"]
    for e in timeline:
        if e["event_id"] in (own, other):
            assert e["content"] == {}


# -- reading ----------------------------------------------------------------------


def test_context(zhome: ZhomeProcess) -> None:
    alice = U(zhome, "alice")
    room_id = alice.create(name="Context room")
    ids = [alice.send(room_id, f"m{i}") for i in range(7)]
    ctx = alice.ok("GET", f"/rooms/{q(room_id)}/context/{q(ids[3])}?limit=4")
    assert ctx["event"]["event_id"] == ids[3]
    assert [e["event_id"] for e in ctx["events_before"]] == [ids[2], ids[1]]
    assert [e["event_id"] for e in ctx["events_after"]] == [ids[4], ids[5]]
    types = {(e["type"], e["state_key"]) for e in ctx["state"]}
    assert ("m.room.create", "") in types and ("m.room.name", "") in types
    assert ctx["start"] and ctx["end"]
    # Paginating back from "start" continues before the context.
    more = alice.ok("GET", f"/rooms/{q(room_id)}/messages?dir=b&limit=1&from={q(ctx['start'])}")
    assert more["chunk"][0]["event_id"] == ids[0]
    status, body = alice.req("GET", f"/rooms/{q(room_id)}/context/{q('$nope')}")
    assert status == 404


def test_members_and_joined_members(zhome: ZhomeProcess) -> None:
    alice, bob, carol = U(zhome, "alice"), U(zhome, "bob"), U(zhome, "carol")
    room_id = alice.create(preset="public_chat")
    before_bob = alice.sync()["next_batch"]
    bob.ok("POST", f"/rooms/{q(room_id)}/join", {})
    carol.ok("POST", f"/rooms/{q(room_id)}/join", {})
    carol.ok("POST", f"/rooms/{q(room_id)}/leave", {})

    base = f"/rooms/{q(room_id)}/members"
    every = alice.ok("GET", base)["chunk"]
    assert {e["state_key"]: e["content"]["membership"] for e in every} == {
        alice.user_id: "join", bob.user_id: "join", carol.user_id: "leave"}
    joined = alice.ok("GET", base + "?membership=join")["chunk"]
    assert sorted(e["state_key"] for e in joined) == [alice.user_id, bob.user_id]
    not_left = alice.ok("GET", base + "?not_membership=leave")["chunk"]
    assert sorted(e["state_key"] for e in not_left) == [alice.user_id, bob.user_id]
    at = alice.ok("GET", base + "?at=" + q(before_bob))["chunk"]
    assert [e["state_key"] for e in at] == [alice.user_id]

    jm = alice.ok("GET", f"/rooms/{q(room_id)}/joined_members")["joined"]
    assert set(jm) == {alice.user_id, bob.user_id}
    assert jm[bob.user_id].get("display_name") == "bob"
    status, _ = carol.req("GET", f"/rooms/{q(room_id)}/joined_members")
    assert status == 403


def test_small_contract_points(zhome: ZhomeProcess) -> None:
    alice, bob = U(zhome, "alice"), U(zhome, "bob")
    # A room version must be a string.
    status, body = alice.req("POST", "/createRoom", {"room_version": 10})
    assert status == 400 and body["errcode"] == "M_BAD_JSON", body
    # Extra keys of a join body are the join event's content.
    room_id = alice.create(preset="public_chat")
    bob.ok("POST", f"/join/{q(room_id)}", {"foo": "bar", "reason": "hello"})
    status, member = bob.state_event(room_id, "m.room.member", bob.user_id)
    assert status == 200 and member["foo"] == "bar" and member["membership"] == "join" and member["reason"] == "hello"
    status, body = bob.req("POST", f"/join/{q(room_id)}", {"bad": 1.5})
    assert status == 400 and body["errcode"] == "M_BAD_JSON", body
    # Redacting an event of another room through this one.
    other = alice.create(preset="public_chat")
    event_id = alice.send(other, "elsewhere")
    status, body = alice.req("PUT", f"/rooms/{q(room_id)}/redact/{q(event_id)}/r1", {})
    assert status == 400, body
    # /context of an event in a room the reader may not see.
    private = alice.create(preset="private_chat")
    hidden = alice.send(private, "not for bob")
    status, body = bob.req("GET", f"/rooms/{q(private)}/context/{q(hidden)}")
    assert status == 403 and body["errcode"] == "M_FORBIDDEN", body


def test_state_after_leaving(zhome: ZhomeProcess) -> None:
    alice, bob = U(zhome, "alice"), U(zhome, "bob")
    room_id = alice.create(preset="public_chat", topic="before")
    bob.ok("POST", f"/rooms/{q(room_id)}/join", {})
    bob.ok("POST", f"/rooms/{q(room_id)}/leave", {})
    alice.ok("PUT", f"/rooms/{q(room_id)}/state/m.room.topic/", {"topic": "after"})
    alice.ok("PUT", f"/rooms/{q(room_id)}/state/m.room.name/", {"name": "Renamed"})

    st = _by_type(bob.state(room_id))
    assert st[("m.room.topic", "")]["content"]["topic"] == "before"
    assert ("m.room.name", "") not in st
    assert st[("m.room.member", bob.user_id)]["content"]["membership"] == "leave"
    status, body = bob.state_event(room_id, "m.room.topic")
    assert status == 200 and body == {"topic": "before"}
    # Alice sees the current state.
    status, body = alice.state_event(room_id, "m.room.topic")
    assert body == {"topic": "after"}
    # Someone who was never there sees nothing.
    carol = U(zhome, "carol")
    status, _ = carol.req("GET", f"/rooms/{q(room_id)}/state")
    assert status == 403


# -- aliases and the directory ------------------------------------------------------


def test_aliases(zhome: ZhomeProcess) -> None:
    alice, bob = U(zhome, "alice"), U(zhome, "bob")
    room_id = alice.create(preset="public_chat")
    other_room = alice.create(preset="public_chat")
    alias = "#ward7:localhost"

    alice.ok("PUT", "/directory/room/" + q(alias), {"room_id": room_id})
    status, body = alice.req("PUT", "/directory/room/" + q(alias), {"room_id": other_room})
    assert status == 409
    status, body = zhome.request("GET", CS + "/directory/room/" + q(alias), token=bob.token)
    assert status == 200 and body["room_id"] == room_id and "localhost" in body["servers"]
    assert alias in alice.ok("GET", f"/rooms/{q(room_id)}/aliases")["aliases"]

    alice.ok("PUT", f"/rooms/{q(room_id)}/state/m.room.canonical_alias/", {"alias": alias})
    status, body = alice.req("PUT", f"/rooms/{q(other_room)}/state/m.room.canonical_alias/", {"alias": alias})
    assert status == 400 and body["errcode"] == "M_BAD_ALIAS"
    status, body = alice.req("PUT", f"/rooms/{q(room_id)}/state/m.room.canonical_alias/",
                             {"alias": alias, "alt_aliases": ["#missing:localhost"]})
    assert status == 400 and body["errcode"] == "M_BAD_ALIAS"

    # Bob (not the creator, no power) cannot delete it.
    bob.ok("POST", f"/rooms/{q(room_id)}/join", {})
    status, _ = bob.req("DELETE", "/directory/room/" + q(alias))
    assert status == 403
    alice.ok("DELETE", "/directory/room/" + q(alias))
    status, body = alice.req("GET", "/directory/room/" + q(alias))
    assert status == 404 and body["errcode"] == "M_NOT_FOUND"
    assert alias not in alice.ok("GET", f"/rooms/{q(room_id)}/aliases")["aliases"]
    # The deleted alias left the room's canonical alias event.
    status, body = alice.state_event(room_id, "m.room.canonical_alias")
    assert status == 200 and "alias" not in body, body


def test_directory_and_public_rooms(zhome: ZhomeProcess) -> None:
    alice, bob = U(zhome, "alice"), U(zhome, "bob")
    hidden = alice.create(preset="private_chat", name="Secret ward")
    assert alice.ok("GET", f"/directory/list/room/{q(hidden)}")["visibility"] == "private"
    public = [alice.create(preset="public_chat", visibility="public", name=f"Ward {c}") for c in "ABC"]
    assert alice.ok("GET", f"/directory/list/room/{q(public[0])}")["visibility"] == "public"

    seen: list[str] = []
    page = alice.ok("GET", "/publicRooms?limit=2")
    assert len(page["chunk"]) == 2 and page["total_room_count_estimate"] == 3
    seen += [r["room_id"] for r in page["chunk"]]
    page = alice.ok("GET", "/publicRooms?limit=2&since=" + q(page["next_batch"]))
    assert len(page["chunk"]) == 1 and "next_batch" not in page
    seen += [r["room_id"] for r in page["chunk"]]
    assert sorted(seen) == sorted(public)

    found = alice.ok("POST", "/publicRooms", {"filter": {"generic_search_term": "ward b"}})
    assert [r["room_id"] for r in found["chunk"]] == [public[1]]
    assert found["chunk"][0]["name"] == "Ward B" and found["chunk"][0]["join_rule"] == "public"
    assert found["chunk"][0]["num_joined_members"] == 1

    # Publishing needs power in the room; the creator may.
    bob.ok("POST", f"/rooms/{q(public[0])}/join", {})
    status, _ = bob.req("PUT", f"/directory/list/room/{q(public[0])}", {"visibility": "private"})
    assert status == 403
    alice.ok("PUT", f"/directory/list/room/{q(hidden)}", {"visibility": "public"})
    alice.ok("PUT", f"/directory/list/room/{q(public[2])}", {"visibility": "private"})
    ids = {r["room_id"] for r in zhome.request("GET", CS + "/publicRooms")[1]["chunk"]}
    assert ids == {hidden, public[0], public[1]}
