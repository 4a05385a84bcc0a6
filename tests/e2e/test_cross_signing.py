"""Cross-signing over HTTP against a real zhome, with real ed25519
signatures made as a client makes them: key upload (with and without
user-interactive auth), bad keys, signature upload and its failures, what
/keys/query shows to whom, device_lists in /sync and /keys/changes, and the
same across two federating servers.

Spec: client-server-api "Cross-signing" (POST /keys/device_signing/upload,
/keys/signatures/upload, /keys/query); server-server-api "End-to-End
Encryption" (m.signing_key_update, /user/keys/query) and "Device
Management" (GET /user/devices/{userId}, m.device_list_update).
"""

from __future__ import annotations

import copy
import time
from typing import Any, Callable, Optional

import nacl.signing
import signedjson.key
from signedjson.sign import sign_json as _sign_json
from unpaddedbase64 import encode_base64

from tests.e2e.conftest import ZhomeServers
from tests.e2e.harness import ClientUser, ZhomeProcess, q
from tests.e2e.test_federation_hostile import FED, World, world  # noqa: F401 - the fake remote server fixture

PASSWORD = "correct horse battery"  # ClientUser's
WAIT_S = 30.0


def sign_json(obj: dict[str, Any], user_id: str, sk: Any) -> dict[str, Any]:
    """A signed copy (signedjson adds to the object's own signatures)."""
    return _sign_json(copy.deepcopy(obj), user_id, sk)


class Key:
    """A cross-signing key pair; its key ID is ``ed25519:<public key>``."""

    def __init__(self) -> None:
        self.sk = nacl.signing.SigningKey.generate()
        self.pub = encode_base64(bytes(self.sk.verify_key))
        # signedjson signs with ``alg`` and ``version`` of the key.
        self.sk.alg = "ed25519"  # type: ignore[attr-defined]
        self.sk.version = self.pub  # type: ignore[attr-defined]

    def public(self, user_id: str, usage: str, signed_by: Optional["Key"] = None) -> dict[str, Any]:
        body: dict[str, Any] = {"user_id": user_id, "usage": [usage], "keys": {f"ed25519:{self.pub}": self.pub}}
        if signed_by is not None:
            body = sign_json(body, user_id, signed_by.sk)
        return body


class Device:
    def __init__(self, u: ClientUser) -> None:
        self.user = u
        self.device_id: str = u.ok("GET", "/account/whoami")["device_id"]
        self.sk = signedjson.key.generate_signing_key(self.device_id)
        self.ed25519 = encode_base64(signedjson.key.get_verify_key(self.sk).encode())
        self.keys = sign_json({"user_id": u.user_id, "device_id": self.device_id,
                               "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
                               "keys": {f"ed25519:{self.device_id}": self.ed25519,
                                        f"curve25519:{self.device_id}": "c" * 43}}, u.user_id, self.sk)
        u.ok("POST", "/keys/upload", {"device_keys": self.keys})


class Person:
    """A user with one device and a full set of cross-signing keys."""

    def __init__(self, hs: ZhomeProcess, name: str, upload: bool = True) -> None:
        self.u = ClientUser(hs, name)
        self.user_id = self.u.user_id
        self.device = Device(self.u)
        self.master, self.ssk, self.usk = Key(), Key(), Key()
        if upload:
            assert self.u.ok("POST", "/keys/device_signing/upload", self.upload_body()) == {}

    def upload_body(self) -> dict[str, Any]:
        return {"master_key": self.master.public(self.user_id, "master"),
                "self_signing_key": self.ssk.public(self.user_id, "self_signing", self.master),
                "user_signing_key": self.usk.public(self.user_id, "user_signing", self.master)}

    def query(self, *users: str) -> dict[str, Any]:
        return self.u.ok("POST", "/keys/query", {"device_keys": {u: [] for u in users}})


def _unsigned(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in ("signatures", "unsigned")}


def _sync(u: ClientUser, since: Optional[str] = None) -> dict[str, Any]:
    return u.ok("GET", "/sync?timeout=0" + (f"&since={q(since)}" if since else ""))


