"""zhome.util.fastjson reads what the standard library reads."""

from __future__ import annotations

import json

import pytest

from zhome.util.fastjson import loads, loads_fast


@pytest.mark.parametrize("text", [
    '{"type":"m.room.message","content":{"body":"caf\\u00e9 é 🏥","n":[1,-0,2.5e-3,true,null]},"depth":12}',
    '{"big":18446744073709551616,"small":-9223372036854775809,"max":9223372036854775807}',
    '{"lone":"\\ud800"}',
    '{"a":1,"a":2}',
    '{"huge":1e400}',
    '{"nan":NaN}',
    '"text"',
    "null",
])
def test_loads_gives_what_json_loads_gives(text: str) -> None:
    assert repr(loads(text)) == repr(json.loads(text))
    assert repr(loads(text.encode("utf-8"))) == repr(json.loads(text.encode("utf-8")))


def test_integers_beyond_64_bits_stay_integers() -> None:
    got = loads('{"big": 18446744073709551616, "neg": -9223372036854775809}')
    assert got == {"big": 2 ** 64, "neg": -(2 ** 63) - 1}
    assert all(isinstance(v, int) for v in got.values())
    # Left to the standard library, not read by orjson.
    assert loads_fast(b'{"big": 18446744073709551616}') is None
    assert loads_fast(b'{"fine": 123456789012345678}') == {"fine": 123456789012345678}


def test_what_json_refuses_is_refused() -> None:
    for text in ['{"a": 1} x', '{"a": "\x01"}', "[" * 5000 + "]" * 5000]:
        with pytest.raises((ValueError, RecursionError)):
            json.loads(text)
        with pytest.raises((ValueError, RecursionError)):
            loads(text)


def test_a_lone_surrogate_in_text_is_read_as_before() -> None:
    text = '{"raw": "\ud800"}'
    assert loads(text) == json.loads(text) == {"raw": "\ud800"}


def test_bounded_reading_gives_what_json_loads_gives() -> None:
    from zhome.util.fastjson import loads_bounded

    for text in ['{"content":{"body":"é","n":[1,2.5]},"depth":3}', '{"lone":"\\ud800"}', '{"nan":NaN}']:
        assert repr(loads_bounded(text)) == repr(json.loads(text))


def test_copy_json_shares_nothing_mutable() -> None:
    from zhome.util.fastjson import copy_json

    original = {"content": {"body": "x", "list": [1, {"a": True}], "n": None, "f": 1.5},
                "prev_events": ["$a", "$b"], "pair": ([1], 2)}
    copied = copy_json(original)
    assert copied == original
    copied["content"]["list"][1]["a"] = False
    copied["prev_events"].append("$c")
    copied["pair"][0].append(3)  # a tuple is copied by copy.deepcopy, its list too
    assert original == {"content": {"body": "x", "list": [1, {"a": True}], "n": None, "f": 1.5},
                        "prev_events": ["$a", "$b"], "pair": ([1], 2)}
