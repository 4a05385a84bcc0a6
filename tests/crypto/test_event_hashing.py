"""Tests for zhome.crypto.event_hashing (spec: server-server-api "Signing
Events"; appendices "Event Signing" test vectors; rooms/v*.md "Event IDs")."""

from __future__ import annotations

import base64
import copy
import hashlib
import re
from typing import Any

import pytest
from hypothesis import given, strategies as st
from signedjson.key import decode_signing_key_base64, generate_signing_key, get_verify_key
from unpaddedbase64 import decode_base64

from zhome.crypto.event_hashing import (
    SignatureError,
    compute_content_hash,
    compute_event_id,
    compute_reference_hash,
    hash_and_sign_event,
    room_id_for_create_event,
    verify_content_hash,
    verify_event_signature,
)
from zhome.rooms.events import Event
from zhome.rooms.redaction import prune_event_dict
from zhome.rooms.versions import KNOWN_ROOM_VERSIONS, RoomVersion, get_room_version

SPEC_KEY = decode_signing_key_base64("ed25519", "1", "YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1")
SPEC_VERIFY = get_verify_key(SPEC_KEY)


def rv(n: int | str) -> RoomVersion:
    return get_room_version(str(n))


def b64url(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def b64std(b: bytes) -> str:
    return base64.b64encode(b).rstrip(b"=").decode()


# -- appendices.md "Event Signing" -----------------------------------------------

SPEC_MINIMAL_EVENT: dict[str, Any] = {
    "room_id": "!x:domain",
    "sender": "@a:domain",
    "origin": "domain",
    "origin_server_ts": 1000000,
    "signatures": {},
    "hashes": {},
    "type": "X",
    "content": {},
    "prev_events": [],
    "auth_events": [],
    "depth": 3,
    "unsigned": {"age_ts": 1000000},
}
SPEC_MINIMAL_SIGNED: dict[str, Any] = {
    "auth_events": [],
    "content": {},
    "depth": 3,
    "hashes": {"sha256": "5jM4wQpv6lnBo7CLIghJuHdW+s2CMBJPUOGOC89ncos"},
    "origin": "domain",
    "origin_server_ts": 1000000,
    "prev_events": [],
    "room_id": "!x:domain",
    "sender": "@a:domain",
    "signatures": {
        "domain": {
            "ed25519:1": "KxwGjPSDEtvnFgU00fwFz+l6d2pJM6XBIaMEn81SXPTRl16AqLAYqfIReFGZlHi5KLjAWbOoMszkwsQma+lYAg"
        }
    },
    "type": "X",
    "unsigned": {"age_ts": 1000000},
}
SPEC_MESSAGE_EVENT: dict[str, Any] = {
    "content": {"body": "Here is the message content"},
    "event_id": "$0:domain",
    "origin": "domain",
    "origin_server_ts": 1000000,
    "type": "m.room.message",
    "room_id": "!r:domain",
    "sender": "@u:domain",
    "signatures": {},
    "unsigned": {"age_ts": 1000000},
}
SPEC_MESSAGE_SIGNED: dict[str, Any] = {
    "content": {"body": "Here is the message content"},
    "event_id": "$0:domain",
    "hashes": {"sha256": "onLKD1bGljeBWQhWZ1kaP9SorVmRQNdN5aM2JYU2n/g"},
    "origin": "domain",
    "origin_server_ts": 1000000,
    "type": "m.room.message",
    "room_id": "!r:domain",
    "sender": "@u:domain",
    "signatures": {
        "domain": {
            "ed25519:1": "Wm+VzmOUOz08Ds+0NTWb1d4CZrVsJSikkeRxh6aCcUwu6pNC78FunoD7KNWzqFn241eYHYMGCA5McEiVPdhzBA"
        }
    },
    "unsigned": {"age_ts": 1000000},
}

# The spec's vectors keep "origin" in the signed redacted form, which is the
# v1-v10 redaction algorithm; the minimal event has no event_id, so in v1/v2
# hash_and_sign_event would add one: use v3-v10 there.
ORIGIN_KEEPING_HASHED_IDS = [str(n) for n in range(3, 11)]


def test_spec_content_hashes() -> None:
    assert b64std(compute_content_hash(SPEC_MINIMAL_EVENT)) == "5jM4wQpv6lnBo7CLIghJuHdW+s2CMBJPUOGOC89ncos"
    assert b64std(compute_content_hash(SPEC_MESSAGE_EVENT)) == "onLKD1bGljeBWQhWZ1kaP9SorVmRQNdN5aM2JYU2n/g"


@pytest.mark.parametrize("v", ORIGIN_KEEPING_HASHED_IDS)
def test_spec_minimal_event_signed(v: str) -> None:
    _, signed = hash_and_sign_event(rv(v), SPEC_MINIMAL_EVENT, "domain", SPEC_KEY)
    assert signed == SPEC_MINIMAL_SIGNED


@pytest.mark.parametrize("v", ["1", "2"] + ORIGIN_KEEPING_HASHED_IDS)
def test_spec_message_event_signed(v: str) -> None:
    event_id, signed = hash_and_sign_event(rv(v), SPEC_MESSAGE_EVENT, "domain", SPEC_KEY)
    assert signed == SPEC_MESSAGE_SIGNED
    if v in ("1", "2"):
        assert event_id == "$0:domain"


@pytest.mark.parametrize("v", ["1", "2"] + ORIGIN_KEEPING_HASHED_IDS)
def test_spec_signed_events_verify(v: str) -> None:
    for event in (SPEC_MINIMAL_SIGNED, SPEC_MESSAGE_SIGNED):
        verify_event_signature(rv(v), event, "domain", "ed25519:1", SPEC_VERIFY)
        assert verify_content_hash(event)


@pytest.mark.parametrize("v", ["11", "12"])
def test_spec_signed_events_do_not_verify_under_v11_rules(v: str) -> None:
    # v11 no longer protects "origin", so the signed bytes differ.
    with pytest.raises(SignatureError):
        verify_event_signature(rv(v), SPEC_MINIMAL_SIGNED, "domain", "ed25519:1", SPEC_VERIFY)


def test_spec_event_input_not_mutated() -> None:
    before = copy.deepcopy(SPEC_MINIMAL_EVENT)
    hash_and_sign_event(rv(10), SPEC_MINIMAL_EVENT, "domain", SPEC_KEY)
    assert SPEC_MINIMAL_EVENT == before


# -- reference hashes and event IDs ----------------------------------------------

# The redacted, signature-less form of SPEC_MINIMAL_SIGNED, written out by
# hand as canonical JSON so the reference hash is checked independently.
MINIMAL_REDACTED_V10 = (
    b'{"auth_events":[],"content":{},"depth":3,'
    b'"hashes":{"sha256":"5jM4wQpv6lnBo7CLIghJuHdW+s2CMBJPUOGOC89ncos"},'
    b'"origin":"domain","origin_server_ts":1000000,"prev_events":[],'
    b'"room_id":"!x:domain","sender":"@a:domain","type":"X"}'
)
MINIMAL_REDACTED_V11 = (
    b'{"auth_events":[],"content":{},"depth":3,'
    b'"hashes":{"sha256":"5jM4wQpv6lnBo7CLIghJuHdW+s2CMBJPUOGOC89ncos"},'
    b'"origin_server_ts":1000000,"prev_events":[],'
    b'"room_id":"!x:domain","sender":"@a:domain","type":"X"}'
)


def test_reference_hash_independent() -> None:
    assert compute_reference_hash(rv(10), SPEC_MINIMAL_SIGNED) == hashlib.sha256(MINIMAL_REDACTED_V10).digest()
    assert compute_reference_hash(rv(11), SPEC_MINIMAL_SIGNED) == hashlib.sha256(MINIMAL_REDACTED_V11).digest()


@pytest.mark.parametrize("v", ORIGIN_KEEPING_HASHED_IDS)
def test_event_id_of_spec_event(v: str) -> None:
    assert compute_event_id(rv(v), SPEC_MINIMAL_SIGNED) == "$8yif6p8EqgoSten2BLje9ntKm720NyFLWQv9tn8memc"
    assert compute_event_id(rv(v), SPEC_MINIMAL_SIGNED) == "$" + b64url(hashlib.sha256(MINIMAL_REDACTED_V10).digest())


@pytest.mark.parametrize("v", ["11", "12"])
def test_event_id_of_spec_event_v11(v: str) -> None:
    expected = "$70O_oKlXzFbkfu0KE88USi98DjSWrOELrPj-8tisl8I"
    assert compute_event_id(rv(v), SPEC_MINIMAL_SIGNED) == expected
    assert expected == "$" + b64url(hashlib.sha256(MINIMAL_REDACTED_V11).digest())
    assert hash_and_sign_event(rv(v), SPEC_MINIMAL_EVENT, "domain", SPEC_KEY)[0] == expected


# An event whose reference hash has both "+" and "/" in standard base64.
ALPHABET_EVENT: dict[str, Any] = {
    "type": "m.room.message",
    "room_id": "!r:x",
    "sender": "@u:x",
    "content": {"body": "0"},
    "depth": 0,
    "prev_events": [],
    "auth_events": [],
    "origin_server_ts": 0,
    "hashes": {"sha256": "x"},
}
ALPHABET_REDACTED = (
    b'{"auth_events":[],"content":{},"depth":0,"hashes":{"sha256":"x"},"origin_server_ts":0,'
    b'"prev_events":[],"room_id":"!r:x","sender":"@u:x","type":"m.room.message"}'
)


def test_v3_event_id_standard_base64() -> None:
    assert compute_event_id(rv(3), ALPHABET_EVENT) == "$uGpMVPz6cFw1yuR+/K9Z5Ev21Zvee0wVbimnwXtvCXk"
    assert compute_event_id(rv(3), ALPHABET_EVENT) == "$" + b64std(hashlib.sha256(ALPHABET_REDACTED).digest())


@pytest.mark.parametrize("v", [str(n) for n in range(4, 13)])
def test_v4_plus_event_id_urlsafe_base64(v: str) -> None:
    assert compute_event_id(rv(v), ALPHABET_EVENT) == "$uGpMVPz6cFw1yuR-_K9Z5Ev21Zvee0wVbimnwXtvCXk"


@pytest.mark.parametrize("v", ["1", "2"])
def test_v1_event_id_generated(v: str) -> None:
    event = {k: v_ for k, v_ in ALPHABET_EVENT.items() if k != "hashes"}
    a = compute_event_id(rv(v), event, "example.org")
    b = compute_event_id(rv(v), event, "example.org")
    assert re.fullmatch(r"\$[A-Za-z0-9]{18,}:example\.org", a)
    assert a != b
    with pytest.raises(ValueError, match="server name"):
        compute_event_id(rv(v), event)


@pytest.mark.parametrize("v", ["1", "2"])
def test_v1_hash_and_sign_stores_event_id(v: str) -> None:
    event = {k: v_ for k, v_ in ALPHABET_EVENT.items() if k != "hashes"}
    event_id, signed = hash_and_sign_event(rv(v), event, "example.org", SPEC_KEY)
    assert re.fullmatch(r"\$[A-Za-z0-9]{18,}:example\.org", event_id)
    assert signed["event_id"] == event_id
    assert "event_id" not in event
    # The ID is part of what is hashed and signed.
    assert verify_content_hash(signed)
    verify_event_signature(rv(v), signed, "example.org", "ed25519:1", SPEC_VERIFY)
    assert compute_event_id(rv(v), signed) == event_id
    tampered = {**signed, "event_id": "$other:example.org"}
    assert not verify_content_hash(tampered)
    with pytest.raises(SignatureError):
        verify_event_signature(rv(v), tampered, "example.org", "ed25519:1", SPEC_VERIFY)


# -- v12 room IDs -----------------------------------------------------------------

V12_CREATE: dict[str, Any] = {
    "type": "m.room.create",
    "state_key": "",
    "sender": "@alice:example.org",
    "content": {"room_version": "12"},
    "depth": 1,
    "prev_events": [],
    "auth_events": [],
    "origin_server_ts": 1700000000000,
}


def test_v12_room_id_from_create_event() -> None:
    event_id, signed = hash_and_sign_event(rv(12), V12_CREATE, "example.org", SPEC_KEY)
    assert "room_id" not in signed
    room_id = room_id_for_create_event(rv(12), signed)
    assert room_id == "!" + event_id[1:]
    redacted = (
        b'{"auth_events":[],"content":{"room_version":"12"},"depth":1,"hashes":{"sha256":"'
        + signed["hashes"]["sha256"].encode()
        + b'"},"origin_server_ts":1700000000000,"prev_events":[],"sender":"@alice:example.org",'
        b'"state_key":"","type":"m.room.create"}'
    )
    assert room_id == "!" + b64url(hashlib.sha256(redacted).digest())
    assert Event(signed, event_id, rv(12)).room_id == room_id


def test_v12_create_with_room_id_refused() -> None:
    _, signed = hash_and_sign_event(rv(12), {**V12_CREATE, "room_id": "!r:x"}, "example.org", SPEC_KEY)
    with pytest.raises(ValueError, match="no room_id"):
        room_id_for_create_event(rv(12), signed)


def test_v12_unhashed_create_refused() -> None:
    with pytest.raises(ValueError, match="hashed"):
        room_id_for_create_event(rv(12), V12_CREATE)


def test_room_id_before_v12_is_the_pdu_room_id() -> None:
    assert room_id_for_create_event(rv(11), {**V12_CREATE, "room_id": "!r:example.org"}) == "!r:example.org"
    with pytest.raises(ValueError):
        room_id_for_create_event(rv(11), V12_CREATE)
    with pytest.raises(ValueError, match="not an m.room.create"):
        room_id_for_create_event(rv(12), {**V12_CREATE, "type": "m.room.member"})


# -- signatures on events -----------------------------------------------------------


def test_signature_survives_redaction() -> None:
    _, signed = hash_and_sign_event(rv(10), {**ALPHABET_EVENT, "content": {"body": "secret"}}, "x", SPEC_KEY)
    redacted = prune_event_dict(rv(10), signed)
    verify_event_signature(rv(10), redacted, "x", "ed25519:1", SPEC_VERIFY)
    # ... but the content hash tells the redacted copy apart.
    assert verify_content_hash(signed)
    assert not verify_content_hash(redacted)


def test_existing_signatures_kept() -> None:
    other = generate_signing_key("o")
    _, first = hash_and_sign_event(rv(10), ALPHABET_EVENT, "other.org", other)
    _, both = hash_and_sign_event(rv(10), first, "x", SPEC_KEY)
    assert set(both["signatures"]) == {"other.org", "x"}
    verify_event_signature(rv(10), both, "other.org", "ed25519:o", get_verify_key(other))
    verify_event_signature(rv(10), both, "x", "ed25519:1", SPEC_VERIFY)


def test_tampered_protected_field_fails() -> None:
    _, signed = hash_and_sign_event(rv(10), ALPHABET_EVENT, "x", SPEC_KEY)
    with pytest.raises(SignatureError):
        verify_event_signature(rv(10), {**signed, "sender": "@mallory:x"}, "x", "ed25519:1", SPEC_VERIFY)


def test_tampered_content_breaks_hash_not_signature() -> None:
    _, signed = hash_and_sign_event(rv(10), ALPHABET_EVENT, "x", SPEC_KEY)
    tampered = {**signed, "content": {"body": "changed"}}
    verify_event_signature(rv(10), tampered, "x", "ed25519:1", SPEC_VERIFY)
    assert not verify_content_hash(tampered)


@pytest.mark.parametrize(
    "hashes", [None, {}, {"sha256": 5}, {"sha256": "!!notbase64!!"}, "abc", {"sha512": "AAAA"}]
)
def test_malformed_hashes_fail_verification(hashes: Any) -> None:
    event = dict(ALPHABET_EVENT)
    if hashes is None:
        del event["hashes"]
    else:
        event["hashes"] = hashes
    assert verify_content_hash(event) is False


def test_content_hash_ignores_unsigned_signatures_hashes() -> None:
    base = compute_content_hash(ALPHABET_EVENT)
    assert compute_content_hash({**ALPHABET_EVENT, "unsigned": {"age": 1}, "signatures": {"a": {}}}) == base
    assert compute_content_hash({**ALPHABET_EVENT, "hashes": {"sha256": "other"}}) == base
    assert base == hashlib.sha256(
        b'{"auth_events":[],"content":{"body":"0"},"depth":0,"origin_server_ts":0,'
        b'"prev_events":[],"room_id":"!r:x","sender":"@u:x","type":"m.room.message"}'
    ).digest()


def test_hash_and_sign_keeps_other_hash_algorithms() -> None:
    _, signed = hash_and_sign_event(rv(10), {**ALPHABET_EVENT, "hashes": {"future": "AAAA"}}, "x", SPEC_KEY)
    assert set(signed["hashes"]) == {"future", "sha256"}
    assert decode_base64(signed["hashes"]["sha256"]) == compute_content_hash(ALPHABET_EVENT)


# -- properties ---------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1) | st.text(max_size=10)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=10,
)
contents = st.dictionaries(st.text(max_size=8), json_values, max_size=5)
versions = st.sampled_from(sorted(KNOWN_ROOM_VERSIONS.values(), key=lambda r: int(r.identifier)))
event_types = st.sampled_from(["m.room.message", "m.room.member", "m.room.power_levels", "m.room.create", "x.y"])


