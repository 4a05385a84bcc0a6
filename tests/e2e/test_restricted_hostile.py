"""Restricted joins from a hostile server "E" (test_federation_hostile.py's
world: A with alice's public room, E with @mallory joined to it), on SQLite
and PostgreSQL.

A vouches only for users it sees in an allowed room, signs only such
joins, and takes no join naming one of its users that it did not sign.
Spec: server-server-api "Restricted rooms"; rooms v8 auth rules.
"""

from __future__ import annotations

import copy
import time
import urllib.parse
from typing import Any, Callable

from tests.e2e.harness import q
from tests.e2e.test_federation_hostile import FED, RemoteRoom, World, _event_id_of
from tests.e2e.test_federation_hostile import world  # noqa: F401  (A and E, per engine)
from tests.rooms.builders import build_pdu
from zhome.crypto.event_hashing import hash_and_sign_event
from zhome.rooms.versions import get_room_version


def _signed_join(world: World, template: dict[str, Any], user_id: str) -> tuple[str, dict[str, Any]]:
    pdu = {k: v for k, v in template.items() if k not in ("signatures", "hashes", "unsigned", "event_id")}
    pdu.update(sender=user_id, state_key=user_id, origin_server_ts=int(time.time() * 1000))
    return hash_and_sign_event(get_room_version("10"), pdu, world.e.server_name, world.e.key)


def test_restricted_joins_from_a_hostile_server(world: World) -> None:  # noqa: F811
    a, e = world.a, world.e
    status, created = world.client("POST", "/createRoom", {
        "preset": "private_chat", "room_version": "10", "initial_state": [
            {"type": "m.room.join_rules", "state_key": "", "content": {
                "join_rule": "restricted", "allow": [{"type": "m.room_membership", "room_id": world.room.room_id}]}}]})
    assert status == 200, created
    room_id = created["room_id"]
    eve = f"@eve:{e.server_name}"

    status, body = e.request(a, "GET", f"{FED}/v1/make_join/{q(room_id)}/{q(eve)}?ver=10")
    assert status == 403 and body["errcode"] == "M_FORBIDDEN", body
    status, made = e.request(a, "GET", f"{FED}/v1/make_join/{q(room_id)}/{q(world.mallory)}?ver=10")
    assert status == 200 and made["event"]["content"]["join_authorised_via_users_server"] == world.alice, made
    template = made["event"]

    # eve's join with the authoriser copied from mallory's template: A
    # checks again at send_join and does not sign it.
    eid, signed = _signed_join(world, template, eve)
    status, body = e.request(a, "PUT", f"{FED}/v2/send_join/{q(room_id)}/{q(eid)}", signed)
    assert status == 403 and body["errcode"] == "M_FORBIDDEN", body

    # mallory's join comes back with A's signature added, otherwise unchanged.
    eid, signed = _signed_join(world, template, world.mallory)
    status, joined = e.request(a, "PUT", f"{FED}/v2/send_join/{q(room_id)}/{q(eid)}", signed)
    assert status == 200, joined
    back = joined["event"]
    assert set(back["signatures"]) == {a.server_name, e.server_name}
    assert back["signatures"][e.server_name] == signed["signatures"][e.server_name]
    assert {k: v for k, v in back.items() if k not in ("signatures", "unsigned")} == \
        {k: v for k, v in signed.items() if k != "signatures"}
    # v1 wraps the same answer.
    status, again = e.request(a, "PUT", f"{FED}/v1/send_join/{q(room_id)}/{q(eid)}", signed)
    assert status == 200 and again[0] == 200 and set(again[1]["event"]["signatures"]) == set(back["signatures"])

    # E is in the room now. A join naming alice that A never signed, sent
    # in a transaction, fails the signature check.
    rv = get_room_version("10")
    state = {(p["type"], p["state_key"]): _event_id_of(rv, p) for p in joined["state"]}
    state[("m.room.member", world.mallory)] = eid
    room = RemoteRoom(e, room_id, rv, state, eid, template["depth"])
    content = {"membership": "join", "join_authorised_via_users_server": world.alice}
    forged_id, forged = room.sign(room.build("m.room.member", content, eve, state_key=eve))
    status, body = world.send_txn([forged])
    assert status == 200 and "signature" in body["pdus"][forged_id].get("error", "").lower(), body
    status, members = world.client("GET", f"/rooms/{q(room_id)}/members")
    assert status == 200, members
    assert {m["state_key"]: m["content"]["membership"] for m in members["chunk"]} == {
        world.alice: "join", world.mallory: "join"}
    world.assert_serving()


