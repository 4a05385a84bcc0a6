"""Restricted joins from a hostile server "E" (test_federation_hostile.py's
world: A with alice's public room, E with @mallory joined to it), on SQLite
and PostgreSQL.

A vouches only for users it sees in an allowed room, signs only such
joins, and takes no join naming one of its users that it did not sign.
Spec: server-server-api "Restricted rooms"; rooms v8 auth rules.
"""

from __future__ import annotations

import time
from typing import Any

from tests.e2e.harness import q
from tests.e2e.test_federation_hostile import FED, RemoteRoom, World, _event_id_of
from tests.e2e.test_federation_hostile import world  # noqa: F401  (A and E, per engine)
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
