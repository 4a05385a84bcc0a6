"""Room summaries (GET /_matrix/client/v1/room_summary/{roomIdOrAlias} and
MSC3266's unstable paths) through a real zhome on SQLite and PostgreSQL.

Spec: client-server-api "Room summaries".
"""

from __future__ import annotations

from typing import Any

import jsonschema

from tests.e2e.harness import ClientUser, ZhomeProcess, q
from tests.e2e.openapi import Spec

_spec: Spec | None = None

V1 = "/_matrix/client/v1/room_summary/"
ENCRYPTED = [{"type": "m.room.encryption", "state_key": "", "content": {"algorithm": "m.megolm.v1.aes-sha2"}}]


def summary(hs: ZhomeProcess, target: str, user: ClientUser | None = None, path: str = "v1") -> tuple[int, Any]:
    url = {"v1": V1 + q(target),
           "nheko": f"/_matrix/client/unstable/im.nheko.summary/rooms/{q(target)}/summary",
           "nheko-old": f"/_matrix/client/unstable/im.nheko.summary/summary/{q(target)}"}[path]
    status, body = hs.request("GET", url, token=user.token if user else None)
    if status in (200, 404):
        # Every answer is checked against the spec's response schema.
        global _spec
        _spec = _spec or Spec()
        schema = _spec.response_schema("/room_summary/{roomIdOrAlias}", "get", status)
        errors = list(jsonschema.Draft202012Validator(schema).iter_errors(body))
        assert not errors, [e.message for e in errors[:5]]
    return status, body


def test_private_room_summary_for_members_and_invitees_only(zhome: ZhomeProcess) -> None:
    alice, bob = ClientUser(zhome, "alice"), ClientUser(zhome, "bob")
    room_id = alice.ok("POST", "/createRoom", {"name": "Ward 7", "topic": "night shift", "preset": "private_chat",
                                                "initial_state": ENCRYPTED})["room_id"]
    status, body = summary(zhome, room_id, alice)
    assert status == 200, body
    assert body["room_id"] == room_id and body["name"] == "Ward 7" and body["topic"] == "night shift"
    assert body["membership"] == "join" and body["num_joined_members"] == 1
    # The private_chat preset lets guests join.
    assert body["join_rule"] == "invite" and body["world_readable"] is False and body["guest_can_join"] is True
    assert body["encryption"] == "m.megolm.v1.aes-sha2"
    create = alice.ok("GET", f"/rooms/{q(room_id)}/state/m.room.create/")
    assert body["room_version"] == create["room_version"]
    assert "allowed_room_ids" not in body and "room_type" not in body

    # Neither an outsider nor an anonymous caller learns the room exists.
    for who in (bob, None):
        status, body = summary(zhome, room_id, who)
        assert status == 404 and body["errcode"] == "M_NOT_FOUND", (who, status, body)
    alice.ok("POST", f"/rooms/{q(room_id)}/invite", {"user_id": bob.user_id})
    for path in ("v1", "nheko", "nheko-old"):
        status, body = summary(zhome, room_id, bob, path)
        assert status == 200 and body["membership"] == "invite" and body["name"] == "Ward 7", (path, body)


def test_public_room_summary_by_alias_without_a_token(zhome: ZhomeProcess) -> None:
    alice = ClientUser(zhome, "alice")
    room_id = alice.ok("POST", "/createRoom", {"name": "Lobby", "preset": "public_chat",
                                                "room_alias_name": "lobby"})["room_id"]
    status, body = summary(zhome, "#lobby:localhost")
    assert status == 200, body
    assert body["room_id"] == room_id and body["join_rule"] == "public"
    assert body["canonical_alias"] == "#lobby:localhost"
    assert "membership" not in body and "encryption" not in body
    bob = ClientUser(zhome, "bob")
    assert summary(zhome, room_id, bob)[1]["membership"] == "leave"

    status, body = zhome.request("GET", V1 + q(room_id), token="not-a-token")
    assert status == 401 and body["errcode"] == "M_UNKNOWN_TOKEN", body
    status, body = summary(zhome, "#nowhere:localhost")
    assert status == 404 and body["errcode"] == "M_NOT_FOUND", body
    status, body = summary(zhome, "!unknown:localhost", bob)
    assert status == 404 and body["errcode"] == "M_NOT_FOUND", body
    status, body = summary(zhome, "lobby", bob)
    assert status == 400 and body["errcode"] == "M_INVALID_PARAM", body


def test_restricted_room_summary_for_members_of_allowed_rooms(zhome: ZhomeProcess) -> None:
    alice, carol, dave = ClientUser(zhome, "alice"), ClientUser(zhome, "carol"), ClientUser(zhome, "dave")
    team = alice.ok("POST", "/createRoom", {"preset": "public_chat"})["room_id"]
    carol.ok("POST", f"/join/{q(team)}", {})
    room_id = alice.ok("POST", "/createRoom", {"name": "Team only", "preset": "private_chat", "initial_state": [
        {"type": "m.room.join_rules", "state_key": "",
         "content": {"join_rule": "restricted", "allow": [{"type": "m.room_membership", "room_id": team}]}}]})["room_id"]
    status, body = summary(zhome, room_id, carol)
    assert status == 200, body
    assert body["join_rule"] == "restricted" and body["allowed_room_ids"] == [team]
    assert body["membership"] == "leave"
    status, body = summary(zhome, room_id, dave)
    assert status == 404, body
