"""JSON answers assembled from parts that were encoded once and kept.

A /keys/query answer for a hundred users is mostly the same device keys
every time; encoding them again on each request costs more than reading
them. A handler may return a :class:`Spliced` object whose values (at any
depth, through nested ``Spliced`` objects) include :class:`RawJson` parts:
already-encoded JSON text written into the answer as it is.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def dumps(value: Any) -> str:
    """The encoding every JSON answer uses (compact, UTF-8 as is)."""
    return dumps_bytes(value).decode("utf-8")


def dumps_bytes(value: Any) -> bytes:
    """:func:`dumps` as UTF-8 bytes, what is written to the wire.

    orjson writes the same text as ``json.dumps(value, ensure_ascii=False,
    separators=(",", ":"))`` about ten times faster. What it refuses (keys
    that are not strings, integers beyond 64 bits, a string that is not
    valid Unicode) goes to the standard library, which decides as it always
    did: it converts such keys and integers, and such a string fails to
    encode as UTF-8 in either case."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class RawJson:
    """A JSON value already encoded with :func:`dumps`."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"RawJson({self.text[:40]!r}...)"


class Spliced(dict):
    """A JSON object whose values may be :class:`RawJson` or ``Spliced``."""


def encode(value: Any) -> str:
    if isinstance(value, RawJson):
        return value.text
    if isinstance(value, Spliced):
        return "{" + ",".join([_key(str(k)) + ":" + encode(v) for k, v in value.items()]) + "}"
    return dumps(value)


#: A key as dumps writes it (a JSON string, UTF-8 as is).
_key = json.encoder.encode_basestring


def to_plain(value: Any) -> Any:
    """The same value with every part decoded (for callers that read it)."""
    if isinstance(value, RawJson):
        return json.loads(value.text)
    if isinstance(value, Spliced):
        return {k: to_plain(v) for k, v in value.items()}
    return value
