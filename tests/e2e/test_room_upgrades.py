"""Room upgrades (POST /_matrix/client/v3/rooms/{roomId}/upgrade) through a
real zhome on SQLite and PostgreSQL.

Spec: client-server-api "Room Upgrades" (room_upgrades.yaml); what is
copied and who is invited: zhome/rooms/room_upgrade.py.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

import jsonschema

from tests.e2e.harness import ClientUser, ZhomeProcess, q
from tests.e2e.openapi import Spec

_spec: list[Spec] = []


def upgrade(user: ClientUser, room_id: str, body: dict[str, Any]) -> tuple[int, Any]:
    status, out = user.req("POST", f"/rooms/{q(room_id)}/upgrade", body)
    if not _spec:
        _spec.append(Spec())
    if status in (200, 400, 403):
        schema = _spec[0].response_schema("/rooms/{roomId}/upgrade", "post", status)
        errors = list(jsonschema.Draft202012Validator(schema).iter_errors(out))
        assert not errors, [e.message for e in errors[:5]]
    return status, out


def state(user: ClientUser, room_id: str, etype: str, key: str = "") -> tuple[int, Any]:
    return user.req("GET", f"/rooms/{q(room_id)}/state/{q(etype)}/{q(key)}")


def test_upgrade_populated_v10_room_to_v12(zhome: ZhomeProcess) -> None:
    alice, bob, carol, dave = (ClientUser(zhome, n) for n in ("alice", "bob", "carol", "dave"))
    old = alice.ok("POST", "/createRoom", {
        "room_version": "10", "preset": "public_chat", "name": "Ward 7", "topic": "night shift",
        "room_alias_name": "ward7"})["room_id"]
    for u in (bob, carol, dave):
        u.ok("POST", f"/join/{q(old)}", {})
    pl = alice.ok("GET", f"/rooms/{q(old)}/state/m.room.power_levels/")
    pl["users"][bob.user_id] = 50
    alice.ok("PUT", f"/rooms/{q(old)}/state/m.room.power_levels/", pl)
    alice.ok("POST", f"/rooms/{q(old)}/ban", {"user_id": dave.user_id, "reason": "spam"})

    # Neither an ordinary member nor a moderator may send the tombstone (100).
    for who in (carol, bob):
        status, body = upgrade(who, old, {"new_version": "12"})
        assert status == 403 and body["errcode"] == "M_FORBIDDEN", body

    status, body = upgrade(alice, old, {"new_version": "12"})
    assert status == 200, body
    new = body["replacement_room"]
    assert new.startswith("!") and ":" not in new and new != old

    # The old room: tombstoned, closed to ordinary members, alias gone.
    status, tomb = state(carol, old, "m.room.tombstone")
    assert status == 200 and tomb["replacement_room"] == new and tomb["body"], tomb
    old_pl = alice.ok("GET", f"/rooms/{q(old)}/state/m.room.power_levels/")
    assert old_pl["events_default"] >= 50 and old_pl["invite"] >= 50, old_pl
    status, body = carol.req("PUT", f"/rooms/{q(old)}/send/m.room.message/t1", {"msgtype": "m.text", "body": "hi"})
    assert status == 403, body
    assert alice.ok("GET", f"/rooms/{q(old)}/state/m.room.canonical_alias/") == {}

    # The new room: predecessor, copied state and power levels.
    create = alice.ok("GET", f"/rooms/{q(new)}/state/m.room.create/")
    assert create["room_version"] == "12" and "creator" not in create
    assert create["predecessor"]["room_id"] == old and create["predecessor"]["event_id"].startswith("$")
    assert alice.ok("GET", f"/rooms/{q(new)}/state/m.room.name/") == {"name": "Ward 7"}
    assert alice.ok("GET", f"/rooms/{q(new)}/state/m.room.topic/")["topic"] == "night shift"
    assert alice.ok("GET", f"/rooms/{q(new)}/state/m.room.join_rules/")["join_rule"] == "public"
    hv = alice.ok("GET", f"/rooms/{q(old)}/state/m.room.history_visibility/")
    assert alice.ok("GET", f"/rooms/{q(new)}/state/m.room.history_visibility/") == hv
    new_pl = alice.ok("GET", f"/rooms/{q(new)}/state/m.room.power_levels/")
    # Alice is the new room's creator: above every level, not in "users".
    assert new_pl["users"] == {bob.user_id: 50}, new_pl
    assert new_pl["events"] == pl["events"] and new_pl["state_default"] == pl["state_default"]
    assert new_pl["events_default"] == pl["events_default"] and new_pl["invite"] == pl["invite"]
    ban = alice.ok("GET", f"/rooms/{q(new)}/state/m.room.member/{q(dave.user_id)}")
    assert ban["membership"] == "ban" and ban["reason"] == "spam"

    # The alias moved with the canonical alias.
    assert zhome.request("GET", "/_matrix/client/v3/directory/room/" + q("#ward7:localhost"))[1]["room_id"] == new
    assert alice.ok("GET", f"/rooms/{q(new)}/state/m.room.canonical_alias/") == {"alias": "#ward7:localhost"}
    assert alice.ok("GET", f"/rooms/{q(new)}/aliases")["aliases"] == ["#ward7:localhost"]

    # Members follow the tombstone; the banned one cannot.
    for u in (bob, carol):
        assert u.ok("POST", f"/join/{q(new)}", {})["room_id"] == new
    assert dave.req("POST", f"/join/{q(new)}", {})[0] == 403
    members = alice.ok("GET", f"/rooms/{q(new)}/joined_members")["joined"]
    assert set(members) == {alice.user_id, bob.user_id, carol.user_id}
    # The moderator keeps moderating in the new room; talk goes on there.
    bob.ok("PUT", f"/rooms/{q(new)}/state/m.room.topic/", {"topic": "day shift"})
    carol.ok("PUT", f"/rooms/{q(new)}/send/m.room.message/t2", {"msgtype": "m.text", "body": "here"})


def test_upgrade_private_v1_room_to_v10_invites_local_members(zhome: ZhomeProcess) -> None:
    alice, bob = ClientUser(zhome, "alice"), ClientUser(zhome, "bob")
    old = alice.ok("POST", "/createRoom", {"room_version": "1", "preset": "private_chat", "name": "Old",
                                           "invite": [bob.user_id], "initial_state": [
        {"type": "m.room.encryption", "state_key": "", "content": {"algorithm": "m.megolm.v1.aes-sha2"}}]})["room_id"]
    bob.ok("POST", f"/join/{q(old)}", {})
    pl = alice.ok("GET", f"/rooms/{q(old)}/state/m.room.power_levels/")
    # Room version 1 allows levels written as strings; version 10 does not.
    pl["users"][bob.user_id] = "40"
    pl["events"]["m.room.topic"] = "40"
    alice.ok("PUT", f"/rooms/{q(old)}/state/m.room.power_levels/", pl)

    status, body = upgrade(alice, old, {"new_version": "10"})
    assert status == 200, body
    new = body["replacement_room"]
    assert new.endswith(":localhost")
    create = alice.ok("GET", f"/rooms/{q(new)}/state/m.room.create/")
    assert create["room_version"] == "10" and create["creator"] == alice.user_id
    # Before v12 the tombstone goes first and is the predecessor's event.
    tomb = [e for e in alice.ok("GET", f"/rooms/{q(old)}/state") if e["type"] == "m.room.tombstone"]
    assert create["predecessor"] == {"room_id": old, "event_id": tomb[0]["event_id"]}
    assert alice.ok("GET", f"/rooms/{q(new)}/state/m.room.encryption/")["algorithm"] == "m.megolm.v1.aes-sha2"
    assert alice.ok("GET", f"/rooms/{q(new)}/state/m.room.join_rules/")["join_rule"] == "invite"
    new_pl = alice.ok("GET", f"/rooms/{q(new)}/state/m.room.power_levels/")
    # Alice's own level is back where it was after the copying.
    assert new_pl["users"] == {alice.user_id: 100, bob.user_id: 40}, new_pl
    assert new_pl["events"]["m.room.topic"] == 40
    assert state(bob, old, "m.room.tombstone")[1]["replacement_room"] == new

    # The room is invite-only: bob, on this server, was invited and joins.
    member = alice.ok("GET", f"/rooms/{q(new)}/state/m.room.member/{q(bob.user_id)}")
    assert member["membership"] == "invite", member
    bob.ok("POST", f"/join/{q(new)}", {})
    bob.ok("PUT", f"/rooms/{q(new)}/state/m.room.topic/", {"topic": "moved"})


def test_upgrade_errors(zhome: ZhomeProcess) -> None:
    alice, bob = ClientUser(zhome, "alice"), ClientUser(zhome, "bob")
    room = alice.ok("POST", "/createRoom", {"preset": "private_chat"})["room_id"]
    for body, code in (({"new_version": "99"}, "M_UNSUPPORTED_ROOM_VERSION"),
                       ({"new_version": 10}, "M_BAD_JSON"), ({}, "M_BAD_JSON"),
                       ({"new_version": "12", "additional_creators": ["nobody"]}, "M_INVALID_PARAM")):
        status, out = upgrade(alice, room, body)
        assert status == 400 and out["errcode"] == code, (body, out)
    # Not a member, or a room nobody knows.
    status, out = upgrade(bob, room, {"new_version": "11"})
    assert status == 403 and out["errcode"] == "M_FORBIDDEN", out
    status, out = alice.req("POST", f"/rooms/{q('!nowhere:localhost')}/upgrade", {"new_version": "11"})
    assert status == 404 and out["errcode"] == "M_NOT_FOUND", out
    assert alice.req("GET", f"/rooms/{q(room)}/state/m.room.tombstone/")[0] == 404
    # A tombstone may not point at its own room.
    for path in (f"/rooms/{q(room)}/state/m.room.tombstone/", f"/rooms/{q(room)}/send/m.room.tombstone/t1"):
        status, out = alice.req("PUT", path, {"body": "loop", "replacement_room": room})
        assert status == 400, (path, out)


def test_users_settings_and_the_directory_follow_the_upgrade(zhome: ZhomeProcess) -> None:
    alice, bob = ClientUser(zhome, "alice"), ClientUser(zhome, "bob")
    old = alice.ok("POST", "/createRoom", {"preset": "public_chat", "visibility": "public",
                                           "room_version": "11"})["room_id"]
    bob.ok("POST", f"/join/{q(old)}", {})
    bob.ok("PUT", f"/user/{q(bob.user_id)}/rooms/{q(old)}/tags/m.favourite", {"order": 0.5})
    bob.ok("PUT", f"/pushrules/global/room/{q(old)}", {"actions": ["dont_notify"]})
    bob.ok("PUT", f"/pushrules/global/override/{q(old)}", {"actions": [], "conditions": [
        {"kind": "event_match", "key": "room_id", "pattern": old}]})
    alice.ok("PUT", f"/user/{q(alice.user_id)}/account_data/m.direct", {bob.user_id: [old]})

    new = upgrade(alice, old, {"new_version": "12"})[1]["replacement_room"]
    # The directory lists the new room instead of the old one.
    listed = [r["room_id"] for r in zhome.request("GET", "/_matrix/client/v3/publicRooms")[1]["chunk"]]
    assert new in listed and old not in listed
    assert alice.ok("GET", f"/directory/list/room/{q(new)}")["visibility"] == "public"
    # The upgrader's direct chat is the new room too.
    assert alice.ok("GET", f"/user/{q(alice.user_id)}/account_data/m.direct") == {bob.user_id: [old, new]}

    bob.ok("POST", f"/join/{q(new)}", {})
    assert bob.ok("GET", f"/user/{q(bob.user_id)}/rooms/{q(new)}/tags")["tags"] == {"m.favourite": {"order": 0.5}}
    assert bob.ok("GET", f"/pushrules/global/room/{q(new)}")["actions"] == ["dont_notify"]
    override = bob.ok("GET", f"/pushrules/global/override/{q(new)}")
    assert override["conditions"] == [{"kind": "event_match", "key": "room_id", "pattern": new}], override


def test_v12_room_tombstone_level_and_additional_creators(zhome: ZhomeProcess) -> None:
    alice, bob, carol = ClientUser(zhome, "alice"), ClientUser(zhome, "bob"), ClientUser(zhome, "carol")
    room = alice.ok("POST", "/createRoom", {"room_version": "12", "preset": "public_chat"})["room_id"]
    pl = alice.ok("GET", f"/rooms/{q(room)}/state/m.room.power_levels/")
    assert pl["events"]["m.room.tombstone"] == 150 and alice.user_id not in pl["users"]
    for u in (bob, carol):
        u.ok("POST", f"/join/{q(room)}", {})
    pl["users"][bob.user_id] = 100
    alice.ok("PUT", f"/rooms/{q(room)}/state/m.room.power_levels/", pl)
    # Level 100 is not enough: only creators upgrade a v12 room.
    status, out = upgrade(bob, room, {"new_version": "12"})
    assert status == 403, out

    status, out = upgrade(alice, room, {"new_version": "12", "additional_creators": [carol.user_id]})
    assert status == 200, out
    new = out["replacement_room"]
    create = alice.ok("GET", f"/rooms/{q(new)}/state/m.room.create/")
    assert create["additional_creators"] == [carol.user_id] and create["predecessor"]["room_id"] == room
    new_pl = alice.ok("GET", f"/rooms/{q(new)}/state/m.room.power_levels/")
    assert new_pl["users"] == {bob.user_id: 100} and new_pl["events"]["m.room.tombstone"] == 150
    # Carol, a creator of the new room, may change anything there once joined.
    carol.ok("POST", f"/join/{q(new)}", {})
    carol.ok("PUT", f"/rooms/{q(new)}/state/m.room.name/", {"name": "by carol"})

    # Back to an older version: the v12 creators get 100 there.
    status, out = upgrade(carol, new, {"new_version": "11"})
    assert status == 200, out
    older = out["replacement_room"]
    older_pl = carol.ok("GET", f"/rooms/{q(older)}/state/m.room.power_levels/")
    assert older_pl["users"] == {alice.user_id: 100, bob.user_id: 100, carol.user_id: 100}, older_pl


def test_repeated_upgrade_request_gets_one_replacement(zhome: ZhomeProcess) -> None:
    alice = ClientUser(zhome, "alice")
    room = alice.ok("POST", "/createRoom", {"room_version": "9", "preset": "public_chat", "name": "Busy"})["room_id"]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: upgrade(alice, room, {"new_version": "11"}), range(2)))
    assert all(status == 200 for status, _ in answers), answers
    replacements = {body["replacement_room"] for _, body in answers}
    tomb = alice.ok("GET", f"/rooms/{q(room)}/state/m.room.tombstone/")
    # Either one request answered both, or they ran one after the other:
    # the tombstone names the last replacement either way.
    assert tomb["replacement_room"] in replacements and len(replacements) <= 2
