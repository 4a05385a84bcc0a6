"""GET /notifications end to end, on both engines: what each user was
notified about, with the push rule's actions, read state from receipts,
``only=highlight``, pagination, and bad parameters.

Spec: client-server-api "Push Notifications" → "Listing Notifications".
"""

from __future__ import annotations

import itertools
import urllib.parse
from typing import Any

from tests.e2e.harness import ClientUser, ZhomeProcess, q

_TXN = itertools.count()


class U(ClientUser):
    def send(self, room_id: str, content: dict[str, Any], etype: str = "m.room.message") -> str:
        return str(self.ok("PUT", f"/rooms/{q(room_id)}/send/{etype}/n{next(_TXN)}", content)["event_id"])

    def say(self, room_id: str, text: str) -> str:
        return self.send(room_id, {"msgtype": "m.text", "body": text})

    def notifications(self, **params: Any) -> Any:
        query = ("?" + urllib.parse.urlencode(params)) if params else ""
        return self.ok("GET", "/notifications" + query)

    def rule_actions(self, kind: str, rule_id: str) -> Any:
        return self.ok("GET", f"/pushrules/global/{kind}/{rule_id}/actions")["actions"]


def _shared_room(alice: U, *others: U) -> str:
    room_id = str(alice.ok("POST", "/createRoom", {"preset": "public_chat"})["room_id"])
    for u in others:
        u.ok("POST", f"/rooms/{q(room_id)}/join", {})
    return room_id


def _ids(page: Any) -> list[str]:
    return [n["event"]["event_id"] for n in page["notifications"]]


def test_message_notifies_recipient_and_receipts_mark_read(zhome: ZhomeProcess) -> None:
    alice, bob = U(zhome, "alice"), U(zhome, "bob")
    room_id = _shared_room(alice, bob)
    assert alice.notifications() == {"notifications": []}

    first = bob.say(room_id, "hello there")
    page = alice.notifications()
    assert "next_token" not in page
    [n] = page["notifications"]
    assert n["room_id"] == room_id
    assert n["read"] is False
    assert isinstance(n["ts"], int) and n["ts"] > 0
    # Two members: the one-to-one rule is the one that matched.
    assert n["actions"] == alice.rule_actions("underride", ".m.rule.room_one_to_one")
    assert "notify" in n["actions"]
    ev = n["event"]
    assert ev["event_id"] == first and ev["sender"] == bob.user_id
    assert ev["type"] == "m.room.message" and ev["content"]["body"] == "hello there"
    # ClientEventWithoutRoomID: the room is named once, next to the event.
    assert "room_id" not in ev

    # The sender is not notified of their own message, nor Alice of hers.
    assert bob.notifications()["notifications"] == []
    alice.say(room_id, "hi bob")
    assert _ids(alice.notifications()) == [first]

    # A read receipt at the event marks it read; later events stay unread.
    alice.ok("POST", f"/rooms/{q(room_id)}/receipt/m.read/{q(first)}", {})
    second = bob.say(room_id, "are you there?")
    got = {n["event"]["event_id"]: n["read"] for n in alice.notifications()["notifications"]}
    assert got == {first: True, second: False}
    # A private receipt counts as well.
    alice.ok("POST", f"/rooms/{q(room_id)}/receipt/m.read.private/{q(second)}", {})
    assert all(n["read"] for n in alice.notifications()["notifications"])
    # A receipt in a thread does not read a main-timeline message, even
    # one older than the receipt's event; a main-timeline receipt does.
    third = bob.say(room_id, "one more")
    reply = bob.send(room_id, {"msgtype": "m.text", "body": "in the thread",
                               "m.relates_to": {"rel_type": "m.thread", "event_id": third}})
    alice.ok("POST", f"/rooms/{q(room_id)}/receipt/m.read/{q(reply)}", {"thread_id": third})
    got = {n["event"]["event_id"]: n["read"] for n in alice.notifications()["notifications"]}
    assert got[reply] is True and got[third] is False
    alice.ok("POST", f"/rooms/{q(room_id)}/receipt/m.read/{q(third)}", {"thread_id": "main"})
    assert all(n["read"] for n in alice.notifications()["notifications"])

    # A redacted event is listed redacted.
    bob.ok("PUT", f"/rooms/{q(room_id)}/redact/{q(first)}/r{next(_TXN)}", {"reason": "typo"})
    redacted = [n for n in alice.notifications()["notifications"] if n["event"]["event_id"] == first][0]
    assert redacted["event"]["content"] == {}
    assert redacted["event"]["unsigned"]["redacted_because"]["type"] == "m.room.redaction"