def _wait(pred: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {WAIT_S}s")
        time.sleep(0.2)


# -- POST /keys/device_signing/upload ----------------------------------------------------------
def test_first_upload_needs_no_auth_a_replacement_needs_the_password(zhome: ZhomeProcess) -> None:
    alice = Person(zhome, "alice")  # first upload: no UIA
    out = alice.query(alice.user_id)
    assert out["master_keys"][alice.user_id] == alice.master.public(alice.user_id, "master")
    assert _unsigned(out["self_signing_keys"][alice.user_id]) == alice.ssk.public(alice.user_id, "self_signing")
    assert out["user_signing_keys"][alice.user_id]["keys"] == {f"ed25519:{alice.usk.pub}": alice.usk.pub}

    # A retry of exactly what is stored needs no UIA.
    assert alice.u.ok("POST", "/keys/device_signing/upload", alice.upload_body()) == {}
    assert alice.u.ok("POST", "/keys/device_signing/upload",
                      {"self_signing_key": alice.upload_body()["self_signing_key"]}) == {}

    # A new master key needs the password.
    new_master, new_ssk = Key(), Key()
    body = {"master_key": new_master.public(alice.user_id, "master"),
            "self_signing_key": new_ssk.public(alice.user_id, "self_signing", new_master)}
    status, resp = alice.u.req("POST", "/keys/device_signing/upload", body)
    assert status == 401 and resp["flows"] == [{"stages": ["m.login.password"]}], resp
    session = resp["session"]
    ident = {"type": "m.id.user", "user": alice.user_id}
    status, resp = alice.u.req("POST", "/keys/device_signing/upload", {
        **body, "auth": {"type": "m.login.password", "identifier": ident, "password": "wrong", "session": session}})
    assert status == 401 and resp["errcode"] == "M_FORBIDDEN"
    assert alice.query(alice.user_id)["master_keys"][alice.user_id]["keys"] == {
        f"ed25519:{alice.master.pub}": alice.master.pub}
    # A new self-signing key alone (signed by the stored master) needs it too.
    status, resp = alice.u.req("POST", "/keys/device_signing/upload",
                               {"self_signing_key": Key().public(alice.user_id, "self_signing", alice.master)})
    assert status == 401 and "flows" in resp

    alice.u.ok("POST", "/keys/device_signing/upload", {
        **body, "auth": {"type": "m.login.password", "identifier": ident, "password": PASSWORD, "session": session}})
    out = alice.query(alice.user_id)
    assert out["master_keys"][alice.user_id]["keys"] == {f"ed25519:{new_master.pub}": new_master.pub}
    assert out["self_signing_keys"][alice.user_id]["keys"] == {f"ed25519:{new_ssk.pub}": new_ssk.pub}
    # The user-signing key was signed by the old master key: it is gone.
    assert alice.user_id not in out["user_signing_keys"]


def test_bad_keys_are_refused_and_nothing_is_stored(zhome: ZhomeProcess) -> None:
    alice = Person(zhome, "alice", upload=False)
    bob = ClientUser(zhome, "bob")
    me, m, s = alice.user_id, alice.master, alice.ssk

    def refused(body: dict[str, Any], status: int, errcode: str) -> None:
        got, resp = alice.u.req("POST", "/keys/device_signing/upload", body)
        assert (got, resp.get("errcode")) == (status, errcode), (body, got, resp)

    refused({"master_key": m.public(bob.user_id, "master")}, 400, "M_INVALID_PARAM")
    refused({"master_key": m.public(me, "self_signing")}, 400, "M_INVALID_PARAM")
    two = m.public(me, "master")
    two["keys"][f"ed25519:{s.pub}"] = s.pub
    refused({"master_key": two}, 400, "M_INVALID_PARAM")
    refused({"master_key": {**m.public(me, "master"), "keys": {f"curve25519:{m.pub}": m.pub}}}, 400,
            "M_INVALID_PARAM")
    refused({"master_key": {**m.public(me, "master"), "keys": {f"ed25519:{m.pub}": s.pub}}}, 400,
            "M_INVALID_PARAM")
    refused({"master_key": "nope"}, 400, "M_BAD_JSON")
    # Self-signing key unsigned, signed by another key, or with a forged
    # signature: the master key of the same upload is not stored either.
    refused({"master_key": m.public(me, "master"), "self_signing_key": s.public(me, "self_signing")},
            400, "M_INVALID_SIGNATURE")
    refused({"master_key": m.public(me, "master"), "self_signing_key": s.public(me, "self_signing", Key())},
            400, "M_INVALID_SIGNATURE")
    forged = s.public(me, "self_signing", Key())
    forged["signatures"] = {me: {f"ed25519:{m.pub}": list(forged["signatures"][me].values())[0]}}
    refused({"master_key": m.public(me, "master"), "self_signing_key": forged}, 400, "M_INVALID_SIGNATURE")
    refused({"master_key": m.public(me, "master"), "user_signing_key": alice.usk.public(me, "user_signing", s)},
            400, "M_INVALID_SIGNATURE")
    # Wrong usage for the field.
    refused({"master_key": m.public(me, "master"), "self_signing_key": s.public(me, "user_signing", m)},
            400, "M_INVALID_PARAM")
    # No master key to sign with.
    refused({"self_signing_key": s.public(me, "self_signing", m)}, 400, "M_MISSING_PARAM")
    out = alice.query(me)
    assert out["master_keys"] == {} and out["self_signing_keys"] == {} and out["user_signing_keys"] == {}

    # A key whose public part is one of the user's device IDs.
    clash = ClientUser(zhome, "clash")
    k = Key()
    status, login = zhome.request("POST", "/_matrix/client/v3/login", {
        "type": "m.login.password", "identifier": {"type": "m.id.user", "user": "clash"},
        "password": PASSWORD, "device_id": k.pub})
    assert status == 200, login
    got, resp = clash.req("POST", "/keys/device_signing/upload", {"master_key": k.public(clash.user_id, "master")})
    assert got == 403 and resp["errcode"] == "M_FORBIDDEN"
    assert clash.ok("POST", "/keys/query", {"device_keys": {clash.user_id: []}})["master_keys"] == {}

    # And the good upload still works afterwards.
    assert alice.u.ok("POST", "/keys/device_signing/upload", alice.upload_body()) == {}
    assert alice.query(me)["master_keys"][me]["keys"] == {f"ed25519:{m.pub}": m.pub}


# -- POST /keys/signatures/upload and who sees what ----------------------------------------------
def test_signatures_upload_and_what_each_user_sees(zhome: ZhomeProcess) -> None:
    alice, bob, carol = Person(zhome, "alice"), Person(zhome, "bob"), Person(zhome, "carol")
    a = alice.user_id
    dev = alice.device
    ssk_id, usk_id = f"ed25519:{alice.ssk.pub}", f"ed25519:{alice.usk.pub}"

    # Alice's self-signing key signs her device, her device signs her master
    # key, her user-signing key signs bob's master key; one bad signature in
    # the same request fails alone.
    signed_dev = sign_json(dict(dev.keys), a, alice.ssk.sk)
    signed_master = sign_json(alice.master.public(a, "master"), a, dev.sk)
    bob_master = bob.query(bob.user_id)["master_keys"][bob.user_id]
    signed_bob = sign_json(dict(bob_master), a, alice.usk.sk)
    bad_carol = sign_json(carol.master.public(carol.user_id, "master"), a, Key().sk)
    bad_carol["signatures"][a] = {usk_id: list(bad_carol["signatures"][a].values())[0]}
    out = alice.u.ok("POST", "/keys/signatures/upload", {
        a: {dev.device_id: signed_dev, alice.master.pub: signed_master},
        bob.user_id: {bob.master.pub: signed_bob},
        carol.user_id: {carol.master.pub: bad_carol}})
    assert list(out["failures"]) == [carol.user_id], out
    assert out["failures"][carol.user_id][carol.master.pub]["errcode"] == "M_INVALID_SIGNATURE"

    # Everyone sees the signature of alice's device and of her master key.
    for viewer in (alice, bob):
        got = viewer.query(a)
        sigs = got["device_keys"][a][dev.device_id]["signatures"][a]
        assert sigs[ssk_id] == signed_dev["signatures"][a][ssk_id]
        assert f"ed25519:{dev.device_id}" in sigs
        assert f"ed25519:{dev.device_id}" in got["master_keys"][a]["signatures"][a]
        # The user-signing key is its owner's alone.
        assert (a in got["user_signing_keys"]) == (viewer is alice)
    # Alice's signature of bob's key: alice sees it, bob and carol do not.
    assert usk_id in alice.query(bob.user_id)["master_keys"][bob.user_id]["signatures"][a]
    assert a not in bob.query(bob.user_id)["master_keys"][bob.user_id].get("signatures", {})
    assert a not in carol.query(bob.user_id)["master_keys"][bob.user_id].get("signatures", {})
    # Nothing was stored for carol's bad one.
    assert a not in alice.query(carol.user_id)["master_keys"][carol.user_id].get("signatures", {})

    # Failures, each answered per key, nothing stored for them.
    tampered = sign_json({**dev.keys, "algorithms": ["m.megolm.v1.aes-sha2"]}, a, alice.ssk.sk)
    by_device = sign_json(dict(dev.keys), a, dev.sk)  # a device does not cross-sign itself
    by_other = sign_json(dict(dev.keys), a, bob.ssk.sk)
    out = alice.u.ok("POST", "/keys/signatures/upload", {
        a: {dev.device_id: tampered, "NOSUCHDEVICE": signed_dev}})
    assert out["failures"][a][dev.device_id]["errcode"] == "M_INVALID_SIGNATURE"
    assert out["failures"][a]["NOSUCHDEVICE"]["errcode"] == "M_NOT_FOUND"
    out = alice.u.ok("POST", "/keys/signatures/upload", {a: {dev.device_id: by_device}})
    assert out["failures"][a][dev.device_id]["errcode"] == "M_INVALID_SIGNATURE"
    bob_signed_by_bob_key = sign_json(dict(bob_master), a, bob.usk.sk)
    out = bob.u.ok("POST", "/keys/signatures/upload", {a: {dev.device_id: by_other}})
    assert out["failures"][a][dev.device_id]["errcode"] == "M_NOT_FOUND"
    out = alice.u.ok("POST", "/keys/signatures/upload", {bob.user_id: {bob.master.pub: bob_signed_by_bob_key}})
    assert out["failures"][bob.user_id][bob.master.pub]["errcode"] == "M_INVALID_SIGNATURE"
    status, resp = alice.u.req("POST", "/keys/signatures/upload", {a: "nope"})
    assert status == 400 and resp["errcode"] == "M_BAD_JSON"
    got = bob.query(a)["device_keys"][a][dev.device_id]
    assert got["algorithms"] == dev.keys["algorithms"]
    assert set(got["signatures"][a]) == {ssk_id, f"ed25519:{dev.device_id}"}

    # A user without a user-signing key cannot sign others.
    dave = Person(zhome, "dave", upload=False)
    dave.u.ok("POST", "/keys/device_signing/upload", {"master_key": dave.master.public(dave.user_id, "master")})
    out = dave.u.ok("POST", "/keys/signatures/upload",
                    {bob.user_id: {bob.master.pub: sign_json(dict(bob_master), dave.user_id, dave.usk.sk)}})
    assert out["failures"][bob.user_id][bob.master.pub]["errcode"] == "M_INVALID_SIGNATURE"

    # A new self-signing key takes the old one's signatures with it.
    ident = {"type": "m.id.user", "user": a}
    alice.u.ok("POST", "/keys/device_signing/upload", {
        "self_signing_key": Key().public(a, "self_signing", alice.master),
        "auth": {"type": "m.login.password", "identifier": ident, "password": PASSWORD}})
    assert ssk_id not in bob.query(a)["device_keys"][a][dev.device_id]["signatures"][a]


def test_device_lists_report_cross_signing_changes(zhome: ZhomeProcess) -> None:
    alice = Person(zhome, "alice", upload=False)
    bob, carol = ClientUser(zhome, "bob"), ClientUser(zhome, "carol")
    room = alice.u.ok("POST", "/createRoom", {"preset": "public_chat"})["room_id"]
    bob.ok("POST", f"/join/{q(room)}", {})
    t0 = _sync(bob)["next_batch"]
    c0 = _sync(carol)["next_batch"]
    alice.u.ok("POST", "/keys/device_signing/upload", alice.upload_body())
    t1 = _sync(bob, t0)
    assert t1["device_lists"]["changed"] == [alice.user_id], t1["device_lists"]
    changes = bob.ok("GET", f"/keys/changes?from={q(t0)}&to={q(t1['next_batch'])}")
    assert changes["changed"] == [alice.user_id]
    # Carol shares no room with alice.
    assert alice.user_id not in _sync(carol, c0)["device_lists"]["changed"]
    # Signing her device changes that device's keys.
    out = alice.u.ok("POST", "/keys/signatures/upload", {
        alice.user_id: {alice.device.device_id: sign_json(dict(alice.device.keys), alice.user_id, alice.ssk.sk)}})
    assert out["failures"] == {}
    t2 = _sync(bob, t1["next_batch"])
    assert t2["device_lists"]["changed"] == [alice.user_id]
    # Nothing new: nothing reported.
    assert _sync(bob, t2["next_batch"])["device_lists"]["changed"] == []

    # A new user-signing key concerns alice alone.
    b0, a0 = _sync(bob)["next_batch"], _sync(alice.u)["next_batch"]
    usk = Key()
    alice.u.ok("POST", "/keys/device_signing/upload", {
        "user_signing_key": usk.public(alice.user_id, "user_signing", alice.master),
        "auth": {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": alice.user_id},
                 "password": PASSWORD}})
    a1 = _sync(alice.u, a0)
    assert a1["device_lists"]["changed"] == [alice.user_id]
    assert _sync(bob, b0)["device_lists"]["changed"] == []
    # Her signature of bob's master key: alice is told bob changed, bob is not.
    bob_master = Key()
    bob.ok("POST", "/keys/device_signing/upload", {"master_key": bob_master.public(bob.user_id, "master")})
    b1 = _sync(bob)["next_batch"]
    a1 = _sync(alice.u)["next_batch"]
    out = alice.u.ok("POST", "/keys/signatures/upload", {bob.user_id: {
        bob_master.pub: sign_json(bob_master.public(bob.user_id, "master"), alice.user_id, usk.sk)}})
    assert out["failures"] == {}
    assert _sync(alice.u, a1)["device_lists"]["changed"] == [bob.user_id]
    assert _sync(bob, b1)["device_lists"]["changed"] == []
    # The keys survive a restart (they are in the database).
    zhome.restart()
    assert alice.query(alice.user_id)["master_keys"][alice.user_id]["keys"] == {
        f"ed25519:{alice.master.pub}": alice.master.pub}


# -- across two servers -------------------------------------------------------------------------
def test_cross_signing_over_federation(zhome_pair: ZhomeServers) -> None:
    a_hs, b_hs = zhome_pair.a, zhome_pair.b
    alice = Person(a_hs, "alice_xs", upload=False)
    bob = Person(b_hs, "bob_xs")
    a = alice.user_id
    room = alice.u.ok("POST", "/createRoom", {"preset": "public_chat"})["room_id"]
    bob.u.ok("POST", f"/join/{q(room)}?via={q(a_hs.server_name)}", {})
    _wait(lambda: bob.user_id in alice.u.ok("GET", f"/rooms/{q(room)}/joined_members")["joined"], "bob's join on A")
    # B has alice's device list cached before she uploads cross-signing keys.
    assert alice.device.device_id in bob.query(a)["device_keys"][a]
    since = _sync(bob.u)["next_batch"]

    alice.u.ok("POST", "/keys/device_signing/upload", alice.upload_body())

    # The m.signing_key_update reaches B: bob's sync names alice, his query
    # shows her keys from B's cache.
    def changed() -> bool:
        nonlocal since
        got = _sync(bob.u, since)
        since = got["next_batch"]
        return a in got["device_lists"]["changed"]

    _wait(changed, "alice in bob's device_lists.changed")
    out = bob.query(a)
    assert out["master_keys"][a]["keys"] == {f"ed25519:{alice.master.pub}": alice.master.pub}
    assert out["self_signing_keys"][a]["keys"] == {f"ed25519:{alice.ssk.pub}": alice.ssk.pub}
    assert a not in out["user_signing_keys"]
    # Alice signs her device: an m.device_list_update carries the signature.
    ssk_id = f"ed25519:{alice.ssk.pub}"
    alice.u.ok("POST", "/keys/signatures/upload",
               {a: {alice.device.device_id: sign_json(dict(alice.device.keys), a, alice.ssk.sk)}})
    _wait(lambda: ssk_id in bob.query(a)["device_keys"][a][alice.device.device_id]["signatures"][a],
          "alice's device signature on B")

    # Bob's user-signing key signs alice's (remote) master key; only he sees it.
    master = bob.query(a)["master_keys"][a]
    out = bob.u.ok("POST", "/keys/signatures/upload", {a: {alice.master.pub: sign_json(dict(master), bob.user_id,
                                                                                        bob.usk.sk)}})
    assert out["failures"] == {}, out
    assert f"ed25519:{bob.usk.pub}" in bob.query(a)["master_keys"][a]["signatures"][bob.user_id]
    assert bob.user_id not in alice.query(a)["master_keys"][a].get("signatures", {})

    # Alice replaces her master key: B learns the new one.
    new_master, new_ssk = Key(), Key()
    ident = {"type": "m.id.user", "user": a}
    alice.u.ok("POST", "/keys/device_signing/upload", {
        "master_key": new_master.public(a, "master"),
        "self_signing_key": new_ssk.public(a, "self_signing", new_master),
        "auth": {"type": "m.login.password", "identifier": ident, "password": PASSWORD}})
    _wait(lambda: bob.query(a)["master_keys"][a]["keys"] == {f"ed25519:{new_master.pub}": new_master.pub},
          "alice's new master key on B")
    assert bob.query(a)["self_signing_keys"][a]["keys"] == {f"ed25519:{new_ssk.pub}": new_ssk.pub}
    # Bob's signature was of the old key.
    assert bob.user_id not in bob.query(a)["master_keys"][a].get("signatures", {})

    # Users B shares no room with are asked of A (/user/keys/query).
    dave = Person(a_hs, "dave_xs")
    out = bob.query(dave.user_id)
    assert dave.device.device_id in out["device_keys"][dave.user_id]
    assert out["master_keys"][dave.user_id]["keys"] == {f"ed25519:{dave.master.pub}": dave.master.pub}
    assert out["self_signing_keys"][dave.user_id]["keys"] == {f"ed25519:{dave.ssk.pub}": dave.ssk.pub}
    assert dave.user_id not in out["user_signing_keys"]
    # And GET /user/devices (a resync) carries the keys too: once bob shares
    # a room with dave, B caches dave's list with them.
    room2 = dave.u.ok("POST", "/createRoom", {"preset": "public_chat"})["room_id"]
    bob.u.ok("POST", f"/join/{q(room2)}?via={q(a_hs.server_name)}", {})
    _wait(lambda: bob.user_id in dave.u.ok("GET", f"/rooms/{q(room2)}/joined_members")["joined"], "bob's join")
    out = bob.query(dave.user_id)
    assert out["master_keys"][dave.user_id]["keys"] == {f"ed25519:{dave.master.pub}": dave.master.pub}


# -- the answers' shapes ---------------------------------------------------------------------------
def test_answers_match_the_spec_schemas(zhome: ZhomeProcess) -> None:
    from tests.e2e.openapi import Spec
    from tests.e2e.test_schemas import Checker

    c = Checker(Spec(), zhome)
    alice, bob = Person(zhome, "alice", upload=False), Person(zhome, "bob")
    a, tok = alice.user_id, alice.u.token
    assert c.call("/keys/device_signing/upload", "post", "/keys/device_signing/upload", alice.upload_body(),
                  token=tok) == {}
    bad = {"self_signing_key": Key().public(a, "self_signing", Key())}
    code_body = zhome.request("POST", "/_matrix/client/v3/keys/device_signing/upload", bad, token=tok)
    c.error(code_body, 400, "M_INVALID_SIGNATURE")
    c.validate("/keys/device_signing/upload", "post", 400, code_body[1])
    out = c.call("/keys/signatures/upload", "post", "/keys/signatures/upload", {
        a: {alice.device.device_id: sign_json(alice.device.keys, a, alice.ssk.sk), "NOPE": {"user_id": a}},
        bob.user_id: {bob.master.pub: sign_json(bob.master.public(bob.user_id, "master"), a, alice.usk.sk)}},
        token=tok)
    assert list(out["failures"]) == [a] and list(out["failures"][a]) == ["NOPE"]
    got = c.call("/keys/query", "post", "/keys/query", {"device_keys": {a: [], bob.user_id: []}}, token=tok)
    assert set(got["master_keys"]) == {a, bob.user_id} and set(got["user_signing_keys"]) == {a}


# -- m.signing_key_update from a server that breaks the rules -----------------------------------
def test_signing_key_updates_from_a_remote_server(world: World) -> None:
    e, mallory = world.e, world.mallory
    m1, s1 = Key(), Key()
    devices = {"user_id": mallory, "stream_id": 1,
               "devices": [{"device_id": "MD", "keys": {"user_id": mallory, "device_id": "MD",
                                                        "algorithms": [], "keys": {"ed25519:MD": Key().pub}}}],
               "master_key": m1.public(mallory, "master"),
               "self_signing_key": s1.public(mallory, "self_signing", m1)}
    e.handlers.append(("GET", f"{FED}/v1/user/devices/{mallory}", lambda path, body: (200, devices)))

    def query() -> dict[str, Any]:
        status, out = world.client("POST", "/keys/query", {"device_keys": {mallory: []}})
        assert status == 200, (status, out)
        return out

    # A resync (GET /user/devices) brings the keys into A's cache.
    out = query()
    assert "MD" in out["device_keys"][mallory]
    assert out["master_keys"][mallory]["keys"] == {f"ed25519:{m1.pub}": m1.pub}
    assert out["self_signing_keys"][mallory]["keys"] == {f"ed25519:{s1.pub}": s1.pub}
    status, synced = world.client("GET", "/sync?timeout=0")
    since = synced["next_batch"]

    # Junk and forgeries change nothing: another server's user, a key of
    # another user, a self-signing key not signed by the master key.
    m2, s2 = Key(), Key()
    junk: list[dict[str, Any]] = [
        {"edu_type": "m.signing_key_update", "content": {"user_id": world.alice,
                                                         "master_key": m2.public(world.alice, "master")}},
        {"edu_type": "m.signing_key_update", "content": {"user_id": mallory,
                                                         "master_key": m2.public(world.alice, "master")}},
        {"edu_type": "m.signing_key_update", "content": {"user_id": mallory,
                                                         "self_signing_key": s2.public(mallory, "self_signing",
                                                                                       Key())}},
        {"edu_type": "m.signing_key_update", "content": {"user_id": mallory, "master_key": "x"}},
        {"edu_type": "m.signing_key_update", "content": "x"},
    ]
    status, body = world.send_txn([], junk)
    assert status == 200, (status, body)
    out = query()
    assert out["master_keys"][mallory]["keys"] == {f"ed25519:{m1.pub}": m1.pub}
    assert out["self_signing_keys"][mallory]["keys"] == {f"ed25519:{s1.pub}": s1.pub}
    assert world.alice not in out["master_keys"]

    # A good one: the new keys, and mallory in alice's device_lists.changed.
    status, body = world.send_txn([], [{"edu_type": "m.signing_key_update", "content": {
        "user_id": mallory, "master_key": m2.public(mallory, "master"),
        "self_signing_key": s2.public(mallory, "self_signing", m2)}}])
    assert status == 200, (status, body)
    out = query()
    assert out["master_keys"][mallory]["keys"] == {f"ed25519:{m2.pub}": m2.pub}
    assert out["self_signing_keys"][mallory]["keys"] == {f"ed25519:{s2.pub}": s2.pub}
    status, synced = world.client("GET", f"/sync?timeout=0&since={q(since)}")
    assert mallory in synced["device_lists"]["changed"], synced["device_lists"]
    # A new master key alone: the cached self-signing key (signed by the
    # old one) is dropped.
    m3 = Key()
    world.send_txn([], [{"edu_type": "m.signing_key_update",
                         "content": {"user_id": mallory, "master_key": m3.public(mallory, "master")}}])
    out = query()
    assert out["master_keys"][mallory]["keys"] == {f"ed25519:{m3.pub}": m3.pub}
    assert mallory not in out["self_signing_keys"]
    world.assert_serving()
