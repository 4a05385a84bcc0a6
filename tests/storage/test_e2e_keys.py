"""Device keys, one-time and fallback keys, to-device messages and the
device-list stream in SQL, on both engines.

Spec: client-server-api "End-to-End Encryption" (upload, counts, claim
once, fallback keys) and "Send-to-Device messaging"; device deletion takes
a device's keys and waiting messages with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import signedjson.key
from signedjson.sign import sign_json
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from unpaddedbase64 import encode_base64

from tests.storage.test_event_graph import _server
from zhome.http.errors import MatrixError
from zhome.server import HomeServer
from zhome.storage.e2e_keys import E2eKeysStore, KeyConflict, KeyUpload

ALICE = "@alice:test.local"
BOB = "@bob:test.local"


class Device:
    """A device's ed25519 identity, to sign what it uploads."""

    def __init__(self, user_id: str, device_id: str) -> None:
        self.user_id, self.device_id = user_id, device_id
        self.sk = signedjson.key.generate_signing_key(device_id)
        self.ed25519 = encode_base64(signedjson.key.get_verify_key(self.sk).encode())

    def device_keys(self, **extra: Any) -> dict[str, Any]:
        body = {"user_id": self.user_id, "device_id": self.device_id,
                "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
                "keys": {f"ed25519:{self.device_id}": self.ed25519, f"curve25519:{self.device_id}": "c" * 43}}
        body.update(extra)
        return sign_json(body, self.user_id, self.sk)

    def otk(self, key: str, **extra: Any) -> dict[str, Any]:
        return sign_json({"key": key, **extra}, self.user_id, self.sk)


async def _hs_with_devices(tmp_path: Path, db_config: tuple[str, dict[str, Any]]) -> HomeServer:
    hs = await _server(tmp_path, db_config)
    for user, dev in ((ALICE, "A1"), (ALICE, "A2"), (BOB, "B1")):
        await hs.accounts.create_device_and_token(user, dev, f"tok_{dev}", None, None, None)
    return hs


async def _count_rows(hs: HomeServer, table: str, user_id: str, device_id: str) -> int:
    rows = await hs.db.execute("t", f"SELECT COUNT(*) FROM {table} WHERE user_id = ? AND device_id = ?",
                               user_id, device_id)
    return int(rows[0][0])


@pytest_twisted.ensureDeferred
async def test_upload_counts_claim_once_and_fallback(tmp_path: Path, db_config: tuple[str, dict[str, Any]]) -> None:
    hs = await _hs_with_devices(tmp_path, db_config)
    dev = Device(ALICE, "A1")
    keys = hs.e2e_keys
    out = await keys.upload(ALICE, "A1", {"device_keys": dev.device_keys(),
                                          "one_time_keys": {"signed_curve25519:k1": dev.otk("o1"),
                                                            "signed_curve25519:k2": dev.otk("o2")},
                                          "fallback_keys": {"signed_curve25519:f1": dev.otk("fb", fallback=True)}})
    assert out == {"one_time_key_counts": {"signed_curve25519": 2}}
    # Re-uploading the same key is a no-op; counts come back.
    again = await keys.upload(ALICE, "A1", {"one_time_keys": {"signed_curve25519:k1": dev.otk("o1")}})
    assert again["one_time_key_counts"] == {"signed_curve25519": 2}
    assert await keys.sync_summary(ALICE, "A1") == ({"signed_curve25519": 2}, ["signed_curve25519"])

    queried = await keys.query_local({ALICE: []})
    assert set(queried[ALICE]) == {"A1"}
    assert queried[ALICE]["A1"]["keys"][f"ed25519:A1"] == dev.ed25519

    claimed = []
    for _ in range(2):
        got = await keys.claim_local({ALICE: {"A1": "signed_curve25519"}})
        claimed.extend(got[ALICE]["A1"])
    assert sorted(claimed) == ["signed_curve25519:k1", "signed_curve25519:k2"]
    assert await keys.sync_summary(ALICE, "A1") == ({"signed_curve25519": 0}, ["signed_curve25519"])
    # No one-time key left: the fallback key, marked used, and again.
    for _ in range(2):
        got = await keys.claim_local({ALICE: {"A1": "signed_curve25519"}})
        assert list(got[ALICE]["A1"]) == ["signed_curve25519:f1"]
        assert got[ALICE]["A1"]["signed_curve25519:f1"]["fallback"] is True
    assert await keys.sync_summary(ALICE, "A1") == ({"signed_curve25519": 0}, [])
    # A new fallback key is unused again.
    await keys.upload(ALICE, "A1", {"fallback_keys": {"signed_curve25519:f2": dev.otk("fb2", fallback=True)}})
    assert (await keys.sync_summary(ALICE, "A1"))[1] == ["signed_curve25519"]
    # A device without keys of the algorithm is left out.
    assert await keys.claim_local({BOB: {"B1": "signed_curve25519"}}) == {}
    await hs.stop()


