"""Tests for zhome.rooms.redaction (spec: rooms/v1.md, v6, v8, v9, v11
"Redactions")."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, strategies as st

from zhome.rooms.redaction import prune_event_dict
from zhome.rooms.versions import KNOWN_ROOM_VERSIONS, RoomVersion, get_room_version

ALL_VERSIONS = [str(n) for n in range(1, 13)]

TOP_V1 = {
    "event_id", "type", "room_id", "sender", "state_key", "content", "hashes", "signatures",
    "depth", "prev_events", "prev_state", "auth_events", "origin", "origin_server_ts", "membership",
}  # fmt: skip
TOP_V11 = TOP_V1 - {"origin", "membership", "prev_state"}


def rv(n: int | str) -> RoomVersion:
    return get_room_version(str(n))


def full_event(event_type: str, content: dict[str, Any]) -> dict[str, Any]:
    """An event carrying every top-level key any version knows, plus junk."""
    return {
        "event_id": "$e:example.org",
        "type": event_type,
        "room_id": "!r:example.org",
        "sender": "@u:example.org",
        "state_key": "",
        "content": content,
        "hashes": {"sha256": "abc"},
        "signatures": {"example.org": {"ed25519:1": "sig"}},
        "depth": 7,
        "prev_events": ["$p"],
        "prev_state": [],
        "auth_events": ["$a"],
        "origin": "example.org",
        "origin_server_ts": 1234,
        "membership": "join",
        "redacts": "$x",
        "unsigned": {"age": 5, "redacted_because": {}},
        "age_ts": 99,
        "extra": {"anything": 1},
    }


@pytest.mark.parametrize("v", ALL_VERSIONS)
def test_top_level_keys(v: str) -> None:
    out = prune_event_dict(rv(v), full_event("m.room.message", {"body": "hi"}))
    expected = TOP_V11 if int(v) >= 11 else TOP_V1
    assert set(out) == expected
    assert out["content"] == {}
    assert out["hashes"] == {"sha256": "abc"}
    assert out["signatures"] == {"example.org": {"ed25519:1": "sig"}}


def test_v1_exact_output() -> None:
    assert prune_event_dict(rv(1), full_event("m.room.message", {"body": "hi"})) == {
        "event_id": "$e:example.org",
        "type": "m.room.message",
        "room_id": "!r:example.org",
        "sender": "@u:example.org",
        "state_key": "",
        "content": {},
        "hashes": {"sha256": "abc"},
        "signatures": {"example.org": {"ed25519:1": "sig"}},
        "depth": 7,
        "prev_events": ["$p"],
        "prev_state": [],
        "auth_events": ["$a"],
        "origin": "example.org",
        "origin_server_ts": 1234,
        "membership": "join",
    }


def test_v11_exact_output() -> None:
    assert prune_event_dict(rv(11), full_event("m.room.message", {"body": "hi"})) == {
        "event_id": "$e:example.org",
        "type": "m.room.message",
        "room_id": "!r:example.org",
        "sender": "@u:example.org",
        "state_key": "",
        "content": {},
        "hashes": {"sha256": "abc"},
        "signatures": {"example.org": {"ed25519:1": "sig"}},
        "depth": 7,
        "prev_events": ["$p"],
        "auth_events": ["$a"],
        "origin_server_ts": 1234,
    }


def content_after(v: int, event_type: str, content: dict[str, Any]) -> dict[str, Any]:
    return prune_event_dict(rv(v), full_event(event_type, content))["content"]


MEMBER = {
    "membership": "join",
    "displayname": "U",
    "avatar_url": "mxc://x/y",
    "join_authorised_via_users_server": "@admin:example.org",
    "third_party_invite": {"display_name": "d", "signed": {"mxid": "@u:example.org", "token": "t"}},
    "reason": "r",
}


@pytest.mark.parametrize(
    "v,expected",
    [
        (1, {"membership": "join"}),
        (8, {"membership": "join"}),
        (9, {"membership": "join", "join_authorised_via_users_server": "@admin:example.org"}),
        (10, {"membership": "join", "join_authorised_via_users_server": "@admin:example.org"}),
        (
            11,
            {
                "membership": "join",
                "join_authorised_via_users_server": "@admin:example.org",
                "third_party_invite": {"signed": {"mxid": "@u:example.org", "token": "t"}},
            },
        ),
        (
            12,
            {
                "membership": "join",
                "join_authorised_via_users_server": "@admin:example.org",
                "third_party_invite": {"signed": {"mxid": "@u:example.org", "token": "t"}},
            },
        ),
    ],
)
def test_member_content(v: int, expected: dict[str, Any]) -> None:
    assert content_after(v, "m.room.member", MEMBER) == expected


@pytest.mark.parametrize("tpi", [{"display_name": "d"}, "not an object", None])
def test_v11_member_third_party_invite_without_signed_dropped(tpi: Any) -> None:
    assert content_after(11, "m.room.member", {"membership": "invite", "third_party_invite": tpi}) == {
        "membership": "invite"
    }


CREATE = {"creator": "@u:example.org", "room_version": "10", "m.federate": False, "predecessor": {"room_id": "!o"}}


@pytest.mark.parametrize("v", range(1, 11))
def test_create_content_before_v11(v: int) -> None:
    assert content_after(v, "m.room.create", CREATE) == {"creator": "@u:example.org"}


@pytest.mark.parametrize("v", [11, 12])
def test_create_content_v11_keeps_everything(v: int) -> None:
    content = {"room_version": "12", "additional_creators": ["@b:x"], "m.federate": False, "type": "m.space"}
    assert content_after(v, "m.room.create", content) == content


JOIN_RULES = {"join_rule": "restricted", "allow": [{"type": "m.room_membership", "room_id": "!s"}], "x": 1}


@pytest.mark.parametrize("v", range(1, 8))
def test_join_rules_before_v8(v: int) -> None:
    assert content_after(v, "m.room.join_rules", JOIN_RULES) == {"join_rule": "restricted"}


@pytest.mark.parametrize("v", range(8, 13))
def test_join_rules_v8_keeps_allow(v: int) -> None:
    assert content_after(v, "m.room.join_rules", JOIN_RULES) == {
        "join_rule": "restricted",
        "allow": [{"type": "m.room_membership", "room_id": "!s"}],
    }


POWER_LEVELS = {
    "ban": 50,
    "events": {"m.room.name": 50},
    "events_default": 0,
    "invite": 0,
    "kick": 50,
    "notifications": {"room": 50},
    "redact": 50,
    "state_default": 50,
    "users": {"@u:example.org": 100},
    "users_default": 0,
    "other": 1,
}
PL_V1 = {k: v for k, v in POWER_LEVELS.items() if k not in ("invite", "notifications", "other")}


@pytest.mark.parametrize("v", range(1, 11))
def test_power_levels_before_v11(v: int) -> None:
    assert content_after(v, "m.room.power_levels", POWER_LEVELS) == PL_V1


@pytest.mark.parametrize("v", [11, 12])
def test_power_levels_v11_keeps_invite(v: int) -> None:
    assert content_after(v, "m.room.power_levels", POWER_LEVELS) == {**PL_V1, "invite": 0}


@pytest.mark.parametrize("v", ALL_VERSIONS)
def test_history_visibility(v: str) -> None:
    assert content_after(int(v), "m.room.history_visibility", {"history_visibility": "shared", "x": 1}) == {
        "history_visibility": "shared"
    }


@pytest.mark.parametrize("v", range(1, 6))
def test_aliases_kept_v1_to_v5(v: int) -> None:
    assert content_after(v, "m.room.aliases", {"aliases": ["#a:x"], "x": 1}) == {"aliases": ["#a:x"]}


@pytest.mark.parametrize("v", range(6, 13))
def test_aliases_dropped_from_v6(v: int) -> None:
    assert content_after(v, "m.room.aliases", {"aliases": ["#a:x"]}) == {}


@pytest.mark.parametrize("v", range(1, 11))
def test_redaction_before_v11_loses_redacts(v: int) -> None:
    out = prune_event_dict(rv(v), full_event("m.room.redaction", {"redacts": "$x", "reason": "spam"}))
    assert out["content"] == {}
    assert "redacts" not in out


@pytest.mark.parametrize("v", [11, 12])
def test_redaction_v11_keeps_content_redacts(v: int) -> None:
    out = prune_event_dict(rv(v), full_event("m.room.redaction", {"redacts": "$x", "reason": "spam"}))
    assert out["content"] == {"redacts": "$x"}
    assert "redacts" not in out


@pytest.mark.parametrize("v", ALL_VERSIONS)
def test_other_types_lose_all_content(v: str) -> None:
    for t in ("m.room.name", "m.room.topic", "m.room.encrypted", "m.room.third_party_invite", "org.example"):
        assert content_after(int(v), t, {"name": "n", "membership": "join", "join_rule": "public"}) == {}


@pytest.mark.parametrize("v", ALL_VERSIONS)
def test_unsigned_dropped(v: str) -> None:
    out = prune_event_dict(rv(v), {"type": "m.room.message", "content": {}, "unsigned": {"redacted_because": {}}})
    assert out == {"type": "m.room.message", "content": {}}


def test_missing_content_not_added() -> None:
    assert prune_event_dict(rv(10), {"type": "m.room.message", "sender": "@u:x"}) == {
        "type": "m.room.message",
        "sender": "@u:x",
    }


def test_non_object_content_becomes_empty() -> None:
    assert prune_event_dict(rv(10), {"type": "m.room.member", "content": ["membership"]})["content"] == {}


def test_input_not_mutated_and_not_shared() -> None:
    event = full_event("m.room.power_levels", copy.deepcopy(POWER_LEVELS))
    before = copy.deepcopy(event)
    out = prune_event_dict(rv(11), event)
    assert event == before
    out["content"]["users"]["@evil:x"] = 100
    out["signatures"]["evil"] = {}
    out["prev_events"].append("$y")
    assert event == before


# -- properties ----------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=10)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3),
    max_leaves=10,
)
CONTENT_KEYS = sorted(
    {"membership", "join_authorised_via_users_server", "third_party_invite", "creator", "room_version",
     "join_rule", "allow", "invite", "notifications", "redacts", "history_visibility", "aliases", "body"}
    | set(POWER_LEVELS)
)  # fmt: skip
EVENT_TYPES = [
    "m.room.member", "m.room.create", "m.room.join_rules", "m.room.power_levels", "m.room.history_visibility",
    "m.room.aliases", "m.room.redaction", "m.room.message", "m.room.name",
]  # fmt: skip
ALL_TOP_KEYS = sorted(TOP_V1 | {"unsigned", "redacts", "age_ts", "extra", "origin"})

contents = st.dictionaries(st.sampled_from(CONTENT_KEYS) | st.text(max_size=5), json_values, max_size=8)
events = st.builds(
    lambda t, content, others: {**others, "type": t, "content": content},
    st.sampled_from(EVENT_TYPES),
    contents,
    st.dictionaries(st.sampled_from(ALL_TOP_KEYS) | st.text(max_size=5), json_values, max_size=10),
)
versions = st.sampled_from(sorted(KNOWN_ROOM_VERSIONS.values(), key=lambda r: int(r.identifier)))


@given(versions, events)
def test_idempotent(room_version: RoomVersion, event: dict[str, Any]) -> None:
    once = prune_event_dict(room_version, event)
    assert prune_event_dict(room_version, once) == once


@given(versions, events)
def test_never_adds_keys(room_version: RoomVersion, event: dict[str, Any]) -> None:
    out = prune_event_dict(room_version, event)
    assert set(out) <= set(event)
    assert set(out["content"]) <= set(event["content"])


@given(versions, events)
def test_keeps_essential_keys(room_version: RoomVersion, event: dict[str, Any]) -> None:
    out = prune_event_dict(room_version, event)
    protected = TOP_V11 if int(room_version.identifier) >= 11 else TOP_V1
    for key in protected - {"content"}:
        if key in event:
            assert out[key] == event[key]
        else:
            assert key not in out
    assert set(out) == set(event) & protected


@given(versions, events)
def test_does_not_mutate(room_version: RoomVersion, event: dict[str, Any]) -> None:
    before = copy.deepcopy(event)
    prune_event_dict(room_version, event)
    assert event == before
