"""Unit tests of push rule evaluation.

Spec: client-server-api "Push Notifications" → "Push Rules", "Conditions",
"Actions", "Predefined Rules"; appendices "Dot-separated property paths"
and "Glob-style matching".
"""

from __future__ import annotations

from typing import Any, Optional

import pytest

from zhome.push.evaluator import (
    actions_highlight,
    actions_notify,
    evaluate,
    glob_matches,
    split_key,
)
from zhome.push.rules import build_ruleset
from zhome.rooms.events import Event
from zhome.rooms.versions import get_room_version

ALICE = "@alice:example.org"
BOB = "@bob:example.org"
ROOM = "!room:example.org"
RV = get_room_version("10")


def ev(content: Optional[dict[str, Any]] = None, etype: str = "m.room.message", sender: str = BOB,
       state_key: Optional[str] = None, **extra: Any) -> Event:
    pdu: dict[str, Any] = {"type": etype, "sender": sender, "room_id": ROOM,
                           "content": content if content is not None else {}, **extra}
    if state_key is not None:
        pdu["state_key"] = state_key
    return Event(pdu, "$e:example.org", RV)


def text(body: str, **more: Any) -> Event:
    return ev({"msgtype": "m.text", "body": body, **more})


def run(ruleset: dict[str, Any], event: Event, user_id: str = ALICE, display_name: Optional[str] = "Alice",
        members: int = 3, power_levels: Optional[dict[str, Any]] = None, sender_level: int = 0) -> Optional[list]:
    return evaluate(ruleset, event, user_id, display_name, members, power_levels or {}, sender_level)


def one(conditions: list[dict[str, Any]]) -> dict[str, Any]:
    """A ruleset of a single override rule with ``conditions``."""
    return {"global": {"override": [{"rule_id": "r", "enabled": True, "default": False,
                                     "conditions": conditions, "actions": ["notify"]}]}}


def matches(cond: dict[str, Any], event: Event, **kw: Any) -> bool:
    return run(one([cond]), event, **kw) is not None


def defaults(user_rules: Any = (), enables: Any = ()) -> dict[str, Any]:
    return build_ruleset(ALICE, list(user_rules), list(enables))


def outcome(actions: Optional[list]) -> tuple[bool, bool]:
    notify = actions_notify(actions)
    return notify, notify and actions_highlight(actions)


# -- dotted keys and globs ----------------------------------------------------
@pytest.mark.parametrize("key,parts", [
    ("content.body", ("content", "body")),
    ("content.m\\.relates_to.rel_type", ("content", "m.relates_to", "rel_type")),
    ("content.m\\\\foo", ("content", "m\\foo")),
    ("content.a\\xb", ("content", "a\\xb")),  # other escapes are literal
    ("type", ("type",)),
    ("content.", ("content", "")),
])
def test_split_key(key: str, parts: tuple[str, ...]) -> None:
    assert split_key(key) == parts


def test_glob() -> None:
    # The spec's own examples.
    assert glob_matches("lunc?*", "Lunch plans")
    assert glob_matches("lunc?*", "LUNCH")
    assert not glob_matches("lunc?*", " lunch")
    assert not glob_matches("lunc?*", "lunc")
    assert glob_matches("ex*ple", "An example event.", words=True)
    assert glob_matches("ex*ple", "exple", words=True)
    assert glob_matches("ex*ple", "An exciting triple-whammy", words=True)
    assert not glob_matches("ex*ple", "An examples event", words=True)
    # Regex metacharacters are literal.
    assert glob_matches("a.b", "a.b") and not glob_matches("a.b", "axb")
    assert glob_matches("[x]", "[x]")


# -- event_match ----------------------------------------------------------------------
def test_event_match() -> None:
    topic = ev({"topic": "Lunch plans"}, etype="m.room.topic", state_key="")
    assert matches({"kind": "event_match", "key": "content.topic", "pattern": "lunc?*"}, topic)
    assert matches({"kind": "event_match", "key": "type", "pattern": "M.ROOM.*"}, topic)
    assert matches({"kind": "event_match", "key": "state_key", "pattern": ""}, topic)
    assert matches({"kind": "event_match", "key": "room_id", "pattern": ROOM}, topic)
    # Absent or not a string: no match even for "*".
    assert not matches({"kind": "event_match", "key": "content.nope", "pattern": "*"}, topic)
    assert not matches({"kind": "event_match", "key": "state_key", "pattern": "*"}, text("hi"))
    assert not matches({"kind": "event_match", "key": "content.n", "pattern": "*"}, ev({"n": 1}))
    assert not matches({"kind": "event_match", "key": "content", "pattern": "*"}, topic)
    # Malformed conditions never match.
    assert not matches({"kind": "event_match", "key": "type"}, topic)
    assert not matches({"kind": "event_match", "pattern": "*"}, topic)