@pytest_twisted.ensureDeferred
async def test_concurrent_claims_take_each_key_once(tmp_path: Path, db_config: tuple[str, dict[str, Any]]) -> None:
    hs = await _hs_with_devices(tmp_path, db_config)
    store = E2eKeysStore(hs.db)
    n = 20
    await store.upload(ALICE, "A1", KeyUpload(one_time_keys={("alg", f"k{i:02}"): f"v{i}" for i in range(n)}))
    # More claims than keys, all at once (several connections on PostgreSQL).
    results = await defer.gatherResults([defer.ensureDeferred(store.claim([(ALICE, "A1", "alg")]))
                                         for _ in range(n + 5)])
    got = [k for r in results for k in r.get(ALICE, {}).get("A1", {})]
    assert len(got) == n and len(set(got)) == n
    assert await store.count_one_time_keys(ALICE, "A1") == {"signed_curve25519": 0}
    await hs.stop()


@pytest_twisted.ensureDeferred
async def test_one_claim_for_many_devices(tmp_path: Path, db_config: tuple[str, dict[str, Any]]) -> None:
    """One claim of several devices (one statement on PostgreSQL): each
    gets its lowest free one-time key, else its fallback key, else nothing;
    a device asked for twice gets one key; the keys taken are gone."""
    hs = await _hs_with_devices(tmp_path, db_config)
    store = E2eKeysStore(hs.db)
    await store.upload(ALICE, "A1", KeyUpload(one_time_keys={("alg", "k2"): "v2", ("alg", "k1"): "v1",
                                                              ("other", "o1"): "w1"}))
    await store.upload(ALICE, "A2", KeyUpload(fallback_keys={("alg", "f1"): "fb"}))
    wanted = [(ALICE, "A1", "alg"), (ALICE, "A2", "alg"), (BOB, "B1", "alg"), (ALICE, "A1", "alg")]
    assert await store.claim(wanted) == {ALICE: {"A1": {"alg:k1": "v1"}, "A2": {"alg:f1": "fb"}}}
    assert await store.claim(wanted) == {ALICE: {"A1": {"alg:k2": "v2"}, "A2": {"alg:f1": "fb"}}}
    # None left of that algorithm; the other algorithm's key is untouched.
    assert await store.claim(wanted) == {ALICE: {"A2": {"alg:f1": "fb"}}}
    assert await store.claim([(ALICE, "A1", "other")]) == {ALICE: {"A1": {"other:o1": "w1"}}}
    assert await _count_rows(hs, "e2e_one_time_keys", ALICE, "A1") == 0
    await hs.stop()


