"""invite_room_state / knock_room_state: full PDUs on the wire (spec v1.16),
stripped state events for clients."""

from __future__ import annotations

from zhome.federation.servlets import _stripped


def test_full_pdus_become_stripped_state() -> None:
    create = {"type": "m.room.create", "state_key": "", "sender": "@a:hs", "content": {"room_version": "12"},
              "depth": 1, "prev_events": [], "auth_events": [], "origin_server_ts": 1, "hashes": {"sha256": "x"},
              "signatures": {"hs": {"ed25519:a": "y"}}}
    name = {"type": "m.room.name", "state_key": "", "sender": "@a:hs", "content": {"name": "N"}}
    assert _stripped([create, name]) == [
        {"type": "m.room.create", "state_key": "", "content": {"room_version": "12"}, "sender": "@a:hs"},
        {"type": "m.room.name", "state_key": "", "content": {"name": "N"}, "sender": "@a:hs"},
    ]


def test_malformed_entries_are_dropped_and_bounded() -> None:
    good = {"type": "m.room.topic", "state_key": "", "content": {"topic": "t"}, "sender": "@a:hs"}
    assert _stripped([1, "x", {"type": 3, "content": {}}, {"type": "t", "content": []}, good]) == [good]
    assert len(_stripped([good] * 80)) == 50
