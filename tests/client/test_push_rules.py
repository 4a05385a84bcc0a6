"""Unit tests of the merged push ruleset.

Spec: client-server-api "Push Notifications" → "Predefined Rules" and the
kind order of "Push Rules".
"""

from __future__ import annotations

from typing import Any

import pytest

from zhome.client.user_data import UserDataServlets, parse_push_rule_path, split_rule_path
from zhome.http.errors import MatrixError
from zhome.push.rules import KINDS, build_ruleset, default_rule, find_rule

ALICE = "@alice:example.org"

SPEC_OVERRIDE_ORDER = [
    ".m.rule.master",
    ".m.rule.suppress_notices",
    ".m.rule.invite_for_me",
    ".m.rule.member_event",
    ".m.rule.is_user_mention",
    ".m.rule.contains_display_name",
    ".m.rule.is_room_mention",
    ".m.rule.roomnotif",
    ".m.rule.tombstone",
    ".m.rule.reaction",
    ".m.rule.room.server_acl",
    ".m.rule.suppress_edits",
]
SPEC_UNDERRIDE_ORDER = [
    ".m.rule.call",
    ".m.rule.encrypted_room_one_to_one",
    ".m.rule.room_one_to_one",
    ".m.rule.message",
    ".m.rule.encrypted",
]


def ids(rules: list[dict[str, Any]]) -> list[str]:
    return [r["rule_id"] for r in rules]


def test_defaults_in_spec_order() -> None:
    g = build_ruleset(ALICE, [], [])["global"]
    assert set(g) == set(KINDS)
    assert ids(g["override"]) == SPEC_OVERRIDE_ORDER
    assert ids(g["content"]) == [".m.rule.contains_user_name"]
    assert g["room"] == [] and g["sender"] == []
    assert ids(g["underride"]) == SPEC_UNDERRIDE_ORDER
    for kind in KINDS:
        for r in g[kind]:
            assert r["default"] is True
            assert set(r) >= {"rule_id", "default", "enabled", "actions"}


def test_master_disabled_others_enabled() -> None:
    g = build_ruleset(ALICE, [], [])["global"]
    assert g["override"][0]["enabled"] is False
    assert all(r["enabled"] for kind in KINDS for r in g[kind] if r["rule_id"] != ".m.rule.master")


def test_user_id_and_localpart_substituted() -> None:
    g = build_ruleset(ALICE, [], [])["global"]
    invite = find_rule({"global": g}, "override", ".m.rule.invite_for_me")
    assert invite is not None
    assert {"kind": "event_match", "key": "state_key", "pattern": ALICE} in invite["conditions"]
    mention = find_rule({"global": g}, "override", ".m.rule.is_user_mention")
    assert mention is not None
    assert mention["conditions"] == [
        {"kind": "event_property_contains", "key": "content.m\\.mentions.user_ids", "value": ALICE}
    ]
    assert g["content"][0]["pattern"] == "alice"
    assert "[the user" not in repr(g)


def test_spec_definitions_of_some_defaults() -> None:
    assert default_rule(ALICE, "override", ".m.rule.tombstone") == {
        "rule_id": ".m.rule.tombstone",
        "default": True,
        "enabled": True,
        "conditions": [
            {"kind": "event_match", "key": "type", "pattern": "m.room.tombstone"},
            {"kind": "event_match", "key": "state_key", "pattern": ""},
        ],
        "actions": ["notify", {"set_tweak": "highlight"}],
    }
    assert default_rule(ALICE, "underride", ".m.rule.call") == {
        "rule_id": ".m.rule.call",
        "default": True,
        "enabled": True,
        "conditions": [{"kind": "event_match", "key": "type", "pattern": "m.call.invite"}],
        "actions": ["notify", {"set_tweak": "sound", "value": "ring"}],
    }
    assert default_rule(ALICE, "override", ".m.rule.call") is None


def test_user_override_between_master_and_other_defaults() -> None:
    user_rules = [
        ("override", "second", 1, {"actions": [], "conditions": []}),
        ("override", "first", 0, {"actions": ["notify"], "conditions": [{"kind": "event_match", "key": "type",
                                                                         "pattern": "m.x"}]}),
    ]
    g = build_ruleset(ALICE, user_rules, [])["global"]
    assert ids(g["override"]) == [".m.rule.master", "first", "second"] + SPEC_OVERRIDE_ORDER[1:]
    first = g["override"][1]
    assert first == {
        "rule_id": "first",
        "default": False,
        "enabled": True,
        "conditions": [{"kind": "event_match", "key": "type", "pattern": "m.x"}],
        "actions": ["notify"],
    }


