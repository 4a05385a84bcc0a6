"""The space hierarchy across two real zhome servers (A 127.0.0.2, B
127.0.0.3; zhome_pair in conftest.py), on SQLite and PostgreSQL: a space
on A links a space that lives only on B, whose rooms A learns through
GET /_matrix/federation/v1/hierarchy (served by B).

Spec: client-server-api "Spaces", server-server-api "Spaces".
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from tests.e2e.conftest import ZhomeServers
from tests.e2e.harness import ClientUser, ZhomeProcess, q
from tests.e2e.openapi import Spec
from tests.e2e.test_spaces import hierarchy, ids
from zhome.crypto.keys import read_signing_key_file
from zhome.federation.request_auth import sign_request


def federation_get(origin: ZhomeProcess, dest: ZhomeProcess, path: str) -> tuple[int, Any]:
    """A GET to ``dest``'s federation API signed with ``origin``'s key (which
    ``dest`` fetches from ``origin``, a running server)."""
    cfg = yaml.safe_load(origin.config_path.read_text())
    key_path = Path(cfg["signing_key_path"])
    if not key_path.is_absolute():
        key_path = origin.config_path.parent / key_path
    key = read_signing_key_file(str(key_path))[0]
    auth = sign_request(origin.server_name, dest.server_name, "GET", path, None, key)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    req = urllib.request.Request(f"https://{dest.server_name}{path}", headers={"Authorization": auth})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def federation_schema(status: int) -> Any:
    spec = Spec()
    path = spec.data_dir / "api" / "server-server" / "space_hierarchy.yaml"
    op = spec._load(path)["paths"]["/hierarchy/{roomId}"]["get"]
    return spec._inline(path, op["responses"][str(status)])["content"]["application/json"]["schema"]


def _room(user: ClientUser, name: str, preset: str = "public_chat", **extra: Any) -> str:
    return str(user.ok("POST", "/createRoom", {"name": name, "preset": preset, **extra})["room_id"])


def test_hierarchy_through_another_server(zhome_pair: ZhomeServers) -> None:
    a, b = zhome_pair.a, zhome_pair.b
    alice, bob = ClientUser(a, "spacealice"), ClientUser(b, "spacebob")
    space_b = _room(bob, "B's space", creation_content={"type": "m.space"})
    night_b = _room(bob, "Night on B")
    secret_b = _room(bob, "Secret on B", preset="private_chat")
    members_b = _room(bob, "Members of B's space", preset="private_chat", initial_state=[
        {"type": "m.room.join_rules", "state_key": "",
         "content": {"join_rule": "restricted", "allow": [{"type": "m.room_membership", "room_id": space_b}]}}])
    for child in (night_b, secret_b, members_b):
        bob.ok("PUT", f"/rooms/{q(space_b)}/state/m.space.child/{q(child)}", {"via": [b.server_name]})
    space_a = _room(alice, "A's space", creation_content={"type": "m.space"})
    local_a = _room(alice, "Local on A")
    alice.ok("PUT", f"/rooms/{q(space_a)}/state/m.space.child/{q(space_b)}",
             {"via": [b.server_name], "order": "1"})
    alice.ok("PUT", f"/rooms/{q(space_a)}/state/m.space.child/{q(local_a)}", {"via": [a.server_name], "order": "2"})

    status, body = hierarchy(alice, space_a)
    assert status == 200, body
    # B's private room is no business of A's users: B names it inaccessible.
    assert ids(body) == [space_a, space_b, night_b, local_a], body
    remote = body["rooms"][1]
    assert remote["name"] == "B's space" and remote["room_type"] == "m.space" and remote["num_joined_members"] == 1
    assert {c["state_key"] for c in remote["children_state"]} == {night_b, secret_b, members_b}
    assert body["rooms"][2]["name"] == "Night on B" and body["rooms"][2]["join_rule"] == "public"

    # B's own answer to A: the space, its public child, the private one named only.
    status, answer = federation_get(a, b, f"/_matrix/federation/v1/hierarchy/{q(space_b)}?suggested_only=false")
    assert status == 200, answer
    errors = list(jsonschema.Draft202012Validator(federation_schema(200)).iter_errors(answer))
    assert not errors, [f"{list(e.absolute_path)}: {e.message}" for e in errors[:5]]
    assert answer["room"]["room_id"] == space_b and len(answer["room"]["children_state"]) == 3
    assert [c["room_id"] for c in answer["children"]] == [night_b]
    assert answer["inaccessible_children"] == [secret_b, members_b]
    status, answer = federation_get(a, b, f"/_matrix/federation/v1/hierarchy/{q(secret_b)}")
    assert status == 404 and answer["errcode"] == "M_NOT_FOUND", answer
    status, answer = federation_get(a, b, f"/_matrix/federation/v1/hierarchy/{q(space_b)}?suggested_only=true")
    assert status == 200 and answer["children"] == [] and answer["room"]["children_state"] == [], answer

    # Paging over the remote part walks the same tree.
    status, first = hierarchy(alice, space_a, limit=2)
    assert ids(first) == [space_a, space_b] and first["next_batch"], first
    status, rest = hierarchy(alice, space_a, limit=10, **{"from": first["next_batch"]})
    assert status == 200 and ids(rest) == [night_b, local_a], rest
    assert ids(hierarchy(alice, space_a, max_depth=1)[1]) == [space_a, space_b, local_a]

    # Once alice is in B's space, A's own copy of it is used, and the room
    # restricted to the space's members is hers to see (B tells A about it
    # now that one of A's users is in the space).
    alice.ok("POST", f"/join/{q(space_b)}?via={q(b.server_name)}", {})
    status, body = hierarchy(alice, space_a)
    assert ids(body) == [space_a, space_b, night_b, members_b, local_a], body
    assert body["rooms"][1]["num_joined_members"] == 2
    restricted = body["rooms"][3]
    assert restricted["join_rule"] == "restricted" and restricted["allowed_room_ids"] == [space_b], restricted


def test_hierarchy_of_an_unreachable_child(zhome_pair: ZhomeServers) -> None:
    a = zhome_pair.a
    alice = ClientUser(a, "spacealice2")
    space = _room(alice, "Space", creation_content={"type": "m.space"})
    # A child on a server that does not exist is left out, the walk goes on.
    alice.ok("PUT", f"/rooms/{q(space)}/state/m.space.child/{q('!nowhere:127.0.0.9:1')}", {"via": ["127.0.0.9:1"]})
    status, body = hierarchy(alice, space)
    assert status == 200 and ids(body) == [space], body
