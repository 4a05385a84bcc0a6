"""Unit tests of the pure HTTP and sync helpers: rate limiting, stream
tokens, filters and typing expiry."""

from __future__ import annotations

from typing import Any

import pytest

from zhome.http.errors import MatrixError
from zhome.http.ratelimit import RateLimiter
from zhome.rooms.events import Event
from zhome.rooms.versions import get_room_version
from zhome.sync.filtering import EventFilter, validate_filter
from zhome.sync.notifier import Notifier, StreamToken
from zhome.sync.typing import TypingService


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_rate_limiter_burst_then_refill() -> None:
    clock = FakeClock()
    rl = RateLimiter(per_second=0.5, burst_count=3, clock=clock)
    for _ in range(3):
        rl.check("u")
    with pytest.raises(MatrixError) as e:
        rl.check("u")
    assert e.value.code == 429 and e.value.errcode == "M_LIMIT_EXCEEDED"
    assert e.value.extra["retry_after_ms"] == 2000
    rl.check("other")  # keys are independent
    clock.t += 2.0
    rl.check("u")
    with pytest.raises(MatrixError):
        rl.check("u")


def test_rate_limiter_disabled() -> None:
    rl = RateLimiter(per_second=0.001, burst_count=1, enabled=False)
    for _ in range(100):
        rl.check("u")


def test_stream_token_round_trip_and_errors() -> None:
    t = StreamToken(5, 3, 2, 1)
    assert StreamToken.decode(t.encode()) == t
    assert StreamToken(6, 3, 2, 1).is_after(t)
    assert not t.is_after(t)
    # The events position may be negative (backfilled history), the others not.
    assert StreamToken.decode("s-7_2_3_4").events == -7
    for bad in ("", "x1_2_3_4", "s1_2_3", "s1_-2_3_4", "sa_b_c_d"):
        with pytest.raises(MatrixError) as e:
            StreamToken.decode(bad)
        assert e.value.errcode == "M_INVALID_PARAM"


def _ev(etype: str, sender: str = "@a:hs", content: Any = None) -> Event:
    pdu = {"type": etype, "sender": sender, "room_id": "!r:hs", "content": content or {}}
    return Event(pdu, "$e", get_room_version("10"))


def test_event_filter_types_senders_wildcards() -> None:
    f = EventFilter({"types": ["m.room.*"], "not_types": ["m.room.member"], "not_senders": ["@spam:hs"]})
    assert f.matches(_ev("m.room.message"))
    assert not f.matches(_ev("m.room.member"))
    assert not f.matches(_ev("m.reaction"))
    assert not f.matches(_ev("m.room.message", sender="@spam:hs"))
    assert EventFilter({"contains_url": True}).matches(_ev("m.room.message", content={"url": "mxc://a/b"}))
    assert not EventFilter({"contains_url": True}).matches(_ev("m.room.message"))


def test_filter_validation() -> None:
    validate_filter({"room": {"timeline": {"limit": 5, "types": ["m.room.message"]}}})
    validate_filter({"room": {"timeline": {"limit": 0}}})
    for bad in ({"room": {"timeline": {"limit": -1}}}, {"room": {"timeline": {"limit": 1.5}}}, {"room": {"state": {"types": "m.room.name"}}},
                {"event_format": "xml"}, {"room": []}):
        with pytest.raises(MatrixError) as e:
            validate_filter(bad)
        assert e.value.errcode == "M_BAD_JSON"


def test_typing_expires_and_notifies() -> None:
    clock = FakeClock()
    scheduled: list[tuple[float, Any, tuple[Any, ...]]] = []
    notifier = Notifier(0, 0, 0)
    typing = TypingService(notifier, clock=clock, call_later=lambda d, f, *a: scheduled.append((d, f, a)))
    typing.set_typing("!r:hs", "@a:hs", True, 5000)
    assert typing.get_typing("!r:hs") == ["@a:hs"]
    assert notifier.typing_pos == 1
    clock.t += 6
    delay, fn, args = scheduled[0]
    assert 5 <= delay < 6
    fn(*args)
    assert typing.get_typing("!r:hs") == []
    assert notifier.typing_pos == 2  # the expiry woke /sync
    typing.set_typing("!r:hs", "@a:hs", True, 10**9)  # capped
    assert scheduled[-1][0] <= 121


