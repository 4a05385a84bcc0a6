"""Tests for zhome.crypto.canonical (spec: appendices "Canonical JSON")."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import given, strategies as st

from zhome.crypto.canonical import check_canonical_json_value, encode_canonical_json


def _parse_spec_json(text: str) -> Any:
    # The spec's examples are JSON *text*; a number literal such as 1e10 is an
    # integer value written with an exponent. Read integral numbers as ints,
    # as the grammar's "int" production means them.
    def parse_float(s: str) -> Any:
        f = float(s)
        return int(f) if f.is_integer() else f

    return json.loads(text, parse_float=parse_float)


# (input text, expected canonical output) from appendices.md "Examples".
SPEC_EXAMPLES = [
    ("{}", "{}"),
    ('{\n    "one": 1,\n    "two": "Two"\n}', '{"one":1,"two":"Two"}'),
    ('{\n    "b": "2",\n    "a": "1"\n}', '{"a":"1","b":"2"}'),
    ('{"b":"2","a":"1"}', '{"a":"1","b":"2"}'),
    (
        """{
    "auth": {
        "success": true,
        "mxid": "@john.doe:example.com",
        "profile": {
            "display_name": "John Doe",
            "three_pids": [
                {
                    "medium": "email",
                    "address": "john.doe@example.org"
                },
                {
                    "medium": "msisdn",
                    "address": "123456789"
                }
            ]
        }
    }
}""",
        '{"auth":{"mxid":"@john.doe:example.com","profile":{"display_name":"John Doe",'
        '"three_pids":[{"address":"john.doe@example.org","medium":"email"},'
        '{"address":"123456789","medium":"msisdn"}]},"success":true}}',
    ),
    ('{\n    "a": "日本語"\n}', '{"a":"日本語"}'),
    ('{\n    "本": 2,\n    "日": 1\n}', '{"日":1,"本":2}'),
    ('{\n    "a": "\\u65E5"\n}', '{"a":"日"}'),
    ('{\n    "a": null\n}', '{"a":null}'),
    ('{\n    "a": -0,\n    "b": 1e10\n}', '{"a":0,"b":10000000000}'),
]


@pytest.mark.parametrize("text,expected", SPEC_EXAMPLES)
def test_spec_examples(text: str, expected: str) -> None:
    assert encode_canonical_json(_parse_spec_json(text)) == expected.encode("utf-8")


def test_returns_utf8_bytes_not_escapes() -> None:
    out = encode_canonical_json({"a": "é"})
    assert isinstance(out, bytes)
    assert out == b'{"a":"\xc3\xa9"}'


def test_control_characters_escaped_per_grammar() -> None:
    # The grammar's "escaped" production: short escapes where they exist,
    # \u00XX for the other control characters.
    assert encode_canonical_json({"a": "\n\t\x00\x1f\"\\"}) == b'{"a":"\\n\\t\\u0000\\u001f\\"\\\\"}'


def test_keys_sorted_by_code_point_not_utf16() -> None:
    # U+FB01 sorts before U+1F600 by code point but after it in UTF-16
    # order (surrogates D83D...); the spec says code points.
    assert encode_canonical_json({"\U0001f600": 1, "\ufb01": 2}) == '{"ﬁ":2,"😀":1}'.encode("utf-8")


# -- check_canonical_json_value ----------------------------------------------


@pytest.mark.parametrize("strict", [False, True])
def test_valid_values_pass(strict: bool) -> None:
    check_canonical_json_value(
        {"a": [1, -1, 0, True, False, None, "x", {"b": {}}], "c": 2**53 - 1, "d": -(2**53) + 1},
        strict,
    )


@pytest.mark.parametrize("strict", [False, True])
def test_float_rejected_with_path(strict: bool) -> None:
    with pytest.raises(ValueError, match=re.escape("float at content.list[1] is not allowed")):
        check_canonical_json_value({"content": {"list": [1, 1.5]}}, strict)


@pytest.mark.parametrize("strict", [False, True])
def test_integral_float_still_rejected(strict: bool) -> None:
    with pytest.raises(ValueError, match="float"):
        check_canonical_json_value({"a": 1.0}, strict)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.0])
def test_special_floats_rejected(value: float) -> None:
    with pytest.raises(ValueError, match="float at a"):
        check_canonical_json_value({"a": value}, False)


def test_top_level_float_message() -> None:
    with pytest.raises(ValueError, match="float at the top-level value"):
        check_canonical_json_value(0.5, False)


@pytest.mark.parametrize("value", [2**53, -(2**53), 2**64, -(2**70)])
def test_out_of_range_int_rejected_when_strict(value: int) -> None:
    with pytest.raises(ValueError, match=r"integer at content\.n is outside"):
        check_canonical_json_value({"content": {"n": value}}, strict=True)


@pytest.mark.parametrize("value", [2**53, -(2**53), 2**64])
def test_out_of_range_int_allowed_when_not_strict(value: int) -> None:
    check_canonical_json_value({"content": {"n": value}}, strict=False)


def test_range_edges_exact() -> None:
    check_canonical_json_value(9007199254740991, strict=True)
    check_canonical_json_value(-9007199254740991, strict=True)
    with pytest.raises(ValueError):
        check_canonical_json_value(9007199254740992, strict=True)
    with pytest.raises(ValueError):
        check_canonical_json_value(-9007199254740992, strict=True)


def test_bool_is_not_treated_as_int() -> None:
    check_canonical_json_value([True, False], strict=True)


def test_non_string_key_rejected() -> None:
    with pytest.raises(ValueError, match="key 1 .* is not a string"):
        check_canonical_json_value({"a": {1: "x"}}, False)


def test_non_json_type_rejected() -> None:
    with pytest.raises(ValueError, match="type bytes at a"):
        check_canonical_json_value({"a": b"x"}, False)


def test_lone_surrogate_rejected() -> None:
    with pytest.raises(ValueError, match="not valid Unicode"):
        check_canonical_json_value(json.loads('{"a": "\\ud800"}'), False)


# -- properties ----------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1) | st.text()
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(), children, max_size=5),
    max_leaves=30,
)
json_objects = st.dictionaries(st.text(), json_values, max_size=8)


@given(json_objects, st.randoms(use_true_random=False))
def test_deterministic_under_key_reordering(obj: dict[str, Any], rnd: Any) -> None:
    def shuffled(v: Any) -> Any:
        if isinstance(v, dict):
            items = list(v.items())
            rnd.shuffle(items)
            return {k: shuffled(x) for k, x in items}
        if isinstance(v, list):
            return [shuffled(x) for x in v]
        return v

    assert encode_canonical_json(shuffled(obj)) == encode_canonical_json(obj)


@given(json_values)
def test_round_trips_through_json_loads(value: Any) -> None:
    assert json.loads(encode_canonical_json(value).decode("utf-8")) == value


@given(json_objects)
def test_keys_sorted(obj: dict[str, Any]) -> None:
    decoded = json.loads(encode_canonical_json(obj), object_pairs_hook=lambda pairs: pairs)
    keys = [k for k, _ in decoded]
    assert keys == sorted(keys)


@given(json_values)
def test_no_insignificant_whitespace(value: Any) -> None:
    out = encode_canonical_json(value)
    # Re-encoding the parsed value with the most compact settings gives the
    # same length: there is nothing to remove.
    compact = json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode("utf-8")
    assert out == compact
    # And no whitespace outside strings: strip string literals and look.
    without_strings = re.sub(rb'"(?:[^"\\]|\\.)*"', b'""', out)
    assert not re.search(rb"[ \t\n\r]", without_strings)


@given(json_values)
def test_generated_values_are_canonical(value: Any) -> None:
    check_canonical_json_value(value, strict=True)
