"""Unit tests of the per-user push ruleset cache (zhome.push.cache)."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer

from zhome.push.cache import RulesetCache

ALICE = "@alice:example.org"


class FakeUserData:
    def __init__(self) -> None:
        self.calls = 0
        self.enables: list[tuple[str, str, Any, Any]] = []
        self.gate: "defer.Deferred[None] | None" = None

    async def get_push_rule_changes(self, user_id: str) -> tuple[list[tuple], list[tuple]]:
        self.calls += 1
        enables = list(self.enables)
        if self.gate is not None:
            await self.gate
        return [], enables


def result(d: "defer.Deferred[Any]") -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "still waiting"
    return out[0]


def master_enabled(ruleset: dict[str, Any]) -> bool:
    return bool(ruleset["global"]["override"][0]["enabled"])


def test_loads_once_until_invalidated() -> None:
    ud = FakeUserData()
    cache = RulesetCache(ud)
    first = result(defer.ensureDeferred(cache.get(ALICE)))
    assert result(defer.ensureDeferred(cache.get(ALICE))) is first
    assert ud.calls == 1
    ud.enables = [("override", ".m.rule.master", True, None)]
    cache.invalidate(ALICE)
    assert master_enabled(result(defer.ensureDeferred(cache.get(ALICE))))
    assert ud.calls == 2


def test_concurrent_gets_share_one_load() -> None:
    ud = FakeUserData()
    ud.gate = defer.Deferred()
    cache = RulesetCache(ud)
    a = defer.ensureDeferred(cache.get(ALICE))
    b = defer.ensureDeferred(cache.get(ALICE))
    gate, ud.gate = ud.gate, None
    gate.callback(None)
    assert result(a) is result(b)
    assert ud.calls == 1


def test_load_overtaken_by_a_change_is_not_kept() -> None:
    ud = FakeUserData()
    ud.gate = defer.Deferred()
    cache = RulesetCache(ud)
    stale = defer.ensureDeferred(cache.get(ALICE))
    # The user changes a rule while the first load is still reading.
    ud.enables = [("override", ".m.rule.master", True, None)]
    cache.invalidate(ALICE)
    gate, ud.gate = ud.gate, None
    gate.callback(None)
    assert not master_enabled(result(stale))
    assert master_enabled(result(defer.ensureDeferred(cache.get(ALICE))))


def test_rulesets_share_defaults_without_one_users_change_reaching_another() -> None:
    from zhome.push.rules import build_ruleset, find_rule

    plain = build_ruleset("@b:hs", [], [])
    changed = build_ruleset("@a:hs", [], [("underride", ".m.rule.message", False, [{"set_tweak": "x"}]),
                                          ("override", ".m.rule.suppress_notices", False, None)])
    assert find_rule(changed, "underride", ".m.rule.message")["enabled"] is False
    assert find_rule(changed, "underride", ".m.rule.message")["actions"] == [{"set_tweak": "x"}]
    assert find_rule(changed, "override", ".m.rule.suppress_notices")["enabled"] is False
    for ruleset in (plain, build_ruleset("@c:hs", [], [])):
        assert find_rule(ruleset, "underride", ".m.rule.message")["enabled"] is True
        assert find_rule(ruleset, "underride", ".m.rule.message")["actions"] == ["notify"]
        assert find_rule(ruleset, "override", ".m.rule.suppress_notices")["enabled"] is True
    # Rules naming the user are each user's own.
    assert find_rule(plain, "override", ".m.rule.invite_for_me")["conditions"][2]["pattern"] == "@b:hs"
    assert find_rule(changed, "override", ".m.rule.invite_for_me")["conditions"][2]["pattern"] == "@a:hs"
    assert find_rule(plain, "content", ".m.rule.contains_user_name")["pattern"] == "b"