def test_only_highlight(zhome: ZhomeProcess) -> None:
    alice, bob = U(zhome, "alice"), U(zhome, "bob")
    alice.ok("PUT", f"/profile/{q(alice.user_id)}/displayname", {"displayname": "Nurse Alice"})
    room_id = _shared_room(alice, bob)
    plain = bob.say(room_id, "the ward is quiet")
    by_name = bob.say(room_id, "Nurse Alice, bed 4 needs you")
    by_mention = bob.send(room_id, {"msgtype": "m.text", "body": "please look",
                                    "m.mentions": {"user_ids": [alice.user_id]}})

    everything = alice.notifications()["notifications"]
    assert [n["event"]["event_id"] for n in everything] == [by_mention, by_name, plain]
    highlights = alice.notifications(only="highlight")["notifications"]
    assert [n["event"]["event_id"] for n in highlights] == [by_mention, by_name]
    assert highlights[1]["actions"] == alice.rule_actions("override", ".m.rule.contains_display_name")
    assert highlights[0]["actions"] == alice.rule_actions("override", ".m.rule.is_user_mention")
    for n in highlights:
        assert {"set_tweak": "highlight"} in n["actions"] or {"set_tweak": "highlight", "value": True} in n[
            "actions"]
    assert {"set_tweak": "highlight"} not in everything[2]["actions"]


def test_pagination(zhome: ZhomeProcess) -> None:
    alice, bob = U(zhome, "alice"), U(zhome, "bob")
    room_id = _shared_room(alice, bob)
    sent = [bob.say(room_id, f"message {i}") for i in range(25)]
    newest_first = list(reversed(sent))

    seen: list[str] = []
    page = alice.notifications(limit=10)
    pages = 1
    seen += _ids(page)
    while "next_token" in page:
        assert isinstance(page["next_token"], str)
        page = alice.notifications(limit=10, **{"from": page["next_token"]})
        seen += _ids(page)
        pages += 1
        assert pages <= 3
    assert pages == 3 and seen == newest_first

    # The default page holds 20; a huge limit is capped but returns all 25.
    default = alice.notifications()
    assert _ids(default) == newest_first[:20] and "next_token" in default
    rest = alice.notifications(**{"from": default["next_token"]})
    assert _ids(rest) == newest_first[20:] and "next_token" not in rest
    assert _ids(alice.notifications(limit=1000)) == newest_first
    # Highlight-only pages through its own rows: none here.
    assert alice.notifications(only="highlight") == {"notifications": []}


def test_disabled_message_rule_gives_no_notifications(zhome: ZhomeProcess) -> None:
    alice, bob, carol = U(zhome, "alice"), U(zhome, "bob"), U(zhome, "carol")
    room_id = _shared_room(alice, bob, carol)
    alice.ok("PUT", "/pushrules/global/underride/.m.rule.message/enabled", {"enabled": False})

    plain = bob.say(room_id, "shift change at six")
    # Three members: only .m.rule.message would have matched for Alice.
    assert alice.notifications()["notifications"] == []
    assert _ids(carol.notifications()) == [plain]
    assert carol.notifications()["notifications"][0]["actions"] == carol.rule_actions("underride",
                                                                                      ".m.rule.message")
    # A mention still notifies her through its own rule.
    mention = bob.send(room_id, {"msgtype": "m.text", "body": "please look",
                                 "m.mentions": {"user_ids": [alice.user_id]}})
    assert _ids(alice.notifications()) == [mention]


def test_bad_parameters(zhome: ZhomeProcess) -> None:
    alice = U(zhome, "alice")
    for query in ("from=abc", "from=-1", "from=1.5", "from=99999999999999999999", "limit=abc", "limit=-1",
                  "limit=2.5"):
        status, body = alice.req("GET", "/notifications?" + query)
        assert status == 400 and body["errcode"] == "M_INVALID_PARAM", (query, status, body)
    # Valid edge values answer normally.
    for query in ("from=0", "limit=0", "only=bogus"):
        assert alice.ok("GET", "/notifications?" + query) == {"notifications": []}
    status, body = zhome.request("GET", "/_matrix/client/v3/notifications")
    assert status == 401 and body["errcode"] == "M_MISSING_TOKEN"
