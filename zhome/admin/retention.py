"""Message retention: expired message content is purged, in bounded batches.

A room's policy is its ``m.room.retention`` state event's ``max_lifetime``
(milliseconds; raised to ``retention.min_allowed_lifetime_ms``), else the
server's ``retention.default_max_lifetime_ms``; a room with neither keeps
its messages. A message event whose ``origin_server_ts`` is older than
``now - max_lifetime`` loses its content (it is stored in its redacted
form, as erasure does), and its notifications go; a file it showed is
deleted once no stored event shows it (``zhome/storage/event_media.py``).
Never below the room's
statutory retention floor, never in a room or of a sender under a legal
hold. State events are kept: the room's current state needs them.

The job walks each room in stream order from where it stopped (kept in
``retention_positions``), so each event is looked at once; it stops at the
first event not yet expired. ``run_once(now_ms)`` takes the clock, so tests
drive it with a fake one.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

from twisted.internet import task

from zhome.storage.database import Txn

if TYPE_CHECKING:
    from zhome.server import HomeServer

logger = logging.getLogger(__name__)

MAX_BATCHES_PER_ROOM = 1000


class RetentionJob:
    def __init__(self, hs: "HomeServer", clock: Callable[[], float] = time.time) -> None:
        self.hs = hs
        self.config = hs.config.retention
        self.clock = clock
        self._loop: Optional[task.LoopingCall] = None

    def start(self) -> None:
        if not self.config.enabled:
            return
        self._loop = task.LoopingCall(self._tick)
        self._loop.start(self.config.purge_interval_ms / 1000, now=False)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    async def _tick(self) -> None:
        try:
            await self.run_once(int(self.clock() * 1000))
        except Exception:
            logger.exception("retention purge failed")

    async def _policies(self) -> dict[str, int]:
        """room_id -> max_lifetime in ms, for every room that has one."""
        rows = await self.hs.db.execute(
            "retention_policies", "SELECT c.room_id, e.event_id, e.json, e.sealed FROM current_state_events c"
            " JOIN events e"
            " ON e.event_id = c.event_id WHERE c.type = 'm.room.retention' AND c.state_key = ''")
        out: dict[str, int] = {}
        for room_id, eid, raw, sealed in rows:
            lifetime = (self.hs.events.open_pdu(eid, raw, sealed).get("content") or {}).get("max_lifetime")
            if isinstance(lifetime, int) and not isinstance(lifetime, bool) and lifetime > 0:
                out[room_id] = max(lifetime, self.config.min_allowed_lifetime_ms)
        default = self.config.default_max_lifetime_ms
        if default is not None:
            for (room_id,) in await self.hs.db.execute("retention_rooms", "SELECT room_id FROM rooms"):
                out.setdefault(room_id, default)
        return out

    async def run_once(self, now_ms: int) -> dict[str, Any]:
        """One pass over every room with a policy; returns what it purged and skipped."""
        store = self.hs.privacy_store
        floors = await store.floors()
        held_rooms = {h["target"] for h in await store.list_holds("room")}
        held_users = {h["target"] for h in await store.list_holds("user")}
        report: dict[str, Any] = {"purged": {}, "skipped": {}}
        media: list[str] = []
        # A floor is measured against the real clock whatever ``now_ms`` says,
        # so no clock given to this job can purge what a floor keeps.
        real_now = int(self.clock() * 1000)
        for room_id, lifetime in sorted((await self._policies()).items()):
            if room_id in held_rooms:
                report["skipped"][room_id] = "legal_hold"
                continue
            cutoff = now_ms - lifetime
            if room_id in floors:
                cutoff = min(cutoff, real_now - int(floors[room_id]["floor_ms"]))
            n = await self._purge_room(room_id, cutoff, held_users, media)
            if n:
                report["purged"][room_id] = n
        if media:
            report["media_deleted"] = media
        if report["purged"]:
            logger.info("retention purge: %d events in %d rooms, %d files", sum(report["purged"].values()),
                        len(report["purged"]), len(media))
        return report

    async def _delete_files(self, files: set[tuple[str, str]], held_users: set[str]) -> list[str]:
        """Delete the files that expired events showed and no stored event
        shows any more (uploads and cached remote files alike), unless
        protected or uploaded by someone under a legal hold. Until every
        stored event is indexed, no file is known to be unused: none goes."""
        repo = self.hs.media_repository
        if repo is None or not await self.hs.event_media.complete():
            return []
        deleted = []
        for origin, media_id in sorted(files - await self.hs.event_media.shown(files)):
            if (await self.hs.media_admin.status(origin, media_id))[1]:
                continue
            info = await repo.store.get_media(origin, media_id)
            if info is None or (info.user_id is not None and info.user_id in held_users):
                continue
            if await repo.delete_media(origin, media_id):
                await self.hs.media_admin.forget(origin, media_id)
                deleted.append(f"mxc://{origin}/{media_id}")
        return deleted

    async def _purge_room(self, room_id: str, cutoff_ms: int, held_users: set[str],
                          media: list[str]) -> int:
        """Purge the room's expired events; the files deleted with them are
        added to ``media``."""
        batch = self.config.batch_size
        total = 0
        for _ in range(MAX_BATCHES_PER_ROOM):
            def pick(txn: Txn) -> tuple[list[str], Optional[int], bool]:
                txn.execute("SELECT stream_ordering FROM retention_positions WHERE room_id = ?", (room_id,))
                row = txn.fetchone()
                pos = int(row[0]) if row else 0
                txn.execute("SELECT event_id, stream_ordering, origin_server_ts, state_key, sender FROM events"
                            " WHERE room_id = ? AND stream_ordering > ? ORDER BY stream_ordering LIMIT ?",
                            (room_id, pos, batch))
                ids: list[str] = []
                last: Optional[int] = None
                more = False
                rows = txn.fetchall()
                for eid, so, ts, state_key, sender in rows:
                    if ts >= cutoff_ms:
                        break
                    if state_key is None and sender not in held_users:
                        ids.append(eid)
                    last = so
                else:
                    more = len(rows) == batch
                return ids, last, more

            ids, last, more = await self.hs.db.run_interaction("retention_pick", pick)
            if ids:
                files = await self.hs.event_media.files_of_events(ids)
                await self.hs.privacy_store.purge_content(ids)
                total += len(ids)
                if files:
                    media.extend(await self._delete_files(files, held_users))
            if last is not None:
                def advance(txn: Txn, last: int = last) -> None:
                    txn.execute("DELETE FROM retention_positions WHERE room_id = ?", (room_id,))
                    txn.execute("INSERT INTO retention_positions (room_id, stream_ordering) VALUES (?,?)",
                                (room_id, last))

                await self.hs.db.run_interaction("retention_advance", advance)
            if not more:
                break
        return total