def test_joining_a_restricted_room_on_e(world: World) -> None:  # noqa: F811
    """A's user joins a restricted room that lives on E, which names its
    founder as the authoriser: A takes the join back only as it sent it,
    with E's signature added."""
    e = world.e
    rv = get_room_version("10")
    room_id = f"!restricted{time.time_ns()}:{e.server_name}"
    founder = f"@founder:{e.server_name}"
    now = int(time.time() * 1000)

    def signed(pdu: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return hash_and_sign_event(rv, pdu, e.server_name, e.key)

    create_id, create = signed(build_pdu("m.room.create", founder, {"room_version": "10", "creator": founder}, state_key="",
                                         room_id=room_id, prev_events=[], auth_events=[], depth=1,
                                         origin_server_ts=now))
    founder_id, joined = signed(build_pdu("m.room.member", founder, {"membership": "join"}, state_key=founder,
                                          room_id=room_id, prev_events=[create_id], auth_events=[create_id],
                                          depth=2, origin_server_ts=now))
    rules_id, rules = signed(build_pdu("m.room.join_rules", founder, {"join_rule": "restricted", "allow": [
        {"type": "m.room_membership", "room_id": f"!space:{e.server_name}"}]}, state_key="", room_id=room_id,
        prev_events=[founder_id], auth_events=[create_id, founder_id], depth=3, origin_server_ts=now))
    state = [create, joined, rules]

    def make_join(path: str, body: Any) -> tuple[int, Any]:
        user = urllib.parse.unquote(path.split("?")[0].rsplit("/", 1)[1])
        return 200, {"room_version": "10", "event": build_pdu(
            "m.room.member", user, {"membership": "join", "join_authorised_via_users_server": founder},
            state_key=user, room_id=room_id, prev_events=[rules_id], auth_events=[create_id, rules_id, founder_id],
            depth=4, origin_server_ts=int(time.time() * 1000))}

    def answer_with(event: Callable[[dict[str, Any]], Any]) -> Callable[[str, Any], tuple[int, Any]]:
        def send_join(path: str, body: Any) -> tuple[int, Any]:
            out: dict[str, Any] = {"state": state, "auth_chain": state}
            returned = event(copy.deepcopy(body))
            if returned is not None:
                out["event"] = returned
            return 200, out
        return send_join

    def tampered(body: dict[str, Any]) -> dict[str, Any]:
        body["content"]["displayname"] = "someone else"
        return signed(body)[1]

    join_path = f"/join/{q(room_id)}?server_name={q(e.server_name)}"
    for bad, why in ((lambda body: None, "did not send back"), (lambda body: body, "not signed"),
                     (tampered, "another join event")):
        # Not returned, returned without E's signature, returned changed.
        e.handlers[:] = [("GET", f"{FED}/v1/make_join/{room_id}/", make_join),
                         ("PUT", f"{FED}/v2/send_join/", answer_with(bad))]
        try:
            status, body = world.client("POST", join_path, {})
        finally:
            e.handlers.clear()
        assert status == 502 and body["errcode"] == "M_UNKNOWN" and why in body["error"], (status, body)
        status, rooms = world.client("GET", "/joined_rooms")
        assert room_id not in rooms["joined_rooms"], rooms

    e.handlers[:] = [("GET", f"{FED}/v1/make_join/{room_id}/", make_join),
                     ("PUT", f"{FED}/v2/send_join/", answer_with(lambda body: signed(body)[1]))]
    try:
        status, body = world.client("POST", join_path, {})
    finally:
        e.handlers.clear()
    assert status == 200 and body["room_id"] == room_id, body
    status, member = world.client("GET", f"/rooms/{q(room_id)}/state/m.room.member/{q(world.alice)}")
    assert status == 200 and member["join_authorised_via_users_server"] == founder, member
    world.assert_serving()
