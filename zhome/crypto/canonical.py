"""Canonical JSON.

Spec: appendices "Canonical JSON" (shortest UTF-8 encoding, keys sorted by
code point, integers only in ``[-(2**53)+1, (2**53)-1]``) and the room
versions' "Canonical JSON" sections (rooms/v1.md: events of v1-v5 may carry
out-of-range integers; rooms/v6.md onwards: such events are invalid).

Two jobs, kept apart on purpose:

- ``encode_canonical_json`` turns a value into the bytes that are hashed and
  signed. It is deliberately permissive (it encodes whatever the
  ``canonicaljson`` package encodes) because old rooms contain events that
  break the rules, and we must still produce the same bytes as the server
  that signed them.
- ``check_canonical_json_value`` is the gate for *new* or *received* events
  (M_BAD_JSON): it says whether a value is canonical JSON at all.
"""

from __future__ import annotations

from typing import Any

import canonicaljson

# The range in which every IEEE double represents an integer exactly; the
# spec picks it so that JavaScript and other double-only parsers agree.
CANONICALJSON_MAX_INT = 2**53 - 1
CANONICALJSON_MIN_INT = -(2**53) + 1


def encode_canonical_json(obj: Any) -> bytes:
    """The canonical JSON encoding of ``obj`` as UTF-8 bytes."""
    return canonicaljson.encode_canonical_json(obj)


def check_canonical_json_value(obj: Any, strict: bool) -> None:
    """Raise ``ValueError`` when ``obj`` cannot be encoded as canonical JSON.

    Floats are refused everywhere (the grammar has no fractions or
    exponents). With ``strict`` (room versions 6 and later) integers outside
    ``[-(2**53)+1, (2**53)-1]`` are refused too; older versions tolerate them
    because such events exist in real rooms. The message names the path of
    the offending value, for the M_BAD_JSON error a client or server sees.
    """
    _check(obj, strict, "")


def _describe(path: str) -> str:
    return path if path else "the top-level value"


def _check(value: Any, strict: bool, path: str) -> None:
    # bool is a subclass of int: test it first so true/false pass untouched.
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, str):
        _check_string(value, path)
        return
    if isinstance(value, int):
        if strict and not (CANONICALJSON_MIN_INT <= value <= CANONICALJSON_MAX_INT):
            raise ValueError(
                f"integer at {_describe(path)} is outside the canonical JSON range "
                f"[{CANONICALJSON_MIN_INT}, {CANONICALJSON_MAX_INT}]"
            )
        return
    if isinstance(value, float):
        raise ValueError(f"float at {_describe(path)} is not allowed in canonical JSON")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"object key {key!r} at {_describe(path)} is not a string")
            _check_string(key, path)
            _check(item, strict, f"{path}.{key}" if path else key)
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check(item, strict, f"{path}[{i}]")
        return
    raise ValueError(f"value of type {type(value).__name__} at {_describe(path)} is not JSON")


def _check_string(value: str, path: str) -> None:
    # Lone surrogates can come out of json.loads ("\ud800") but have no UTF-8
    # encoding, so the canonical bytes of the event would not exist.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"string at {_describe(path)} is not valid Unicode") from None
