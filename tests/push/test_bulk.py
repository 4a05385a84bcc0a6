"""Push rules for a whole room at once (zhome.push.bulk) give exactly what
evaluating every member on their own gives.

Spec: client-server-api "Push Notifications" → "Push Rules", "Predefined
Rules".
"""

from __future__ import annotations

from typing import Any, Optional

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer

from zhome.push.bulk import actions_for_members, event_haystack
from zhome.push.cache import RulesetCache
from zhome.push.evaluator import actions_notify, evaluate
from zhome.push.rules import _DEFAULT_CONTENT, _DEFAULT_OVERRIDE, _DEFAULT_UNDERRIDE, _has_placeholder
from zhome.rooms.events import Event
from zhome.rooms.versions import get_room_version

RV = get_room_version("10")
ROOM = "!room:hs"
SENDER = "@sender:hs"

# Stored rule changes some members have: a keyword rule, muting the room,
# a disabled default, all shared by several members.
KEYWORD = ("content", "urgent", 0, {"pattern": "urgent", "actions": ["notify", {"set_tweak": "highlight"}]})
ROOM_MUTE = ("room", ROOM, 0, {"actions": []})
NO_MESSAGES = ("underride", ".m.rule.message", False, None)
NAMED_RULE = ("override", "name", 0, {"conditions": [{"kind": "contains_display_name"}],
                                      "actions": ["notify", {"set_tweak": "sound", "value": "x"}]})
PROFILES: list[tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]] = [
    ([], []), ([KEYWORD], []), ([ROOM_MUTE], []), ([], [NO_MESSAGES]), ([NAMED_RULE], []),
]


class FakeUserData:
    def __init__(self, profiles: dict[str, int]) -> None:
        self.profiles = profiles
        self.calls = 0

    async def get_push_rule_changes(self, user_id: str) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        self.calls += 1
        rules, enables = PROFILES[self.profiles.get(user_id, 0)]
        return list(rules), list(enables)


def result(d: "defer.Deferred[Any]") -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "still waiting"
    if isinstance(out[0], Exception):
        raise out[0]
    return out[0]


def event(content: dict[str, Any], etype: str = "m.room.message", state_key: Optional[str] = None) -> Event:
    pdu: dict[str, Any] = {"type": etype, "sender": SENDER, "room_id": ROOM, "content": content}
    if state_key is not None:
        pdu["state_key"] = state_key
    return Event(pdu, "$e:hs", RV)


def one_by_one(cache: RulesetCache, ev: Event, targets: list[tuple[str, Optional[str]]], count: int,
               pl: dict[str, Any], level: int) -> dict[str, list[Any]]:
    out = {}
    for user_id, name in targets:
        actions = evaluate(result(defer.ensureDeferred(cache.get(user_id))), ev, user_id, name, count, pl, level)
        if actions is not None and actions_notify(actions):
            out[user_id] = actions
    return out


MEMBERS = [("@alice:hs", "Alice"), ("@bob:hs", "Bob B"), ("@al:hs", None), ("@carol:hs", "ALICE"),
           ("@dave.x:hs", "Dave"), ("@e:hs", "Ünïcode Näme"), ("@urgent:hs", None), ("@f:hs", "f")]
WORDS = ["hello", "alice", "Alice", "ALICE", "al", "@alice:hs", "bob b", "Bob", "urgent", "dave.x",
         "ünïcode näme", "ÜNÏCODE NÄME", "@room", "f", "e", "x", "\x00", "@\x00:\x00"]


@settings(max_examples=300, deadline=None)
@given(
    words=st.lists(st.sampled_from(WORDS), max_size=6),
    mentions=st.one_of(st.none(), st.lists(st.sampled_from([u for u, _ in MEMBERS] + ["@x:hs"]), max_size=3)),
    profiles=st.lists(st.integers(0, len(PROFILES) - 1), min_size=len(MEMBERS), max_size=len(MEMBERS)),
    kind=st.sampled_from(["text", "notice", "invite", "encrypted", "formatted"]),
    count=st.sampled_from([2, 3, 50]),
    sender_level=st.sampled_from([0, 50, 100]),
)
def test_grouped_answers_equal_one_by_one(words: list[str], mentions: Optional[list[str]], profiles: list[int],
                                         kind: str, count: int, sender_level: int) -> None:
    body = " ".join(words)
    content: dict[str, Any]
    if kind == "invite":
        ev = event({"membership": "invite", "displayname": body}, "m.room.member", MEMBERS[len(words) % 8][0])
    elif kind == "encrypted":
        ev = event({"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": body}, "m.room.encrypted")
    else:
        content = {"msgtype": "m.notice" if kind == "notice" else "m.text", "body": body}
        if kind == "formatted":
            content["format"] = "org.matrix.custom.html"
            content["formatted_body"] = f"<b>{body}</b>"
        if mentions is not None:
            content["m.mentions"] = {"user_ids": mentions}
        ev = event(content)
    ud = FakeUserData({u: p for (u, _), p in zip(MEMBERS, profiles)})
    cache = RulesetCache(ud)
    pl = {"notifications": {"room": 50}}
    grouped = result(defer.ensureDeferred(actions_for_members(cache, ev, MEMBERS, count, pl, sender_level)))
    assert grouped == one_by_one(cache, ev, MEMBERS, count, pl, sender_level)


def test_members_with_the_same_rules_share_one_evaluation_and_one_list() -> None:
    members = [(f"@user{i}:hs", f"User {i}") for i in range(500)]
    ud = FakeUserData({})
    cache = RulesetCache(ud)
    ev = event({"msgtype": "m.text", "body": "lunch is ready"})
    out = result(defer.ensureDeferred(actions_for_members(cache, ev, members, 501, {}, 0)))
    assert set(out) == {u for u, _ in members}
    assert len({id(a) for a in out.values()}) == 1
    assert out["@user1:hs"] == ["notify"]
    # One named member is told apart: highlighted, with their own list.
    ev = event({"msgtype": "m.text", "body": "lunch is ready, user 7"})
    out = result(defer.ensureDeferred(actions_for_members(cache, ev, members, 501, {}, 0)))
    assert {"set_tweak": "highlight"} in out["@user7:hs"]
    assert out["@user8:hs"] == ["notify"]
    assert ud.calls == 500  # rules read once per member, not per message


def test_the_haystack_holds_what_rules_that_name_a_user_read() -> None:
    # The default rules that name the user read only the content and the
    # state key; the haystack must hold both (a new such rule reading,
    # say, the sender would make grouping unsound).
    named = [r for r in _DEFAULT_OVERRIDE + _DEFAULT_CONTENT + _DEFAULT_UNDERRIDE if _has_placeholder(r)]
    assert {r["rule_id"] for r in named} == {".m.rule.invite_for_me", ".m.rule.is_user_mention",
                                           ".m.rule.contains_user_name"}
    for r in named:
        for c in r.get("conditions", []):
            if _has_placeholder(c):
                assert c["key"] in ("state_key", "content.m\\.mentions.user_ids"), c
    ev = event({"body": "Hi", "m.mentions": {"user_ids": ["@X:hs"]}, "deep": [{"k": "Name"}]},
               "m.room.member", "@Invitee:hs")
    hay = event_haystack(ev)
    for needle in ("hi", "@x:hs", "name", "@invitee:hs"):
        assert needle in hay
