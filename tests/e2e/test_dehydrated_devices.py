"""Dehydrated devices (MSC3814) on a real zhome: upload with keys, the
device visible to /keys/query and /keys/claim, to-device messages paged by
next_batch and kept until the device is replaced, replacement and deletion
taking the old device's keys with them, and bad uploads changing nothing.

Spec: MSC3814 "Dehydrated devices with SSSS", unstable prefix
org.matrix.msc3814.v1.
"""

from __future__ import annotations

import os
from typing import Any

import signedjson.key
from signedjson.sign import sign_json
from unpaddedbase64 import encode_base64

from tests.e2e.harness import ClientUser, ZhomeProcess, q

UNSTABLE = "/_matrix/client/unstable/org.matrix.msc3814.v1"
PAGE = 100  # zhome's page size for /events


class DehydratedDevice:
    """Keys of a device a client would dehydrate; its ID is its curve25519 key."""

    def __init__(self, user_id: str, device_id: str | None = None) -> None:
        self.user_id = user_id
        self.device_id = device_id or encode_base64(os.urandom(32))
        self.sk = signedjson.key.generate_signing_key(self.device_id)
        self.ed25519 = encode_base64(signedjson.key.get_verify_key(self.sk).encode())

    def device_keys(self) -> dict[str, Any]:
        d = self.device_id
        return sign_json({"user_id": self.user_id, "device_id": d, "dehydrated": True,
                          "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
                          "keys": {f"ed25519:{d}": self.ed25519, f"curve25519:{d}": d}}, self.user_id, self.sk)

    def signed(self, key: str, **extra: Any) -> dict[str, Any]:
        return sign_json({"key": key, **extra}, self.user_id, self.sk)

    def body(self, **over: Any) -> dict[str, Any]:
        out = {"device_id": self.device_id,
               "device_data": {"algorithm": "org.matrix.msc3814.v1.olm", "device_pickle": "pickle-" + self.device_id},
               "initial_device_display_name": "Dehydrated",
               "device_keys": self.device_keys(),
               "one_time_keys": {"signed_curve25519:AAAA": self.signed("otk1")},
               "fallback_keys": {"signed_curve25519:AAAB": self.signed("fb1", fallback=True)}}
        out.update(over)
        return out


