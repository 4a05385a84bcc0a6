"""Per-user data end to end: typing, receipts (public and private), read
markers, account data, tags, filters, push rules and unread notification
counts, each observed through /sync or read back.

Spec: client-server-api "Typing Notifications", "Receipts", "Fully read
markers", "Client Config", "Room Tagging", "Filtering", "Push Notifications".
"""

from __future__ import annotations

import itertools
import json
import urllib.parse
from typing import Any, Optional

from tests.e2e.harness import ClientUser, ZhomeProcess, q

_TXN = itertools.count()


class U(ClientUser):
    def __init__(self, hs: ZhomeProcess, name: str) -> None:
        super().__init__(hs, name)
        self.next_batch: Optional[str] = None

    def send(self, room_id: str, content: dict[str, Any]) -> str:
        return str(self.ok("PUT", f"/rooms/{q(room_id)}/send/m.room.message/t{next(_TXN)}", content)["event_id"])

    def say(self, room_id: str, text: str) -> str:
        return self.send(room_id, {"msgtype": "m.text", "body": text})

    def sync(self, flt: Any = None, incremental: bool = True, timeout: int = 0) -> Any:
        params = {"timeout": str(timeout)}
        if incremental and self.next_batch:
            params["since"] = self.next_batch
        if flt is not None:
            params["filter"] = flt if isinstance(flt, str) else json.dumps(flt)
        out = self.ok("GET", "/sync?" + urllib.parse.urlencode(params))
        self.next_batch = out["next_batch"]
        return out


def _shared_room(alice: U, bob: U) -> str:
    room_id = str(alice.ok("POST", "/createRoom", {"preset": "public_chat"})["room_id"])
    bob.ok("POST", f"/rooms/{q(room_id)}/join", {})
    return room_id


def _ephemeral(sync: Any, room_id: str, etype: str) -> list[dict[str, Any]]:
    room = sync["rooms"].get("join", {}).get(room_id, {})
    return [e for e in room.get("ephemeral", {}).get("events", []) if e["type"] == etype]


def _room_account_data(sync: Any, room_id: str) -> dict[str, Any]:
    room = sync["rooms"].get("join", {}).get(room_id, {})
    return {e["type"]: e["content"] for e in room.get("account_data", {}).get("events", [])}


def test_typing(zhome: ZhomeProcess) -> None:
    alice, bob = U(zhome, "alice"), U(zhome, "bob")
    room_id = _shared_room(alice, bob)
    bob.sync()

    alice.ok("PUT", f"/rooms/{q(room_id)}/typing/{q(alice.user_id)}", {"typing": True, "timeout": 30000})
    typing = _ephemeral(bob.sync(timeout=5000), room_id, "m.typing")
    assert typing and typing[-1]["content"]["user_ids"] == [alice.user_id]
    # A fresh sync also shows who is typing.
    assert _ephemeral(bob.sync(incremental=False), room_id, "m.typing")[-1]["content"]["user_ids"] == [
        alice.user_id]

    alice.ok("PUT", f"/rooms/{q(room_id)}/typing/{q(alice.user_id)}", {"typing": False})
    typing = _ephemeral(bob.sync(timeout=5000), room_id, "m.typing")
    assert typing and typing[-1]["content"]["user_ids"] == []

    # Nobody can type for someone else, nor in a room they are not in.
    status, _ = bob.req("PUT", f"/rooms/{q(room_id)}/typing/{q(alice.user_id)}", {"typing": True})
    assert status == 403
    carol = U(zhome, "carol")
    status, _ = carol.req("PUT", f"/rooms/{q(room_id)}/typing/{q(carol.user_id)}", {"typing": True})
    assert status == 403


