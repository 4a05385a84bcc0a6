"""The residency policy: operator allow/block lists, m.room.server_acl and
zhome.residency, each able to refuse a server."""

from __future__ import annotations

from zhome.federation.destinations import DestinationPolicy
from zhome.federation.policy import ResidencyPolicy, server_acl_allows


def _policy(allowed=("*",), blocked=()) -> ResidencyPolicy:  # type: ignore[no-untyped-def]
    return ResidencyPolicy("home.example", DestinationPolicy(allowed, blocked))


def test_operator_lists() -> None:
    p = _policy(blocked=("*.evil.example", "127.0.0.9:*"))
    assert p.server_allowed("good.example")
    assert not p.server_allowed("a.evil.example")
    assert not p.server_allowed("A.EVIL.example:8448")
    assert not p.server_allowed("127.0.0.9:8448")
    assert p.server_allowed("home.example")
    only = _policy(allowed=("*.care.example",))
    assert only.server_allowed("north.care.example")
    assert not only.server_allowed("other.example")


def test_server_acl() -> None:
    acl = {"allow": ["*"], "deny": ["bad.example"], "allow_ip_literals": False}
    assert server_acl_allows(acl, "fine.example:8448")
    assert not server_acl_allows(acl, "bad.example")
    assert not server_acl_allows(acl, "127.0.0.2:8448")
    assert not server_acl_allows({"allow": []}, "any.example")
    assert server_acl_allows(None, "any.example")


def test_room_residency_event() -> None:
    p = _policy()
    state = {("zhome.residency", ""): {"allow": ["*.nl.example"]}}
    assert p.room_allows("a.nl.example", state)
    assert not p.room_allows("a.us.example", state)
    deny = {("zhome.residency", ""): {"deny": ["a.nl.example"]}}
    assert not p.room_allows("a.nl.example", deny)
    assert p.room_allows("b.nl.example", deny)
    assert p.room_allows("home.example", {("m.room.server_acl", ""): {"allow": []}})
