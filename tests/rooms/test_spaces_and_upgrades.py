"""Pure parts of the space hierarchy and of room upgrades: the spec's
ordering of space children (its own example), paging tokens, summaries
from other servers, and power levels carried into a new room version.

Spec: client-server-api "Spaces" ("Ordering of children within a space"),
"Room Upgrades".
"""

from __future__ import annotations

import pytest

from zhome.http.errors import MatrixError
from zhome.rooms.room_upgrade import normalised_power_levels
from zhome.rooms.spaces import _clean_summary, _decode_token, _encode_token, _ordered


def test_children_ordered_as_the_spec_example() -> None:
    def child(room: str, ts: int, order: str | None = None) -> dict:
        content: dict = {"via": ["example.org"]}
        if order is not None:
            content["order"] = order
        return {"type": "m.space.child", "state_key": room, "origin_server_ts": ts, "content": content,
                "sender": "@a:example.org"}

    given = [child("!b:example.org", 1640341000000, " "), child("!a:example.org", 1640141000000, "aaaa"),
             child("!c:example.org", 1640841000000, "first"), child("!e:example.org", 1640641000000),
             child("!d:example.org", 1640741000000)]
    assert [c["state_key"] for c in _ordered(given)] == [
        "!b:example.org", "!a:example.org", "!c:example.org", "!e:example.org", "!d:example.org"]
    # An invalid order (too long, outside \x20-\x7E) counts as none; ties go by timestamp, then room ID.
    odd = [child("!z:x", 5, "a" * 51), child("!y:x", 5, "\n"), child("!x:x", 1, "b"), child("!w:x", 1, "b")]
    assert [c["state_key"] for c in _ordered(odd)] == ["!w:x", "!x:x", "!y:x", "!z:x"]


def test_paging_token_is_bound_to_its_filters() -> None:
    token = _encode_token("!s:x", True, 3, 7)
    assert _decode_token(token, "!s:x", True, 3) == 7
    for args in (("!t:x", True, 3), ("!s:x", False, 3), ("!s:x", True, None)):
        with pytest.raises(MatrixError) as e:
            _decode_token(token, *args)
        assert e.value.code == 400 and e.value.errcode == "M_INVALID_PARAM"
    for bad in ("", "!!!", "e30", _encode_token("!s:x", True, 3, 0)[:-3]):
        with pytest.raises(MatrixError):
            _decode_token(bad, "!s:x", True, 3)


def test_remote_summary_keeps_only_well_typed_fields() -> None:
    assert _clean_summary({"room_id": "not-a-room"}) is None
    assert _clean_summary("x") is None
    got = _clean_summary({"room_id": "!r:x", "name": 5, "topic": "t", "num_joined_members": True,
                          "world_readable": "yes", "encryption": "rot13", "allowed_room_ids": ["!a:x", 3, "b"],
                          "children_state": [{"type": "m.space.child", "state_key": "!c:x", "content": {},
                                              "sender": "@u:x", "origin_server_ts": 1},
                                             {"type": "m.room.name", "state_key": "", "content": {},
                                              "sender": "@u:x", "origin_server_ts": 1}]})
    assert got == {"room_id": "!r:x", "topic": "t", "num_joined_members": 0, "world_readable": False,
                   "guest_can_join": False, "allowed_room_ids": ["!a:x"],
                   "children_state": [{"type": "m.space.child", "state_key": "!c:x", "content": {},
                                       "sender": "@u:x", "origin_server_ts": 1}]}


def test_power_levels_normalised_for_newer_versions() -> None:
    got = normalised_power_levels({
        "users": {"@a:x": "100", "@b:x": 50, "@c:x": "lots", "@d:x": True},
        "events": {"m.room.name": " 50 ", "m.room.topic": 2 ** 60},
        "ban": "50", "kick": None, "notifications": {"room": "20"}, "custom": {"kept": "as is"}})
    assert got == {"users": {"@a:x": 100, "@b:x": 50}, "events": {"m.room.name": 50}, "ban": 50,
                   "notifications": {"room": 20}, "custom": {"kept": "as is"}}
