"""Invite permissions: the settings' validation, the order in which the
patterns decide an invite, and the store on both engines (a user's row
goes with their account, nobody else's)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from tests.storage.test_event_graph import _server
from zhome.admin.invite_permissions import DEFAULTS, invite_allowed, parse_settings
from zhome.http.errors import MatrixError


def test_parse_fills_defaults_and_drops_duplicates() -> None:
    assert parse_settings({}) == DEFAULTS
    got = parse_settings({"default": "block", "allowed_servers": ["a.example", "a.example"],
                          "set_by": "@x:y", "set_ts": 1})
    assert got == {**DEFAULTS, "default": "block", "allowed_servers": ["a.example"]}


@pytest.mark.parametrize("body,errcode", [
    ({"default": True}, "M_BAD_JSON"),
    ({"default": "deny"}, "M_INVALID_PARAM"),
    ({"blocked_users": "@a:b"}, "M_BAD_JSON"),
    ({"blocked_users": [["@a:b"]]}, "M_BAD_JSON"),
    ({"blocked_users": ["a:b"]}, "M_INVALID_PARAM"),
    ({"allowed_users": ["@ab"]}, "M_INVALID_PARAM"),
    ({"allowed_servers": ["x/y"]}, "M_INVALID_PARAM"),
    ({"allowed_servers": ["\tx"]}, "M_INVALID_PARAM"),
    ({"whatever": []}, "M_BAD_JSON"),
])
def test_parse_refuses_bad_settings(body: dict[str, Any], errcode: str) -> None:
    with pytest.raises(MatrixError) as e:
        parse_settings(body)
    assert (e.value.code, e.value.errcode) == (400, errcode)


def _allowed(settings: dict[str, Any], inviter: str) -> bool:
    return invite_allowed(parse_settings(settings), inviter)


def test_specific_patterns_before_general_ones() -> None:
    assert _allowed({}, "@anyone:any.example")
    assert not _allowed({"default": "block"}, "@anyone:any.example")
    s = {"default": "block", "allowed_servers": ["*.clinic.example"], "blocked_users": ["@spam*:*"]}
    assert _allowed(s, "@dr:ward.clinic.example")
    assert not _allowed(s, "@spammer:ward.clinic.example")
    assert not _allowed(s, "@dr:clinic.example.evil")
    s = {"blocked_servers": ["evil.example"], "allowed_users": ["@friend:evil.example"]}
    assert _allowed(s, "@friend:evil.example") and not _allowed(s, "@other:evil.example")
    # Blocked wins over allowed at the same level.
    assert not _allowed({"allowed_users": ["@a:x"], "blocked_users": ["@a:*"]}, "@a:x")
    assert not _allowed({"allowed_servers": ["x"], "blocked_servers": ["x"]}, "@a:x")
    # Server names with or without the port, and case-insensitively.
    assert not _allowed({"blocked_servers": ["127.0.0.3"]}, "@b:127.0.0.3:8448")
    assert not _allowed({"blocked_servers": ["127.0.0.3:8448"]}, "@b:127.0.0.3:8448")
    assert _allowed({"blocked_servers": ["127.0.0.3:9"]}, "@b:127.0.0.3:8448")
    assert not _allowed({"blocked_users": ["@Bob:Evil.Example"]}, "@bob:evil.example")


@pytest_twisted.ensureDeferred
async def test_store_and_policy(tmp_path: Path, db_config: tuple[str, dict[str, Any]]) -> None:
    hs = await _server(tmp_path, db_config)
    alice, bob = "@alice:test.local", "@bob:test.local"
    policy = hs.invite_policy
    assert await policy.get(alice) == DEFAULTS
    await policy.store.set(alice, parse_settings({"default": "block"}), alice)
    await policy.store.set(bob, parse_settings({"blocked_users": [alice]}), "@root:test.local")
    got = await policy.get(bob)
    assert got["blocked_users"] == [alice] and got["set_by"] == "@root:test.local" and got["set_ts"] > 0
    with pytest.raises(MatrixError) as e:
        await policy.check(alice, bob)
    assert (e.value.code, e.value.errcode) == (403, "M_FORBIDDEN")
    with pytest.raises(MatrixError):
        await policy.check("@x:elsewhere.example", alice)
    await policy.check(bob, "@carol:test.local")  # no setting: allowed
    await policy.check("@x:elsewhere.example", "@y:elsewhere.example")  # not our user: not ours to decide
    await policy.check(f"@server-notices:{hs.server_name}", alice)  # notices always reach
    # Deactivation's purge hooks forget alice's setting, not bob's.
    for purge in hs.account_purge_hooks:
        await purge(alice)
    assert await policy.get(alice) == DEFAULTS
    assert (await policy.get(bob))["blocked_users"] == [alice]
    await hs.stop()
