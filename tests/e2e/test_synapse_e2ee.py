"""End-to-end encryption between zhome and a real Synapse, both directions.

A zhome on 127.0.0.2 (on SQLite and on PostgreSQL) and the pinned Synapse
on 127.0.0.5 federate; matrix-nio with its e2e extra is the client on both
sides. Covered: encrypted rooms created on either side, devices that sign
in later (m.device_list_update EDUs both ways), devices that are removed
(device_lists.changed, the device gone from /keys/query), and to-device
messages sent straight to a remote user (m.direct_to_device EDUs). Besides
what the clients decrypt, the raw answers of both servers are checked.

Spec: client-server-api "End-to-End Encryption" and "Send-to-Device
messaging"; server-server-api "End-to-End Encryption", "Send-to-device
messaging" and "Device Management".
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import signedjson.key
from signedjson.sign import sign_json
from unpaddedbase64 import encode_base64

from tests.e2e.conftest import ZhomeServers
from tests.e2e.harness import ZhomeProcess
from tests.e2e.synapse_peer import SynapsePeer
from tests.e2e.test_e2ee import PASSWORD, Person, _encrypted_room
from tests.e2e.test_synapse_federation import Client, _q, _request, register
from tests.e2e.test_synapse_federation import synapse  # noqa: F401  (the module's Synapse peer)

WAIT_S = 30.0


@pytest.fixture(scope="module", params=["sqlite3", "postgres"])
def zhome_e2ee(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZhomeProcess]:
    """A federating zhome on 127.0.0.2, once per database engine."""
    root = tmp_path_factory.mktemp(f"zhome_e2ee_{request.param}")
    with contextlib.ExitStack() as stack:
        yield ZhomeServers(request.param, root, stack).spawn("127.0.0.2", "z")


def _account(base_url: str, prefix: str) -> str:
    """A new user on ``base_url`` with no device left behind (the clients
    sign in themselves)."""
    c = register(base_url, prefix + uuid.uuid4().hex[:8])
    c.ok("POST", "/_matrix/client/v3/logout", {})
    return c.user_id


def _raw(p: Person, base_url: str) -> Client:
    """Raw HTTP access with a nio client's token, its since token unchanged."""
    c = Client(base_url, p.client.user_id, p.client.access_token)
    c.since = p.client.next_batch
    return c


def _login(base_url: str, user_id: str) -> tuple[Client, str]:
    status, resp = _request(base_url, "POST", "/_matrix/client/v3/login", {
        "type": "m.login.password", "identifier": {"type": "m.id.user", "user": user_id}, "password": PASSWORD})
    assert status == 200, resp
    c = Client(base_url, resp["user_id"], resp["access_token"])
    c.sync(timeout_ms=0)
    return c, str(resp["device_id"])


def _device_keys(viewer: Client, user_id: str) -> dict[str, Any]:
    """``viewer``'s server's /keys/query answer for one user's devices, after
    checking that nothing failed and every device is about that user."""
    resp = viewer.ok("POST", "/_matrix/client/v3/keys/query", {"device_keys": {user_id: []}, "timeout": 10000})
    assert resp.get("failures") == {}, resp
    devices = resp["device_keys"].get(user_id, {})
    for device_id, keys in devices.items():
        assert keys["user_id"] == user_id and keys["device_id"] == device_id, keys
        assert f"ed25519:{device_id}" in keys["keys"] and f"curve25519:{device_id}" in keys["keys"], keys
        assert f"ed25519:{device_id}" in keys["signatures"][user_id], keys
    return dict(devices)


