"""Send-to-device messages waiting for local devices.

Spec: client-server-api "Send-to-Device messaging": messages are kept per
device until the device's next /sync acknowledges them (a since token at
or after their position), and PUT /sendToDevice is idempotent per device
and transaction ID. Each message is sealed at rest under its recipient's
data key (``zhome/storage/at_rest.py``), bound to its row.
"""

from __future__ import annotations

import json
import time
from typing import Any, Optional

from zhome.storage.at_rest import Sealer, open_text, seal_text
from zhome.storage.database import Database, Txn
from zhome.storage.ids import IdGenerator

#: Messages given to one device in one /sync response.
MAX_PER_SYNC = 100


class ToDeviceStore:
    def __init__(self, db: Database, ids: IdGenerator, sealer: Optional[Sealer] = None) -> None:
        self.db = db
        self.ids = ids
        self.sealer = sealer

    @staticmethod
    def _aad(stream_id: int, user_id: str, device_id: str) -> str:
        return f"device_inbox\x00{stream_id}\x00{user_id}\x00{device_id}"

    def seal_message(self, stream_id: int, user_id: str, device_id: str, message_json: str) -> Optional[str]:
        return seal_text(self.sealer, user_id, message_json, self._aad(stream_id, user_id, device_id))

    def _open(self, rows: list[tuple[Any, ...]], user_id: str, device_id: str) -> list[dict[str, Any]]:
        out = []
        for stream_id, stored in rows:
            text = open_text(self.sealer, stored, self._aad(int(stream_id), user_id, device_id))
            if text is not None:  # None: its key was destroyed (the recipient erased)
                out.append(json.loads(text))
        return out

    @classmethod
    async def current_position(cls, db: Database) -> int:
        rows = await db.execute(
            "to_device_position", "SELECT MAX(stream_id) FROM device_inbox UNION ALL"
            " SELECT MAX(pos) FROM stream_positions WHERE stream = 'to_device'")
        return max([int(r[0]) for r in rows if r[0] is not None] or [0])

    async def add_messages(self, messages: list[tuple[str, str, dict[str, Any]]],
                           txn_key: Optional[tuple[str, str, str]] = None) -> tuple[bool, list[int]]:
        """Queue (user, device, message) rows in one transaction. With
        ``txn_key`` (sender, sender device, txn ID) a repeat of the same
        transaction stores nothing. Returns whether this was new and the
        position of each row, in order."""

        def txn_fn(txn: Txn) -> tuple[bool, list[int]]:
            if txn_key is not None:
                txn.execute("SELECT 1 FROM to_device_txns WHERE user_id = ? AND device_id = ? AND txn_id = ?",
                            txn_key)
                if txn.fetchone() is not None:
                    return False, []
                txn.execute("INSERT INTO to_device_txns (user_id, device_id, txn_id, ts) VALUES (?,?,?,?)",
                            (*txn_key, int(time.time() * 1000)))
            positions = []
            rows = []
            for user_id, device_id, msg in messages:
                pos = self.ids.next()
                positions.append(pos)
                rows.append((pos, user_id, device_id, self.seal_message(pos, user_id, device_id, json.dumps(msg))))
            txn.executemany("INSERT INTO device_inbox (stream_id, user_id, device_id, message_json) VALUES (?,?,?,?)",
                            rows)
            if positions:
                last = positions[-1]
                txn.execute("UPDATE stream_positions SET pos = ? WHERE stream = 'to_device' AND pos < ?", (last, last))
            return True, positions

        return await self.db.run_interaction("to_device_add", txn_fn)

    async def take_for_sync(self, user_id: str, device_id: str, acked: int, upto: int
                            ) -> tuple[list[dict[str, Any]], int]:
        """Delete the messages the device acknowledged (position <= ``acked``)
        and return the next ones up to ``upto`` (at most MAX_PER_SYNC) with
        the position the next token should carry."""

        def txn_fn(txn: Txn) -> tuple[list[dict[str, Any]], int]:
            if acked > 0:
                txn.execute("DELETE FROM device_inbox WHERE user_id = ? AND device_id = ? AND stream_id <= ?",
                            (user_id, device_id, acked))
            txn.execute("SELECT stream_id, message_json FROM device_inbox WHERE user_id = ? AND device_id = ?"
                        " AND stream_id > ? AND stream_id <= ? ORDER BY stream_id LIMIT ?",
                        (user_id, device_id, acked, upto, MAX_PER_SYNC))
            rows = txn.fetchall()
            if len(rows) == MAX_PER_SYNC:
                # More are waiting: the next sync continues after these.
                return self._open(rows, user_id, device_id), int(rows[-1][0])
            return self._open(rows, user_id, device_id), upto

        return await self.db.run_interaction("to_device_take", txn_fn)

    async def delete_acknowledged(self, user_id: str, device_id: str, acked: int) -> None:
        """Delete the messages the device acknowledged (position <= ``acked``)."""
        await self.db.run_interaction(
            "to_device_ack", lambda txn: txn.execute(
                "DELETE FROM device_inbox WHERE user_id = ? AND device_id = ? AND stream_id <= ?",
                (user_id, device_id, acked)))

    async def peek(self, user_id: str, device_id: str, after: int, upto: int, limit: int
                   ) -> tuple[list[dict[str, Any]], Optional[int]]:
        """The messages waiting for a device after position ``after`` and up
        to ``upto``, at most ``limit``, without deleting any; and the
        position of the last one returned (None when there was none)."""
        rows = await self.db.execute(
            "to_device_peek", "SELECT stream_id, message_json FROM device_inbox WHERE user_id = ? AND device_id = ?"
            " AND stream_id > ? AND stream_id <= ? ORDER BY stream_id LIMIT ?", user_id, device_id, after, upto, limit)
        return self._open(rows, user_id, device_id), (int(rows[-1][0]) if rows else None)

    async def expire_txns(self, older_than_ms: int) -> None:
        """Forget transaction and message IDs older than ``older_than_ms``
        (a client or server retries within minutes, not days)."""
        cutoff = int(time.time() * 1000) - older_than_ms
        await self.db.run_interaction(
            "to_device_expire_txns", lambda txn: txn.execute("DELETE FROM to_device_txns WHERE ts < ?", (cutoff,)))

    @staticmethod
    def delete_for_devices_txn(txn: Txn, user_id: str, device_ids: list[str]) -> None:
        from zhome.storage.database import in_chunks

        for chunk, qs in in_chunks(device_ids):
            txn.execute(f"DELETE FROM device_inbox WHERE user_id = ? AND device_id IN ({qs})", (user_id, *chunk))
            txn.execute(f"DELETE FROM to_device_txns WHERE user_id = ? AND device_id IN ({qs})", (user_id, *chunk))
