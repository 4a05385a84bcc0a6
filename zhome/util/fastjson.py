"""Reading JSON fast where it is read most: stored events and request bodies.

orjson reads strict JSON into the same Python values as the standard
library's ``json.loads``, several times faster, with one difference that
matters here: an integer beyond 64 bits becomes a float. Text that may hold
one (a run of 19 digits or more, inside a string or not) is read by the
standard library, and so is anything orjson refuses, so the standard
library keeps deciding every case it always decided.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Optional

import orjson

#: Every digit made "0" and every other byte " ": a run of 19 digits or
#: more is then found by a plain substring search, several times faster
#: than a regular expression. 19 digits reach below -2**63; 18 stay within
#: a signed 64-bit integer.
_DIGITS_ONLY = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_LONG_RUN = b"0" * 19


def loads_fast(data: str | bytes) -> Optional[Any]:
    """What orjson reads from ``data``, or None when the standard library
    must decide (a long run of digits, or text orjson refuses). JSON ``null``
    alone also gives None: callers that accept it must check the text."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if raw.translate(_DIGITS_ONLY).find(_LONG_RUN) >= 0:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def loads(data: str | bytes) -> Any:
    """``json.loads(data)``, faster (see the module docstring)."""
    got = loads_fast(data)
    return got if got is not None else json.loads(data)


def loads_bounded(data: str | bytes) -> Any:
    """``json.loads(data)`` for text known to hold no integer beyond the
    canonical JSON range (stored events of room versions 6 and later, which
    refuse such integers before they are hashed): orjson reads it without
    the search for long digits; what it refuses the standard library decides."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def copy_json(value: Any) -> Any:
    """A deep copy of a JSON value (dicts, lists, strings, numbers, booleans,
    None) several times faster than ``copy.deepcopy``, which it falls back
    to for anything else (a tuple, another object)."""
    if isinstance(value, dict):
        return {k: copy_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [copy_json(v) for v in value]
    if value is None or isinstance(value, (str, int, float)):
        return value
    return copy.deepcopy(value)
