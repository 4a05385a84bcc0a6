"""The space hierarchy (GET /_matrix/client/v1/rooms/{roomId}/hierarchy) and
mutual rooms (GET /_matrix/client/v1/mutual_rooms) on one real zhome, on
SQLite and PostgreSQL. Across two servers: test_spaces_federation.py.

Spec: client-server-api "Spaces" (space_hierarchy.yaml), "Mutual rooms"
(mutual_rooms.yaml).
"""

from __future__ import annotations

from typing import Any, Optional

import jsonschema

from tests.e2e.harness import ClientUser, ZhomeProcess, q
from tests.e2e.openapi import Spec

_spec: list[Spec] = []
V1 = "/_matrix/client/v1"


def checked(template: str, status: int, body: Any) -> None:
    if not _spec:
        _spec.append(Spec())
    schema = _spec[0].response_schema(template, "get", status)
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(body))
    assert not errors, [f"{list(e.absolute_path)}: {e.message}" for e in errors[:5]]


def hierarchy(user: ClientUser, room_id: str, **params: Any) -> tuple[int, Any]:
    query = "&".join(f"{k}={q(str(v).lower() if isinstance(v, bool) else str(v))}" for k, v in params.items())
    status, body = user.hs.request("GET", f"{V1}/rooms/{q(room_id)}/hierarchy" + (f"?{query}" if query else ""),
                                   token=user.token)
    if status in (200, 400, 403):
        checked("/rooms/{roomId}/hierarchy", status, body)
    return status, body


def ids(body: dict[str, Any]) -> list[str]:
    return [r["room_id"] for r in body["rooms"]]


def make_space(user: ClientUser, name: str, preset: str = "public_chat") -> str:
    return str(user.ok("POST", "/createRoom", {"name": name, "preset": preset,
                                               "creation_content": {"type": "m.space"}})["room_id"])


def add_child(user: ClientUser, space: str, child: str, via: str, **extra: Any) -> None:
    user.ok("PUT", f"/rooms/{q(space)}/state/m.space.child/{q(child)}", {"via": [via], **extra})


def test_hierarchy_of_nested_spaces(zhome: ZhomeProcess) -> None:
    alice, bob = ClientUser(zhome, "alice"), ClientUser(zhome, "bob")
    hs = zhome.server_name
    space = make_space(alice, "Hospital")
    general = alice.ok("POST", "/createRoom", {"name": "General", "preset": "public_chat"})["room_id"]
    ward = make_space(alice, "Ward")
    night = alice.ok("POST", "/createRoom", {"name": "Night", "preset": "public_chat"})["room_id"]
    private = alice.ok("POST", "/createRoom", {"name": "Board", "preset": "private_chat"})["room_id"]
    gone = alice.ok("POST", "/createRoom", {"preset": "public_chat"})["room_id"]
    add_child(alice, space, general, hs, suggested=True)
    add_child(alice, space, ward, hs, order="a")
    add_child(alice, space, private, hs)
    # A link without "via" is no link; a loop back to the top is broken.
    alice.ok("PUT", f"/rooms/{q(space)}/state/m.space.child/{q(gone)}", {})
    add_child(alice, ward, night, hs)
    add_child(alice, ward, space, hs)

    status, body = hierarchy(bob, space)
    assert status == 200, body
    # Depth first, "order" before the rest: the private room is not bob's to see.
    assert ids(body) == [space, ward, night, general], body
    assert "next_batch" not in body
    top = body["rooms"][0]
    assert top["room_type"] == "m.space" and top["name"] == "Hospital" and top["join_rule"] == "public"
    assert [c["state_key"] for c in top["children_state"]] == [ward, general, private]
    assert all(c["origin_server_ts"] > 0 and c["sender"] == alice.user_id for c in top["children_state"])
    assert body["rooms"][2]["children_state"] == [] and "room_type" not in body["rooms"][2]
    # Alice is in the private room.
    assert ids(hierarchy(alice, space)[1]) == [space, ward, night, general, private]

    assert ids(hierarchy(bob, space, max_depth=1)[1]) == [space, ward, general]
    assert ids(hierarchy(bob, space, max_depth=0)[1]) == [space]
    assert ids(hierarchy(bob, space, suggested_only=True)[1]) == [space, general]

    # Pages of two, with the same filters on every page.
    status, first = hierarchy(bob, space, limit=2)
    assert status == 200 and ids(first) == [space, ward] and first["next_batch"], first
    status, second = hierarchy(bob, space, limit=2, **{"from": first["next_batch"]})
    assert status == 200 and ids(second) == [night, general], second
    assert "next_batch" not in second or ids(hierarchy(bob, space, limit=2, **{"from": second["next_batch"]})[1]) == []
    status, body = hierarchy(bob, space, limit=2, suggested_only=True, **{"from": first["next_batch"]})
    assert status == 400 and body["errcode"] == "M_INVALID_PARAM", body

    # A banned user does not see the room they are banned from (nor below it).
    carol = ClientUser(zhome, "carol")
    alice.ok("POST", f"/rooms/{q(ward)}/ban", {"user_id": carol.user_id})
    assert ids(hierarchy(carol, space)[1]) == [space, general]

    # A private room is 403 for outsiders; bad parameters are 400.
    status, body = hierarchy(bob, private)
    assert status == 403 and body["errcode"] == "M_FORBIDDEN", body
    assert hierarchy(bob, "!unknown:localhost")[0] == 403
    for params in ({"limit": 0}, {"max_depth": -1}, {"from": "garbage"}, {"suggested_only": "maybe"},
                   {"limit": "x"}):
        status, body = hierarchy(bob, space, **params)
        assert status == 400 and body["errcode"] == "M_INVALID_PARAM", (params, body)


