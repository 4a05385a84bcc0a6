"""Unread counts by thread and threaded read receipts against a real zhome
on both engines, over raw HTTP, /sync and error answers checked against
the spec's schemas.

Spec: client-server-api "Threaded read receipts" (``thread_id`` on
``POST /rooms/{roomId}/receipt/{receiptType}/{eventId}``: ``main`` or a
thread root; the event must be in that thread; not for ``m.fully_read``),
"Receiving notifications" / "Marking notifications as read" (counts
partitioned by thread; an unthreaded receipt clears every thread, a
threaded one its own; of ``m.read`` and ``m.read.private`` the one ahead
counts), GET /sync (``unread_thread_notifications`` on the
RoomEventFilter: ``unread_notifications`` is then the main timeline's and
``unread_thread_notifications`` maps thread roots to their counts).
"""

from __future__ import annotations

import itertools
import json
import urllib.parse
from pathlib import Path
from typing import Any, Optional

import jsonschema

from tests.e2e.harness import ClientUser, ZhomeProcess, q
from tests.e2e.openapi import Spec

_TXN = itertools.count()
RECEIPT = "/rooms/{roomId}/receipt/{receiptType}/{eventId}"
BY_THREAD = {"room": {"timeline": {"unread_thread_notifications": True}}}
# The receipts themselves filtered out: counts must still come.
BY_THREAD_NO_RECEIPTS = {"room": {"timeline": {"unread_thread_notifications": True},
                                  "ephemeral": {"not_types": ["m.receipt"]}}}



class U(ClientUser):
    def __init__(self, hs: ZhomeProcess, name: str, spec: Spec) -> None:
        super().__init__(hs, name)
        self.spec = spec
        self.next_batch: Optional[str] = None

    def send(self, room_id: str, body: str, thread: Optional[str] = None, mention: Optional[str] = None) -> str:
        content: dict[str, Any] = {"msgtype": "m.text", "body": body}
        if thread is not None:
            content["m.relates_to"] = {"rel_type": "m.thread", "event_id": thread}
        if mention is not None:
            content["m.mentions"] = {"user_ids": [mention]}
        return str(self.ok("PUT", f"/rooms/{q(room_id)}/send/m.room.message/t{next(_TXN)}", content)["event_id"])

    def sync(self, flt: Any = None, incremental: bool = False, timeout: int = 0) -> Any:
        params = {"timeout": str(timeout)}
        if incremental and self.next_batch:
            params["since"] = self.next_batch
        if flt is not None:
            params["filter"] = json.dumps(flt)
        out = self.ok("GET", "/sync?" + urllib.parse.urlencode(params))
        self.spec.validate(out, "/sync", "get", 200)
        self.next_batch = out["next_batch"]
        return out

    def receipt(self, room_id: str, event_id: str, body: Any = None, rtype: str = "m.read") -> tuple[int, Any]:
        status, out = self.req("POST", f"/rooms/{q(room_id)}/receipt/{rtype}/{q(event_id)}",
                               {} if body is None else body)
        if status in (200, 400):
            self.spec.validate(out, RECEIPT, "post", status)
        else:  # not documented for this endpoint: the standard error body
            errors = list(jsonschema.Draft202012Validator(self.spec.schema_file("definitions/errors/error.yaml"))
                          .iter_errors(out))
            assert not errors, [e.message for e in errors]
        return status, out

    def read(self, room_id: str, event_id: str, thread_id: Optional[str] = None, rtype: str = "m.read") -> None:
        status, out = self.receipt(room_id, event_id, None if thread_id is None else {"thread_id": thread_id},
                                   rtype)
        assert status == 200, (event_id, thread_id, status, out)


def _counts(n: int, h: int = 0) -> dict[str, int]:
    return {"notification_count": n, "highlight_count": h}


def _room(sync: Any, room_id: str) -> dict[str, Any]:
    return dict(sync["rooms"]["join"][room_id])


