"""The dehydrated-device mark in SQL, on both engines: at most one per
user, replaced by the next, and gone with its device however the device is
deleted.

Spec: MSC3814 "Dehydrated devices with SSSS".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted

from tests.storage.test_event_graph import _server
from zhome.storage.dehydrated_devices import DehydratedDevice

ALICE = "@alice:test.local"
BOB = "@bob:test.local"


@pytest_twisted.ensureDeferred
async def test_mark_follows_its_device(tmp_path: Path, db_config: tuple[str, dict[str, Any]]) -> None:
    hs = await _server(tmp_path, db_config)
    store = hs.dehydrated_devices.store
    assert await store.get(ALICE) is None
    for user, dev in ((ALICE, "DEH1"), (ALICE, "DEH2"), (BOB, "DEHB")):
        assert await hs.accounts.create_device(user, dev, "Dehydrated")
    assert not await hs.accounts.create_device(ALICE, "DEH1", "again")  # exists: nothing written

    await store.set(ALICE, "DEH1", {"algorithm": "a", "device_pickle": "p1"})
    await store.set(BOB, "DEHB", {"algorithm": "a"})
    assert await store.get(ALICE) == DehydratedDevice("DEH1", {"algorithm": "a", "device_pickle": "p1"})
    await store.set(ALICE, "DEH2", {"algorithm": "a", "device_pickle": "p2"})
    assert await store.get(ALICE) == DehydratedDevice("DEH2", {"algorithm": "a", "device_pickle": "p2"})

    # Deleting another device leaves the mark; deleting the marked one takes it.
    await hs.accounts.delete_devices(ALICE, ["DEH1"])
    assert (await store.get(ALICE)) is not None
    await hs.accounts.delete_devices(ALICE, ["DEH2"])
    assert await store.get(ALICE) is None
    # So does deleting every device of a user (deactivation), and nobody else's.
    await hs.accounts.delete_devices(BOB, None)
    assert await store.get(BOB) is None
    rows = await hs.db.execute("t", "SELECT COUNT(*) FROM dehydrated_devices")
    assert int(rows[0][0]) == 0
    # A device without a token can never authenticate a request.
    tokens = await hs.db.execute("t", "SELECT COUNT(*) FROM access_tokens WHERE device_id LIKE 'DEH%'")
    assert int(tokens[0][0]) == 0
