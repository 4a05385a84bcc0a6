"""Push rules, pushers and delivery to a push gateway, end to end on both
engines.

Spec: client-server-api "Push Notifications" ("Push Rules: API",
"Pushers"), and the Push Gateway API (``POST /_matrix/push/v1/notify``): a
real gateway (aiohttp, on 127.0.0.1) receives what zhome sends, and each
request is validated against the spec's push gateway OpenAPI schema.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jsonschema
import pytest
import yaml
from aiohttp import web

from tests.e2e.harness import CS, ClientUser, ZhomeProcess, free_port, q
from tests.e2e.openapi import spec_data_dir

_TXN = itertools.count()
NOTIFY = "/_matrix/push/v1/notify"
PASSWORD = "correct horse battery"


class U(ClientUser):
    def say(self, room_id: str, text: str) -> str:
        return str(self.ok("PUT", f"/rooms/{q(room_id)}/send/m.room.message/p{next(_TXN)}",
                           {"msgtype": "m.text", "body": text})["event_id"])

    def rules(self, kind: str) -> list[str]:
        return [r["rule_id"] for r in self.ok("GET", "/pushrules/")["global"][kind]]

    def set_pusher(self, pushkey: str, url: str, app_id: str = "org.example.app", **extra: Any) -> tuple[int, Any]:
        body = {"kind": "http", "app_id": app_id, "pushkey": pushkey, "app_display_name": "Example",
                "device_display_name": "Phone", "lang": "en", "data": {"url": url}, **extra}
        return self.req("POST", "/pushers/set", body)

    def pushers(self) -> list[dict[str, Any]]:
        return list(self.ok("GET", "/pushers")["pushers"])


def _room(alice: U, *others: U, **create: Any) -> str:
    room_id = str(alice.ok("POST", "/createRoom", {"preset": "public_chat", **create})["room_id"])
    for u in others:
        u.ok("POST", f"/rooms/{q(room_id)}/join", {})
    return room_id


def _gateway_schema() -> dict[str, Any]:
    path = spec_data_dir() / "api" / "push-gateway" / "push_notifier.yaml"
    doc = yaml.safe_load(Path(path).read_text())
    post = doc["paths"]["/notify"]["post"]
    return {"request": post["requestBody"]["content"]["application/json"]["schema"],
            "response": post["responses"]["200"]["content"]["application/json"]["schema"]}


class Gateway:
    """A push gateway on 127.0.0.1 (aiohttp in its own thread) that records
    every request and answers each with ``respond(body)`` (default: no
    rejected pushkeys)."""

    def __init__(self, port: Optional[int] = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}{NOTIFY}"
        self.received: "queue.Queue[dict[str, Any]]" = queue.Queue()
        self.respond: Callable[[dict[str, Any]], dict[str, Any]] = lambda body: {"rejected": []}
        self.schema = _gateway_schema()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._runner: Optional[web.AppRunner] = None

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.received.put(body)
        return web.json_response(self.respond(body))

    def start(self) -> "Gateway":
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            app = web.Application()
            app.router.add_post(NOTIFY, self._handle)
            self._runner = web.AppRunner(app)
            loop.run_until_complete(self._runner.setup())
            loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert ready.wait(10), "gateway did not start"
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop = self._thread = None

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("no matching push arrived")
            try:
                body = self.received.get(timeout=left)
            except queue.Empty:
                continue
            jsonschema.Draft202012Validator(self.schema["request"]).validate(body)
            if pred(body):
                return body

    def nothing_for(self, seconds: float) -> None:
        try:
            body = self.received.get(timeout=seconds)
        except queue.Empty:
            return
        raise AssertionError(f"unexpected push: {body}")


@pytest.fixture
def gateway() -> Any:
    gw = Gateway().start()
    try:
        yield gw
    finally:
        gw.stop()


def _for_event(event_id: str) -> Callable[[dict[str, Any]], bool]:
    return lambda body: body["notification"].get("event_id") == event_id


# -- push rules ----------------------------------------------------------------------
def test_rule_crud_and_positioning(zhome: ZhomeProcess) -> None:
    alice = U(zhome, "alice")
    for rid in ("#a:x", "#b:x"):
        alice.ok("PUT", f"/pushrules/global/room/{q(rid)}", {"actions": ["notify"]})
    # New rules go first; before/after place them.
    assert alice.rules("room") == ["#b:x", "#a:x"]
    alice.ok("PUT", f"/pushrules/global/room/{q('#c:x')}?before={q('#a:x')}", {"actions": ["notify"]})
    assert alice.rules("room") == ["#b:x", "#c:x", "#a:x"]
    alice.ok("PUT", f"/pushrules/global/room/{q('#d:x')}?after={q('#b:x')}", {"actions": []})
    assert alice.rules("room") == ["#b:x", "#d:x", "#c:x", "#a:x"]
    # An update without before/after keeps its place and takes the new actions.
    alice.ok("PUT", f"/pushrules/global/room/{q('#c:x')}", {"actions": ["dont_notify"]})
    assert alice.rules("room") == ["#b:x", "#d:x", "#c:x", "#a:x"]
    assert alice.ok("GET", f"/pushrules/global/room/{q('#c:x')}/actions") == {"actions": ["dont_notify"]}
    status, body = alice.req("PUT", f"/pushrules/global/room/{q('#e:x')}?before=nope", {"actions": []})
    assert status == 400 and body["errcode"] == "M_UNKNOWN"
    status, body = alice.req("PUT", f"/pushrules/global/room/{q('#e:x')}?after=.m.rule.master", {"actions": []})
    assert status == 400

    # A room rule for a real room ID, percent-encoded, and every kind.
    room_id = "!abc:localhost"
    alice.ok("PUT", f"/pushrules/global/room/{q(room_id)}", {"actions": ["dont_notify"]})
    rule = alice.ok("GET", f"/pushrules/global/room/{q(room_id)}")
    assert rule == {"rule_id": room_id, "default": False, "enabled": True, "actions": ["dont_notify"]}
    alice.ok("PUT", "/pushrules/global/content/cake", {"pattern": "cake*lie", "actions": ["notify"]})
    assert alice.ok("GET", "/pushrules/global/content/cake")["pattern"] == "cake*lie"
    alice.ok("PUT", f"/pushrules/global/sender/{q('@bob:localhost')}", {"actions": []})
    assert alice.ok("GET", f"/pushrules/global/sender/{q('@bob:localhost')}")["actions"] == []
    cond = [{"kind": "event_match", "key": "content.msgtype", "pattern": "m.notice"}]
    alice.ok("PUT", "/pushrules/global/override/o1", {"conditions": cond, "actions": ["notify"]})
    alice.ok("PUT", "/pushrules/global/underride/u1", {"conditions": cond, "actions": ["notify"]})
    assert alice.rules("override")[:2] == [".m.rule.master", "o1"]
    assert alice.rules("underride")[0] == "u1"
    # Listings: the kind, the scope, everything.
    assert "o1" in [r["rule_id"] for r in alice.ok("GET", "/pushrules/global/override/")]
    assert set(alice.ok("GET", "/pushrules/global/")) == {"override", "content", "room", "sender", "underride"}
    for kind in ("override", "content", "room", "sender", "underride"):
        for r in alice.ok("GET", f"/pushrules/global/{kind}/"):
            assert {"rule_id", "default", "enabled", "actions"} <= set(r)

    # enabled and actions, for user and server-default rules alike.
    alice.ok("PUT", "/pushrules/global/override/o1/enabled", {"enabled": False})
    assert alice.ok("GET", "/pushrules/global/override/o1/enabled") == {"enabled": False}
    alice.ok("PUT", "/pushrules/global/underride/.m.rule.message/actions", {"actions": ["dont_notify"]})
    assert alice.ok("GET", "/pushrules/global/underride/.m.rule.message/actions") == {"actions": ["dont_notify"]}
    alice.ok("PUT", "/pushrules/global/underride/.m.rule.message/enabled", {"enabled": False})
    assert alice.ok("GET", "/pushrules/global/underride/.m.rule.message")["enabled"] is False

    # Deleting: user rules go, server-default ones stay.
    alice.ok("DELETE", f"/pushrules/global/room/{q('#b:x')}")
    assert alice.req("GET", f"/pushrules/global/room/{q('#b:x')}")[0] == 404
    assert alice.req("DELETE", f"/pushrules/global/room/{q('#b:x')}")[0] == 404
    status, _ = alice.req("DELETE", "/pushrules/global/override/.m.rule.master")
    assert status in (400, 403)
    assert alice.ok("GET", "/pushrules/global/override/.m.rule.master")["rule_id"] == ".m.rule.master"


def test_rule_path_and_body_errors(zhome: ZhomeProcess) -> None:
    alice = U(zhome, "alice")
    # The ruleset is at /pushrules/ only.
    assert alice.req("GET", "/pushrules")[0] == 404
    for path in ("/pushrules/global", "/pushrules/global/room", "/pushrules/not_a_scope/",
                 "/pushrules/global/not_a_template/", "/pushrules/global/override/.m.rule.master/not_an_attr"):
        status, body = alice.req("GET", path)
        assert status == 400 and body["errcode"] in ("M_UNRECOGNIZED", "M_INVALID_PARAM"), (path, status, body)
    assert alice.req("GET", "/pushrules/global/override/not_a_rule")[0] == 404
    for path, body in [
        ("/pushrules/", {"actions": []}),
        (f"/pushrules/not_a_scope/room/{q('#x:y')}", {"actions": []}),
        ("/pushrules/global", {"actions": []}),
        ("/pushrules/global/room", {"actions": []}),
        ("/pushrules/global/room/", {"actions": []}),
        ("/pushrules/global/not_a_template/foo", {"actions": []}),
        (f"/pushrules/global/room/{q('#fo' + chr(92) + 'o:x')}", {"actions": []}),
        (f"/pushrules/global/room/{q('a/b')}", {"actions": []}),
        ("/pushrules/global/override/.mine", {"actions": []}),
        ("/pushrules/global/override/my_id", {}),
        ("/pushrules/global/underride/my_id", {"conditions": [{}], "actions": []}),
        ("/pushrules/global/content/my_id", {"actions": []}),
        (f"/pushrules/global/room/{q('#r:x')}", {"actions": ["not_an_action"]}),
        ("/pushrules/global/override/.m.rule.master/not_an_attr", {"enabled": True}),
        ("/pushrules/global/override/.m.rule.master/enabled", {"enabled": "yes"}),
    ]:
        status, answer = alice.req("PUT", path, body)
        assert status == 400, (path, status, answer)
        assert isinstance(answer.get("errcode"), str) and answer["errcode"].startswith("M_")
    assert alice.req("PUT", "/pushrules/global/override/.not.a.rule/actions", {"actions": []})[0] == 404
    assert alice.req("PUT", "/pushrules/global/sender/%40nobody%3Ax/enabled", {"enabled": True})[0] == 404


def test_rule_changes_reach_sync_as_account_data(zhome: ZhomeProcess) -> None:
    alice = U(zhome, "alice")
    since = alice.ok("GET", "/sync?timeout=0")["next_batch"]
    alice.ok("PUT", "/pushrules/global/content/shift", {"pattern": "handover", "actions": ["notify"]})
    alice.ok("PUT", "/pushrules/global/underride/.m.rule.message/actions", {"actions": ["dont_notify"]})
    events = alice.ok("GET", f"/sync?timeout=0&since={since}").get("account_data", {}).get("events", [])
    [rules] = [e for e in events if e["type"] == "m.push_rules"]
    assert "shift" in [r["rule_id"] for r in rules["content"]["global"]["content"]]
    [message] = [r for r in rules["content"]["global"]["underride"] if r["rule_id"] == ".m.rule.message"]
    # A historical action is kept as set (and means nothing when evaluating).
    assert message["actions"] == ["dont_notify"]


# -- pushers -------------------------------------------------------------------------
def test_pusher_crud_and_errors(zhome: ZhomeProcess) -> None:
    alice, bob = U(zhome, "alice"), U(zhome, "bob")
    url = "https://push.example.org" + NOTIFY
    assert alice.pushers() == []
    status, _ = alice.set_pusher("key1", url, profile_tag="tag", data={"url": url, "format": "event_id_only",
                                                                           "custom": 1})
    assert status == 200
    [p] = alice.pushers()
    assert p == {"pushkey": "key1", "kind": "http", "app_id": "org.example.app", "app_display_name": "Example",
                 "device_display_name": "Phone", "lang": "en", "profile_tag": "tag",
                 "data": {"url": url, "format": "event_id_only", "custom": 1}}
    # Setting it again updates it.
    alice.set_pusher("key1", url, lang="de")
    [p] = alice.pushers()
    assert p["lang"] == "de" and p["data"] == {"url": url}
    # The same app_id and pushkey for another user moves it, unless append.
    assert bob.set_pusher("key1", url)[0] == 200
    assert alice.pushers() == [] and len(bob.pushers()) == 1
    assert alice.set_pusher("key1", url, append=True)[0] == 200
    assert len(alice.pushers()) == 1 and len(bob.pushers()) == 1
    # kind null deletes (and deleting what is not there is fine).
    assert alice.req("POST", "/pushers/set", {"kind": None, "app_id": "org.example.app", "pushkey": "key1"})[0] == 200
    assert alice.pushers() == []
    assert alice.req("POST", "/pushers/set", {"kind": None, "app_id": "org.example.app", "pushkey": "key1"})[0] == 200

    base: dict[str, Any] = {"kind": "http", "app_id": "a", "pushkey": "k", "app_display_name": "A", "device_display_name": "D",
            "lang": "en", "data": {"url": url}}
    changes: list[tuple[dict[str, Any], str]] = [
        ({"kind": "carrier-pigeon"}, "M_INVALID_PARAM"),
        ({"kind": 5}, "M_BAD_JSON"),
        ({"app_id": ""}, "M_INVALID_PARAM"),
        ({"app_id": "x" * 65}, "M_INVALID_PARAM"),
        ({"pushkey": "k" * 513}, "M_INVALID_PARAM"),
        ({"data": {}}, "M_MISSING_PARAM"),
        ({"data": {"url": "ftp://push.example.org" + NOTIFY}}, "M_INVALID_PARAM"),
        ({"data": {"url": "not a url"}}, "M_INVALID_PARAM"),
        ({"data": {"url": "https://push.example.org/elsewhere"}}, "M_INVALID_PARAM"),
        ({"data": "url"}, "M_BAD_JSON"),
        ({"lang": None}, "M_MISSING_PARAM"),
        ({"append": "yes"}, "M_BAD_JSON"),
    ]
    for change, errcode in changes:
        status, body = alice.req("POST", "/pushers/set", {**base, **change})
        assert (status, body.get("errcode")) == (400, errcode), (change, status, body)
    for missing in ("kind", "app_id", "pushkey"):
        status, body = alice.req("POST", "/pushers/set", {k: v for k, v in base.items() if k != missing})
        assert (status, body["errcode"]) == (400, "M_MISSING_PARAM")
    assert alice.pushers() == []


def test_pushers_go_with_their_device(zhome: ZhomeProcess) -> None:
    alice = U(zhome, "alice")
    url = "https://push.example.org" + NOTIFY
    status, login = zhome.request("POST", CS + "/login", {
        "type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}, "password": PASSWORD})
    assert status == 200
    other = login["access_token"]
    alice.set_pusher("mine", url)
    zhome.request("POST", CS + "/pushers/set", {
        "kind": "http", "app_id": "org.example.app", "pushkey": "other", "app_display_name": "A",
        "device_display_name": "D", "lang": "en", "data": {"url": url}}, token=other)
    assert sorted(p["pushkey"] for p in alice.pushers()) == ["mine", "other"]
    # A password change that logs out the other devices takes their pushers.
    alice.ok("POST", "/account/password", {"new_password": "a new one", "auth": {
        "type": "m.login.password", "identifier": {"type": "m.id.user", "user": alice.user_id},
        "password": PASSWORD}})
    assert [p["pushkey"] for p in alice.pushers()] == ["mine"]
    # So does logging out.
    status, login = zhome.request("POST", CS + "/login", {
        "type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}, "password": "a new one"})
    third = login["access_token"]
    zhome.request("POST", CS + "/pushers/set", {
        "kind": "http", "app_id": "org.example.app", "pushkey": "third", "app_display_name": "A",
        "device_display_name": "D", "lang": "en", "data": {"url": url}}, token=third)
    assert len(alice.pushers()) == 2
    assert zhome.request("POST", CS + "/logout", {}, token=third)[0] == 200
    assert [p["pushkey"] for p in alice.pushers()] == ["mine"]


# -- delivery ------------------------------------------------------------------------
def test_message_is_pushed_with_counts_and_fields(zhome: ZhomeProcess, gateway: Gateway) -> None:
    alice, bob = U(zhome, "alice"), U(zhome, "bob")
    bob.ok("PUT", f"/profile/{q(bob.user_id)}/displayname", {"displayname": "Bob B"})
    room_id = _room(alice, bob, name="Handover")
    assert alice.set_pusher("key-a", gateway.url, data={"url": gateway.url, "custom": "x"})[0] == 200
    event_id = bob.say(room_id, "the patient in room 4")
    body = gateway.wait_for(_for_event(event_id))
    n = body["notification"]
    assert n["room_id"] == room_id and n["type"] == "m.room.message" and n["sender"] == bob.user_id
    assert n["content"] == {"msgtype": "m.text", "body": "the patient in room 4"}
    assert n["room_name"] == "Handover" and n["sender_display_name"] == "Bob B"
    assert n["counts"] == {"unread": 1}
    [device] = n["devices"]
    assert device["app_id"] == "org.example.app" and device["pushkey"] == "key-a"
    assert device["data"] == {"custom": "x"}
    assert isinstance(device["pushkey_ts"], int) and abs(device["pushkey_ts"] - time.time()) < 600
    # Two members: the one-to-one rule, with its sound.
    assert device["tweaks"] == {"sound": "default"} and n["prio"] == "high"

    second = bob.say(room_id, "and room 5")
    assert gateway.wait_for(_for_event(second))["notification"]["counts"] == {"unread": 2}
    # A read receipt sends the new badge count alone.
    alice.ok("POST", f"/rooms/{q(room_id)}/receipt/m.read/{q(second)}", {})
    badge = gateway.wait_for(lambda b: "event_id" not in b["notification"])
    assert badge["notification"]["counts"] == {"unread": 0}
    # Alice's own messages are not pushed to her.
    alice.say(room_id, "thanks")
    gateway.nothing_for(1.0)


def _badge(gateway: Gateway) -> dict[str, Any]:
    """The next badge-only push: counts without an event."""
    body = gateway.wait_for(lambda b: "event_id" not in b["notification"])
    return dict(body["notification"]["counts"])


def test_redacting_an_unread_message_sends_the_lower_badge(zhome: ZhomeProcess, gateway: Gateway) -> None:
    alice, bob = U(zhome, "alice"), U(zhome, "bob")
    room_id = _room(alice, bob)
    assert alice.set_pusher("key-a", gateway.url)[0] == 200
    first = bob.say(room_id, "one")
    assert gateway.wait_for(_for_event(first))["notification"]["counts"] == {"unread": 1}
    second = bob.say(room_id, "two")
    assert gateway.wait_for(_for_event(second))["notification"]["counts"] == {"unread": 2}
    bob.ok("PUT", f"/rooms/{q(room_id)}/redact/{q(first)}/r{next(_TXN)}", {})
    assert _badge(gateway) == {"unread": 1}
    # Once read, a redaction changes no count, and sends nothing.
    alice.ok("POST", f"/rooms/{q(room_id)}/receipt/m.read/{q(second)}", {})
    assert _badge(gateway) == {"unread": 0}
    bob.ok("PUT", f"/rooms/{q(room_id)}/redact/{q(second)}/r{next(_TXN)}", {})
    gateway.nothing_for(1.0)


def test_sending_sends_the_cleared_badge(zhome: ZhomeProcess, gateway: Gateway) -> None:
    """Sending an event reads what came before it ("Receiving
    notifications"): the sender's other devices get the new badge, as
    after a read receipt; a send that clears nothing pushes nothing."""
    alice, bob = U(zhome, "alice"), U(zhome, "bob")
    room_id = _room(alice, bob)
    assert alice.set_pusher("key-a", gateway.url)[0] == 200
    first = bob.say(room_id, "one")
    assert gateway.wait_for(_for_event(first))["notification"]["counts"] == {"unread": 1}
    alice.say(room_id, "answered from the desktop")
    assert _badge(gateway) == {"unread": 0}
    alice.say(room_id, "and more")
    gateway.nothing_for(1.0)


def test_event_id_only_invites_and_muted_rooms(zhome: ZhomeProcess, gateway: Gateway) -> None:
    alice, bob = U(zhome, "alice"), U(zhome, "bob")
    alice.set_pusher("key-a", gateway.url, data={"url": gateway.url, "format": "event_id_only"})
    room_id = str(bob.ok("POST", "/createRoom", {"preset": "private_chat", "name": "Ward 3"})["room_id"])
    bob.ok("POST", f"/rooms/{q(room_id)}/invite", {"user_id": alice.user_id})
    invite = gateway.wait_for(lambda b: True)["notification"]
    assert invite["room_id"] == room_id and set(invite) == {"event_id", "room_id", "prio", "counts", "devices"}
    assert invite["devices"][0]["data"] == {"format": "event_id_only"}

    alice.ok("POST", f"/rooms/{q(room_id)}/join", {})
    alice.ok("PUT", f"/pushrules/global/room/{q(room_id)}", {"actions": ["dont_notify"]})
    muted = bob.say(room_id, "not for push")
    mention = bob.say(room_id, "alice, please call")
    body = gateway.wait_for(lambda b: "event_id" in b["notification"])
    assert body["notification"]["event_id"] == mention != muted


def test_full_invite_push(zhome: ZhomeProcess, gateway: Gateway) -> None:
    alice, bob = U(zhome, "alice"), U(zhome, "bob")
    alice.set_pusher("key-a", gateway.url)
    room_id = str(bob.ok("POST", "/createRoom", {"preset": "private_chat", "name": "Ward 3"})["room_id"])
    bob.ok("POST", f"/rooms/{q(room_id)}/invite", {"user_id": alice.user_id})
    n = gateway.wait_for(lambda b: b["notification"].get("type") == "m.room.member")["notification"]
    assert n["sender"] == bob.user_id and n["user_is_target"] is True and n["room_name"] == "Ward 3"
    assert n["content"]["membership"] == "invite"
    # The invite does not count as an unread message once she joins.
    alice.ok("POST", f"/rooms/{q(room_id)}/join", {})
    sync = alice.ok("GET", "/sync?timeout=0")
    assert sync["rooms"]["join"][room_id]["unread_notifications"]["notification_count"] == 0


def test_rejected_pushkey_loses_its_pusher(zhome: ZhomeProcess, gateway: Gateway) -> None:
    alice, bob = U(zhome, "alice"), U(zhome, "bob")
    room_id = _room(alice, bob)
    alice.set_pusher("key-1", gateway.url)
    alice.set_pusher("key-2", gateway.url)
    gateway.respond = lambda body: {"rejected": [d["pushkey"] for d in body["notification"]["devices"]
                                                 if d["pushkey"] == "key-1"]}
    first = bob.say(room_id, "one")
    keys = {gateway.wait_for(_for_event(first))["notification"]["devices"][0]["pushkey"] for _ in range(2)}
    assert keys == {"key-1", "key-2"}
    deadline = time.monotonic() + 10
    while [p["pushkey"] for p in alice.pushers()] != ["key-2"]:
        assert time.monotonic() < deadline, alice.pushers()
        time.sleep(0.1)
    second = bob.say(room_id, "two")
    assert gateway.wait_for(_for_event(second))["notification"]["devices"][0]["pushkey"] == "key-2"
    gateway.nothing_for(1.0)


def test_delivery_retried_after_gateway_was_down(zhome: ZhomeProcess) -> None:
    alice, bob = U(zhome, "alice"), U(zhome, "bob")
    room_id = _room(alice, bob)
    gateway = Gateway()
    # The gateway is not listening yet: the push fails and is retried.
    alice.set_pusher("key-a", gateway.url)
    event_id = bob.say(room_id, "while you were away")
    time.sleep(1.5)
    gateway.start()
    try:
        body = gateway.wait_for(_for_event(event_id), timeout=30)
        assert body["notification"]["content"]["body"] == "while you were away"
    finally:
        gateway.stop()


def test_pending_deliveries_survive_a_restart(zhome: ZhomeProcess) -> None:
    alice, bob = U(zhome, "alice"), U(zhome, "bob")
    room_id = _room(alice, bob)
    gateway = Gateway()
    alice.set_pusher("key-a", gateway.url)
    delivered = gateway.start()
    first = bob.say(room_id, "before")
    delivered.wait_for(_for_event(first))
    gateway.stop()
    # Sent while the gateway is down, and the server killed before a retry
    # could succeed: the notification row is all that is left of it.
    second = bob.say(room_id, "during")
    zhome.stop(kill=True)
    gateway = Gateway(gateway.port).start()
    try:
        zhome.start()
        body = gateway.wait_for(_for_event(second), timeout=30)
        assert body["notification"]["content"]["body"] == "during"
    finally:
        gateway.stop()


def test_invite_over_federation_is_pushed(zhome_pair: Any, gateway: Gateway) -> None:
    carol, dave = U(zhome_pair.a, "carol_push"), U(zhome_pair.b, "dave_push")
    dave.set_pusher("key-d", gateway.url)
    room_id = str(carol.ok("POST", "/createRoom", {"preset": "private_chat", "name": "Referrals"})["room_id"])
    carol.ok("POST", f"/rooms/{q(room_id)}/invite", {"user_id": dave.user_id})
    n = gateway.wait_for(lambda b: b["notification"].get("type") == "m.room.member", timeout=30)["notification"]
    assert n["room_id"] == room_id and n["sender"] == carol.user_id and n["user_is_target"] is True
    # The room is unknown to dave's server but for the invite's stripped state.
    assert n["room_name"] == "Referrals"
    assert n["devices"][0]["tweaks"] == {"sound": "default"}