def test_sending_an_event_reads_what_came_before(zhome: ZhomeProcess, spec: Spec) -> None:
    """"When the user updates their read receipt (either by using the API or
    by sending an event), notifications prior to and including that event
    MUST be marked as read": counts in every thread, the notification list,
    and a later receipt for an older event does not bring them back."""
    alice, bob = U(zhome, "alice", spec), U(zhome, "bob", spec)
    room_id = str(alice.ok("POST", "/createRoom", {"preset": "public_chat"})["room_id"])
    bob.ok("POST", f"/rooms/{q(room_id)}/join", {})
    first = bob.send(room_id, "one")
    root = bob.send(room_id, "a thread")
    bob.send(room_id, "in it", thread=root)
    assert _room(alice.sync(), room_id)["unread_notifications"] == _counts(3)
    alice.send(room_id, "I have read it all")
    assert _room(alice.sync(), room_id)["unread_notifications"] == _counts(0)
    assert _room(alice.sync(BY_THREAD), room_id)["unread_thread_notifications"] == {}
    listed = alice.ok("GET", "/notifications")["notifications"]
    assert len(listed) == 3 and all(n["read"] for n in listed), listed
    # A receipt for an event before her message leaves it all read.
    alice.read(room_id, first)
    assert _room(alice.sync(), room_id)["unread_notifications"] == _counts(0)
    # What comes after her message counts again, and a receipt clears it.
    later = bob.send(room_id, "two")
    assert _room(alice.sync(), room_id)["unread_notifications"] == _counts(1)
    assert [n["read"] for n in alice.ok("GET", "/notifications")["notifications"]] == [False, True, True, True]
    alice.read(room_id, later)
    assert _room(alice.sync(), room_id)["unread_notifications"] == _counts(0)


def test_counts_and_receipts_by_thread(zhome: ZhomeProcess, spec: Spec) -> None:
    alice, bob = U(zhome, "alice", spec), U(zhome, "bob", spec)
    room_id = str(alice.ok("POST", "/createRoom", {"preset": "public_chat"})["room_id"])
    bob.ok("POST", f"/rooms/{q(room_id)}/join", {})
    # Alice's own messages count for no one of hers.
    alice.send(room_id, "mine")
    # Two members: every message of Bob's notifies Alice (.m.rule.room_one_to_one).
    m1 = bob.send(room_id, "hello")
    root_a = bob.send(room_id, "topic A")
    root_b = bob.send(room_id, "topic B")
    a1 = bob.send(room_id, "a1", thread=root_a)
    a2 = bob.send(room_id, "a2", thread=root_a)
    b1 = bob.send(room_id, "b1", thread=root_b)
    b2 = bob.send(room_id, "b2 for alice", thread=root_b, mention=alice.user_id)
    m2 = bob.send(room_id, "bye")

    def by_thread() -> tuple[dict[str, int], dict[str, Any]]:
        room = _room(alice.sync(BY_THREAD), room_id)
        return room["unread_notifications"], room["unread_thread_notifications"]

    def total() -> dict[str, int]:
        room = _room(alice.sync(), room_id)
        assert "unread_thread_notifications" not in room
        return dict(room["unread_notifications"])

    # Without the flag: one count over the whole room, as before threads.
    assert total() == _counts(8, 1)
    # With it: the main timeline (thread roots included) apart from each thread.
    assert by_thread() == (_counts(4), {root_a: _counts(2), root_b: _counts(2, 1)})
    # Bob's view: Alice's message came before his own, so it is read
    # ("Receiving notifications": sending an event marks what is before it read).
    bob_room = _room(bob.sync(BY_THREAD), room_id)
    assert bob_room["unread_notifications"] == _counts(0) and bob_room["unread_thread_notifications"] == {}

    # A threaded receipt clears its own thread only, up to its event.
    alice.read(room_id, a1, thread_id=root_a)
    assert by_thread() == (_counts(4), {root_a: _counts(1), root_b: _counts(2, 1)})
    assert total() == _counts(7, 1)

    # An incremental sync reports the recount, with the receipts filtered out.
    alice.sync(BY_THREAD_NO_RECEIPTS)
    alice.read(room_id, a2, thread_id=root_a)
    inc = alice.sync(BY_THREAD_NO_RECEIPTS, incremental=True, timeout=5000)
    room = _room(inc, room_id)
    assert room["ephemeral"]["events"] == []
    assert room["unread_notifications"] == _counts(4)
    assert room["unread_thread_notifications"] == {root_b: _counts(2, 1)}

    # A main-timeline receipt clears the main timeline only: what follows
    # m1 there (both roots and m2) stays.
    alice.read(room_id, m1, thread_id="main")
    assert by_thread() == (_counts(3), {root_b: _counts(2, 1)})
    alice.read(room_id, b1, thread_id=root_b)
    assert by_thread() == (_counts(3), {root_b: _counts(1, 1)})

    # An unthreaded receipt clears every thread up to its event, where it
    # is ahead of the thread's own receipts: the main timeline keeps m2.
    alice.read(room_id, b2)
    assert by_thread() == (_counts(1), {})
    assert total() == _counts(1)
    # A threaded receipt behind it brings nothing back.
    alice.read(room_id, b1, thread_id=root_b, rtype="m.read.private")
    assert by_thread() == (_counts(1), {})

    # A threaded receipt ahead of the unthreaded ones still counts: an
    # unthreaded private receipt behind it changes nothing in its thread.
    a3 = bob.send(room_id, "a3", thread=root_a)
    m3 = bob.send(room_id, "m3")
    assert by_thread() == (_counts(2), {root_a: _counts(1)})
    alice.read(room_id, a3, thread_id=root_a, rtype="m.read.private")
    assert by_thread() == (_counts(2), {})
    alice.read(room_id, m1, rtype="m.read.private")
    assert by_thread() == (_counts(2), {})
    # One at the end of the room clears everything...
    alice.read(room_id, m3, rtype="m.read.private")
    assert by_thread() == (_counts(0), {})
    assert total() == _counts(0)
    # ...and an older public receipt does not bring the counts back ("the
    # receipt which is more recent/ahead must be used").
    alice.read(room_id, m2)
    assert total() == _counts(0)

    # New events count again, in their threads.
    bob.send(room_id, "a4", thread=root_a)
    bob.send(room_id, "m4")
    assert by_thread() == (_counts(1), {root_a: _counts(1)})


