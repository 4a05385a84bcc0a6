"""Format checks on received PDUs: ``parse_pdu``.

Spec: server-server-api "Checks performed on receipt of a PDU" (step 1: a
valid event in the room version's format, else dropped), "PDUs" (the
required keys and their types; at most 20 prev_events and 10 auth_events),
client-server-api "Size limits" (65536 bytes in all; sender, room_id, type,
state_key, event_id at most 255 bytes), appendices "Canonical JSON" (no
floats; from room version 6 integers within [-(2**53)+1, 2**53-1]).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from zhome.crypto.event_hashing import compute_event_id, hash_and_sign_event
from zhome.crypto.keys import new_signing_key
from zhome.federation.handler import PduRejected, _strip_pdu, parse_pdu
from zhome.rooms.versions import get_room_version

SERVER = "remote.example"
KEY = new_signing_key("k1")
V1 = get_room_version("1")
V5 = get_room_version("5")
V10 = get_room_version("10")
V12 = get_room_version("12")


def _pdu(rv: Any = V10, **over: Any) -> dict[str, Any]:
    if rv.event_id_format.name == "SERVER_CHOSEN":
        refs: list[Any] = [["$prev:remote.example", {"sha256": "abc"}]]
        auth: list[Any] = [["$auth:remote.example", {"sha256": "abc"}]]
    else:
        refs, auth = ["$prev"], ["$auth"]
    pdu: dict[str, Any] = {
        "room_id": "!room:remote.example",
        "sender": "@mallory:remote.example",
        "type": "m.room.message",
        "content": {"msgtype": "m.text", "body": "hi"},
        "depth": 7,
        "origin_server_ts": 1700000000000,
        "prev_events": refs,
        "auth_events": auth,
    }
    if rv.event_id_format.name == "SERVER_CHOSEN":
        pdu["origin"] = SERVER
    pdu.update(over)
    _, signed = hash_and_sign_event(rv, pdu, SERVER, KEY)
    return signed


@pytest.mark.parametrize("rv", [V1, V5, V10, V12], ids=lambda rv: "v" + rv.identifier)
def test_valid_pdu_parses_with_its_event_id(rv: Any) -> None:
    pdu = _pdu(rv)
    ev = parse_pdu(rv, pdu)
    assert ev.event_id == compute_event_id(rv, pdu)
    assert ev.type == "m.room.message" and ev.sender == "@mallory:remote.example"


def test_unsigned_is_not_part_of_the_event_id() -> None:
    pdu = _pdu()
    with_unsigned = dict(pdu, unsigned={"age": 5})
    assert parse_pdu(V10, _strip_pdu(with_unsigned)).event_id == parse_pdu(V10, pdu).event_id


@pytest.mark.parametrize("value", [None, [], "x", 1])
def test_not_an_object(value: Any) -> None:
    with pytest.raises(PduRejected):
        parse_pdu(V10, value)


@pytest.mark.parametrize("key", ["type", "sender", "content", "depth", "origin_server_ts", "prev_events",
                                 "auth_events", "hashes", "signatures", "room_id"])
def test_missing_required_field(key: str) -> None:
    pdu = _pdu()
    del pdu[key]
    with pytest.raises(PduRejected):
        parse_pdu(V10, pdu)


@pytest.mark.parametrize("key,value", [
    ("type", 5), ("type", None), ("sender", ["@a:b"]), ("content", "text"), ("content", []),
    ("depth", "7"), ("depth", True), ("depth", 7.0), ("origin_server_ts", "now"), ("origin_server_ts", False),
    ("prev_events", "$prev"), ("prev_events", {"$prev": 1}), ("auth_events", None), ("hashes", "abc"),
    ("signatures", []), ("room_id", 12), ("state_key", 0), ("state_key", None),
])
def test_field_of_the_wrong_type(key: str, value: Any) -> None:
    pdu = _pdu()
    pdu[key] = value
    with pytest.raises(PduRejected):
        parse_pdu(V10, pdu)


@pytest.mark.parametrize("sender", ["mallory", "@mallory", "@:remote.example", "!room:remote.example", ""])
def test_sender_must_be_a_user_id(sender: str) -> None:
    with pytest.raises(PduRejected):
        parse_pdu(V10, _pdu(sender=sender))


@pytest.mark.parametrize("refs", [[1], [None], [["$x", {}]], [{"event_id": "$x"}]])
def test_bad_event_references_in_hash_id_versions(refs: list[Any]) -> None:
    with pytest.raises(PduRejected):
        parse_pdu(V10, _pdu(prev_events=refs))
    with pytest.raises(PduRejected):
        parse_pdu(V10, _pdu(auth_events=refs))


@pytest.mark.parametrize("refs", [["$x"], [[]], [[1, {}]]])
def test_bad_event_references_in_v1(refs: list[Any]) -> None:
    with pytest.raises(PduRejected):
        parse_pdu(V1, _pdu(V1, prev_events=refs))


def test_v1_needs_an_event_id() -> None:
    pdu = _pdu(V1)
    del pdu["event_id"]
    with pytest.raises(PduRejected):
        parse_pdu(V1, pdu)
    with pytest.raises(PduRejected):
        parse_pdu(V1, dict(_pdu(V1), event_id="no-sigil"))


def test_too_many_prev_events_or_auth_events() -> None:
    parse_pdu(V10, _pdu(prev_events=[f"$p{i}" for i in range(20)]))
    with pytest.raises(PduRejected):
        parse_pdu(V10, _pdu(prev_events=[f"$p{i}" for i in range(21)]))
    parse_pdu(V10, _pdu(auth_events=[f"$a{i}" for i in range(10)]))
    with pytest.raises(PduRejected):
        parse_pdu(V10, _pdu(auth_events=[f"$a{i}" for i in range(11)]))


def test_oversized_pdu() -> None:
    small = _pdu(content={"body": ""})
    from zhome.crypto.canonical import encode_canonical_json

    room = 65536 - len(encode_canonical_json(small))
    # At the limit: accepted; one byte more: rejected. (The hash and
    # signature have a fixed length, so the size moves with the body.)
    at_limit = _pdu(content={"body": "x" * room})
    assert len(encode_canonical_json(at_limit)) == 65536
    parse_pdu(V10, at_limit)
    with pytest.raises(PduRejected):
        parse_pdu(V10, _pdu(content={"body": "x" * (room + 1)}))


@pytest.mark.parametrize("key", ["type", "state_key", "room_id"])
def test_fields_longer_than_255_bytes(key: str) -> None:
    long_value = {"type": "t" * 256, "state_key": "s" * 256, "room_id": "!" + "r" * 240 + ":remote.example"}[key]
    ok_value = {"type": "t" * 255, "state_key": "é" * 127, "room_id": "!" + "r" * 239 + ":remote.example"}[key]
    parse_pdu(V10, _pdu(**{key: ok_value}))
    with pytest.raises(PduRejected):
        parse_pdu(V10, _pdu(**{key: long_value}))


def test_sender_longer_than_255_bytes() -> None:
    with pytest.raises(PduRejected):
        parse_pdu(V10, _pdu(sender="@" + "m" * 240 + ":remote.example"))


@pytest.mark.parametrize("where", ["content", "top", "nested"])
def test_floats_are_rejected(where: str) -> None:
    if where == "content":
        pdu = _pdu(content={"body": "hi", "n": 1.5})
    elif where == "top":
        pdu = _pdu(extra=0.25)
    else:
        pdu = _pdu(content={"a": [{"b": [1, 2, 3.0]}]})
    with pytest.raises(PduRejected):
        parse_pdu(V10, pdu)


def test_integer_range_is_strict_from_v6() -> None:
    big = 2**53
    parse_pdu(V5, _pdu(V5, content={"n": big}))
    with pytest.raises(PduRejected):
        parse_pdu(V10, _pdu(content={"n": big}))
    with pytest.raises(PduRejected):
        parse_pdu(V10, _pdu(content={"n": -big}))
    parse_pdu(V10, _pdu(content={"n": big - 1}))


def test_v12_create_event_has_no_room_id_but_others_need_one() -> None:
    create = {
        "sender": "@mallory:remote.example", "type": "m.room.create", "state_key": "",
        "content": {"room_version": "12"}, "depth": 1, "origin_server_ts": 1700000000000,
        "prev_events": [], "auth_events": [],
    }
    _, signed = hash_and_sign_event(V12, create, SERVER, KEY)
    assert parse_pdu(V12, signed).type == "m.room.create"
    pdu = _pdu(V12)
    del pdu["room_id"]
    with pytest.raises(PduRejected):
        parse_pdu(V12, pdu)


def test_parse_does_not_change_the_pdu() -> None:
    pdu = _pdu()
    before = copy.deepcopy(pdu)
    parse_pdu(V10, pdu)
    assert pdu == before
