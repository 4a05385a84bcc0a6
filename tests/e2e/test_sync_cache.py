"""The /sync answer cache against a real zhome: a repeated identical request
(what a client sends after timing out) gets the answer already computed,
and only while it is still the answer."""

from __future__ import annotations

import json
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tests.e2e.harness import CS, ClientUser, ZhomeProcess, q


def sync(user: ClientUser, **params: str) -> dict[str, Any]:
    status, body = user.hs.request("GET", CS + "/sync?" + urllib.parse.urlencode(params), token=user.token)
    assert status == 200, body
    return body


def timeline(answer: dict[str, Any], room_id: str) -> list[str]:
    room = answer["rooms"]["join"].get(room_id, {})
    return [e["content"].get("body", "") for e in room.get("timeline", {}).get("events", [])]


def test_a_repeated_sync_is_answered_from_the_cache_until_something_changes(zhome: ZhomeProcess) -> None:
    alice, bob = ClientUser(zhome, "alice"), ClientUser(zhome, "bob")
    mine = alice.ok("POST", "/createRoom", {"preset": "private_chat"})["room_id"]
    theirs = bob.ok("POST", "/createRoom", {"preset": "private_chat"})["room_id"]
    alice.ok("PUT", f"/rooms/{q(mine)}/send/m.room.message/a1", {"msgtype": "m.text", "body": "one"})
    flt = json.dumps({"room": {"timeline": {"limit": 5}}})

    first = sync(alice, filter=flt)
    # Something in a room Alice is not in: her answer is still the answer.
    bob.ok("PUT", f"/rooms/{q(theirs)}/send/m.room.message/b1", {"msgtype": "m.text", "body": "elsewhere"})
    again = sync(alice, filter=flt)
    assert again == first, "the repeated request was computed afresh"
    # Identical requests at once get the same answer too.
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: sync(alice, filter=flt), range(4)))
    assert all(a == first for a in answers)
    # Another filter is another request.
    assert sync(alice, filter=json.dumps({"room": {"timeline": {"limit": 4}}}))["next_batch"] != first["next_batch"]

    # A message in her room: the next identical request has it.
    alice.ok("PUT", f"/rooms/{q(mine)}/send/m.room.message/a2", {"msgtype": "m.text", "body": "two"})
    fresh = sync(alice, filter=flt)
    assert timeline(fresh, mine)[-1] == "two" and fresh["next_batch"] != first["next_batch"]
    # Her account data changed: afresh again.
    alice.ok("PUT", f"/user/{q(alice.user_id)}/account_data/org.example.setting", {"on": True})
    after = sync(alice, filter=flt)
    assert any(e["type"] == "org.example.setting" for e in after["account_data"]["events"])
    # A redaction: the redacted content is never served again from the cache.
    sent = alice.ok("PUT", f"/rooms/{q(mine)}/send/m.room.message/a3", {"msgtype": "m.text", "body": "secret"})
    assert "secret" in timeline(sync(alice, filter=flt), mine)
    alice.ok("PUT", f"/rooms/{q(mine)}/redact/{q(sent['event_id'])}/r1", {})
    assert "secret" not in timeline(sync(alice, filter=flt), mine)

    # An incremental sync with nothing new (a long poll that ends empty) is
    # never kept: the retry waits for what comes.
    since = after["next_batch"]
    empty = sync(alice, since=sync(alice, filter=flt)["next_batch"], timeout="0", filter=flt)
    assert not empty["rooms"].get("join")
    alice.ok("PUT", f"/rooms/{q(mine)}/send/m.room.message/a4", {"msgtype": "m.text", "body": "three"})
    later = sync(alice, since=empty["next_batch"], timeout="0", filter=flt)
    assert timeline(later, mine) == ["three"], since