def test_user_rules_before_defaults_of_other_kinds() -> None:
    user_rules = [
        ("underride", "u1", 0, {"actions": ["notify"], "conditions": []}),
        ("content", "cake", 0, {"actions": ["notify"], "pattern": "cake*lie"}),
        ("room", "!r:example.org", 0, {"actions": []}),
        ("sender", "@spam:example.org", 0, {"actions": []}),
    ]
    g = build_ruleset(ALICE, user_rules, [])["global"]
    assert ids(g["underride"]) == ["u1"] + SPEC_UNDERRIDE_ORDER
    assert ids(g["content"]) == ["cake", ".m.rule.contains_user_name"]
    assert g["content"][0]["pattern"] == "cake*lie" and "conditions" not in g["content"][0]
    assert g["room"] == [{"rule_id": "!r:example.org", "default": False, "enabled": True, "actions": []}]
    assert ids(g["sender"]) == ["@spam:example.org"]


def test_disabling_a_default_rule() -> None:
    g = build_ruleset(ALICE, [], [("underride", ".m.rule.message", 0, None)])["global"]
    msg = find_rule({"global": g}, "underride", ".m.rule.message")
    assert msg is not None and msg["enabled"] is False
    assert msg["actions"] == ["notify"]
    # The module's templates are not mutated: a fresh build is unaffected.
    fresh = find_rule(build_ruleset(ALICE, [], []), "underride", ".m.rule.message")
    assert fresh is not None and fresh["enabled"] is True


def test_enabling_master_and_overriding_actions() -> None:
    enables = [
        ("override", ".m.rule.master", 1, None),
        ("content", ".m.rule.contains_user_name", 1, ["notify"]),
        ("override", "mine", 0, ["notify"]),
    ]
    user_rules = [("override", "mine", 0, {"actions": [], "conditions": []})]
    rs = build_ruleset(ALICE, user_rules, enables)
    master = find_rule(rs, "override", ".m.rule.master")
    assert master is not None and master["enabled"] is True
    cun = find_rule(rs, "content", ".m.rule.contains_user_name")
    assert cun is not None and cun["actions"] == ["notify"] and cun["enabled"] is True
    mine = find_rule(rs, "override", "mine")
    assert mine is not None and mine["enabled"] is False and mine["actions"] == ["notify"]
    # An override keyed on another kind must not leak across kinds.
    assert find_rule(rs, "underride", "mine") is None


def test_rule_body_validation() -> None:
    # Historical actions are kept as given (the evaluator ignores them).
    assert UserDataServlets._validate_rule("content", {"pattern": "x", "actions": ["dont_notify"]}) == {
        "actions": ["dont_notify"],
        "pattern": "x",
    }
    assert UserDataServlets._validate_rule("override", {"actions": ["notify"]}) == {
        "actions": ["notify"],
        "conditions": [],
    }
    assert UserDataServlets._validate_rule("room", {"actions": [], "pattern": "ignored"}) == {"actions": []}
    for kind, body in [
        ("content", {"actions": []}),
        ("override", {"conditions": []}),
        ("override", {"actions": [], "conditions": {}}),
        ("override", {"actions": [], "conditions": [{"key": "type"}]}),
        ("sender", {"actions": ["bogus"]}),
        ("sender", {"actions": [{"value": 1}]}),
    ]:
        with pytest.raises(MatrixError) as e:
            UserDataServlets._validate_rule(kind, body)
        assert e.value.code == 400 and e.value.errcode == "M_BAD_JSON"


def test_push_rule_paths() -> None:
    base = "/_matrix/client/v3/pushrules"
    assert parse_push_rule_path(base) is None
    assert parse_push_rule_path(base + "/") == [""]
    assert parse_push_rule_path(base + "/global/") == ["global", ""]
    # Split before decoding: an encoded slash stays inside the rule ID.
    assert parse_push_rule_path(base + "/global/room/%21a%2Fb%3Ax?before=y") == ["global", "room", "!a/b:x"]
    assert parse_push_rule_path("/_matrix/client/r0/pushrules/global/room/%23a%3Ax/enabled") == [
        "global", "room", "#a:x", "enabled"]
    assert split_rule_path(["global", "room", "!r:x"]) == ("global", "room", "!r:x", None)
    assert split_rule_path(["global", "room", "!r:x", "actions"]) == ("global", "room", "!r:x", "actions")
    for segs, errcode in [
        ([""], "M_UNRECOGNIZED"),
        (["device", "room", "x"], "M_INVALID_PARAM"),
        (["global"], "M_UNRECOGNIZED"),
        (["global", "room"], "M_UNRECOGNIZED"),
        (["global", "room", ""], "M_UNRECOGNIZED"),
        (["global", "template", "x"], "M_INVALID_PARAM"),
        (["global", "override", ".m.rule.master", "not_an_attr"], "M_UNRECOGNIZED"),
        (["global", "override", ".m.rule.master", "enabled", ""], "M_UNRECOGNIZED"),
    ]:
        with pytest.raises(MatrixError) as e:
            split_rule_path(segs)
        assert e.value.code == 400 and e.value.errcode == errcode, segs
