"""Cross-signing keys and signatures in SQL, on both engines: what a new
master key takes with it, signatures merged into device keys and dropped
with the device or its keys, the device-list stream rows (outside the
m.device_list_update prev_id chain), remote users' cached keys, and a
failed transaction leaving nothing.

Spec: client-server-api "Cross-signing"; server-server-api "Device
Management" (stream_id and prev_id of m.device_list_update).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from tests.storage.test_e2e_keys import ALICE, BOB, Device, _hs_with_devices
from zhome.server import HomeServer
from zhome.storage.cross_signing import MasterKeyChanged, Signature
from zhome.storage.e2e_keys import KeyUpload

CAROL = "@carol:remote.example"


def _key(user_id: str, usage: str, pub: str) -> dict[str, Any]:
    return {"user_id": user_id, "usage": [usage], "keys": {f"ed25519:{pub}": pub}}


async def _rows(hs: HomeServer, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    return await hs.db.execute("t", sql, *params)


@pytest_twisted.ensureDeferred
async def test_keys_replacement_and_signatures(tmp_path: Path, db_config: tuple[str, dict[str, Any]]) -> None:
    hs = await _hs_with_devices(tmp_path, db_config)
    store = hs.cross_signing.store
    dev = Device(ALICE, "A1")
    await hs.e2e_keys.store.upload(ALICE, "A1", KeyUpload(device_keys=dev.device_keys()))
    before = await hs.device_lists.store.latest_stream_id(ALICE)

    pos, removed = await store.upload_keys(ALICE, {"master": _key(ALICE, "master", "M1"),
                                                   "self_signing": _key(ALICE, "self_signing", "S1"),
                                                   "user_signing": _key(ALICE, "user_signing", "U1")})
    assert removed == [] and pos > before
    got = await store.get_keys([ALICE, BOB])
    assert set(got) == {ALICE} and got[ALICE]["master"] == _key(ALICE, "master", "M1")
    # The change is in the stream, outside the m.device_list_update chain.
    assert await _rows(hs, "SELECT user_id, cross_signing FROM device_list_changes WHERE stream_id = ?", pos) \
        == [(ALICE, 1)]
    assert await hs.device_lists.store.latest_stream_id(ALICE) == before

    # Signatures: of the device (its keys carry it, and its device list
    # changes), of the master key by the device, of bob's key by alice.
    sigs = [Signature(ALICE, "A1", ALICE, "ed25519:S1", "sig-dev"),
            Signature(ALICE, "M1", ALICE, "ed25519:A1", "sig-master"),
            Signature(BOB, "MB", ALICE, "ed25519:U1", "sig-bob")]
    positions = await store.add_signatures(sigs, [(ALICE, "A1")], [(ALICE, None)])
    assert len(positions) == 1
    keys = (await hs.e2e_keys.store.get_device_keys([ALICE]))[ALICE]["A1"]
    assert keys["signatures"][ALICE]["ed25519:S1"] == "sig-dev"
    assert keys["signatures"][ALICE]["ed25519:A1"] == dev.device_keys()["signatures"][ALICE]["ed25519:A1"]
    chain = await _rows(hs, "SELECT stream_id, device_id, prev_id FROM device_list_changes WHERE user_id = ?"
                        " AND cross_signing = 0 ORDER BY stream_id", ALICE)
    assert chain[-1][1] == "A1" and chain[-1][2] == chain[-2][0]  # prev_id skips the cross-signing rows
    assert {(s.target_user_id, s.signature) for s in await store.get_signatures([ALICE, BOB])} == {
        (ALICE, "sig-dev"), (ALICE, "sig-master"), (BOB, "sig-bob")}

    # The same device keys again keep the signature; other keys drop it.
    await hs.e2e_keys.store.upload(ALICE, "A1", KeyUpload(device_keys=dev.device_keys()))
    assert "ed25519:S1" in (await hs.e2e_keys.store.get_device_keys([ALICE]))[ALICE]["A1"]["signatures"][ALICE]
    await hs.e2e_keys.store.upload(ALICE, "A1", KeyUpload(device_keys=dev.device_keys(algorithms=["x"])))
    assert "ed25519:S1" not in (await hs.e2e_keys.store.get_device_keys([ALICE]))[ALICE]["A1"]["signatures"][ALICE]
    await store.add_signatures([sigs[0]], [(ALICE, "A1")], [])

    # A new master key alone: the self-signing and user-signing keys it did
    # not sign go, with every signature made by them or of the old master.
    # An upload judged against a master key that is no longer stored
    # (another upload came first) stores nothing.
    with pytest.raises(MasterKeyChanged):
        await store.upload_keys(ALICE, {"master": _key(ALICE, "master", "M2")})
    assert (await store.get_keys([ALICE]))[ALICE]["master"] == _key(ALICE, "master", "M1")
    _, removed = await store.upload_keys(ALICE, {"master": _key(ALICE, "master", "M2")}, _key(ALICE, "master", "M1"))
    assert sorted(removed) == ["self_signing", "user_signing"]
    assert set((await store.get_keys([ALICE]))[ALICE]) == {"master"}
    assert await store.get_signatures([ALICE, BOB]) == []

    # Deleting a device takes its signatures.
    await store.upload_keys(ALICE, {"self_signing": _key(ALICE, "self_signing", "S2")}, _key(ALICE, "master", "M2"))
    await store.add_signatures([Signature(ALICE, "A1", ALICE, "ed25519:S2", "s2")], [(ALICE, "A1")], [])
    await hs.accounts.delete_devices(ALICE, ["A1"])
    assert await _rows(hs, "SELECT COUNT(*) FROM e2e_cross_signing_signatures") == [(0,)]
    await hs.stop()


@pytest_twisted.ensureDeferred
async def test_changes_for_one_reader_only(tmp_path: Path, db_config: tuple[str, dict[str, Any]]) -> None:
    hs = await _hs_with_devices(tmp_path, db_config)
    store, lists = hs.cross_signing.store, hs.device_lists.store
    room_id, _ = await hs.room_creation.create_room(ALICE, {"preset": "public_chat"})
    await hs.membership.update(BOB, BOB, room_id, "join")
    start = hs.device_lists.store.ids.current()
    pos, _ = await store.upload_keys(ALICE, {"master": _key(ALICE, "master", "M1")})
    assert await lists.changed_users(BOB, start, pos) == {ALICE}
    # A user-signing key alone: alice is told, bob is not.
    pos2, _ = await store.upload_keys(ALICE, {"user_signing": _key(ALICE, "user_signing", "U1")},
                                      _key(ALICE, "master", "M1"))
    assert await lists.changed_users(BOB, pos, pos2) == set()
    assert await lists.changed_users(ALICE, pos, pos2) == {ALICE}
    # Alice's signature of bob's master key: alice is told bob changed.
    (pos3,) = await store.add_signatures([Signature(BOB, "MB", ALICE, "ed25519:U1", "s")], [], [(BOB, ALICE)])
    assert await lists.changed_users(ALICE, pos2, pos3) == {BOB}
    assert await lists.changed_users(BOB, pos2, pos3) == set()
    # From the start (an initial sync), the same rule: erin has no devices,
    # only alice's signature of her key.
    erin = "@erin:test.local"
    await hs.accounts.create_user(erin, None)
    await hs.membership.update(erin, erin, room_id, "join")
    (pos4,) = await store.add_signatures([Signature(erin, "ME", ALICE, "ed25519:U1", "s")], [], [(erin, ALICE)])
    assert erin in await lists.changed_users(ALICE, 0, pos4)
    assert erin not in await lists.changed_users(BOB, 0, pos4)
    await hs.stop()


@pytest_twisted.ensureDeferred
async def test_failed_transaction_stores_nothing(tmp_path: Path, db_config: tuple[str, dict[str, Any]]) -> None:
    hs = await _hs_with_devices(tmp_path, db_config)
    store = hs.cross_signing.store
    hook = store.on_device_signed_txn

    def boom(txn: Any, user_id: str, device_id: str) -> None:
        raise RuntimeError("the device-list write failed")

    store.on_device_signed_txn = boom
    rows_before = await _rows(hs, "SELECT COUNT(*) FROM device_list_changes")
    with pytest.raises(RuntimeError):
        await store.add_signatures([Signature(ALICE, "A1", ALICE, "ed25519:S", "x")], [(ALICE, "A1")], [(ALICE, None)])
    assert await _rows(hs, "SELECT COUNT(*) FROM e2e_cross_signing_signatures") == [(0,)]
    assert await _rows(hs, "SELECT COUNT(*) FROM device_list_changes") == rows_before
    store.on_device_signed_txn = hook
    await hs.stop()


@pytest_twisted.ensureDeferred
async def test_remote_users_cached_keys(tmp_path: Path, db_config: tuple[str, dict[str, Any]]) -> None:
    hs = await _hs_with_devices(tmp_path, db_config)
    store = hs.cross_signing.store
    lists = hs.device_lists.store
    await lists.replace_remote_devices(CAROL, 7, {"C1": ("phone", None)},
                                       {"master": _key(CAROL, "master", "CM"),
                                        "self_signing": _key(CAROL, "self_signing", "CS")})
    assert set((await store.get_keys([CAROL]))[CAROL]) == {"master", "self_signing"}
    # An m.signing_key_update with a new master key and no self-signing key.
    pos = await store.apply_remote_update(CAROL, {"master": _key(CAROL, "master", "CM2")}, ["self_signing"])
    assert (await store.get_keys([CAROL]))[CAROL] == {"master": _key(CAROL, "master", "CM2")}
    assert await _rows(hs, "SELECT user_id FROM device_list_changes WHERE stream_id = ?", pos) == [(CAROL,)]
    # A resync replaces the whole set; forgetting the user drops it.
    await lists.replace_remote_devices(CAROL, 8, {}, {"master": _key(CAROL, "master", "CM3")})
    assert (await store.get_keys([CAROL]))[CAROL] == {"master": _key(CAROL, "master", "CM3")}
    assert await lists.get_remote_stream_ids([CAROL]) == {CAROL: 8}
    await lists.forget_remote_user(CAROL)
    assert await store.get_keys([CAROL]) == {}
    await hs.stop()