def test_receipts_public_and_private(zhome: ZhomeProcess) -> None:
    alice, bob = U(zhome, "alice"), U(zhome, "bob")
    room_id = _shared_room(alice, bob)
    first = bob.say(room_id, "one")
    second = bob.say(room_id, "two")
    alice.sync()
    bob.sync()

    alice.ok("POST", f"/rooms/{q(room_id)}/receipt/m.read/{q(first)}", {})
    receipts = _ephemeral(bob.sync(timeout=5000), room_id, "m.receipt")
    assert receipts
    content = receipts[0]["content"]
    assert alice.user_id in content[first]["m.read"]
    assert isinstance(content[first]["m.read"][alice.user_id]["ts"], int)

    alice.ok("POST", f"/rooms/{q(room_id)}/receipt/m.read.private/{q(second)}", {})
    mine = _ephemeral(alice.sync(timeout=5000), room_id, "m.receipt")
    assert mine and alice.user_id in mine[0]["content"][second]["m.read.private"]
    theirs = _ephemeral(bob.sync(), room_id, "m.receipt")
    assert all("m.read.private" not in per_event
               for r in theirs for per_event in r["content"].values())
    full = bob.sync(incremental=False)
    for r in _ephemeral(full, room_id, "m.receipt"):
        for per_event in r["content"].values():
            assert "m.read.private" not in per_event
    # Alice's own initial sync keeps her private receipt.
    mine = _ephemeral(alice.sync(incremental=False), room_id, "m.receipt")
    assert any(second in r["content"] and "m.read.private" in r["content"][second] for r in mine)

    status, body = alice.req("POST", f"/rooms/{q(room_id)}/receipt/m.bogus/{q(first)}", {})
    assert status == 400
    status, body = alice.req("POST", f"/rooms/{q(room_id)}/receipt/m.read/{q('$unknown')}", {})
    assert status == 404


def test_read_markers(zhome: ZhomeProcess) -> None:
    alice, bob = U(zhome, "alice"), U(zhome, "bob")
    room_id = _shared_room(alice, bob)
    eid = bob.say(room_id, "read me")
    alice.sync()
    alice.ok("POST", f"/rooms/{q(room_id)}/read_markers", {"m.fully_read": eid, "m.read": eid})
    got = alice.ok("GET", f"/user/{q(alice.user_id)}/rooms/{q(room_id)}/account_data/m.fully_read")
    assert got == {"event_id": eid}
    s = alice.sync(timeout=5000)
    assert _room_account_data(s, room_id).get("m.fully_read") == {"event_id": eid}
    # m.fully_read is private to Alice: not an m.receipt for Bob.
    for r in _ephemeral(bob.sync(incremental=False), room_id, "m.receipt"):
        assert all("m.fully_read" not in v for v in r["content"].values())
        assert alice.user_id in r["content"][eid]["m.read"]


def test_account_data_and_tags(zhome: ZhomeProcess) -> None:
    alice, bob = U(zhome, "alice"), U(zhome, "bob")
    room_id = _shared_room(alice, bob)
    alice.sync()

    base = f"/user/{q(alice.user_id)}"
    alice.ok("PUT", base + "/account_data/org.example.settings", {"theme": "dark"})
    assert alice.ok("GET", base + "/account_data/org.example.settings") == {"theme": "dark"}
    status, body = alice.req("GET", base + "/account_data/org.example.missing")
    assert status == 404 and body["errcode"] == "M_NOT_FOUND"
    status, _ = bob.req("GET", base + "/account_data/org.example.settings")
    assert status == 403
    s = alice.sync(timeout=5000)
    glob = {e["type"]: e["content"] for e in s["account_data"]["events"]}
    assert glob["org.example.settings"] == {"theme": "dark"}

    alice.ok("PUT", base + f"/rooms/{q(room_id)}/account_data/org.example.draft", {"text": "half a thought"})
    assert alice.ok("GET", base + f"/rooms/{q(room_id)}/account_data/org.example.draft") == {
        "text": "half a thought"}
    s = alice.sync(timeout=5000)
    assert _room_account_data(s, room_id)["org.example.draft"] == {"text": "half a thought"}
    # Both are in a fresh sync too.
    s = alice.sync(incremental=False)
    assert {e["type"] for e in s["account_data"]["events"]} >= {"org.example.settings"}
    assert "org.example.draft" in _room_account_data(s, room_id)

    tags = base + f"/rooms/{q(room_id)}/tags"
    alice.ok("PUT", tags + "/m.favourite", {"order": 0.25})
    alice.ok("PUT", tags + "/u.work", {})
    assert alice.ok("GET", tags) == {"tags": {"m.favourite": {"order": 0.25}, "u.work": {}}}
    s = alice.sync(timeout=5000)
    assert _room_account_data(s, room_id)["m.tag"] == {"tags": {"m.favourite": {"order": 0.25}, "u.work": {}}}
    alice.ok("DELETE", tags + "/u.work")
    assert alice.ok("GET", tags) == {"tags": {"m.favourite": {"order": 0.25}}}
    s = alice.sync(timeout=5000)
    assert _room_account_data(s, room_id)["m.tag"] == {"tags": {"m.favourite": {"order": 0.25}}}
    status, _ = bob.req("GET", tags)
    assert status == 403


