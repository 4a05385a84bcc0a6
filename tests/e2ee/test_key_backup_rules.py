"""The pure parts of server-side key backups: the rule that decides which
of two keys of one session is kept, and the checks of versions, auth_data
and uploaded keys.

Spec: client-server-api "Server-side key backups" (the replacement rule:
is_verified, then the lower first_message_index, then the lower
forwarded_count) and the ``m.megolm_backup.v1.curve25519-aes-sha2`` auth_data.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from unpaddedbase64 import encode_base64

from zhome.e2ee.key_backup import MEGOLM_BACKUP_V1, check_auth_data, check_key_data, check_rooms, parse_version, \
    should_replace
from zhome.http.errors import MatrixError
from zhome.storage.key_backup import RoomKey

keys = st.builds(lambda fmi, fc, v, tag: RoomKey("!r:x", "s", fmi, fc, v, {"tag": tag}),
                 st.integers(0, 5), st.integers(0, 5), st.booleans(), st.integers(0, 3))


def _rank(k: RoomKey) -> tuple[int, int, int]:
    return (0 if k.is_verified else 1, k.first_message_index, k.forwarded_count)


@given(keys, keys)
def test_replace_exactly_when_strictly_better(a: RoomKey, b: RoomKey) -> None:
    assert should_replace(a, b) == (_rank(b) < _rank(a))
    # Never both ways; a tie keeps what is stored.
    assert not (should_replace(a, b) and should_replace(b, a))
    assert not should_replace(a, a)


@given(st.lists(keys, min_size=1, max_size=12))
def test_the_kept_key_is_the_first_best_whatever_came_between(uploads: list[RoomKey]) -> None:
    stored = uploads[0]
    for new in uploads[1:]:
        if should_replace(stored, new):
            stored = new
    best = min(_rank(k) for k in uploads)
    assert _rank(stored) == best
    assert stored is next(k for k in uploads if _rank(k) == best)


def test_spec_order_of_criteria() -> None:
    base = RoomKey("!r:x", "s", 5, 5, False, {})
    assert should_replace(base, RoomKey("!r:x", "s", 9, 9, True, {}))  # verified beats lower indexes
    assert not should_replace(RoomKey("!r:x", "s", 9, 9, True, {}), base)
    assert should_replace(base, RoomKey("!r:x", "s", 4, 9, False, {}))  # index beats forwarded_count
    assert should_replace(base, RoomKey("!r:x", "s", 5, 4, False, {}))
    assert not should_replace(base, RoomKey("!r:x", "s", 5, 5, False, {"other": 1}))


@pytest.mark.parametrize("raw,expected", [
    ("1", 1), ("42", 42), ("0", None), ("-1", None), ("01", None), ("1.0", None), ("", None), ("abc", None),
    ("١", None), ("9" * 19, None), (" 1", None),
])
def test_parse_version(raw: str, expected: Any) -> None:
    assert parse_version(raw) == expected


def test_auth_data_public_key() -> None:
    good = encode_base64(os.urandom(32))
    assert check_auth_data(MEGOLM_BACKUP_V1, {"public_key": good, "extra": 1}) == {"public_key": good, "extra": 1}
    assert check_auth_data(MEGOLM_BACKUP_V1, {"public_key": good + "="}) is not None  # padded is tolerated
    for bad in (None, "x", [], {}, {"public_key": None}, {"public_key": good[:-2]},
                {"public_key": good[:-1] + "!"}, {"public_key": encode_base64(os.urandom(33))},
                {"public_key": good, "signatures": {"@u:x": "sig"}}):
        with pytest.raises(MatrixError) as e:
            check_auth_data(MEGOLM_BACKUP_V1, bad)
        assert (e.value.code, e.value.errcode) == (400, "M_BAD_JSON"), bad


def test_key_data_and_rooms() -> None:
    good = {"first_message_index": 0, "forwarded_count": 1, "is_verified": True, "session_data": {"a": 1}}
    assert check_key_data("!r:x", "s", good, "body") == RoomKey("!r:x", "s", 0, 1, True, {"a": 1})
    assert check_key_data("!r:x", "s", {**good, "first_message_index": 2 ** 53 - 1}, "b").first_message_index \
        == 2 ** 53 - 1
    with pytest.raises(MatrixError):
        check_key_data("!r:x", "s", {**good, "first_message_index": 2 ** 53}, "b")
    got = check_rooms({"rooms": {"!a:x": {"sessions": {"s1": good}}, "!b": {"sessions": {}}}})
    assert [(k.room_id, k.session_id) for k in got] == [("!a:x", "s1")]
    for bad in ({"rooms": {"a:x": {"sessions": {}}}}, {"rooms": {"!a:x": {}}}, {"rooms": []}, {}):
        with pytest.raises(MatrixError) as e:
            check_rooms(bad)
        assert e.value.errcode == "M_BAD_JSON", bad