def _wait_devices(viewer: Client, user_id: str, want: set[str], what: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    got: dict[str, Any] = {}
    while time.monotonic() < deadline:
        got = _device_keys(viewer, user_id)
        if set(got) == want:
            return got
        time.sleep(0.3)
    raise AssertionError(f"{what}: /keys/query for {user_id} gave {sorted(got)}, wanted {sorted(want)}")


def _claim(viewer: Client, user_id: str, device_id: str) -> None:
    resp = viewer.ok("POST", "/_matrix/client/v3/keys/claim",
                     {"one_time_keys": {user_id: {device_id: "signed_curve25519"}}, "timeout": 10000})
    assert resp.get("failures") == {}, resp
    keys = resp["one_time_keys"][user_id][device_id]
    assert len(keys) == 1 and next(iter(keys)).startswith("signed_curve25519:"), keys
    key = next(iter(keys.values()))
    assert f"ed25519:{device_id}" in key["signatures"][user_id], key


def _knows(p: Person, user_id: str, device_id: str) -> bool:
    return any(d.device_id == device_id for d in p.client.device_store.active_user_devices(user_id))


def _shared_with(p: Person, room_id: str) -> set[tuple[str, str]]:
    return set(p.client.olm.outbound_group_sessions[room_id].users_shared_with)


async def _exchange(a: Person, b: Person, room_id: str, tag: str) -> None:
    await a.send(room_id, f"{tag}: from {a.client.user_id}")
    await b.sync_until(lambda: f"{tag}: from {a.client.user_id}" in b.plaintexts.get(room_id, []), "a's message")
    await b.send(room_id, f"{tag}: from {b.client.user_id}")
    await a.sync_until(lambda: f"{tag}: from {b.client.user_id}" in a.plaintexts.get(room_id, []), "b's reply")


def _ciphertext_only(c: Client, room_id: str) -> None:
    raw = c.ok("GET", f"/_matrix/client/v3/rooms/{_q(room_id)}/messages", query={"dir": "b", "limit": "50"})
    sent = [e for e in raw["chunk"] if "state_key" not in e]
    assert sent and all(e["type"] == "m.room.encrypted" and "ciphertext" in e["content"] for e in sent), sent


# ---------------------------------------------------------------------------
# (a) and (b): an encrypted room created on either side


async def _room_created_on(creator_side: str, zh: ZhomeProcess, syn: SynapsePeer, root: Path) -> None:
    z = Person(zh, _account(zh.base_url, "ez"), root / "z")
    s = Person(syn, _account(syn.base_url, "es"), root / "s")
    try:
        await z.login("zhome laptop")
        await s.login("synapse laptop")
        room_id = await (_encrypted_room(z, s) if creator_side == "zhome" else _encrypted_room(s, z))
        await _exchange(z, s, room_id, "first") if creator_side == "zhome" else await _exchange(s, z, room_id, "first")
        assert not z.undecrypted and not s.undecrypted, (z.undecrypted, s.undecrypted)

        # What each server answers about the other's user.
        zraw, sraw = _raw(z, zh.base_url), _raw(s, syn.base_url)
        assert set(_device_keys(zraw, s.client.user_id)) == {s.client.device_id}
        assert set(_device_keys(sraw, z.client.user_id)) == {z.client.device_id}
        _claim(zraw, s.client.user_id, s.client.device_id)
        _claim(sraw, z.client.user_id, z.client.device_id)
        _ciphertext_only(zraw, room_id)
        _ciphertext_only(sraw, room_id)
    finally:
        for p in (z, s):
            await p.close()


def test_zhome_creates_encrypted_room_with_synapse_user(zhome_e2ee: ZhomeProcess, synapse: SynapsePeer,  # noqa: F811
                                                        tmp_path: Path) -> None:
    asyncio.run(_room_created_on("zhome", zhome_e2ee, synapse, tmp_path))


def test_synapse_creates_encrypted_room_with_zhome_user(zhome_e2ee: ZhomeProcess, synapse: SynapsePeer,  # noqa: F811
                                                        tmp_path: Path) -> None:
    asyncio.run(_room_created_on("synapse", zhome_e2ee, synapse, tmp_path))


# ---------------------------------------------------------------------------
# (c) and (d): devices that sign in later and devices that go


async def _devices_come_and_go(zh: ZhomeProcess, syn: SynapsePeer, root: Path) -> None:
    z_id, s_id = _account(zh.base_url, "dz"), _account(syn.base_url, "ds")
    z, z2 = Person(zh, z_id, root / "z"), Person(zh, z_id, root / "z2")
    s, s2 = Person(syn, s_id, root / "s"), Person(syn, s_id, root / "s2")
    try:
        await z.login("zhome laptop")
        await s.login("synapse laptop")
        room_id = await _encrypted_room(z, s)
        await _exchange(z, s, room_id, "before")

        # A second Synapse device: zhome hears of it (m.device_list_update
        # from Synapse), zhome's user encrypts to it.
        await s2.login("synapse tablet")
        await s2.sync()
        s2_dev = s2.client.device_id
        zraw = _raw(z, zh.base_url)
        _wait_devices(zraw, s_id, {s.client.device_id, s2_dev}, "Synapse's second device on zhome")
        await z.sync_until(lambda: _knows(z, s_id, s2_dev), "the Synapse user's second device")
        await z.send(room_id, "to both Synapse devices")
        await s2.sync_until(lambda: "to both Synapse devices" in s2.plaintexts.get(room_id, []),
                            "zhome's message on Synapse's second device")
        await s.sync_until(lambda: "to both Synapse devices" in s.plaintexts.get(room_id, []),
                           "zhome's message on Synapse's first device")

        # A second zhome device: Synapse hears of it (zhome's EDU), Synapse's
        # user encrypts to it.
        await z2.login("zhome tablet")
        await z2.sync()
        z2_dev = z2.client.device_id
        sraw = _raw(s, syn.base_url)
        _wait_devices(sraw, z_id, {z.client.device_id, z2_dev}, "zhome's second device on Synapse")
        await s.sync_until(lambda: _knows(s, z_id, z2_dev), "the zhome user's second device")
        await s.send(room_id, "to both zhome devices")
        await z2.sync_until(lambda: "to both zhome devices" in z2.plaintexts.get(room_id, []),
                            "Synapse's message on zhome's second device")
        await z.sync_until(lambda: "to both zhome devices" in z.plaintexts.get(room_id, []),
                           "Synapse's message on zhome's first device")
        # (The new devices see the earlier messages they were never given
        # keys for; the first devices missed nothing.)
        for p in (z, s):
            assert not [e for e in p.undecrypted if e.room_id == room_id], (p.client.device_id, p.undecrypted)

        # The Synapse tablet signs out: zhome's /sync says the user's devices
        # changed, /keys/query drops the device, and the next room key goes
        # to the remaining device only.
        zraw = _raw(z, zh.base_url)
        assert not isinstance(await s2.client.logout(), Exception)
        zraw.sync_until(lambda r: s_id in r.get("device_lists", {}).get("changed", []),
                        "device_lists.changed for the Synapse user")
        _wait_devices(zraw, s_id, {s.client.device_id}, "Synapse's tablet gone on zhome")
        await z.sync_until(lambda: not _knows(z, s_id, s2_dev), "the Synapse tablet gone from zhome's client")
        z.client.olm.outbound_group_sessions.pop(room_id, None)  # rotate
        await z.send(room_id, "tablet gone")
        await s.sync_until(lambda: "tablet gone" in s.plaintexts.get(room_id, []), "the message after the logout")
        shared = _shared_with(z, room_id)
        assert (s_id, s.client.device_id) in shared and (s_id, s2_dev) not in shared, shared

        # The zhome tablet signs out: the same seen from Synapse.
        sraw = _raw(s, syn.base_url)
        assert not isinstance(await z2.client.logout(), Exception)
        sraw.sync_until(lambda r: z_id in r.get("device_lists", {}).get("changed", []),
                        "device_lists.changed for the zhome user")
        _wait_devices(sraw, z_id, {z.client.device_id}, "zhome's tablet gone on Synapse")
        await s.sync_until(lambda: not _knows(s, z_id, z2_dev), "the zhome tablet gone from Synapse's client")
        s.client.olm.outbound_group_sessions.pop(room_id, None)
        await s.send(room_id, "zhome tablet gone")
        await z.sync_until(lambda: "zhome tablet gone" in z.plaintexts.get(room_id, []),
                           "the message after zhome's logout")
        shared = _shared_with(s, room_id)
        assert (z_id, z.client.device_id) in shared and (z_id, z2_dev) not in shared, shared
    finally:
        for p in (z, z2, s, s2):
            await p.close()


def test_devices_signing_in_and_out_on_both_sides(zhome_e2ee: ZhomeProcess, synapse: SynapsePeer,  # noqa: F811
                                                  tmp_path: Path) -> None:
    asyncio.run(_devices_come_and_go(zhome_e2ee, synapse, tmp_path))


# ---------------------------------------------------------------------------
# (e) to-device messages straight between the servers


def _to_device(c: Client, sender: str, etype: str, wait: float) -> list[dict[str, Any]]:
    """The to-device events of ``etype`` from ``sender`` in ``c``'s /sync
    over ``wait`` seconds."""
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        r = c.sync(timeout_ms=500)
        got += [e for e in r.get("to_device", {}).get("events", []) if e["type"] == etype and e["sender"] == sender]
    return got


def _until_to_device(c: Client, sender: str, etype: str, n: int) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + WAIT_S
    while len(got) < n and time.monotonic() < deadline:
        got += _to_device(c, sender, etype, 0.5)
    # Then a quiet while: nothing arrives a second time.
    got += _to_device(c, sender, etype, 3.0)
    return got


def _send_to_device(sender: Client, etype: str, txn: str, messages: dict[str, Any]) -> None:
    sender.ok("PUT", f"/_matrix/client/v3/sendToDevice/{_q(etype)}/{_q(txn)}", {"messages": messages})


def _to_device_one_way(sender: Client, receiver_id: str, r1: Client, d1: str, r2: Client) -> None:
    etype = "org.zhome.test.ping"
    _send_to_device(sender, etype, "all", {receiver_id: {"*": {"n": "every device"}}})
    for c in (r1, r2):
        got = _until_to_device(c, sender.user_id, etype, 1)
        assert [e["content"] for e in got] == [{"n": "every device"}], (c.base_url, got)
    # A named device only; the same transaction ID again changes nothing.
    _send_to_device(sender, etype, "one", {receiver_id: {d1: {"n": "first device"}}})
    _send_to_device(sender, etype, "one", {receiver_id: {d1: {"n": "first device"}}})
    got = _until_to_device(r1, sender.user_id, etype, 1)
    assert [e["content"] for e in got] == [{"n": "first device"}], got
    assert _to_device(r2, sender.user_id, etype, 1.0) == []


def test_to_device_messages_between_the_servers(zhome_e2ee: ZhomeProcess, synapse: SynapsePeer  # noqa: F811
                                                ) -> None:
    z_id, s_id = _account(zhome_e2ee.base_url, "tz"), _account(synapse.base_url, "ts")
    z1, zd1 = _login(zhome_e2ee.base_url, z_id)
    z2, _ = _login(zhome_e2ee.base_url, z_id)
    s1, sd1 = _login(synapse.base_url, s_id)
    s2, _ = _login(synapse.base_url, s_id)
    _to_device_one_way(z1, s_id, s1, sd1, s2)
    _to_device_one_way(s1, z_id, z1, zd1, z2)


# ---------------------------------------------------------------------------
# Leaving: device_lists.left, and key queries still answered afterwards


def _upload_device_keys(c: Client) -> str:
    device_id = str(c.ok("GET", "/_matrix/client/v3/account/whoami")["device_id"])
    sk = signedjson.key.generate_signing_key(device_id)
    keys = sign_json({"user_id": c.user_id, "device_id": device_id,
                      "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
                      "keys": {f"ed25519:{device_id}": encode_base64(signedjson.key.get_verify_key(sk).encode()),
                               f"curve25519:{device_id}": encode_base64(os.urandom(32))}}, c.user_id, sk)
    c.ok("POST", "/_matrix/client/v3/keys/upload", {"device_keys": keys})
    return device_id


def _lists(c: Client, field: str, user_id: str) -> Callable[[dict[str, Any]], bool]:
    return lambda r: user_id in r.get("device_lists", {}).get(field, [])


def test_leaving_the_room_shows_in_device_lists_left(zhome_e2ee: ZhomeProcess, synapse: SynapsePeer  # noqa: F811
                                                     ) -> None:
    z_id, s_id = _account(zhome_e2ee.base_url, "lz"), _account(synapse.base_url, "ls")
    (z, _), (s, _) = _login(zhome_e2ee.base_url, z_id), _login(synapse.base_url, s_id)
    zd, sd = _upload_device_keys(z), _upload_device_keys(s)
    room_id = z.create_room(preset="private_chat", invite=[s_id])
    s.sync_until(lambda r: room_id in r.get("rooms", {}).get("invite", {}), "the invite")
    s.ok("POST", f"/_matrix/client/v3/rooms/{_q(room_id)}/join", {})
    z.sync_until(_lists(z, "changed", s_id), "the Synapse user in device_lists.changed after the join")
    s.sync_until(_lists(s, "changed", z_id), "the zhome user in device_lists.changed after the join")
    assert set(_device_keys(z, s_id)) == {sd} and set(_device_keys(s, z_id)) == {zd}

    # The Synapse user leaves zhome's room: zhome says so in
    # device_lists.left, and its key queries for them still work (now asked
    # of Synapse each time).
    s.ok("POST", f"/_matrix/client/v3/rooms/{_q(room_id)}/leave", {})
    z.sync_until(_lists(z, "left", s_id), "the Synapse user in device_lists.left")
    assert set(_device_keys(z, s_id)) == {sd}

    # The zhome user leaves a Synapse room: both sides say so.
    room2 = s.create_room(preset="private_chat", invite=[z_id])
    z.sync_until(lambda r: room2 in r.get("rooms", {}).get("invite", {}), "the invite from Synapse")
    z.ok("POST", f"/_matrix/client/v3/rooms/{_q(room2)}/join", {})
    z.sync_until(_lists(z, "changed", s_id), "the Synapse user in device_lists.changed after joining on Synapse")
    s.sync_until(_lists(s, "changed", z_id), "the zhome user in device_lists.changed after joining on Synapse")
    z.ok("POST", f"/_matrix/client/v3/rooms/{_q(room2)}/leave", {})
    z.sync_until(_lists(z, "left", s_id), "the Synapse user in device_lists.left after leaving on Synapse")
    s.sync_until(_lists(s, "left", z_id), "the zhome user in Synapse's device_lists.left")
    assert set(_device_keys(z, s_id)) == {sd} and set(_device_keys(s, z_id)) == {zd}
