"""Unit tests of the notification log's read rule.

Spec: client-server-api "Listing Notifications" (``read``) and "Threaded
read receipts" (an unthreaded receipt covers the room, a threaded one its
thread, ``main`` being the events outside any thread).
"""

from __future__ import annotations

from typing import Any

from zhome.push.notifications import is_read, thread_of
from zhome.rooms.events import Event
from zhome.rooms.versions import get_room_version

ROOM = "!room:example.org"
OTHER = "!other:example.org"


def ev(content: dict[str, Any]) -> Event:
    pdu = {"type": "m.room.message", "sender": "@bob:example.org", "room_id": ROOM, "content": content}
    return Event(pdu, "$e:example.org", get_room_version("10"))


def test_thread_of() -> None:
    assert thread_of(ev({"body": "x"})) == "main"
    assert thread_of(ev({"m.relates_to": {"rel_type": "m.thread", "event_id": "$root"}})) == "$root"
    # Other relations (replies, edits) stay on the main timeline.
    assert thread_of(ev({"m.relates_to": {"m.in_reply_to": {"event_id": "$x"}}})) == "main"
    assert thread_of(ev({"m.relates_to": {"rel_type": "m.replace", "event_id": "$x"}})) == "main"
    # Malformed relations do not make a thread.
    assert thread_of(ev({"m.relates_to": {"rel_type": "m.thread", "event_id": 5}})) == "main"
    assert thread_of(ev({"m.relates_to": "nope"})) == "main"


def test_unthreaded_receipt_covers_the_room_up_to_its_position() -> None:
    marks = {(ROOM, ""): 10}
    assert is_read(10, ROOM, "main", marks)
    assert is_read(3, ROOM, "$root", marks)
    assert not is_read(11, ROOM, "main", marks)
    # Receipts are per room.
    assert not is_read(3, OTHER, "main", marks)
    assert not is_read(1, ROOM, "main", {})


def test_threaded_receipt_covers_its_thread_only() -> None:
    marks = {(ROOM, "$root"): 20, (ROOM, "main"): 5}
    assert is_read(15, ROOM, "$root", marks)
    assert not is_read(15, ROOM, "main", marks)
    assert is_read(5, ROOM, "main", marks)
    assert not is_read(15, ROOM, "$other", marks)
    # The later of an unthreaded and a threaded mark wins.
    assert is_read(15, ROOM, "main", {**marks, (ROOM, ""): 16})
