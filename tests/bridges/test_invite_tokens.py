"""Invitation reply addresses (zhome/bridges/email/tokens.py)."""

from __future__ import annotations

from zhome.bridges.email.tokens import (
    invite_key, invite_localpart, parse_invite_localpart, parse_reply_localpart, verify_invite,
)

TOKEN = "0123456789abcdef0123456789abcdef"


def test_round_trip_and_binding_to_the_address() -> None:
    key = invite_key("as-token")
    local = invite_localpart(key, TOKEN, "Invitee@Example.org")
    assert local is not None and len(local) <= 64 and local == local.lower()
    parsed = parse_invite_localpart(local.upper())
    assert parsed is not None and parsed[0] == TOKEN
    assert verify_invite(key, TOKEN, parsed[1], " invitee@example.org ")
    assert not verify_invite(key, TOKEN, parsed[1], "other@example.org")
    assert not verify_invite(invite_key("another as-token"), TOKEN, parsed[1], "invitee@example.org")
    other_token = "f" + TOKEN[1:]
    assert not verify_invite(key, other_token, parsed[1], "invitee@example.org")
    assert parse_reply_localpart(local) is None


def test_malformed() -> None:
    key = invite_key("as-token")
    assert invite_localpart(key, "Not-Hex_token", "a@b.c") is None
    for bad in ("invite+", "invite+abc.def", f"invite+{TOKEN}", f"invite+{TOKEN}.{'1' * 20}", "reply+1.abc",
                f"invite+{TOKEN}.{'a' * 21}"):
        assert parse_invite_localpart(bad) is None, bad
