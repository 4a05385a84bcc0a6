"""Pure parts of the legacy endpoints: receipt events, account data order,
token clamping, and the per-room typing positions the event stream reads."""

from __future__ import annotations

from typing import Any

from zhome.client.legacy import _clamp, _ordered_account_data, _receipt_events
from zhome.sync.notifier import Notifier, StreamToken
from zhome.sync.typing import TypingService


def test_receipt_events_group_by_room_and_hide_others_private_receipts() -> None:
    rows = [
        ("!a:hs", "m.read", "@u:hs", "", "$1", {"ts": 1}),
        ("!a:hs", "m.read", "@v:hs", "t1", "$1", {"ts": 2}),
        ("!a:hs", "m.read.private", "@v:hs", "", "$2", {"ts": 3}),
        ("!a:hs", "m.read.private", "@u:hs", "", "$2", {"ts": 4}),
        ("!b:hs", "m.read", "@v:hs", "", "$9", {"ts": 5}),
    ]
    out = _receipt_events(rows, "@u:hs")
    assert out == [
        {"type": "m.receipt", "room_id": "!a:hs", "content": {
            "$1": {"m.read": {"@u:hs": {"ts": 1}, "@v:hs": {"ts": 2, "thread_id": "t1"}}},
            "$2": {"m.read.private": {"@u:hs": {"ts": 4}}},
        }},
        {"type": "m.receipt", "room_id": "!b:hs", "content": {"$9": {"m.read": {"@v:hs": {"ts": 5}}}}},
    ]


def test_room_account_data_puts_tags_first() -> None:
    items: list[dict[str, Any]] = [{"type": "a.b", "content": {}}, {"type": "m.tag", "content": {"tags": {}}},
                                   {"type": "m.fully_read", "content": {}}]
    assert [d["type"] for d in _ordered_account_data(items)] == ["m.tag", "a.b", "m.fully_read"]


def test_clamp_reads_a_future_token_from_now() -> None:
    now = StreamToken(10, 5, 3, 0)
    assert _clamp(StreamToken(12, 2, 3, 7), now) == StreamToken(10, 2, 3, 0)
    assert _clamp(StreamToken(-5, 0, 0, 0), now) == StreamToken(-5, 0, 0, 0)


def test_typing_remembers_each_rooms_latest_change() -> None:
    notifier = Notifier(0, 0, 0)
    typing = TypingService(notifier, clock=lambda: 0.0, call_later=lambda *a: None)
    seen: list[bool] = []
    # A waiter woken by the change already sees it recorded.
    notifier._wake = lambda room_ids=(), user_ids=(): seen.extend(  # type: ignore[method-assign]
        typing.changed_after(r, notifier.typing_pos - 1) for r in room_ids)
    typing.set_typing("!a:hs", "@u:hs", True, 5000)
    pos = notifier.typing_pos
    assert seen == [True]
    assert typing.changed_after("!a:hs", pos - 1) and not typing.changed_after("!a:hs", pos)
    assert not typing.changed_after("!b:hs", 0)
    typing.set_typing("!b:hs", "@u:hs", True, 5000)
    assert typing.changed_after("!b:hs", pos) and not typing.changed_after("!a:hs", pos)
    typing.set_typing("!a:hs", "@u:hs", True, 5000)  # still typing: no change
    assert not typing.changed_after("!a:hs", pos)
