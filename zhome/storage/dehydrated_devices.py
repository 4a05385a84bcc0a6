"""Which device of a user is the dehydrated one, and its encrypted data.

MSC3814 "Dehydrated devices with SSSS" (unstable prefix
``org.matrix.msc3814.v1``): a user has at most one dehydrated device. The
device itself lives with the other devices (``AccountsStore``); this store
only marks it, and forgets the mark in the transaction that deletes the
device, however it is deleted.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Optional

from zhome.storage.database import Database, Txn


@dataclass(frozen=True)
class DehydratedDevice:
    device_id: str
    device_data: Any


class DehydratedDevicesStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def get(self, user_id: str) -> Optional[DehydratedDevice]:
        rows = await self.db.execute("dehydrated_get", "SELECT device_id, device_data FROM dehydrated_devices"
                                     " WHERE user_id = ?", user_id)
        return DehydratedDevice(rows[0][0], json.loads(rows[0][1])) if rows else None

    async def set(self, user_id: str, device_id: str, device_data: Any) -> None:
        """Mark ``device_id`` as the user's dehydrated device, replacing any mark."""

        def txn_fn(txn: Txn) -> None:
            txn.execute("DELETE FROM dehydrated_devices WHERE user_id = ?", (user_id,))
            txn.execute("INSERT INTO dehydrated_devices (user_id, device_id, device_data, ts) VALUES (?,?,?,?)",
                        (user_id, device_id, json.dumps(device_data, sort_keys=True), int(time.time() * 1000)))

        await self.db.run_interaction("dehydrated_set", txn_fn)

    def on_devices_changed_txn(self, txn: Txn, user_id: str, device_ids: list[str], deleted: bool) -> None:
        """A device-change hook of ``AccountsStore``: a deleted dehydrated
        device is no longer the user's dehydrated device."""
        if not deleted:
            return
        for device_id in device_ids:
            txn.execute("DELETE FROM dehydrated_devices WHERE user_id = ? AND device_id = ?", (user_id, device_id))