def test_event_match_body_word_boundaries() -> None:
    cond = {"kind": "event_match", "key": "content.body", "pattern": "cake"}
    assert matches(cond, text("Cake!"))
    assert matches(cond, text("the cake is a lie"))
    assert matches(cond, text("x-cake-y"))
    assert not matches(cond, text("cakes"))
    assert not matches(cond, text("pancake"))
    assert not matches(cond, text("cake_time"))
    # Other keys match the whole value.
    assert not matches({"kind": "event_match", "key": "content.other", "pattern": "cake"},
                       ev({"other": "the cake"}))


def test_event_match_escaped_key() -> None:
    edit = ev({"body": "x", "m.relates_to": {"rel_type": "m.replace"}})
    assert matches({"kind": "event_match", "key": "content.m\\.relates_to.rel_type", "pattern": "m.replace"}, edit)
    assert not matches({"kind": "event_match", "key": "content.m.relates_to.rel_type", "pattern": "*"}, edit)
    weird = ev({"m\\foo": "bar"})
    assert matches({"kind": "event_match", "key": "content.m\\\\foo", "pattern": "bar"}, weird)


# -- event_property_is / contains ---------------------------------------------------
def test_event_property_is() -> None:
    create = ev({"m.federate": True, "n": 1, "s": "true", "z": None, "f": 1.5, "o": {}},
                etype="m.room.create", state_key="")

    def is_(key: str, value: Any) -> bool:
        return matches({"kind": "event_property_is", "key": key, "value": value}, create)

    assert is_("content.m\\.federate", True)
    assert not is_("content.m\\.federate", "true")
    assert not is_("content.m\\.federate", 1)
    assert is_("content.n", 1)
    assert not is_("content.n", True)  # do not cast types
    assert not is_("content.s", True)
    assert is_("content.s", "true")
    assert is_("content.z", None)
    assert not is_("content.missing", None)
    assert not is_("content.f", 1.5)
    assert not is_("content.o", {})
    assert not matches({"kind": "event_property_is", "key": "content.n"}, create)


def test_event_property_contains() -> None:
    alias = ev({"alt_aliases": ["#somewhere:example.org", "#myroom:example.com", 3, True, None, {"x": 1}]},
               etype="m.room.canonical_alias", state_key="")

    def contains(key: str, value: Any) -> bool:
        return matches({"kind": "event_property_contains", "key": key, "value": value}, alias)

    assert contains("content.alt_aliases", "#myroom:example.com")
    assert not contains("content.alt_aliases", ":example.com")
    assert contains("content.alt_aliases", 3)
    assert not contains("content.alt_aliases", 1)  # True is not 1
    assert contains("content.alt_aliases", True)
    assert contains("content.alt_aliases", None)
    assert not contains("content.alt_aliases", {"x": 1})  # compound values are ignored
    assert not contains("content.missing", "x")
    assert not matches({"kind": "event_property_contains", "key": "content.s", "value": "a"}, ev({"s": "abc"}))


# -- contains_display_name ----------------------------------------------------------
def test_contains_display_name() -> None:
    cond = {"kind": "contains_display_name"}
    assert matches(cond, text("hey Alice, look"))
    assert matches(cond, text("ALICE"))
    assert not matches(cond, text("Alicent is here"))
    assert not matches(cond, text("hey Alice"), display_name=None)
    assert not matches(cond, text("hey"), display_name="")
    assert not matches(cond, ev({"msgtype": "m.text"}))
    assert matches(cond, text("ping Dr. A. (ward 3)"), display_name="Dr. A. (ward 3)")


# -- room_member_count ---------------------------------------------------------------
@pytest.mark.parametrize("is_,count,expected", [
    ("2", 2, True), ("2", 3, False), ("==2", 2, True), ("==2", 1, False),
    ("<3", 2, True), ("<3", 3, False), (">3", 4, True), (">3", 3, False),
    ("<=3", 3, True), ("<=3", 4, False), (">=3", 3, True), (">=3", 2, False),
    ("", 2, False), ("x2", 2, False), ("=2", 2, False), ("2.0", 2, False), ("-1", 2, False),
])
def test_room_member_count(is_: str, count: int, expected: bool) -> None:
    assert matches({"kind": "room_member_count", "is": is_}, text("hi"), members=count) is expected