def make_event(event_type: str, content: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": event_type,
        "room_id": "!r:example.org",
        "sender": "@u:example.org",
        "content": content,
        "depth": 5,
        "prev_events": ["$p"],
        "auth_events": ["$a"],
        "origin_server_ts": 1,
        "event_id": "$fixed:example.org",
    }


@given(contents, contents)
def test_content_hash_changes_with_content(a: dict[str, Any], b: dict[str, Any]) -> None:
    ea, eb = make_event("x.y", a), make_event("x.y", b)
    assert (compute_content_hash(ea) == compute_content_hash(eb)) == (a == b)


@given(versions, event_types, contents, json_values)
def test_reference_hash_unaffected_by_unsigned(
    room_version: RoomVersion, event_type: str, content: dict[str, Any], unsigned: Any
) -> None:
    event = make_event(event_type, content)
    assert compute_reference_hash(room_version, {**event, "unsigned": unsigned}) == compute_reference_hash(
        room_version, event
    )
    assert compute_event_id(room_version, {**event, "unsigned": unsigned}) == compute_event_id(room_version, event)


@given(versions, event_types, contents)
def test_reference_hash_unaffected_by_signatures_and_redaction(
    room_version: RoomVersion, event_type: str, content: dict[str, Any]
) -> None:
    event_id, signed = hash_and_sign_event(room_version, make_event(event_type, content), "x", SPEC_KEY)
    redacted = prune_event_dict(room_version, signed)
    assert compute_event_id(room_version, redacted) == event_id
    assert compute_reference_hash(room_version, redacted) == compute_reference_hash(room_version, signed)


@given(versions, event_types, contents)
def test_sign_verify_round_trip(room_version: RoomVersion, event_type: str, content: dict[str, Any]) -> None:
    _, signed = hash_and_sign_event(room_version, make_event(event_type, content), "x", SPEC_KEY)
    assert verify_content_hash(signed)
    verify_event_signature(room_version, signed, "x", "ed25519:1", SPEC_VERIFY)
    verify_event_signature(room_version, prune_event_dict(room_version, signed), "x", "ed25519:1", SPEC_VERIFY)


@given(versions, event_types, contents, st.sampled_from(["sender", "depth", "origin_server_ts", "prev_events"]))
def test_tampering_protected_field_fails(
    room_version: RoomVersion, event_type: str, content: dict[str, Any], field: str
) -> None:
    _, signed = hash_and_sign_event(room_version, make_event(event_type, content), "x", SPEC_KEY)
    signed[field] = ["tampered"]
    with pytest.raises(SignatureError):
        verify_event_signature(room_version, signed, "x", "ed25519:1", SPEC_VERIFY)
    assert not verify_content_hash(signed)