def test_lru_cache_weight_bound() -> None:
    from zhome.storage.lru import LruCache

    c: LruCache[int, list[int]] = LruCache(100, max_weight=10, weigh=len)
    c.set(1, [0] * 4)
    c.set(2, [0] * 4)
    assert c.get(1) is not None  # 1 is now the most recent
    c.set(3, [0] * 4)  # weight 12 > 10: the least recent (2) goes
    assert c.get(2) is None and c.get(1) is not None and c.get(3) is not None
    c.set(4, [0] * 50)  # heavier than the bound alone: kept, everything else evicted
    assert c.get(4) is not None and c.get(1) is None and c.get(3) is None
    c.pop(4)
    c.set(5, [0])
    assert c.get(5) == [0]
    counted: LruCache[int, int] = LruCache(2)
    for i in range(5):
        counted.set(i, i)
    assert counted.get(2) is None and counted.get(3) == 3 and counted.get(4) == 4


def test_spliced_answers_encode_as_their_plain_form() -> None:
    import json

    from zhome.http.jsonsplice import RawJson, Spliced, dumps, encode, to_plain

    part = {"DEV": {"keys": {"ed25519:DEV": "é"}, "unsigned": {}}}
    body = Spliced(device_keys=Spliced({"@a:x": RawJson(dumps(part)), "@b:x": {"D2": {"k": [1, None]}}}),
                   failures={}, master_keys={"@a:x": {"usage": ["master"]}})
    text = encode(body)
    assert json.loads(text) == to_plain(body) == {
        "device_keys": {"@a:x": part, "@b:x": {"D2": {"k": [1, None]}}},
        "failures": {}, "master_keys": {"@a:x": {"usage": ["master"]}}}
    assert text == dumps(to_plain(body))


def test_answers_encode_as_the_standard_library_would() -> None:
    """The fast encoder writes what ``json.dumps`` (compact, UTF-8 as is)
    writes, and hands what it refuses to the standard library."""
    import json

    from zhome.http.jsonsplice import dumps, dumps_bytes

    def stdlib(v: object) -> bytes:
        return json.dumps(v, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    values = [
        {"chunk": [{"content": {"body": "Ĳssel – 🏥 \"quoted\" \\ \n\t\u2028"}, "origin_server_ts": 1_700_000_000_000,
                    "unsigned": {"age": 0, "m.relations": {}}}], "next_batch": None, "flag": True},
        [1, -2, 0.5, 2 ** 63 - 1, -(2 ** 63), "", [], {}],
        {1: "an integer key", "b": (1, 2)},   # orjson refuses keys that are not strings
        {"big": 2 ** 64},                      # and integers beyond 64 bits
        {"small": -(2 ** 63) - 1},
    ]
    for v in values:
        assert dumps_bytes(v) == stdlib(v), v
        assert dumps(v) == stdlib(v).decode("utf-8")
    # A string that is not valid Unicode cannot be an answer either way.
    with pytest.raises(UnicodeEncodeError):
        dumps_bytes({"bad": "\ud800"})


def test_request_bodies_read_as_the_standard_library_would() -> None:
    """The fast reader gives what ``json.loads`` gives, integers beyond 64
    bits included, and refuses what was refused before."""
    import io
    import json
    from types import SimpleNamespace

    from zhome.http.errors import MatrixError
    from zhome.http.server import read_json_body

    def read(raw: bytes) -> object:
        return read_json_body(SimpleNamespace(content=io.BytesIO(raw)))  # type: ignore[arg-type]

    accepted = [
        b'{"msgtype": "m.text", "body": "caf\\u00e9 \xc3\xa9 \xf0\x9f\x8f\xa5", "n": [1, -0, 2.5e-3, true, null]}',
        b'{"big": 18446744073709551616, "small": -9223372036854775809, "max": 9223372036854775807}',
        b'{"lone": "\\ud800"}',   # orjson refuses it; the standard library reads it, as before
        b'{"a": 1, "a": 2}',
        b'{"huge": 1e400}',
    ]
    for raw in accepted:
        got = read(raw)
        assert repr(got) == repr(json.loads(raw.decode("utf-8"))), raw
    assert isinstance(read(accepted[1])["big"], int)  # type: ignore[index]
    for raw, errcode in [(b'{"a": NaN}', "M_NOT_JSON"), (b'{"a": -Infinity}', "M_NOT_JSON"),
                         (b'{"a": "\xff"}', "M_NOT_JSON"), (b'{"a": 1} x', "M_NOT_JSON"), (b"[1]", "M_BAD_JSON"),
                         (b'"text"', "M_BAD_JSON"), (b"  ", "M_NOT_JSON")]:
        with pytest.raises(MatrixError) as e:
            read(raw)
        assert e.value.errcode == errcode, raw