def test_bad_threaded_receipts_are_refused(zhome: ZhomeProcess, spec: Spec) -> None:
    alice, bob = U(zhome, "alice", spec), U(zhome, "bob", spec)
    room_id = str(alice.ok("POST", "/createRoom", {"preset": "public_chat"})["room_id"])
    bob.ok("POST", f"/rooms/{q(room_id)}/join", {})
    m1 = bob.send(room_id, "plain")
    root_a = bob.send(room_id, "topic A")
    root_b = bob.send(room_id, "topic B")
    a1 = bob.send(room_id, "a1", thread=root_a)
    b1 = bob.send(room_id, "b1", thread=root_b)
    before = _room(alice.sync(BY_THREAD), room_id)
    assert before["unread_notifications"] == _counts(3)
    assert before["unread_thread_notifications"] == {root_a: _counts(1), root_b: _counts(1)}

    refused: list[tuple[str, Any, str]] = [
        (a1, {"thread_id": 7}, "m.read"),  # not a string
        (a1, {"thread_id": ""}, "m.read"),  # empty
        (a1, {"thread_id": "thread-a"}, "m.read"),  # neither main nor an event ID
        (a1, {"thread_id": root_b}, "m.read"),  # in another thread
        (a1, {"thread_id": "main"}, "m.read.private"),  # in a thread, not the main timeline
        (m1, {"thread_id": root_a}, "m.read"),  # in the main timeline
        (root_b, {"thread_id": root_a}, "m.read"),  # a root is in the main timeline
        (m1, {"thread_id": m1}, "m.read"),  # names no thread
        (a1, {"thread_id": root_a}, "m.fully_read"),  # no thread_id for the fully read marker
        (m1, {"thread_id": "main"}, "m.fully_read"),
    ]
    for event_id, body, rtype in refused:
        status, out = alice.receipt(room_id, event_id, body, rtype)
        assert (status, out.get("errcode")) == (400, "M_INVALID_PARAM"), (event_id, body, rtype, out)
    # Nothing was written: the counts, the receipts and the marker are as before.
    after = alice.sync(BY_THREAD)
    room = _room(after, room_id)
    assert room["unread_notifications"] == before["unread_notifications"]
    assert room["unread_thread_notifications"] == before["unread_thread_notifications"]
    mine = [e for e in room["ephemeral"]["events"] if e["type"] == "m.receipt"
            and any(alice.user_id in users for rs in e["content"].values() for users in rs.values())]
    assert mine == []
    assert all(e["type"] != "m.fully_read" for e in room["account_data"]["events"])

    # Accepted: an event with its own thread, main for a root, and the
    # root named as its own thread (which reads none of the thread).
    alice.read(room_id, b1, thread_id=root_b)
    alice.read(room_id, root_a, thread_id="main")
    alice.read(room_id, root_a, thread_id=root_a)
    room = _room(alice.sync(BY_THREAD), room_id)
    assert room["unread_notifications"] == _counts(1)  # root_b is after root_a
    assert room["unread_thread_notifications"] == {root_a: _counts(1)}
    status, out = alice.receipt(room_id, "$nowhere", {"thread_id": "main"})
    assert (status, out.get("errcode")) == (404, "M_NOT_FOUND")
    # What the thread ID is made of is checked first, for any event.
    status, out = alice.receipt(room_id, "$nowhere", {"thread_id": "thread-a"})
    assert (status, out.get("errcode")) == (400, "M_INVALID_PARAM")

    # A redacted event has lost its relation, and so its thread: a receipt
    # in the thread it was in is taken; a malformed thread ID still is not.
    bob.ok("PUT", f"/rooms/{q(room_id)}/redact/{q(a1)}/r{next(_TXN)}", {})
    status, out = alice.receipt(room_id, a1, {"thread_id": "thread-a"})
    assert (status, out.get("errcode")) == (400, "M_INVALID_PARAM")
    alice.read(room_id, a1, thread_id=root_a)
    assert _room(alice.sync(BY_THREAD), room_id)["unread_thread_notifications"] == {}
    # The receipts carry their thread to the other members.
    receipts = [e for e in _room(bob.sync(), room_id)["ephemeral"]["events"] if e["type"] == "m.receipt"]
    content = {eid: users for r in receipts for eid, types in r["content"].items()
               for users in [types.get("m.read", {})]}
    assert content[b1][alice.user_id]["thread_id"] == root_b
    assert content[root_a][alice.user_id]["thread_id"] in ("main", root_a)


