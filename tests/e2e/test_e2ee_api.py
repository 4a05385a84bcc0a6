"""The end-to-end encryption endpoints over HTTP: errors for bad input,
one-time keys claimed once, to-device delivery and acknowledgement,
device_lists in /sync and /keys/changes, and the sync token.

Spec: client-server-api "End-to-End Encryption", "Send-to-Device
messaging", "Syncing".
"""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any

import signedjson.key
from signedjson.sign import sign_json
from unpaddedbase64 import encode_base64

from tests.e2e.harness import ClientUser, ZhomeProcess, q


class Device:
    def __init__(self, u: ClientUser) -> None:
        self.user = u
        self.device_id: str = u.ok("GET", "/account/whoami")["device_id"]
        self.sk = signedjson.key.generate_signing_key(self.device_id)
        self.ed25519 = encode_base64(signedjson.key.get_verify_key(self.sk).encode())

    def device_keys(self, user_id: str | None = None, device_id: str | None = None) -> dict[str, Any]:
        d = device_id or self.device_id
        return sign_json({"user_id": user_id or self.user.user_id, "device_id": d,
                          "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
                          "keys": {f"ed25519:{d}": self.ed25519, f"curve25519:{d}": "c" * 43}},
                         user_id or self.user.user_id, self.sk)

    def otk(self, key: str) -> dict[str, Any]:
        return sign_json({"key": key}, self.user.user_id, self.sk)


def _sync(u: ClientUser, since: str | None = None, timeout: int = 0) -> dict[str, Any]:
    path = f"/sync?timeout={timeout}" + (f"&since={q(since)}" if since else "")
    return u.ok("GET", path)


def test_bad_key_uploads_are_refused_and_store_nothing(zhome: ZhomeProcess) -> None:
    alice, bob = ClientUser(zhome, "alice"), ClientUser(zhome, "bob")
    dev = Device(alice)
    other = Device(alice)
    forged = dict(dev.device_keys())
    forged["keys"] = {**forged["keys"], f"curve25519:{dev.device_id}": "d" * 43}  # signature no longer matches
    cases = [
        ({"device_keys": dev.device_keys(user_id=bob.user_id)}, "M_BAD_JSON"),
        ({"device_keys": dev.device_keys(device_id="NOTMINE")}, "M_BAD_JSON"),
        ({"device_keys": {k: v for k, v in dev.device_keys().items() if k != "signatures"}}, "M_BAD_JSON"),
        ({"device_keys": forged}, "M_INVALID_SIGNATURE"),
        ({"device_keys": {**dev.device_keys(), "signatures": other.device_keys()["signatures"]}},
         "M_INVALID_SIGNATURE"),
        ({"one_time_keys": {"signed_curve25519:k1": dev.otk("k")}}, "M_INVALID_SIGNATURE"),  # no device keys yet
        ({"one_time_keys": "nope"}, "M_BAD_JSON"),
    ]
    for body, errcode in cases:
        status, resp = alice.req("POST", "/keys/upload", body)
        assert (status, resp["errcode"]) == (400, errcode), (body, resp)
    assert alice.ok("POST", "/keys/query", {"device_keys": {alice.user_id: []}})["device_keys"] == {alice.user_id: {}}

    ok = alice.ok("POST", "/keys/upload", {"device_keys": dev.device_keys(),
                                           "one_time_keys": {"signed_curve25519:k1": dev.otk("one")}})
    assert ok == {"one_time_key_counts": {"signed_curve25519": 1}}
    status, resp = alice.req("POST", "/keys/upload", {"one_time_keys": {"signed_curve25519:k1": dev.otk("two")}})
    assert status == 400 and resp["errcode"] == "M_BAD_JSON"
    status, resp = alice.req("POST", "/keys/upload", {"one_time_keys": {"signed_curve25519:k2": other.otk("x")}})
    assert status == 400 and resp["errcode"] == "M_INVALID_SIGNATURE"
    assert _sync(alice)["device_one_time_keys_count"] == {"signed_curve25519": 1}

    # Claimed once; the second claim finds nothing.
    claim = {"one_time_keys": {alice.user_id: {dev.device_id: "signed_curve25519"}}}
    first = bob.ok("POST", "/keys/claim", claim)
    assert first["one_time_keys"][alice.user_id][dev.device_id]["signed_curve25519:k1"]["key"] == "one"
    assert bob.ok("POST", "/keys/claim", claim)["one_time_keys"] == {}
    assert _sync(alice)["device_one_time_keys_count"] == {"signed_curve25519": 0}
    status, resp = bob.req("POST", "/keys/claim", {"one_time_keys": {alice.user_id: "x"}})
    assert status == 400 and resp["errcode"] == "M_BAD_JSON"
    status, resp = bob.req("POST", "/keys/query", {"device_keys": ["x"]})
    assert status == 400 and resp["errcode"] == "M_BAD_JSON"

    # Fallback key: given when one-time keys run out, then marked used.
    alice.ok("POST", "/keys/upload", {"fallback_keys": {"signed_curve25519:f1": dev.otk("fb")}})
    assert _sync(alice)["device_unused_fallback_key_types"] == ["signed_curve25519"]
    got = bob.ok("POST", "/keys/claim", claim)["one_time_keys"][alice.user_id][dev.device_id]
    assert list(got) == ["signed_curve25519:f1"]
    assert _sync(alice)["device_unused_fallback_key_types"] == []


