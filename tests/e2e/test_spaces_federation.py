"""The space hierarchy across two real zhome servers (A 127.0.0.2, B
127.0.0.3; zhome_pair in conftest.py), on SQLite and PostgreSQL: a space
on A links a space that lives only on B, whose rooms A learns through
GET /_matrix/federation/v1/hierarchy (served by B).

Spec: client-server-api "Spaces", server-server-api "Spaces".
"""

from __future__ import annotations

from typing import Any

from tests.e2e.conftest import ZhomeServers
from tests.e2e.harness import ClientUser, q
from tests.e2e.test_spaces import hierarchy, ids


def _room(user: ClientUser, name: str, preset: str = "public_chat", **extra: Any) -> str:
    return str(user.ok("POST", "/createRoom", {"name": name, "preset": preset, **extra})["room_id"])


def test_hierarchy_through_another_server(zhome_pair: ZhomeServers) -> None:
    a, b = zhome_pair.a, zhome_pair.b
    alice, bob = ClientUser(a, "spacealice"), ClientUser(b, "spacebob")
    space_b = _room(bob, "B's space", creation_content={"type": "m.space"})
    night_b = _room(bob, "Night on B")
    secret_b = _room(bob, "Secret on B", preset="private_chat")
    for child in (night_b, secret_b):
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
    assert {c["state_key"] for c in remote["children_state"]} == {night_b, secret_b}
    assert body["rooms"][2]["name"] == "Night on B" and body["rooms"][2]["join_rule"] == "public"

    # Paging over the remote part walks the same tree.
    status, first = hierarchy(alice, space_a, limit=2)
    assert ids(first) == [space_a, space_b] and first["next_batch"], first
    status, rest = hierarchy(alice, space_a, limit=10, **{"from": first["next_batch"]})
    assert status == 200 and ids(rest) == [night_b, local_a], rest
    assert ids(hierarchy(alice, space_a, max_depth=1)[1]) == [space_a, space_b, local_a]

    # Once alice is in B's space, A's own copy of it is used.
    alice.ok("POST", f"/join/{q(space_b)}?via={q(b.server_name)}", {})
    status, body = hierarchy(alice, space_a)
    assert ids(body) == [space_a, space_b, night_b, local_a], body
    assert body["rooms"][1]["num_joined_members"] == 2


def test_hierarchy_of_an_unreachable_child(zhome_pair: ZhomeServers) -> None:
    a = zhome_pair.a
    alice = ClientUser(a, "spacealice2")
    space = _room(alice, "Space", creation_content={"type": "m.space"})
    # A child on a server that does not exist is left out, the walk goes on.
    alice.ok("PUT", f"/rooms/{q(space)}/state/m.space.child/{q('!nowhere:127.0.0.9:1')}", {"via": ["127.0.0.9:1"]})
    status, body = hierarchy(alice, space)
    assert status == 200 and ids(body) == [space], body
