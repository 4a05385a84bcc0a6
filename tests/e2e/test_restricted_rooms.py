"""Joins to rooms with the ``restricted`` and ``knock_restricted`` join
rules, on one real zhome and across two (A 127.0.0.2, B 127.0.0.3;
zhome_pair in conftest.py), on SQLite and PostgreSQL.

Spec: client-server-api "Restricted rooms"; server-server-api "Restricted
rooms" (make_join names an authorising user of the resident server,
send_join returns the join signed by it; 400 M_UNABLE_TO_AUTHORISE_JOIN,
400 M_UNABLE_TO_GRANT_JOIN, 403 M_FORBIDDEN); rooms v8/v10 auth rules.
"""

from __future__ import annotations

import time
from typing import Any

from tests.e2e.conftest import ZhomeServers
from tests.e2e.harness import ClientUser, ZhomeProcess, q
from tests.e2e.test_spaces_federation import federation_get

WAIT_S = 30.0


def restricted_room(user: ClientUser, allowed: str, rule: str = "restricted", version: str = "10",
                    **extra: Any) -> str:
    return str(user.ok("POST", "/createRoom", {"preset": "private_chat", "room_version": version, "initial_state": [
        {"type": "m.room.join_rules", "state_key": "",
         "content": {"join_rule": rule, "allow": [{"type": "m.room_membership", "room_id": allowed}]}}],
        **extra})["room_id"])


def member_event(user: ClientUser, room_id: str, target: str) -> dict[str, Any]:
    return dict(user.ok("GET", f"/rooms/{q(room_id)}/state/m.room.member/{q(target)}"))


def wait_for_member(user: ClientUser, room_id: str, target: str, membership: str = "join") -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    while True:
        status, body = user.req("GET", f"/rooms/{q(room_id)}/state/m.room.member/{q(target)}")
        if status == 200 and body.get("membership") == membership:
            return dict(body)
        assert time.monotonic() < deadline, (status, body)
        time.sleep(0.2)


def test_local_restricted_joins(zhome: ZhomeProcess) -> None:
    alice, bob, carol = ClientUser(zhome, "alice"), ClientUser(zhome, "bob"), ClientUser(zhome, "carol")
    space = alice.ok("POST", "/createRoom", {"preset": "public_chat", "creation_content": {"type": "m.space"}})[
        "room_id"]
    bob.ok("POST", f"/join/{q(space)}", {})
    for rule, version in (("restricted", "8"), ("restricted", "10"), ("knock_restricted", "10")):
        room = restricted_room(alice, space, rule, version)
        status, body = carol.req("POST", f"/join/{q(room)}", {})
        assert status == 403 and body["errcode"] == "M_FORBIDDEN", (rule, version, body)
        # A client cannot name its own authoriser.
        assert bob.ok("POST", f"/join/{q(room)}", {"join_authorised_via_users_server": carol.user_id})[
            "room_id"] == room
        member = member_event(alice, room, bob.user_id)
        assert member["membership"] == "join" and member["join_authorised_via_users_server"] == alice.user_id
        if rule == "knock_restricted":
            # Not in the space: carol may still knock.
            assert carol.ok("POST", f"/knock/{q(room)}", {})["room_id"] == room
    # An invited user needs nobody to vouch.
    room = restricted_room(alice, space)
    alice.ok("POST", f"/rooms/{q(room)}/invite", {"user_id": carol.user_id})
    carol.ok("POST", f"/join/{q(room)}", {})
    assert "join_authorised_via_users_server" not in member_event(alice, room, carol.user_id)
    # Nobody in the room may invite: the member of the space is refused too.
    room = restricted_room(alice, space, power_level_content_override={"invite": 101})
    status, body = bob.req("POST", f"/join/{q(room)}", {})
    assert status == 403 and body["errcode"] == "M_FORBIDDEN" and "invite" in body["error"], body


