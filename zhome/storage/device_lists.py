"""The device-list stream and the cache of remote users' device lists.

Spec: client-server-api "Tracking the device list for a user" (/sync
``device_lists``, GET /keys/changes) and server-server-api "Device
Management" (m.device_list_update, GET /user/devices/{userId}).

Every change to a user's devices or device keys, local or remote, is one
row of ``device_list_changes`` at a position of this stream; /sync and
/keys/changes read the users who changed between two positions and share a
room with the reader.
"""

from __future__ import annotations

import json
import time
from typing import Any, Iterable, Optional

from zhome.storage.cross_signing import CrossSigningStore
from zhome.storage.database import Database, Txn
from zhome.storage.ids import IdGenerator

# Users who share a joined room with ``?`` (the reader counts as sharing
# with themself through any joined room).
SHARED_USERS_SQL = (
    "SELECT DISTINCT c2.state_key FROM current_state_events c1 JOIN current_state_events c2"
    " ON c2.room_id = c1.room_id AND c2.type = 'm.room.member' AND c2.membership = 'join'"
    " WHERE c1.type = 'm.room.member' AND c1.state_key = ? AND c1.membership = 'join'"
)


class DeviceListStore:
    def __init__(self, db: Database, ids: IdGenerator) -> None:
        self.db = db
        self.ids = ids

    def record_change_txn(self, txn: Txn, user_id: str, device_ids: Iterable[str]) -> list[tuple[int, str, Optional[int]]]:
        """Add stream rows for changed devices of ``user_id`` and return
        (stream_id, device_id, prev_id) for each; prev_id chains the user's
        rows for m.device_list_update."""
        txn.execute("SELECT MAX(stream_id) FROM device_list_changes WHERE user_id = ? AND cross_signing = 0",
                    (user_id,))
        row = txn.fetchone()
        prev: Optional[int] = int(row[0]) if row and row[0] is not None else None
        out = []
        for device_id in device_ids:
            sid = self.ids.next()
            txn.execute("INSERT INTO device_list_changes (stream_id, user_id, device_id, prev_id) VALUES (?,?,?,?)",
                        (sid, user_id, device_id, prev))
            out.append((sid, device_id, prev))
            prev = sid
        return out

    async def record_change(self, user_id: str, device_ids: Iterable[str]) -> list[tuple[int, str, Optional[int]]]:
        ids = list(device_ids)
        return await self.db.run_interaction("device_list_change", self.record_change_txn, user_id, ids)

    async def latest_stream_id(self, user_id: str) -> int:
        """The user's latest m.device_list_update stream_id (cross-signing
        changes travel as m.signing_key_update, outside that chain)."""
        rows = await self.db.execute("device_list_latest",
                                     "SELECT MAX(stream_id) FROM device_list_changes WHERE user_id = ?"
                                     " AND cross_signing = 0", user_id)
        return int(rows[0][0] or 0) if rows else 0

    async def changed_users(self, user_id: str, from_pos: int, to_pos: int) -> set[str]:
        """Users sharing a room with ``user_id`` (and the user) whose devices
        changed in (from_pos, to_pos] (changes visible to others only left out)."""
        if from_pos <= 0:
            # From the start: per shared user through the (user_id,
            # stream_id) index rather than a scan of the whole stream.
            rows = await self.db.execute(
                "device_list_changed_users_all",
                "SELECT u.state_key FROM (" + SHARED_USERS_SQL + " UNION SELECT ?) u WHERE EXISTS ("
                "SELECT 1 FROM device_list_changes d WHERE d.user_id = u.state_key AND d.stream_id <= ?"
                " AND (d.visible_to IS NULL OR d.visible_to = ?))",
                user_id, user_id, to_pos, user_id)
            return {r[0] for r in rows}
        rows = await self.db.execute(
            "device_list_changed_users",
            "SELECT DISTINCT d.user_id FROM device_list_changes d WHERE d.stream_id > ? AND d.stream_id <= ?"
            " AND (d.visible_to IS NULL OR d.visible_to = ?)"
            " AND (d.user_id = ? OR d.user_id IN (" + SHARED_USERS_SQL + "))",
            from_pos, to_pos, user_id, user_id, user_id)
        return {r[0] for r in rows}

    async def users_sharing_room(self, user_id: str) -> set[str]:
        rows = await self.db.execute("users_sharing_room", SHARED_USERS_SQL, user_id)
        return {r[0] for r in rows}

    # -- remote users' device lists ------------------------------------------------
    async def get_remote_stream_ids(self, user_ids: Iterable[str]) -> dict[str, int]:
        rows = await self.db.select_in(
            "remote_device_stream_ids",
            "SELECT user_id, stream_id FROM remote_device_list_streams WHERE user_id IN ({in})", sorted(set(user_ids)))
        return {u: int(s) for u, s in rows}

    async def get_remote_devices(self, user_ids: Iterable[str]) -> dict[str, dict[str, tuple[Optional[str], Any]]]:
        """user -> device -> (display name, keys or None), for the users
        whose lists are cached (one with no devices maps to an empty dict;
        users not cached are left out). One statement, so one snapshot:
        a list dropped or replaced meanwhile is read whole or not at all."""
        rows = await self.db.select_in(
            "remote_devices",
            "SELECT s.user_id, d.device_id, d.display_name, d.keys_json FROM remote_device_list_streams s"
            " LEFT JOIN remote_devices d ON d.user_id = s.user_id WHERE s.user_id IN ({in})",
            sorted(set(user_ids)))
        out: dict[str, dict[str, tuple[Optional[str], Any]]] = {}
        for u, d, name, keys in rows:
            devices = out.setdefault(u, {})
            if d is not None:
                devices[d] = (name, json.loads(keys) if keys else None)
        return out

    async def apply_remote_update(self, user_id: str, device_id: str, stream_id: int, deleted: bool,
                                  display_name: Optional[str], keys: Optional[dict[str, Any]]) -> int:
        """Apply one m.device_list_update to the cache; returns the stream
        position of the change recorded for local readers."""

        def txn_fn(txn: Txn) -> int:
            txn.execute("DELETE FROM remote_devices WHERE user_id = ? AND device_id = ?", (user_id, device_id))
            if not deleted:
                txn.execute("INSERT INTO remote_devices (user_id, device_id, display_name, keys_json) VALUES (?,?,?,?)",
                            (user_id, device_id, display_name, json.dumps(keys) if keys is not None else None))
            txn.execute("UPDATE remote_device_list_streams SET stream_id = ?, updated_ts = ? WHERE user_id = ?",
                        (stream_id, int(time.time() * 1000), user_id))
            return self.record_change_txn(txn, user_id, [device_id])[-1][0]

        return await self.db.run_interaction("remote_device_update", txn_fn)

    async def replace_remote_devices(self, user_id: str, stream_id: int,
                                     devices: dict[str, tuple[Optional[str], Optional[dict[str, Any]]]],
                                     cross_signing: Optional[dict[str, dict[str, Any]]] = None) -> int:
        """Replace the cached list with a full one (a resync), and the
        user's cross-signing keys (key type -> checked key) with it."""

        def txn_fn(txn: Txn) -> int:
            txn.execute("DELETE FROM remote_devices WHERE user_id = ?", (user_id,))
            txn.executemany("INSERT INTO remote_devices (user_id, device_id, display_name, keys_json) VALUES (?,?,?,?)",
                            [(user_id, d, name, json.dumps(k) if k is not None else None)
                             for d, (name, k) in devices.items()])
            txn.execute("DELETE FROM remote_device_list_streams WHERE user_id = ?", (user_id,))
            txn.execute("INSERT INTO remote_device_list_streams (user_id, stream_id, updated_ts) VALUES (?,?,?)",
                        (user_id, stream_id, int(time.time() * 1000)))
            CrossSigningStore.replace_remote_keys_txn(txn, user_id, cross_signing or {})
            return self.record_change_txn(txn, user_id, ["*"])[-1][0]

        return await self.db.run_interaction("remote_device_resync", txn_fn)

    async def forget_remote_user(self, user_id: str) -> Optional[int]:
        """Drop a remote user's cached list (a resync failed, or no room is
        shared any more); their next query goes to their server. Returns
        the position of the recorded change, None if nothing was cached."""

        def txn_fn(txn: Txn) -> Optional[int]:
            txn.execute("DELETE FROM remote_devices WHERE user_id = ?", (user_id,))
            CrossSigningStore.forget_remote_user_txn(txn, user_id)
            txn.execute("DELETE FROM remote_device_list_streams WHERE user_id = ?", (user_id,))
            if txn.rowcount == 0:
                return None
            return self.record_change_txn(txn, user_id, ["*"])[-1][0]

        return await self.db.run_interaction("remote_device_forget", txn_fn)
