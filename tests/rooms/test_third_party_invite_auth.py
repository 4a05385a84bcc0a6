"""Auth rules for third-party invites (spec: room versions, "Authorization
rules": m.room.third_party_invite needs the invite level; an invite with
third_party_invite is allowed when signed names the state key, the token
names an m.room.third_party_invite the same sender sent, and a signature
matches one of its public keys)."""

from __future__ import annotations

from typing import Any

import pytest
from signedjson.key import encode_verify_key_base64, generate_signing_key, get_verify_key
from signedjson.sign import sign_json

from tests.rooms.test_auth import ALICE, ALL, BOB, CAROL, setup

TOKEN = "tok123"


def _keys() -> tuple[Any, Any, str, str]:
    long_term, ephemeral = generate_signing_key("0"), generate_signing_key("1")
    return (long_term, ephemeral, encode_verify_key_base64(get_verify_key(long_term)),
            encode_verify_key_base64(get_verify_key(ephemeral)))


def _room(version: str, invite_level: int = 0) -> tuple[Any, Any, Any]:
    room = setup(version, join_rule="invite")
    if invite_level:
        pl = dict(room.state[("m.room.power_levels", "")].content)
        pl["invite"] = invite_level
        room.pl(ALICE, pl)
    long_term, ephemeral, pk1, pk2 = _keys()
    room.send("m.room.third_party_invite", ALICE, {
        "display_name": "b...@example.org", "key_validity_url": "https://id.example/isvalid", "public_key": pk1,
        "public_keys": [{"public_key": pk1}, {"public_key": pk2}]}, TOKEN)
    return room, long_term, ephemeral


def _tpi(signer: Any, mxid: str = BOB, token: str = TOKEN, server: str = "id.example") -> dict[str, Any]:
    return {"display_name": "b...@example.org", "signed": sign_json({"mxid": mxid, "token": token}, server, signer)}


@pytest.mark.parametrize("version", ALL)
def test_signed_by_either_key_is_allowed(version: str) -> None:
    room, long_term, ephemeral = _room(version)
    room.member(ALICE, BOB, "invite", third_party_invite=_tpi(long_term))
    room.member(ALICE, CAROL, "invite", third_party_invite=_tpi(ephemeral, mxid=CAROL))
    # The invitee joins the invite-only room.
    room.member(BOB, BOB, "join")


@pytest.mark.parametrize("version", ALL)
def test_the_rules_refuse(version: str) -> None:
    room, long_term, _ = _room(version)
    other = generate_signing_key("9")
    cases = [
        {"display_name": "x"},  # no signed
        {"signed": {"mxid": BOB}},  # no token
        _tpi(long_term, mxid=CAROL),  # mxid is not the state key
        _tpi(long_term, token="other"),  # no m.room.third_party_invite for it
        _tpi(other),  # signed by a key the invite does not list
    ]
    for tpi in cases:
        room.member_refused(ALICE, BOB, "invite", third_party_invite=tpi)
    tampered = _tpi(long_term)
    tampered["signed"]["extra"] = "changed after signing"  # the signature no longer matches
    room.member_refused(ALICE, BOB, "invite", third_party_invite=tampered)
    # Only the sender of the m.room.third_party_invite may use it.
    room.member(ALICE, CAROL, "invite")
    room.member(CAROL, CAROL, "join")
    room.member_refused(CAROL, BOB, "invite", third_party_invite=_tpi(long_term))
    # A banned user cannot be invited by a third-party invite either.
    room.member(ALICE, BOB, "ban")
    room.member_refused(ALICE, BOB, "invite", third_party_invite=_tpi(long_term))


@pytest.mark.parametrize("version", ALL)
def test_third_party_invite_event_needs_the_invite_level(version: str) -> None:
    room, _, _ = _room(version, invite_level=50)
    room.member(ALICE, CAROL, "invite")
    room.member(CAROL, CAROL, "join")
    room.refused("m.room.third_party_invite", CAROL, {"display_name": "x", "public_key": "abc",
                                                      "key_validity_url": "https://id.example"}, "t2")
