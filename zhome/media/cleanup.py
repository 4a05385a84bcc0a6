"""Media housekeeping: expired pending uploads and stale cached remote media.

Spec: client-server-api "Content repository": a media ID made by
``POST /_matrix/media/v1/create`` whose content has not come by its
``unused_expires_at`` is of no further use, so its row is removed.
Server-server-api "Content Repository" leaves how long a server keeps its
copies of other servers' media to the server: zhome removes a cached item
(original and thumbnails, rows and encrypted files) once it has not been
fetched or served for ``media.remote_cache_max_age_ms``; the origin still
has it, and the next request fetches it again. Local media is never removed
here (only the admin API deletes it).

Uses are recorded in ``remote_media_cache`` (see ``store``) at most once per
``resolution_ms`` per item, so serving popular media does not write to the
database on every request. Passes run from a LoopingCall, in bounded
batches, and never raise: an error is logged and the next pass tries again.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter
from twisted.internet import defer, task, threads

from zhome.media.backend import StorageBackend
from zhome.media.repository import MediaRepository

logger = logging.getLogger(__name__)

REMOVED = Counter("zhome_media_cleanup_removed_total", "Media removed by housekeeping", ["kind"])

#: Rows handled per database transaction, and transactions per kind per pass:
#: one pass removes at most BATCH_SIZE * MAX_BATCHES items of each kind, the
#: rest waits for the next pass.
BATCH_SIZE = 500
MAX_BATCHES = 20
#: Uses of one cached item closer together than this are recorded once.
ACCESS_RESOLUTION_MS = 3600 * 1000
#: Items whose last recorded use is remembered in memory (to skip the
#: database write); the least recently recorded are forgotten first.
ACCESS_MEMORY = 10_000


def access_resolution_ms(max_age_ms: int | None) -> int:
    # Coarse next to the maximum age, so a used item is never taken for unused.
    if max_age_ms is None:
        return ACCESS_RESOLUTION_MS
    return max(1, min(ACCESS_RESOLUTION_MS, max_age_ms // 10))


class RemoteAccessRecorder:
    """Notes that cached remote media was served, cheaply."""

    def __init__(self, repo: MediaRepository, max_entries: int = ACCESS_MEMORY) -> None:
        self.repo = repo
        self.resolution_ms = access_resolution_ms(repo.config.remote_cache_max_age_ms)
        self.max_entries = max_entries
        self._recent: OrderedDict[tuple[str, str], int] = OrderedDict()

    async def record(self, origin: str, media_id: str) -> None:
        """Never raises: failing to note a use must not fail the download."""
        if origin == self.repo.server_name:
            return
        now = self.repo.now_ms()
        key = (origin, media_id)
        last = self._recent.get(key)
        if last is not None and 0 <= now - last < self.resolution_ms:
            return
        self._recent[key] = now
        self._recent.move_to_end(key)
        while len(self._recent) > self.max_entries:
            self._recent.popitem(last=False)
        try:
            # The condition in SQL keeps other processes' recent writes.
            await self.repo.store.note_remote_access(origin, media_id, now, now - self.resolution_ms)
        except Exception:
            self._recent.pop(key, None)
            logger.warning("could not record the use of cached media %s/%s", origin, media_id, exc_info=True)


@dataclass
class CleanupResult:
    pending_uploads: int = 0
    remote_media: int = 0
    remote_thumbnails: int = 0
    files: int = 0
    file_errors: int = 0


def _delete_files_blocking(backend: StorageBackend, names: list[str]) -> tuple[int, int]:
    deleted = failed = 0
    for name in names:
        try:
            backend.delete(name)
            deleted += 1
        except Exception:
            # The rows are gone already, so the file is an orphan; it stays
            # encrypted and its wrapped file key went with the row.
            failed += 1
            logger.warning("could not delete media file %s", name, exc_info=True)
    return deleted, failed


class MediaCleaner:
    def __init__(self, repo: MediaRepository, batch_size: int = BATCH_SIZE, max_batches: int = MAX_BATCHES,
                 scheduler: Any = None) -> None:
        self.repo = repo
        self.batch_size = batch_size
        self.max_batches = max_batches
        # What schedules the passes (an IReactorTime); None: the reactor.
        self.scheduler = scheduler
        self._loop: task.LoopingCall | None = None
        self._loop_done: defer.Deferred[task.LoopingCall] | None = None
        self._stopping = False

    # ------------------------------------------------------------------
    # Scheduling

    def start(self) -> None:
        """Run a pass every ``media.cleanup_interval_ms``, the first one
        interval after start-up (so start-up does not wait for it)."""
        if self._loop is not None:
            return
        self._stopping = False
        self._loop = task.LoopingCall(self._tick)
        if self.scheduler is not None:
            self._loop.clock = self.scheduler
        self._loop_done = self._loop.start(self.repo.config.cleanup_interval_ms / 1000, now=False)
        self._loop_done.addErrback(lambda f: logger.error("media cleanup stopped: %s", f.getTraceback()))

    def _tick(self) -> defer.Deferred[CleanupResult]:
        return defer.ensureDeferred(self.run_once())

    async def stop(self) -> None:
        """Stop the loop; waits for a running pass, which ends after its batch."""
        self._stopping = True
        loop, done = self._loop, self._loop_done
        self._loop = self._loop_done = None
        if loop is None or done is None:
            return
        if loop.running:
            loop.stop()
        # Fires once a running pass has finished (at once when none runs).
        d: defer.Deferred[None] = defer.Deferred()
        done.addBoth(lambda _: d.callback(None))
        await d

    # ------------------------------------------------------------------
    # One pass

    async def run_once(self) -> CleanupResult:
        """One pass over both kinds; never raises."""
        result = CleanupResult()
        try:
            await self._remove_expired_pending(result)
        except Exception:
            logger.exception("removing expired pending uploads failed")
        try:
            await self._remove_stale_remote(result)
        except Exception:
            logger.exception("removing stale cached remote media failed")
        if result.pending_uploads or result.remote_media or result.remote_thumbnails or result.file_errors:
            logger.info("media cleanup: removed %d expired pending uploads, %d cached remote media and %d remote "
                        "thumbnails (%d files, %d could not be deleted)", result.pending_uploads,
                        result.remote_media, result.remote_thumbnails, result.files, result.file_errors)
        return result

    async def _delete_files(self, names: list[str], result: CleanupResult) -> None:
        if not names:
            return
        deleted, failed = await threads.deferToThread(_delete_files_blocking, self.repo.backend, names)
        result.files += deleted
        result.file_errors += failed

    async def _remove_expired_pending(self, result: CleanupResult) -> None:
        store, origin = self.repo.store, self.repo.server_name
        for _ in range(self.max_batches):
            if self._stopping:
                return
            now = self.repo.now_ms()
            media_ids = await store.expired_pending_uploads(origin, now, self.batch_size)
            if not media_ids:
                return
            deleted, names = await store.delete_expired_pending_uploads(origin, media_ids, now)
            result.pending_uploads += deleted
            REMOVED.labels("pending_upload").inc(deleted)
            await self._delete_files(names, result)
            if len(media_ids) < self.batch_size:
                return

    async def _remove_stale_remote(self, result: CleanupResult) -> None:
        max_age = self.repo.config.remote_cache_max_age_ms
        if max_age is None:
            return
        store, local = self.repo.store, self.repo.server_name
        for _ in range(self.max_batches):
            if self._stopping:
                return
            unused_since = self.repo.now_ms() - max_age
            items = await store.stale_remote_media(local, unused_since, self.batch_size)
            if not items:
                return
            originals, thumbnails, names = await store.delete_stale_remote_media(local, items, unused_since)
            result.remote_media += originals
            result.remote_thumbnails += thumbnails
            REMOVED.labels("remote_media").inc(originals)
            REMOVED.labels("remote_thumbnail").inc(thumbnails)
            await self._delete_files(names, result)
            if len(items) < self.batch_size:
                return


__all__ = ["CleanupResult", "MediaCleaner", "RemoteAccessRecorder", "access_resolution_ms"]