def test_account_data_deletion(zhome: ZhomeProcess) -> None:
    """MSC3391: DELETE on account data; incremental /sync carries {} for it,
    reads answer 404 and a fresh /sync leaves it out."""
    alice, bob = U(zhome, "alice"), U(zhome, "bob")
    room_id = _shared_room(alice, bob)
    base = f"/user/{q(alice.user_id)}"
    alice.ok("PUT", base + "/account_data/org.example.old", {"keep": False})
    alice.ok("PUT", base + "/account_data/org.example.stays", {"keep": True})
    alice.ok("PUT", base + f"/rooms/{q(room_id)}/account_data/org.example.draft", {"text": "gone soon"})
    alice.sync()

    unstable = f"/_matrix/client/unstable/org.matrix.msc3391/user/{q(alice.user_id)}"
    status, body = alice.hs.request("DELETE", unstable + "/account_data/org.example.old", token=alice.token)
    assert status == 200, body
    alice.ok("DELETE", base + f"/rooms/{q(room_id)}/account_data/org.example.draft")
    # Deleting what does not exist is fine; server-controlled types are not the client's to delete.
    alice.ok("DELETE", base + "/account_data/org.example.never")
    status, body = alice.req("DELETE", base + "/account_data/m.push_rules")
    assert status == 405, body
    status, body = bob.req("DELETE", base + "/account_data/org.example.stays")
    assert status == 403, body

    for path in ("/account_data/org.example.old", f"/rooms/{q(room_id)}/account_data/org.example.draft"):
        status, body = alice.req("GET", base + path)
        assert status == 404 and body["errcode"] == "M_NOT_FOUND", (path, body)
    assert alice.ok("GET", base + "/account_data/org.example.stays") == {"keep": True}
    s = alice.sync(timeout=5000)
    glob = {e["type"]: e["content"] for e in s["account_data"]["events"]}
    assert glob.get("org.example.old") == {}, glob
    assert _room_account_data(s, room_id).get("org.example.draft") == {}
    s = alice.sync(incremental=False)
    types = {e["type"] for e in s["account_data"]["events"]}
    assert "org.example.old" not in types and "org.example.stays" in types, types
    assert "org.example.draft" not in _room_account_data(s, room_id)
    assert alice.hs.request("GET", "/_matrix/client/versions")[1]["unstable_features"]["org.matrix.msc3391"]


def test_filters_and_limited_timeline(zhome: ZhomeProcess) -> None:
    alice = U(zhome, "alice")
    room_id = str(alice.ok("POST", "/createRoom", {})["room_id"])
    flt = {"room": {"timeline": {"limit": 1}}, "presence": {"types": []}}
    filter_id = alice.ok("POST", f"/user/{q(alice.user_id)}/filter", flt)["filter_id"]
    assert isinstance(filter_id, str) and not filter_id.startswith("{")
    back = alice.ok("GET", f"/user/{q(alice.user_id)}/filter/{q(filter_id)}")
    assert back["room"]["timeline"]["limit"] == 1
    status, body = alice.req("GET", f"/user/{q(alice.user_id)}/filter/99999")
    assert status == 404
    # Room and sender lists hold IDs.
    for bad in ({"room": {"timeline": {"rooms": ["not_a_room_id"]}}},
                {"room": {"timeline": {"senders": ["not_a_sender_id"]}}},
                {"room": {"not_rooms": ["#alias:localhost"]}}):
        status, body = alice.req("POST", f"/user/{q(alice.user_id)}/filter", bad)
        assert status == 400 and body["errcode"] == "M_BAD_JSON", (bad, body)
    ok = {"room": {"rooms": [room_id, "!old:localhost"], "timeline": {"senders": [alice.user_id]}}}
    assert alice.ok("POST", f"/user/{q(alice.user_id)}/filter", ok)["filter_id"]

    alice.sync(flt=filter_id)
    sent = [alice.say(room_id, f"m{i}") for i in range(3)]
    s = alice.sync(flt=filter_id)
    tl = s["rooms"]["join"][room_id]["timeline"]
    assert [e["event_id"] for e in tl["events"]] == [sent[2]]
    assert tl["limited"] is True
    prev = tl["prev_batch"]
    page = alice.ok("GET", f"/rooms/{q(room_id)}/messages?dir=b&limit=2&from={q(prev)}")
    assert [e["event_id"] for e in page["chunk"]] == [sent[1], sent[0]]

    # Without the filter (and nothing missed) the timeline is not limited.
    alice.say(room_id, "m3")
    tl = alice.sync()["rooms"]["join"][room_id]["timeline"]
    assert tl["limited"] is False and len(tl["events"]) == 1
    # An inline filter JSON works as well as an ID.
    alice.say(room_id, "m4")
    alice.say(room_id, "m5")
    tl = alice.sync(flt={"room": {"timeline": {"limit": 1}}})["rooms"]["join"][room_id]["timeline"]
    assert tl["limited"] is True and [e["content"]["body"] for e in tl["events"]] == ["m5"]