def test_hierarchy_restricted_child_for_members_of_the_space(zhome: ZhomeProcess) -> None:
    alice, bob, carol = ClientUser(zhome, "alice"), ClientUser(zhome, "bob"), ClientUser(zhome, "carol")
    space = make_space(alice, "Team", preset="private_chat")
    team_room = alice.ok("POST", "/createRoom", {"name": "Team room", "preset": "private_chat", "initial_state": [
        {"type": "m.room.join_rules", "state_key": "",
         "content": {"join_rule": "restricted", "allow": [{"type": "m.room_membership", "room_id": space}]}}]})[
        "room_id"]
    add_child(alice, space, team_room, zhome.server_name)
    alice.ok("POST", f"/rooms/{q(space)}/invite", {"user_id": bob.user_id})
    # Invited to the space: bob sees it but not yet the restricted room.
    assert ids(hierarchy(bob, space)[1]) == [space]
    bob.ok("POST", f"/join/{q(space)}", {})
    status, body = hierarchy(bob, space)
    assert ids(body) == [space, team_room], body
    assert body["rooms"][1]["allowed_room_ids"] == [space] and body["rooms"][1]["join_rule"] == "restricted"
    assert hierarchy(carol, space)[0] == 403
    # The listed room is bob's to join, by the space's membership; not carol's.
    bob.ok("POST", f"/join/{q(team_room)}", {})
    member = bob.ok("GET", f"/rooms/{q(team_room)}/state/m.room.member/{q(bob.user_id)}")
    assert member["membership"] == "join" and member["join_authorised_via_users_server"] == alice.user_id
    status, body = carol.req("POST", f"/join/{q(team_room)}", {})
    assert status == 403 and body["errcode"] == "M_FORBIDDEN", body


def mutual(user: ClientUser, other: Optional[str], **params: str) -> tuple[int, Any]:
    query = ([f"user_id={q(other)}"] if other is not None else []) + [f"{k}={q(v)}" for k, v in params.items()]
    status, body = user.hs.request("GET", f"{V1}/mutual_rooms?" + "&".join(query), token=user.token)
    if status in (200, 400):
        checked("/mutual_rooms", status, body)
    return status, body


def test_mutual_rooms(zhome: ZhomeProcess) -> None:
    alice, bob, carol = (ClientUser(zhome, n) for n in ("alice", "bob", "carol"))
    shared = []
    for i in range(5):
        room = alice.ok("POST", "/createRoom", {"preset": "public_chat"})["room_id"]
        bob.ok("POST", f"/join/{q(room)}", {})
        shared.append(room)
    left = alice.ok("POST", "/createRoom", {"preset": "public_chat"})["room_id"]
    bob.ok("POST", f"/join/{q(left)}", {})
    bob.ok("POST", f"/rooms/{q(left)}/leave", {})
    invited = alice.ok("POST", "/createRoom", {"preset": "private_chat", "invite": [bob.user_id]})["room_id"]
    alice.ok("POST", "/createRoom", {"preset": "public_chat"})
    assert invited not in shared

    status, body = mutual(alice, bob.user_id)
    assert status == 200 and body == {"joined": sorted(shared), "count": 5}, body
    assert mutual(bob, alice.user_id)[1]["joined"] == sorted(shared)
    assert mutual(carol, alice.user_id)[1] == {"joined": [], "count": 0}
    assert mutual(alice, "@nobody:localhost")[1] == {"joined": [], "count": 0}

    # Pages (limit is zhome's extension), by next_batch and by MSC2666's batch_token.
    seen: list[str] = []
    token: Optional[str] = None
    for _ in range(5):
        params = {"limit": "2"}
        if token is not None:
            params["from" if len(seen) < 3 else "batch_token"] = token
        status, body = mutual(alice, bob.user_id, **params)
        assert status == 200 and body["count"] == 5, body
        seen += body["joined"]
        token = body.get("next_batch")
        if token is None:
            break
    assert seen == sorted(shared)
    status, body = alice.hs.request("GET", "/_matrix/client/unstable/uk.half-shot.msc2666/user/mutual_rooms?user_id="
                                    + q(bob.user_id), token=alice.token)
    assert status == 200 and body["joined"] == sorted(shared), body

    for other, params in ((None, {}), ("bob", {}), ("@:x", {}), (alice.user_id, {}),
                          (bob.user_id, {"from": "!!!"}), (bob.user_id, {"limit": "0"})):
        status, body = mutual(alice, other, **params)
        assert status == 400 and body["errcode"] in ("M_INVALID_PARAM", "M_MISSING_PARAM"), (other, params, body)
    versions = zhome.request("GET", "/_matrix/client/versions")[1]
    assert versions["unstable_features"]["uk.half-shot.msc2666.query_mutual_rooms"] is True