def test_room_member_count_not_a_string() -> None:
    assert not matches({"kind": "room_member_count", "is": 2}, text("hi"), members=2)
    assert not matches({"kind": "room_member_count"}, text("hi"), members=2)


# -- sender_notification_permission -------------------------------------------------
def test_sender_notification_permission() -> None:
    cond = {"kind": "sender_notification_permission", "key": "room"}
    msg = text("hi")
    assert not matches(cond, msg, sender_level=49)
    assert matches(cond, msg, sender_level=50)  # default "room" level is 50
    assert matches(cond, msg, sender_level=10, power_levels={"notifications": {"room": 10}})
    assert not matches(cond, msg, sender_level=9, power_levels={"notifications": {"room": 10}})
    # v1-v5 rooms may carry levels as strings.
    assert matches(cond, msg, sender_level=20, power_levels={"notifications": {"room": "20"}})
    assert not matches({"kind": "sender_notification_permission"}, msg, sender_level=100)


def test_unknown_condition_disables_rule() -> None:
    assert not matches({"kind": "org.example.never_heard_of"}, text("hi"))
    assert run(one([{"kind": "event_match", "key": "type", "pattern": "*"}, {"kind": "nope"}]), text("hi")) is None
    assert run(one(["not an object"]), text("hi")) is None  # type: ignore[list-item]
    # A rule without conditions always matches.
    assert run(one([]), text("hi")) == ["notify"]


# -- rule kinds and order -----------------------------------------------------------------
def test_kind_order_and_disabled_rules() -> None:
    rs = {"global": {
        "override": [{"rule_id": "o", "enabled": False, "conditions": [], "actions": ["o"]}],
        "content": [{"rule_id": "c", "enabled": True, "pattern": "tea", "actions": ["c"]}],
        "room": [{"rule_id": ROOM, "enabled": True, "actions": ["r"]}],
        "sender": [{"rule_id": BOB, "enabled": True, "actions": ["s"]}],
        "underride": [{"rule_id": "u", "enabled": True, "conditions": [], "actions": ["u"]}],
    }}
    assert run(rs, text("time for tea")) == ["c"]
    assert run(rs, text("time")) == ["r"]
    rs["global"]["room"][0]["rule_id"] = "!other:example.org"
    assert run(rs, text("time")) == ["s"]
    assert run(rs, ev({"body": "x"}, sender="@carol:example.org")) == ["u"]
    rs["global"]["override"][0]["enabled"] = True
    assert run(rs, text("tea")) == ["o"]
    assert run({"global": {}}, text("x")) is None
    # Within a kind, the first rule wins.
    two = {"global": {"content": [
        {"rule_id": "a", "enabled": True, "pattern": "time", "actions": ["a"]},
        {"rule_id": "b", "enabled": True, "pattern": "tea", "actions": ["b"]},
    ]}}
    assert run(two, text("It's time for tea")) == ["a"]


def test_actions_helpers() -> None:
    assert actions_notify(["notify"]) and not actions_notify([]) and not actions_notify(None)
    assert not actions_notify([{"set_tweak": "sound", "value": "default"}])
    assert actions_highlight(["notify", {"set_tweak": "highlight"}])
    assert actions_highlight([{"set_tweak": "highlight", "value": True}])
    assert not actions_highlight([{"set_tweak": "highlight", "value": False}])
    assert not actions_highlight(["notify", {"set_tweak": "sound", "value": "default"}])
    assert not actions_highlight(None)
    assert not actions_highlight([{"set_tweak": "highlight"}, {"set_tweak": "highlight", "value": False}])


# -- the server-default rules ---------------------------------------------------------------
def test_default_plain_message_notifies() -> None:
    assert outcome(run(defaults(), text("hello everyone"))) == (True, False)


def test_default_notice_does_not_notify() -> None:
    assert run(defaults(), ev({"msgtype": "m.notice", "body": "bot says hi"})) == []


def test_default_user_mention_highlights() -> None:
    mention = text("can you check?", **{"m.mentions": {"user_ids": [ALICE]}})
    assert outcome(run(defaults(), mention)) == (True, True)
    other = text("can you check?", **{"m.mentions": {"user_ids": ["@carol:example.org"]}})
    assert outcome(run(defaults(), other)) == (True, False)