def test_push_rules(zhome: ZhomeProcess) -> None:
    alice = U(zhome, "alice")
    rules = alice.ok("GET", "/pushrules/")["global"]
    override_ids = [r["rule_id"] for r in rules["override"]]
    assert override_ids[0] == ".m.rule.master"
    assert ".m.rule.suppress_notices" in override_ids
    assert any(r["rule_id"] == ".m.rule.message" for r in rules["underride"])
    assert all(r["default"] for r in rules["override"])

    alice.ok("PUT", "/pushrules/global/content/shift", {"pattern": "handover", "actions": ["notify"]})
    alice.ok("PUT", "/pushrules/global/override/.m.rule.suppress_notices/enabled", {"enabled": False})
    rules = alice.ok("GET", "/pushrules/")["global"]
    mine = [r for r in rules["content"] if r["rule_id"] == "shift"]
    assert mine and mine[0]["pattern"] == "handover" and mine[0]["actions"] == ["notify"]
    assert mine[0]["enabled"] is True and mine[0]["default"] is False
    suppress = [r for r in rules["override"] if r["rule_id"] == ".m.rule.suppress_notices"][0]
    assert suppress["enabled"] is False
    assert alice.ok("GET", "/pushrules/global/override/.m.rule.suppress_notices/enabled") == {"enabled": False}
    assert alice.ok("GET", "/pushrules/global/content/shift")["pattern"] == "handover"

    alice.ok("DELETE", "/pushrules/global/content/shift")
    status, _ = alice.req("GET", "/pushrules/global/content/shift")
    assert status == 404
    # Server-default rules cannot be deleted (the spec names no status; 4xx).
    status, body = alice.req("DELETE", "/pushrules/global/override/.m.rule.master")
    assert status in (400, 403) and body["errcode"]
    assert alice.ok("GET", "/pushrules/global/override/.m.rule.master")["rule_id"] == ".m.rule.master"
    # Push rules are also m.push_rules account data.
    s = alice.sync()
    assert any(e["type"] == "m.push_rules" for e in s["account_data"]["events"])


def test_unread_notification_counts(zhome: ZhomeProcess) -> None:
    alice, bob = U(zhome, "alice"), U(zhome, "bob")
    room_id = _shared_room(alice, bob)
    alice.sync()

    def counts() -> dict[str, int]:
        return dict(alice.sync(incremental=False)["rooms"]["join"][room_id]["unread_notifications"])

    assert counts() == {"notification_count": 0, "highlight_count": 0}
    bob.say(room_id, "hello everyone")
    assert counts() == {"notification_count": 1, "highlight_count": 0}
    # Alice's own messages do not count, and sending one reads what came
    # before it ("Receiving notifications").
    alice.say(room_id, "hi")
    assert counts() == {"notification_count": 0, "highlight_count": 0}

    mention = bob.send(room_id, {"msgtype": "m.text", "body": "alice: can you check?",
                                 "m.mentions": {"user_ids": [alice.user_id]}})
    assert counts() == {"notification_count": 1, "highlight_count": 1}
    # The counts come with an incremental sync too.
    bob.say(room_id, "and another")
    s = alice.sync(timeout=5000)
    assert s["rooms"]["join"][room_id]["unread_notifications"] == {"notification_count": 2, "highlight_count": 1}

    # A receipt for the mention leaves the later message unread.
    alice.ok("POST", f"/rooms/{q(room_id)}/receipt/m.read/{q(mention)}", {})
    assert counts() == {"notification_count": 1, "highlight_count": 0}
    last = bob.say(room_id, "last one")
    assert counts() == {"notification_count": 2, "highlight_count": 0}
    alice.ok("POST", f"/rooms/{q(room_id)}/receipt/m.read/{q(last)}", {})
    assert counts() == {"notification_count": 0, "highlight_count": 0}
    # A private receipt resets the counts too.
    bob.say(room_id, "after that")
    newest = bob.send(room_id, {"msgtype": "m.text", "body": "ping", "m.mentions": {"user_ids": [alice.user_id]}})
    assert counts() == {"notification_count": 2, "highlight_count": 1}
    alice.ok("POST", f"/rooms/{q(room_id)}/receipt/m.read.private/{q(newest)}", {})
    assert counts() == {"notification_count": 0, "highlight_count": 0}