@pytest_twisted.ensureDeferred
async def test_bad_uploads_store_nothing(tmp_path: Path, db_config: tuple[str, dict[str, Any]]) -> None:
    hs = await _hs_with_devices(tmp_path, db_config)
    keys = hs.e2e_keys
    dev = Device(ALICE, "A1")
    other = Device(ALICE, "A1")
    bad: list[tuple[dict[str, Any], str]] = [
        ({"device_keys": Device(BOB, "A1").device_keys()}, "M_BAD_JSON"),  # another user
        ({"device_keys": Device(ALICE, "A2").device_keys()}, "M_BAD_JSON"),  # another device
        ({"device_keys": {k: v for k, v in dev.device_keys().items() if k != "signatures"}}, "M_BAD_JSON"),
        ({"device_keys": {**dev.device_keys(), "signatures": other.device_keys()["signatures"]}},
         "M_INVALID_SIGNATURE"),  # signed by another key
        ({"device_keys": {**dev.device_keys(), "algorithms": "x"}}, "M_BAD_JSON"),
        # A good device key with a one-time key signed by someone else.
        ({"device_keys": dev.device_keys(), "one_time_keys": {"signed_curve25519:k1": other.otk("o")}},
         "M_INVALID_SIGNATURE"),
        ({"device_keys": dev.device_keys(), "one_time_keys": {"signed_curve25519:k1": {"key": "unsigned"}}},
         "M_INVALID_SIGNATURE"),
        ({"device_keys": dev.device_keys(), "one_time_keys": {"nocolon": "x"}}, "M_BAD_JSON"),
    ]
    for body, errcode in bad:
        with pytest.raises(MatrixError) as e:
            await keys.upload(ALICE, "A1", body)
        assert (e.value.code, e.value.errcode) == (400, errcode), body
        for table in ("e2e_device_keys", "e2e_one_time_keys", "e2e_fallback_keys"):
            assert await _count_rows(hs, table, ALICE, "A1") == 0, (table, body)

    await keys.upload(ALICE, "A1", {"device_keys": dev.device_keys(),
                                    "one_time_keys": {"signed_curve25519:k1": dev.otk("o1")}})
    # The same key ID with other content: 400, and the rest of that upload
    # (a new key) is not stored either.
    with pytest.raises(MatrixError) as e:
        await keys.upload(ALICE, "A1", {"one_time_keys": {"signed_curve25519:k0": dev.otk("new"),
                                                          "signed_curve25519:k1": dev.otk("changed")}})
    assert e.value.code == 400
    assert await keys.store.count_one_time_keys(ALICE, "A1") == {"signed_curve25519": 1}
    with pytest.raises(KeyConflict):
        await keys.store.upload(ALICE, "A1", KeyUpload(one_time_keys={("signed_curve25519", "k1"): {"key": "x"}}))
    await hs.stop()


@pytest_twisted.ensureDeferred
async def test_device_deletion_takes_keys_and_messages(tmp_path: Path, db_config: tuple[str, dict[str, Any]]) -> None:
    hs = await _hs_with_devices(tmp_path, db_config)
    for device_id in ("A1", "A2"):
        dev = Device(ALICE, device_id)
        await hs.e2e_keys.upload(ALICE, device_id, {
            "device_keys": dev.device_keys(), "one_time_keys": {"signed_curve25519:k": dev.otk("o")},
            "fallback_keys": {"signed_curve25519:f": dev.otk("f", fallback=True)}})
    await hs.to_device.send(BOB, "B1", "m.test", "t1", {"messages": {ALICE: {"*": {"n": 1}}}})
    # The same transaction again delivers nothing twice.
    await hs.to_device.send(BOB, "B1", "m.test", "t1", {"messages": {ALICE: {"*": {"n": 1}}}})
    assert await _count_rows(hs, "device_inbox", ALICE, "A1") == 1
    assert await _count_rows(hs, "device_inbox", ALICE, "A2") == 1
    before = hs.notifier.current_token().device_lists

    await hs.accounts.delete_devices(ALICE, ["A1"])
    for table in ("e2e_device_keys", "e2e_one_time_keys", "e2e_fallback_keys", "device_inbox"):
        assert await _count_rows(hs, table, ALICE, "A1") == 0, table
        assert await _count_rows(hs, table, ALICE, "A2") == 1, table
    assert hs.notifier.current_token().device_lists > before
    assert set((await hs.e2e_keys.query_local({ALICE: []}))[ALICE]) == {"A2"}
    assert await hs.e2e_keys.sync_summary(ALICE, "A1") == ({"signed_curve25519": 0}, [])

    # Logging out everywhere clears the rest.
    await hs.accounts.delete_devices(ALICE, None)
    for table in ("e2e_device_keys", "e2e_one_time_keys", "e2e_fallback_keys", "device_inbox"):
        assert await _count_rows(hs, table, ALICE, "A2") == 0, table
    await hs.stop()