def test_default_display_name_highlights() -> None:
    assert outcome(run(defaults(), text("Hi Alice!"), display_name="Alice")) == (True, True)
    # The legacy body rules do not apply when the event has m.mentions.
    assert outcome(run(defaults(), text("Hi Alice!", **{"m.mentions": {}}), display_name="Alice")) == (True, False)


def test_default_user_name_highlights() -> None:
    assert outcome(run(defaults(), text("ping alice"), display_name="Someone")) == (True, True)
    assert outcome(run(defaults(), text("ping malice"), display_name="Someone")) == (True, False)


def test_default_room_mention_needs_power() -> None:
    at_room = text("@room fire drill")
    assert outcome(run(defaults(), at_room, sender_level=100)) == (True, True)
    assert outcome(run(defaults(), at_room, sender_level=0)) == (True, False)
    room_mention = text("fire drill", **{"m.mentions": {"room": True}})
    assert outcome(run(defaults(), room_mention, sender_level=50)) == (True, True)
    assert outcome(run(defaults(), room_mention, sender_level=0)) == (True, False)


def test_master_rule_mutes_everything() -> None:
    rs = defaults(enables=[("override", ".m.rule.master", True, None)])
    assert run(rs, text("hello")) == []
    assert outcome(run(rs, text("x", **{"m.mentions": {"user_ids": [ALICE]}}))) == (False, False)
    assert outcome(run(rs, text("Alice"))) == (False, False)
    # Master outranks the user's own override rules too.
    mine = [("override", "mine", 0, {"conditions": [], "actions": ["notify"]})]
    rs = defaults(mine, [("override", ".m.rule.master", True, None)])
    assert run(rs, text("hello")) == []


def test_user_content_rule_highlights() -> None:
    mine = [("content", "handover", 0, {"pattern": "handover", "actions": ["notify", {"set_tweak": "highlight"}]})]
    rs = defaults(mine)
    assert outcome(run(rs, text("Handover at 7"))) == (True, True)
    assert outcome(run(rs, text("handovers at 7"))) == (True, False)


def test_disabled_message_rule() -> None:
    rs = defaults(enables=[("underride", ".m.rule.message", False, None)])
    assert run(rs, text("hello"), members=3) is None
    # One-to-one rooms still notify through .m.rule.room_one_to_one.
    assert outcome(run(rs, text("hello"), members=2)) == (True, False)


def test_room_one_to_one() -> None:
    actions = run(defaults(), text("hello"), members=2)
    assert actions == ["notify", {"set_tweak": "sound", "value": "default"}]
    assert run(defaults(), text("hello"), members=3) == ["notify"]


def test_encrypted() -> None:
    enc = ev({"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "..."}, etype="m.room.encrypted")
    assert run(defaults(), enc, members=2) == ["notify", {"set_tweak": "sound", "value": "default"}]
    assert run(defaults(), enc, members=5) == ["notify"]
    rs = defaults(enables=[("underride", ".m.rule.encrypted", False, None)])
    assert run(rs, enc, members=5) is None


def test_other_defaults() -> None:
    assert run(defaults(), ev({"membership": "join"}, etype="m.room.member", state_key=BOB)) == []
    invite = ev({"membership": "invite"}, etype="m.room.member", state_key=ALICE)
    assert outcome(run(defaults(), invite)) == (True, False)
    tomb = ev({"body": "moved", "replacement_room": "!n:example.org"}, etype="m.room.tombstone", state_key="")
    assert outcome(run(defaults(), tomb)) == (True, True)
    assert run(defaults(), ev({"m.relates_to": {"rel_type": "m.annotation"}}, etype="m.reaction")) == []
    edit = text("* fixed", **{"m.relates_to": {"rel_type": "m.replace", "event_id": "$x"}})
    assert run(defaults(), edit) == []
    call = ev({"call_id": "c"}, etype="m.call.invite")
    assert run(defaults(), call) == ["notify", {"set_tweak": "sound", "value": "ring"}]
    assert run(defaults(), ev({"name": "x"}, etype="m.room.name", state_key="")) is None


def test_room_and_sender_rules() -> None:
    rs = defaults([("room", ROOM, 0, {"actions": []}), ("sender", "@carol:example.org", 0, {"actions": []})])
    assert run(rs, text("hello")) == []
    rs = defaults([("sender", BOB, 0, {"actions": []})])
    assert run(rs, text("hello")) == []
    assert outcome(run(rs, text("x", **{"m.mentions": {"user_ids": [ALICE]}}))) == (True, True)