def test_send_to_device_delivery_ack_and_errors(zhome: ZhomeProcess) -> None:
    alice, bob = ClientUser(zhome, "alice"), ClientUser(zhome, "bob")
    bob_device = bob.ok("GET", "/account/whoami")["device_id"]
    start = _sync(bob)["next_batch"]
    bad = [
        {"messages": "x"},
        {"messages": {"not-a-user": {"D": {}}}},
        {"messages": {bob.user_id: ["D"]}},
        {"messages": {bob.user_id: {bob_device: "not an object"}}},
        {},
    ]
    for i, body in enumerate(bad):
        status, resp = alice.req("PUT", f"/sendToDevice/m.test/bad{i}", body)
        assert status == 400 and resp["errcode"] == "M_BAD_JSON", (body, resp)
    status, _ = alice.req("PUT", "/sendToDevice/m.test/raw", None)
    assert status == 400
    assert _sync(bob, start)["to_device"]["events"] == []

    # A waiting /sync wakes for the message.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        waiting = pool.submit(_sync, bob, start, 20000)
        time.sleep(0.5)
        alice.ok("PUT", "/sendToDevice/m.test/t1", {"messages": {bob.user_id: {bob_device: {"n": 1}}}})
        woken = waiting.result(timeout=30)
        assert time.monotonic() - started < 10
    assert woken["to_device"]["events"] == [{"sender": alice.user_id, "type": "m.test", "content": {"n": 1}}]
    # The same transaction ID again: not delivered twice; "*" reaches every device.
    alice.ok("PUT", "/sendToDevice/m.test/t1", {"messages": {bob.user_id: {bob_device: {"n": 1}}}})
    alice.ok("PUT", "/sendToDevice/m.test/t2", {"messages": {bob.user_id: {"*": {"n": 2}}}})
    # Syncing from the token that delivered message 1 acknowledged it; 2 is
    # not acknowledged until a later token is used, so it comes again.
    for _ in range(2):
        again = _sync(bob, woken["next_batch"])
        assert [e["content"]["n"] for e in again["to_device"]["events"]] == [2]
    assert [e["content"]["n"] for e in _sync(bob)["to_device"]["events"]] == [2]
    # Acknowledged by the next since token: gone, also from an initial sync.
    assert _sync(bob, again["next_batch"])["to_device"]["events"] == []
    assert _sync(bob)["to_device"]["events"] == []