@pytest_twisted.ensureDeferred
async def test_to_device_acknowledged_and_position_kept(tmp_path: Path,
                                                        db_config: tuple[str, dict[str, Any]]) -> None:
    hs = await _hs_with_devices(tmp_path, db_config)
    for i in range(3):
        await hs.to_device.send(BOB, "B1", "m.test", f"t{i}", {"messages": {ALICE: {"A1": {"n": i}}}})
    now = hs.notifier.current_token().to_device
    events, pos = await hs.to_device.for_sync(ALICE, "A1", None, now)
    assert [e["content"]["n"] for e in events] == [0, 1, 2] and pos == now
    assert events[0] == {"sender": BOB, "type": "m.test", "content": {"n": 0}}
    # Not acknowledged yet: an initial sync gets them again.
    events, _ = await hs.to_device.for_sync(ALICE, "A1", None, now)
    assert len(events) == 3
    # The next sync with the later token acknowledges them, and they are
    # deleted (in the background, right after the answer).
    events, _ = await hs.to_device.for_sync(ALICE, "A1", pos, now)
    assert events == []
    for _ in range(100):
        if await _count_rows(hs, "device_inbox", ALICE, "A1") == 0:
            break
        await deferLater(reactor, 0.02, lambda: None)
    assert await _count_rows(hs, "device_inbox", ALICE, "A1") == 0
    assert (await hs.to_device.for_sync(ALICE, "A1", None, now))[0] == []
    config = hs.config
    await hs.stop()
    # The stream position survives a restart although the inbox is empty.
    hs2 = HomeServer(config)
    await hs2.setup()
    assert hs2.notifier.current_token().to_device == now
    await hs2.stop()


@pytest_twisted.ensureDeferred
async def test_a_remote_list_dropped_during_a_read_is_not_read_as_empty(
        tmp_path: Path, db_config: tuple[str, dict[str, Any]]) -> None:
    """A remote user's cached list dropped (their last shared room left)
    while a key query reads it: the query sees the whole list or none, never
    "cached, no devices", which would answer empty without asking their
    server."""
    hs = await _server(tmp_path, db_config)
    store, lists = hs.device_lists.store, hs.device_lists
    carol = "@carol:remote.example"
    keys = {"user_id": carol, "device_id": "C1", "keys": {"ed25519:C1": "k"}}
    await store.replace_remote_devices(carol, 7, {"C1": ("phone", keys)})
    assert set((await lists.cached_remote_keys([carol]))[carol]) == {"C1"}

    # The drop lands just before the devices are read.
    real_select_in = hs.db.select_in
    dropped: list[bool] = []

    async def select_in(name: str, *a: Any, **kw: Any) -> Any:
        if name == "remote_devices" and not dropped:
            dropped.append(True)
            await store.forget_remote_user(carol)
        return await real_select_in(name, *a, **kw)
    hs.db.select_in = select_in  # type: ignore[method-assign]
    try:
        got = await lists.cached_remote_keys([carol])
    finally:
        hs.db.select_in = real_select_in  # type: ignore[method-assign]
    assert dropped and got == {}, got
    # Cached again (a resync): read whole.
    await store.replace_remote_devices(carol, 8, {"C1": ("phone", keys)})
    assert set((await lists.cached_remote_keys([carol]))[carol]) == {"C1"}
    # Cached with no devices at all: an empty list, not "not cached".
    await store.replace_remote_devices(carol, 9, {})
    assert await lists.cached_remote_keys([carol]) == {carol: {}}
    await hs.stop()