def test_history_purge_lowers_each_threads_count(zhome: ZhomeProcess, spec: Spec, tmp_path: Path) -> None:
    from tests.e2e.test_admin_api import Admin

    admin = Admin(zhome, "root", tmp_path)
    alice, bob = U(zhome, "alice", spec), U(zhome, "bob", spec)
    room_id = str(alice.ok("POST", "/createRoom", {"preset": "public_chat"})["room_id"])
    bob.ok("POST", f"/rooms/{q(room_id)}/join", {})
    root = bob.send(room_id, "topic")
    bob.send(room_id, "r1", thread=root)
    bob.send(room_id, "r2", thread=root, mention=alice.user_id)
    bob.send(room_id, "main 1")
    cut = bob.send(room_id, "main 2")
    room = _room(alice.sync(BY_THREAD), room_id)
    assert room["unread_notifications"] == _counts(3)
    assert room["unread_thread_notifications"] == {root: _counts(2, 1)}

    # Everything before "main 2" leaves the timeline, its notifications
    # with it: each off its own thread's count.
    purge_id = admin.ok("POST", f"/_synapse/admin/v1/purge_history/{q(room_id)}/{q(cut)}", {})["purge_id"]
    assert admin.wait_for_purge(purge_id) == "complete"
    room = _room(alice.sync(BY_THREAD), room_id)
    assert room["unread_notifications"] == _counts(1)
    # A thread left with nothing unread is not listed.
    assert room["unread_thread_notifications"] == {}
    assert _room(alice.sync(), room_id)["unread_notifications"] == _counts(1)


def test_history_purge_takes_off_only_what_each_member_had_unread(zhome: ZhomeProcess, spec: Spec,
                                                                   tmp_path: Path) -> None:
    """A purge takes each purged notification off the counts of those who
    had not read it: a member who had read the purged events keeps the
    count of what came after them ("Receiving notifications": counts are
    of events after the receipt)."""
    from tests.e2e.test_admin_api import Admin

    admin = Admin(zhome, "root", tmp_path)
    alice, bob, carol = U(zhome, "alice", spec), U(zhome, "bob", spec), U(zhome, "carol", spec)
    room_id = str(alice.ok("POST", "/createRoom", {"preset": "public_chat"})["room_id"])
    bob.ok("POST", f"/rooms/{q(room_id)}/join", {})
    carol.ok("POST", f"/rooms/{q(room_id)}/join", {})
    bob.send(room_id, "one")
    two = bob.send(room_id, "two")
    alice.read(room_id, two)
    cut = bob.send(room_id, "three")
    assert _room(alice.sync(), room_id)["unread_notifications"] == _counts(1)
    assert _room(carol.sync(), room_id)["unread_notifications"] == _counts(3)

    purge_id = admin.ok("POST", f"/_synapse/admin/v1/purge_history/{q(room_id)}/{q(cut)}", {})["purge_id"]
    assert admin.wait_for_purge(purge_id) == "complete"
    # Alice had read "one" and "two": her count was of "three" alone.
    assert _room(alice.sync(), room_id)["unread_notifications"] == _counts(1)
    assert _room(carol.sync(), room_id)["unread_notifications"] == _counts(1)
    # Counting goes on from there.
    bob.send(room_id, "four")
    assert _room(alice.sync(), room_id)["unread_notifications"] == _counts(2)
    assert _room(carol.sync(), room_id)["unread_notifications"] == _counts(2)