def test_unread_counts_follow_push_rules(zhome: ZhomeProcess) -> None:
    alice, bob, carol = U(zhome, "alice"), U(zhome, "bob"), U(zhome, "carol")
    room_id = _shared_room(alice, bob)
    carol.ok("POST", f"/rooms/{q(room_id)}/join", {})

    def counts() -> dict[str, int]:
        return dict(alice.sync(incremental=False)["rooms"]["join"][room_id]["unread_notifications"])

    def mention() -> str:
        return bob.send(room_id, {"msgtype": "m.text", "body": "please look",
                                  "m.mentions": {"user_ids": [alice.user_id]}})

    bob.say(room_id, "plain before")
    assert counts() == {"notification_count": 1, "highlight_count": 0}

    # Three members: no one-to-one rule applies, so a plain message no longer notifies.
    alice.ok("PUT", "/pushrules/global/underride/.m.rule.message/enabled", {"enabled": False})
    bob.say(room_id, "plain after")
    assert counts() == {"notification_count": 1, "highlight_count": 0}
    mention()
    assert counts() == {"notification_count": 2, "highlight_count": 1}

    # The master rule mutes everything, mentions included.
    alice.ok("PUT", "/pushrules/global/override/.m.rule.master/enabled", {"enabled": True})
    mention()
    bob.say(room_id, "plain while muted")
    assert counts() == {"notification_count": 2, "highlight_count": 1}
    # A receipt recounts with the same rules: nothing after it counts.
    last = carol.say(room_id, "carol too")
    alice.ok("POST", f"/rooms/{q(room_id)}/receipt/m.read/{q(last)}", {})
    assert counts() == {"notification_count": 0, "highlight_count": 0}


def test_ignoring_users(zhome: ZhomeProcess) -> None:
    """Spec "Ignoring Users": no events of an ignored user but their state
    events, no invites from them; un-ignoring resumes at once."""
    alice, bob, carol = U(zhome, "alice"), U(zhome, "bob"), U(zhome, "carol")
    room_id = _shared_room(alice, bob)
    carol.ok("POST", f"/rooms/{q(room_id)}/join", {})
    alice.sync()
    alice.ok("PUT", f"/user/{q(alice.user_id)}/account_data/m.ignored_user_list",
             {"ignored_users": {bob.user_id: {}}})

    def timeline(s: Any) -> list[dict[str, Any]]:
        return list(s["rooms"].get("join", {}).get(room_id, {}).get("timeline", {}).get("events", []))

    bob.say(room_id, "from bob")
    carol.say(room_id, "from carol")
    bob.ok("PUT", f"/profile/{q(bob.user_id)}/displayname", {"displayname": "Bob renamed"})
    for s in (alice.sync(), alice.sync(incremental=False)):
        bodies = [e["content"].get("body") for e in timeline(s) if e["type"] == "m.room.message"]
        assert "from carol" in bodies and "from bob" not in bodies, bodies
        # State events of the ignored user still come.
        assert any(e["type"] == "m.room.member" and e["sender"] == bob.user_id
                   and e["content"].get("displayname") == "Bob renamed" for e in timeline(s))

    # Invites from the ignored user do not reach the client; others' do.
    by_bob = str(bob.ok("POST", "/createRoom", {"invite": [alice.user_id]})["room_id"])
    by_carol = str(carol.ok("POST", "/createRoom", {"invite": [alice.user_id]})["room_id"])
    for s in (alice.sync(), alice.sync(incremental=False)):
        invites = s["rooms"].get("invite", {})
        assert by_carol in invites and by_bob not in invites, list(invites)

    # Un-ignoring takes effect on the next sync.
    alice.ok("PUT", f"/user/{q(alice.user_id)}/account_data/m.ignored_user_list", {"ignored_users": {}})
    alice.sync()
    bob.say(room_id, "bob again")
    assert "bob again" in [e["content"].get("body") for e in timeline(alice.sync())]