def _req(u: ClientUser, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    return u.hs.request(method, UNSTABLE + path, body, token=u.token)


def _ok(u: ClientUser, method: str, path: str, body: Any = None) -> Any:
    status, out = _req(u, method, path, body)
    assert status == 200, (method, path, status, out)
    return out


def _query(u: ClientUser, user_id: str) -> dict[str, Any]:
    out: dict[str, Any] = u.ok("POST", "/keys/query", {"device_keys": {user_id: []}})["device_keys"].get(user_id, {})
    return out


def _send(u: ClientUser, to: str, device_id: str, n: int, tag: str) -> None:
    for i in range(n):
        u.ok("PUT", f"/sendToDevice/m.room.encrypted/{tag}-{i}",
             {"messages": {to: {device_id: {"algorithm": "m.olm.v1.curve25519-aes-sha2", "i": i, "tag": tag}}}})


def test_versions_advertise_msc3814(zhome: ZhomeProcess) -> None:
    status, body = zhome.request("GET", "/_matrix/client/versions")
    assert status == 200 and body["unstable_features"].get("org.matrix.msc3814") is True


def test_dehydrate_claim_send_page_replace_delete(zhome: ZhomeProcess) -> None:
    alice, bob = ClientUser(zhome, "alice"), ClientUser(zhome, "bob")
    for method in ("GET", "DELETE"):
        status, resp = _req(alice, method, "/dehydrated_device")
        assert (status, resp["errcode"]) == (404, "M_NOT_FOUND"), resp

    # Device IDs are curve25519 keys in base64: "/" and "+" must survive paths.
    first = DehydratedDevice(alice.user_id, "A/b+" + encode_base64(os.urandom(30)))
    assert _ok(alice, "PUT", "/dehydrated_device", first.body()) == {"device_id": first.device_id}
    assert _ok(alice, "GET", "/dehydrated_device") == {"device_id": first.device_id,
                                                        "device_data": first.body()["device_data"]}
    # Others see it as one of alice's devices and can start an olm session with it.
    assert _query(bob, alice.user_id)[first.device_id]["keys"] == first.device_keys()["keys"]
    claim = {"one_time_keys": {alice.user_id: {first.device_id: "signed_curve25519"}}}
    got = bob.ok("POST", "/keys/claim", claim)["one_time_keys"][alice.user_id][first.device_id]
    assert got == {"signed_curve25519:AAAA": first.signed("otk1")}
    got = bob.ok("POST", "/keys/claim", claim)["one_time_keys"][alice.user_id][first.device_id]
    assert list(got) == ["signed_curve25519:AAAB"]  # then the fallback key
    assert first.device_id in {d["device_id"] for d in alice.ok("GET", "/devices")["devices"]}

    # Messages to it, more than one page.
    _send(bob, alice.user_id, first.device_id, PAGE + 5, "t")
    events = f"/dehydrated_device/{q(first.device_id)}/events"
    page1 = _ok(alice, "POST", events, {})
    assert [e["content"]["i"] for e in page1["events"]] == list(range(PAGE))
    assert all(e["sender"] == bob.user_id and e["type"] == "m.room.encrypted" for e in page1["events"])
    page2 = _ok(alice, "POST", events, {"next_batch": page1["next_batch"]})
    assert [e["content"]["i"] for e in page2["events"]] == list(range(PAGE, PAGE + 5))
    page3 = _ok(alice, "POST", events, {"next_batch": page2["next_batch"]})
    assert page3["events"] == [] and isinstance(page3["next_batch"], str)
    assert _ok(alice, "POST", events, {"next_batch": page3["next_batch"]})["events"] == []
    # Paging deletes nothing: a rehydration that stopped half-way starts again.
    again = _ok(alice, "POST", events)
    assert again["events"] == page1["events"]
    # A message sent after the last page is found from that page's token.
    _send(bob, alice.user_id, first.device_id, 1, "late")
    late = _ok(alice, "POST", events, {"next_batch": page3["next_batch"]})
    assert [e["content"]["tag"] for e in late["events"]] == ["late"]

    # Only the dehydrated device's messages, and only the owner's.
    alice_device = alice.ok("GET", "/account/whoami")["device_id"]
    for who, dev in ((alice, alice_device), (alice, "NOPE"), (bob, first.device_id)):
        status, resp = _req(who, "POST", f"/dehydrated_device/{q(dev)}/events", {})
        assert (status, resp["errcode"]) == (403, "M_FORBIDDEN"), resp
    for bad, errcode in (({"next_batch": "x1"}, "M_INVALID_PARAM"), ({"next_batch": 5}, "M_BAD_JSON")):
        status, resp = _req(alice, "POST", events, bad)
        assert (status, resp["errcode"]) == (400, errcode), resp

    # The dehydrated device survives a restart.
    zhome.restart()
    assert _ok(alice, "GET", "/dehydrated_device")["device_id"] == first.device_id

    # Replacing it removes the old device, its keys and its messages.
    second = DehydratedDevice(alice.user_id)
    assert _ok(alice, "PUT", "/dehydrated_device", second.body())["device_id"] == second.device_id
    assert _ok(alice, "GET", "/dehydrated_device")["device_id"] == second.device_id
    keys = _query(bob, alice.user_id)
    assert first.device_id not in keys and second.device_id in keys
    assert first.device_id not in {d["device_id"] for d in alice.ok("GET", "/devices")["devices"]}
    status, resp = _req(alice, "POST", events, {})
    assert (status, resp["errcode"]) == (403, "M_FORBIDDEN")
    assert _ok(alice, "POST", f"/dehydrated_device/{q(second.device_id)}/events")["events"] == []
    # Re-uploading the same device ID replaces it too (a fresh inbox).
    _send(bob, alice.user_id, second.device_id, 2, "s")
    assert _ok(alice, "PUT", "/dehydrated_device", second.body())["device_id"] == second.device_id
    assert _ok(alice, "POST", f"/dehydrated_device/{q(second.device_id)}/events")["events"] == []

    # Delete.
    assert _ok(alice, "DELETE", "/dehydrated_device") == {"device_id": second.device_id}
    assert _req(alice, "GET", "/dehydrated_device")[0] == 404
    assert second.device_id not in _query(bob, alice.user_id)
    assert _req(alice, "POST", f"/dehydrated_device/{q(second.device_id)}/events", {})[0] == 403


def test_bad_dehydrated_devices_change_nothing(zhome: ZhomeProcess) -> None:
    alice, bob = ClientUser(zhome, "alice"), ClientUser(zhome, "bob")
    kept = DehydratedDevice(alice.user_id)
    _ok(alice, "PUT", "/dehydrated_device", kept.body())
    new = DehydratedDevice(alice.user_id)
    alice_device = alice.ok("GET", "/account/whoami")["device_id"]
    other = DehydratedDevice(alice.user_id)
    no_sig = {k: v for k, v in new.device_keys().items() if k != "signatures"}
    forged = {**new.device_keys(), "signatures": other.device_keys()["signatures"]}
    cases: list[tuple[dict[str, Any], str]] = [
        ({k: v for k, v in new.body().items() if k != "device_id"}, "M_BAD_JSON"),
        (new.body(device_id=""), "M_BAD_JSON"),
        (new.body(device_id=7), "M_BAD_JSON"),
        ({k: v for k, v in new.body().items() if k != "device_data"}, "M_BAD_JSON"),
        (new.body(device_data="opaque"), "M_BAD_JSON"),
        (new.body(initial_device_display_name=5), "M_BAD_JSON"),
        ({k: v for k, v in new.body().items() if k != "device_keys"}, "M_BAD_JSON"),
        (new.body(device_keys=no_sig), "M_BAD_JSON"),
        (new.body(device_keys=forged), "M_INVALID_SIGNATURE"),
        (new.body(device_keys=other.device_keys()), "M_BAD_JSON"),  # keys of another device ID
        (new.body(one_time_keys={"signed_curve25519:X": other.signed("k")}), "M_INVALID_SIGNATURE"),
        (new.body(fallback_keys="nope"), "M_BAD_JSON"),
    ]
    for body, errcode in cases:
        status, resp = _req(alice, "PUT", "/dehydrated_device", body)
        assert (status, resp.get("errcode")) == (400, errcode), (body, resp)
    # A device ID of one of the user's own devices is refused, and that
    # device keeps its tokens.
    mine = DehydratedDevice(alice.user_id, alice_device)
    status, resp = _req(alice, "PUT", "/dehydrated_device", mine.body())
    assert (status, resp["errcode"]) == (400, "M_INVALID_PARAM"), resp
    assert alice.ok("GET", "/account/whoami")["device_id"] == alice_device

    assert _ok(alice, "GET", "/dehydrated_device")["device_id"] == kept.device_id
    keys = _query(bob, alice.user_id)
    assert kept.device_id in keys and new.device_id not in keys
    devices = {d["device_id"] for d in alice.ok("GET", "/devices")["devices"]}
    assert devices == {alice_device, kept.device_id}
    status, resp = alice.hs.request("PUT", UNSTABLE + "/dehydrated_device", raw=b"{nope", token=alice.token)
    assert (status, resp["errcode"]) == (400, "M_NOT_JSON")
    status, resp = alice.hs.request("GET", UNSTABLE + "/dehydrated_device")
    assert (status, resp["errcode"]) == (401, "M_MISSING_TOKEN")


def test_concurrent_replacements_leave_one_device(zhome: ZhomeProcess) -> None:
    import concurrent.futures

    alice, bob = ClientUser(zhome, "alice"), ClientUser(zhome, "bob")
    alice_device = alice.ok("GET", "/account/whoami")["device_id"]
    candidates = [DehydratedDevice(alice.user_id) for _ in range(4)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda d: _req(alice, "PUT", "/dehydrated_device", d.body()), candidates))
    assert all(status == 200 for status, _ in results), results
    marked = _ok(alice, "GET", "/dehydrated_device")["device_id"]
    assert marked in {d.device_id for d in candidates}
    assert {d["device_id"] for d in alice.ok("GET", "/devices")["devices"]} == {alice_device, marked}
    assert set(_query(bob, alice.user_id)) == {marked}