def _redact(user: U, room_id: str, event_id: str) -> None:
    user.ok("PUT", f"/rooms/{q(room_id)}/redact/{q(event_id)}/r{next(_TXN)}", {})


def test_redacting_an_unread_message_lowers_the_counts(zhome: ZhomeProcess, spec: Spec) -> None:
    """A redacted event notifies no one: it comes off the counts of those
    who had not read it, in its thread, highlight included; for those who
    had, nothing changes."""
    alice, bob = U(zhome, "alice", spec), U(zhome, "bob", spec)
    room_id = str(alice.ok("POST", "/createRoom", {"preset": "public_chat"})["room_id"])
    bob.ok("POST", f"/rooms/{q(room_id)}/join", {})
    plain = bob.send(room_id, "hello")
    assert _room(alice.sync(), room_id)["unread_notifications"] == _counts(1)
    _redact(bob, room_id, plain)
    assert _room(alice.sync(), room_id)["unread_notifications"] == _counts(0)
    mention = bob.send(room_id, "for you", mention=alice.user_id)
    assert _room(alice.sync(), room_id)["unread_notifications"] == _counts(1, 1)
    _redact(bob, room_id, mention)
    assert _room(alice.sync(), room_id)["unread_notifications"] == _counts(0)
    # Redacting it again takes nothing more off.
    kept = bob.send(room_id, "still here")
    _redact(bob, room_id, mention)
    assert _room(alice.sync(), room_id)["unread_notifications"] == _counts(1)
    assert kept


def test_redactions_lower_each_threads_count_of_those_who_had_not_read(zhome: ZhomeProcess, spec: Spec) -> None:
    alice, bob, carol = U(zhome, "alice", spec), U(zhome, "bob", spec), U(zhome, "carol", spec)
    room_id = str(alice.ok("POST", "/createRoom", {"preset": "public_chat"})["room_id"])
    for u in (bob, carol):
        u.ok("POST", f"/rooms/{q(room_id)}/join", {})
    # Three members: every message notifies the two who did not send it
    # (.m.rule.message), a mention highlights.
    plain = bob.send(room_id, "hello")
    mention = bob.send(room_id, "for alice", mention=alice.user_id)
    root = bob.send(room_id, "topic")
    bob.send(room_id, "t1", thread=root)
    t2 = bob.send(room_id, "t2 for alice", thread=root, mention=alice.user_id)

    def by_thread(u: U) -> tuple[dict[str, int], dict[str, Any]]:
        room = _room(u.sync(BY_THREAD), room_id)
        return room["unread_notifications"], room["unread_thread_notifications"]

    assert by_thread(alice) == (_counts(3, 1), {root: _counts(2, 1)})
    assert by_thread(carol) == (_counts(3), {root: _counts(2)})
    # Carol has read the thread, and the main timeline up to the mention.
    carol.read(room_id, t2, thread_id=root)
    carol.read(room_id, mention)
    assert by_thread(carol) == (_counts(1), {})

    _redact(bob, room_id, mention)
    assert by_thread(alice) == (_counts(2), {root: _counts(2, 1)})
    _redact(bob, room_id, t2)
    assert by_thread(alice) == (_counts(2), {root: _counts(1)})
    _redact(bob, room_id, plain)
    assert by_thread(alice) == (_counts(1), {root: _counts(1)})
    assert _room(alice.sync(), room_id)["unread_notifications"] == _counts(2)
    # What Carol had read stays read, and what she had not ("topic") stays unread.
    assert by_thread(carol) == (_counts(1), {})
    # Bob's own messages were never in his counts.
    assert by_thread(bob) == (_counts(0), {})
    # Receipts recount to the same.
    alice.read(room_id, root, thread_id="main")
    assert by_thread(alice) == (_counts(0), {root: _counts(1)})