def test_restricted_join_over_federation(zhome_pair: ZhomeServers) -> None:
    a, b = zhome_pair.a, zhome_pair.b
    alice = ClientUser(a, "ralice")
    bob, carol = ClientUser(b, "rbob"), ClientUser(b, "rcarol")
    space = alice.ok("POST", "/createRoom", {"preset": "public_chat", "creation_content": {"type": "m.space"}})[
        "room_id"]
    bob.ok("POST", f"/join/{q(space)}?server_name={q(a.server_name)}", {})
    room = restricted_room(alice, space)

    # A's make_join answers for B's users from A's view of the space.
    status, body = federation_get(b, a, f"/_matrix/federation/v1/make_join/{q(room)}/{q(bob.user_id)}?ver=10")
    assert status == 200 and body["event"]["content"]["join_authorised_via_users_server"] == alice.user_id, body
    status, body = federation_get(b, a, f"/_matrix/federation/v1/make_join/{q(room)}/{q(carol.user_id)}?ver=10")
    assert status == 403 and body["errcode"] == "M_FORBIDDEN", body
    # Allowed, but nobody on A may invite: B is told to try another server.
    closed = restricted_room(alice, space, power_level_content_override={"invite": 101})
    status, body = federation_get(b, a, f"/_matrix/federation/v1/make_join/{q(closed)}/{q(bob.user_id)}?ver=10")
    assert status == 400 and body["errcode"] == "M_UNABLE_TO_GRANT_JOIN", body
    status, body = bob.req("POST", f"/join/{q(closed)}?server_name={q(a.server_name)}", {})
    assert status == 400 and body["errcode"] == "M_UNABLE_TO_GRANT_JOIN", body

    # While B is not in the room, A refuses carol's join for it.
    status, body = carol.req("POST", f"/join/{q(room)}?server_name={q(a.server_name)}", {})
    assert status == 403 and body["errcode"] == "M_FORBIDDEN", body

    bob.ok("POST", f"/join/{q(room)}?server_name={q(a.server_name)}", {})
    member = wait_for_member(alice, room, bob.user_id)
    assert member["join_authorised_via_users_server"] == alice.user_id
    # The join A stored and B got back carries both servers' signatures.
    event_id = next(e["event_id"] for e in alice.ok("GET", f"/rooms/{q(room)}/state")
                    if e["type"] == "m.room.member" and e["state_key"] == bob.user_id)
    status, pdus = federation_get(b, a, f"/_matrix/federation/v1/event/{q(event_id)}")
    assert status == 200, pdus
    assert set(pdus["pdus"][0]["signatures"]) == {a.server_name, b.server_name}
    status, pdus = federation_get(a, b, f"/_matrix/federation/v1/event/{q(event_id)}")
    assert status == 200 and set(pdus["pdus"][0]["signatures"]) == {a.server_name, b.server_name}, pdus
    assert member_event(bob, room, bob.user_id)["membership"] == "join"

    # B is in the room now: it decides carol's join itself.
    status, body = carol.req("POST", f"/join/{q(room)}", {})
    assert status == 403 and body["errcode"] == "M_FORBIDDEN", body


def test_restricted_to_a_room_the_resident_server_is_not_in(zhome_pair: ZhomeServers) -> None:
    a, b = zhome_pair.a, zhome_pair.b
    alice, bob = ClientUser(a, "salice"), ClientUser(b, "sbob")
    space_b = bob.ok("POST", "/createRoom", {"preset": "public_chat"})["room_id"]
    room = restricted_room(alice, space_b)
    # A cannot tell whether bob is in B's room.
    status, body = federation_get(b, a, f"/_matrix/federation/v1/make_join/{q(room)}/{q(bob.user_id)}?ver=10")
    assert status == 400 and body["errcode"] == "M_UNABLE_TO_AUTHORISE_JOIN", body
    status, body = bob.req("POST", f"/join/{q(room)}?server_name={q(a.server_name)}", {})
    assert status == 400 and body["errcode"] == "M_UNABLE_TO_AUTHORISE_JOIN", body
    # An incompatible room version is told before any of that.
    status, body = federation_get(b, a, f"/_matrix/federation/v1/make_join/{q(room)}/{q(bob.user_id)}?ver=7")
    assert status == 400 and body["errcode"] == "M_INCOMPATIBLE_ROOM_VERSION", body

    # Once B is in the room with a user who may invite, B authorises its
    # own user's join locally, and A accepts the join B signed.
    dave = ClientUser(b, "sdave")
    alice.ok("POST", f"/rooms/{q(room)}/invite", {"user_id": dave.user_id})
    wait_invite = time.monotonic() + WAIT_S
    while dave.req("POST", f"/join/{q(room)}?server_name={q(a.server_name)}", {})[0] != 200:
        assert time.monotonic() < wait_invite
        time.sleep(0.2)
    bob.ok("POST", f"/join/{q(room)}", {})
    member = wait_for_member(alice, room, bob.user_id)
    assert member["join_authorised_via_users_server"] == dave.user_id


