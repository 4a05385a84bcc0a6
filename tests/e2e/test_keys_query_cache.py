"""/keys/query answers local users' keys from a cache; every change a
client can make shows in the very next query of another user.

Each step first queries (so the answer is cached), then changes one
thing, then queries again: a cache that missed a change would give the
old answer. Spec: client-server-api "End-to-End Encryption" (POST
/keys/query, /keys/upload, /keys/signatures/upload, device management).
"""

from __future__ import annotations

from typing import Any

from tests.e2e.harness import ClientUser, ZhomeProcess
from tests.e2e.test_cross_signing import PASSWORD, Device, Person, sign_json


def _devices(viewer: Person, user_id: str) -> dict[str, Any]:
    out: dict[str, Any] = viewer.query(user_id)["device_keys"].get(user_id, {})
    return out


def _login(hs: ZhomeProcess, user_id: str, device_id: str) -> ClientUser:
    status, resp = hs.request("POST", "/_matrix/client/v3/login", {
        "type": "m.login.password", "identifier": {"type": "m.id.user", "user": user_id},
        "password": PASSWORD, "device_id": device_id, "initial_device_display_name": "second phone"})
    assert status == 200, resp
    u = ClientUser.__new__(ClientUser)
    u.hs, u.user_id, u.token = hs, user_id, resp["access_token"]
    return u


def test_every_change_shows_in_the_next_query(zhome: ZhomeProcess) -> None:
    alice = Person(zhome, "alice", upload=False)
    bob = Person(zhome, "bob")
    a, d1 = alice.user_id, alice.device.device_id

    # Rename: the display name is part of the answer.
    assert set(_devices(bob, a)) == {d1}
    alice.u.ok("PUT", f"/devices/{d1}", {"display_name": "kitchen laptop"})
    assert _devices(bob, a)[d1]["unsigned"] == {"device_display_name": "kitchen laptop"}

    # A second device, with keys uploaded after login.
    phone = _login(zhome, a, "PHONE")
    assert set(_devices(bob, a)) == {d1}  # no keys yet: not listed
    Device(phone)
    got = _devices(bob, a)
    assert set(got) == {d1, "PHONE"} and got["PHONE"]["unsigned"] == {"device_display_name": "second phone"}

    # Cross-signing keys, then the device signed by the self-signing key.
    assert a not in bob.query(a)["master_keys"]
    assert alice.u.ok("POST", "/keys/device_signing/upload", alice.upload_body()) == {}
    assert bob.query(a)["master_keys"][a]["keys"] == {f"ed25519:{alice.master.pub}": alice.master.pub}
    assert f"ed25519:{alice.ssk.pub}" not in _devices(bob, a)[d1]["signatures"][a]
    unsigned_keys = {k: v for k, v in alice.device.keys.items() if k not in ("signatures", "unsigned")}
    signed = sign_json(unsigned_keys, a, alice.ssk.sk)
    assert alice.u.ok("POST", "/keys/signatures/upload", {a: {d1: signed}}) == {"failures": {}}
    assert f"ed25519:{alice.ssk.pub}" in _devices(bob, a)[d1]["signatures"][a]

    # Bob signs Alice's master key with his user-signing key: he sees it,
    # Alice's own answer (cached before) does not change for her.
    assert bob.user_id not in bob.query(a)["master_keys"][a].get("signatures", {})
    assert bob.user_id not in alice.query(a)["master_keys"][a].get("signatures", {})
    master = alice.master.public(a, "master")
    signed_master = sign_json(master, bob.user_id, bob.usk.sk)
    assert bob.u.ok("POST", "/keys/signatures/upload",
                    {a: {alice.master.pub: signed_master}}) == {"failures": {}}
    assert f"ed25519:{bob.usk.pub}" in bob.query(a)["master_keys"][a]["signatures"][bob.user_id]
    assert bob.user_id not in alice.query(a)["master_keys"][a].get("signatures", {})

    # Deleting a device takes its keys out of the answer.
    status, resp = alice.u.req("POST", "/delete_devices", {"devices": ["PHONE"]})
    assert status == 401
    alice.u.ok("POST", "/delete_devices", {"devices": ["PHONE"], "auth": {
        "type": "m.login.password", "identifier": {"type": "m.id.user", "user": a}, "password": PASSWORD,
        "session": resp["session"]}})
    assert set(_devices(bob, a)) == {d1}

    # Deactivation: nothing is left to give out.
    status, resp = alice.u.req("POST", "/account/deactivate", {})
    assert status == 401
    alice.u.ok("POST", "/account/deactivate", {"auth": {
        "type": "m.login.password", "identifier": {"type": "m.id.user", "user": a}, "password": PASSWORD,
        "session": resp["session"]}})
    out = bob.query(a)
    assert out["device_keys"].get(a, {}) == {}
    assert a not in out["master_keys"] and a not in out["self_signing_keys"]
