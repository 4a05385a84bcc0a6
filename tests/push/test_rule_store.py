"""Push rule storage on both engines: where new and updated rules go
within their kind, and before/after positioning.

Spec: client-server-api "Push Rules: API" (PUT /pushrules/global/{kind}/{ruleId}:
new rules are the most important user-defined rule of their kind unless
``before``/``after`` say otherwise; an update keeps the rule's place).
"""

from __future__ import annotations

import pytest_twisted

from zhome.storage.database import Database
from zhome.storage.ids import IdGenerator
from zhome.storage.user_data import UserDataStore

ALICE = "@alice:test.local"


async def _store(db: Database) -> UserDataStore:
    return UserDataStore(db, await IdGenerator.from_table(db, "account_data", "stream_id"),
                         await IdGenerator.from_table(db, "receipts", "stream_id"))


async def _order(store: UserDataStore, kind: str) -> list[str]:
    rules, _ = await store.get_push_rule_changes(ALICE)
    return [r for k, r, _, _ in sorted(rules, key=lambda t: t[2]) if k == kind]


@pytest_twisted.ensureDeferred
async def test_new_rules_first_and_positioning(database: Database) -> None:
    store = await _store(database)
    rule = {"actions": ["notify"]}
    assert await store.put_push_rule(ALICE, "room", "#a:x", rule, None, None)
    assert await store.put_push_rule(ALICE, "room", "#b:x", rule, None, None)
    assert await _order(store, "room") == ["#b:x", "#a:x"]
    assert await store.put_push_rule(ALICE, "room", "#c:x", rule, "#a:x", None)
    assert await _order(store, "room") == ["#b:x", "#c:x", "#a:x"]
    assert await store.put_push_rule(ALICE, "room", "#d:x", rule, None, "#a:x")
    assert await _order(store, "room") == ["#b:x", "#c:x", "#a:x", "#d:x"]
    # Moving an existing rule.
    assert await store.put_push_rule(ALICE, "room", "#d:x", rule, "#b:x", None)
    assert await _order(store, "room") == ["#d:x", "#b:x", "#c:x", "#a:x"]
    # Unknown anchors change nothing.
    assert not await store.put_push_rule(ALICE, "room", "#e:x", rule, "#nope:x", None)
    assert not await store.put_push_rule(ALICE, "room", "#e:x", rule, None, "#nope:x")
    assert await _order(store, "room") == ["#d:x", "#b:x", "#c:x", "#a:x"]
    # Anchors are per kind: a sender rule is no anchor for a room rule.
    assert await store.put_push_rule(ALICE, "sender", "@s:x", rule, None, None)
    assert not await store.put_push_rule(ALICE, "room", "#e:x", rule, "@s:x", None)
    assert await store.delete_push_rule(ALICE, "room", "#b:x")
    assert not await store.delete_push_rule(ALICE, "room", "#b:x")
    assert await _order(store, "room") == ["#d:x", "#c:x", "#a:x"]
    assert await _order(store, "sender") == ["@s:x"]


@pytest_twisted.ensureDeferred
async def test_replacing_a_rule_keeps_its_place_and_takes_its_new_actions(database: Database) -> None:
    store = await _store(database)
    for rid in ("#a:x", "#b:x", "#c:x"):
        assert await store.put_push_rule(ALICE, "room", rid, {"actions": ["notify"]}, None, None)
    assert await _order(store, "room") == ["#c:x", "#b:x", "#a:x"]
    await store.set_push_rule_attr(ALICE, "room", "#b:x", False, ["dont_notify"])
    # Replaced without before/after: same place, new actions, still disabled.
    assert await store.put_push_rule(ALICE, "room", "#b:x", {"actions": []}, None, None)
    assert await _order(store, "room") == ["#c:x", "#b:x", "#a:x"]
    rules, enables = await store.get_push_rule_changes(ALICE)
    assert [r for k, rid, _, r in rules if rid == "#b:x"] == [{"actions": []}]
    assert [(e, a) for k, rid, e, a in enables if rid == "#b:x"] == [(0, None)]