def test_restricted_join_vouched_for_by_another_resident_server(zhome_pair: ZhomeServers) -> None:
    a, b = zhome_pair.a, zhome_pair.b
    alice = ClientUser(a, "talice")
    bob, dave = ClientUser(b, "tbob"), ClientUser(b, "tdave")
    space = alice.ok("POST", "/createRoom", {"preset": "public_chat"})["room_id"]
    bob.ok("POST", f"/join/{q(space)}?server_name={q(a.server_name)}", {})
    room = restricted_room(alice, space, power_level_content_override={"invite": 50})
    alice.ok("POST", f"/rooms/{q(room)}/invite", {"user_id": dave.user_id})
    deadline = time.monotonic() + WAIT_S
    while dave.req("POST", f"/join/{q(room)}?server_name={q(a.server_name)}", {})[0] != 200:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    # B is in the room, but dave may not invite: A vouches for bob's join,
    # which B then takes in like any event from A.
    assert bob.ok("POST", f"/join/{q(room)}", {})["room_id"] == room
    assert member_event(bob, room, bob.user_id)["join_authorised_via_users_server"] == alice.user_id
    assert wait_for_member(alice, room, bob.user_id)["join_authorised_via_users_server"] == alice.user_id
    bob.ok("PUT", f"/rooms/{q(room)}/send/m.room.message/t1", {"msgtype": "m.text", "body": "in"})
    deadline = time.monotonic() + WAIT_S
    while True:
        chunk = alice.ok("GET", f"/rooms/{q(room)}/messages?dir=b&limit=10")["chunk"]
        if any(e["content"].get("body") == "in" for e in chunk):
            break
        assert time.monotonic() < deadline, chunk
        time.sleep(0.2)


def test_restricted_join_tries_the_next_resident_server(zhome_pair: ZhomeServers) -> None:
    """The room lives on A, the allowed room on C: A cannot tell, so B asks
    C, whose user in the room may invite and vouches for B's user."""
    a, b = zhome_pair.a, zhome_pair.b
    c = zhome_pair.spawn("127.0.0.4", "c")
    alice, bob, carl = ClientUser(a, "ualice"), ClientUser(b, "ubob"), ClientUser(c, "ucarl")
    space_c = carl.ok("POST", "/createRoom", {"preset": "public_chat"})["room_id"]
    bob.ok("POST", f"/join/{q(space_c)}?server_name={q(c.server_name)}", {})
    room = restricted_room(alice, space_c)
    alice.ok("POST", f"/rooms/{q(room)}/invite", {"user_id": carl.user_id})
    deadline = time.monotonic() + WAIT_S
    while carl.req("POST", f"/join/{q(room)}?server_name={q(a.server_name)}", {})[0] != 200:
        assert time.monotonic() < deadline
        time.sleep(0.2)

    via = f"server_name={q(a.server_name)}&server_name={q(c.server_name)}"
    assert bob.ok("POST", f"/join/{q(room)}?{via}", {})["room_id"] == room
    assert member_event(bob, room, bob.user_id)["join_authorised_via_users_server"] == carl.user_id
    assert wait_for_member(alice, room, bob.user_id)["join_authorised_via_users_server"] == carl.user_id