def test_to_device_backlog_paging_and_a_reused_device_id(zhome: ZhomeProcess) -> None:
    """More messages than one /sync carries come a page at a time, each once;
    a device that is logged out loses its waiting messages, also when the
    same device ID logs in again."""
    alice, bob = ClientUser(zhome, "alice"), ClientUser(zhome, "bob")
    password = "correct horse battery"

    def login() -> str:
        status, out = zhome.request("POST", "/_matrix/client/v3/login", {
            "type": "m.login.password", "identifier": {"type": "m.id.user", "user": bob.user_id},
            "password": password, "device_id": "REUSED"})
        assert status == 200, out
        bob.token = out["access_token"]
        return str(out["device_id"])

    def send(n: Any) -> None:
        alice.ok("PUT", f"/sendToDevice/m.test/{n}", {"messages": {bob.user_id: {"REUSED": {"n": n}}}})

    login()
    token = _sync(bob)["next_batch"]
    for n in range(130):
        send(n)
    seen: list[Any] = []
    for _ in range(4):
        page = _sync(bob, token)
        token = page["next_batch"]
        seen += [e["content"]["n"] for e in page["to_device"]["events"]]
    assert seen == list(range(130))
    send("late")
    page = _sync(bob, token)
    assert [e["content"]["n"] for e in page["to_device"]["events"]] == ["late"]
    assert _sync(bob, page["next_batch"])["to_device"]["events"] == []
    send("stale")
    bob.ok("POST", "/logout", {})
    login()
    assert _sync(bob)["to_device"]["events"] == []
    send("fresh")
    assert [e["content"]["n"] for e in _sync(bob)["to_device"]["events"]] == ["fresh"]


def test_device_lists_in_sync_and_keys_changes(zhome: ZhomeProcess) -> None:
    alice, bob, carol = ClientUser(zhome, "alice"), ClientUser(zhome, "bob"), ClientUser(zhome, "carol")
    room = alice.ok("POST", "/createRoom", {"preset": "public_chat"})["room_id"]
    t0 = _sync(alice)["next_batch"]
    bob.ok("POST", f"/join/{q(room)}", {})
    t1 = _sync(alice, t0)
    # Bob newly shares a room with alice.
    assert bob.user_id in t1["device_lists"]["changed"]
    # Bob's device keys change: alice (and bob himself) see it.
    bob_dev = Device(bob)
    bt = _sync(bob)["next_batch"]
    bob.ok("POST", "/keys/upload", {"device_keys": bob_dev.device_keys()})
    t2 = _sync(alice, t1["next_batch"])
    assert t2["device_lists"]["changed"] == [bob.user_id]
    assert bob.user_id in _sync(bob, bt)["device_lists"]["changed"]
    # An initial sync names the users sharing a room whose devices changed.
    assert bob.user_id in _sync(alice)["device_lists"]["changed"]
    # Carol shares no room: her changes are not alice's business.
    Device(carol)
    carol.ok("POST", "/keys/upload", {"device_keys": Device(carol).device_keys()})
    t3 = _sync(alice, t2["next_batch"])
    assert carol.user_id not in t3["device_lists"]["changed"]
    changes = alice.ok("GET", f"/keys/changes?from={q(t0)}&to={q(t3['next_batch'])}")
    assert changes["changed"] == [bob.user_id] and changes["left"] == []
    # Bob leaves: he is in "left".
    bob.ok("POST", f"/rooms/{q(room)}/leave", {})
    t4 = _sync(alice, t3["next_batch"])
    assert t4["device_lists"]["left"] == [bob.user_id]
    assert alice.ok("GET", f"/keys/changes?from={q(t3['next_batch'])}")["left"] == [bob.user_id]
    # Nothing changed: empty lists.
    t5 = _sync(alice, t4["next_batch"])
    assert t5["device_lists"] == {"changed": [], "left": []}

    # A token issued before the new streams existed still works.
    old = "s" + "_".join(t5["next_batch"][1:].split("_")[:4])
    assert "device_lists" in _sync(alice, old)
    status, resp = alice.req("GET", "/sync?since=s1_2_3")
    assert status == 400 and resp["errcode"] == "M_INVALID_PARAM"
    status, resp = alice.req("GET", "/keys/changes?from=garbage")
    assert status == 400 and resp["errcode"] == "M_INVALID_PARAM"
