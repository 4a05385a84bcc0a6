"""Media housekeeping against a real database (SQLite and PostgreSQL) and a
filesystem store: expired pending uploads and stale cached remote media."""

from __future__ import annotations

import io
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from prometheus_client import REGISTRY
from twisted.internet import task

from tests.media import images
from zhome.config import MediaConfig
from zhome.http.errors import MatrixError
from zhome.media import crypto, multipart
from zhome.media.backend import FileSystemBackend
from zhome.media.cleanup import MediaCleaner, RemoteAccessRecorder
from zhome.media.repository import MediaRepository
from zhome.media.store import MediaInfo, MediaStore
from zhome.storage.database import Database
from zhome.storage.migrations import SCHEMA_DIR, prepare_database

HOUR_MS = 3600 * 1000
DAY_MS = 24 * HOUR_MS
MAX_AGE_MS = 10 * DAY_MS
T0 = 1_700_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now

    def advance_ms(self, ms: int) -> None:
        self.now += ms / 1000


class FakeFederation:
    """Answers federation media requests as an origin server would."""

    def __init__(self) -> None:
        self.media: dict[str, bytes] = {}
        self.thumbnails: dict[str, bytes] = {}
        self.requests: list[str] = []

    async def open_get(self, server_name: str, path: str, query: Any = None, **kw: Any) -> Any:
        from tests.media.remote_fakes import BytesResponse
        from zhome.federation.transport import FederationHttpError

        self.requests.append(path)
        kind, media_id = path.split("/")[-2:]
        data = (self.media if kind == "download" else self.thumbnails).get(media_id)
        if data is None:
            raise FederationHttpError(404, "M_NOT_FOUND", {"errcode": "M_NOT_FOUND"})
        content_type = "image/png" if data.startswith(b"\x89PNG") else "application/octet-stream"
        head, tail = multipart.framing("b0undary", content_type, None)
        return BytesResponse("multipart/mixed; boundary=b0undary", head + data + tail)


def _repo(database: Database, tmp_path: Path, clock: Clock, federation: FakeFederation | None = None,
          **config: object) -> MediaRepository:
    settings: dict[str, object] = {"max_upload_size": 1_000_000, "thumbnails_on_upload": False,
                                   "remote_cache_max_age_ms": MAX_AGE_MS}
    settings.update(config)
    cfg = MediaConfig(**settings)  # type: ignore[arg-type]
    return MediaRepository("hs.test", cfg, MediaStore(database, local_origin="hs.test"),
                           FileSystemBackend(str(tmp_path / "store")),
                           crypto.KeyRing(crypto.ServerKey(os.urandom(32))), federation_client=federation,
                           clock=clock)


def _files(tmp_path: Path) -> list[Path]:
    return [p for p in (tmp_path / "store").rglob("*") if p.is_file()]


async def _count(database: Database, table: str) -> int:
    return int((await database.execute("count", f"SELECT COUNT(*) FROM {table}"))[0][0])


def _removed_metric(kind: str) -> float:
    return REGISTRY.get_sample_value("zhome_media_cleanup_removed_total", {"kind": kind}) or 0.0


# -- pending uploads ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_expired_pending_upload_removed(database: Database, tmp_path: Path) -> None:
    clock = Clock()
    repo = _repo(database, tmp_path, clock)
    uri, _ = await repo.create("@a:hs.test")
    media_id = uri.rsplit("/", 1)[1]
    before = _removed_metric("pending_upload")

    clock.advance_ms(repo.config.unused_expires_after_ms + 1)
    result = await MediaCleaner(repo).run_once()

    assert result.pending_uploads == 1
    assert await repo.store.get_media("hs.test", media_id) is None
    assert _removed_metric("pending_upload") == before + 1
    # The user's pending count no longer includes it, and the ID is gone.
    assert await repo.store.count_pending("@a:hs.test", 0) == 0
    with pytest.raises(MatrixError) as e:
        await repo.upload_to("@a:hs.test", "hs.test", media_id, io.BytesIO(b"late"), 4, "text/plain", None)
    assert e.value.errcode == "M_NOT_FOUND"


@pytest_twisted.ensureDeferred
async def test_unexpired_pending_upload_kept(database: Database, tmp_path: Path) -> None:
    clock = Clock()
    repo = _repo(database, tmp_path, clock)
    uri, expires = await repo.create("@a:hs.test")
    media_id = uri.rsplit("/", 1)[1]

    clock.now = expires / 1000  # at the expiry instant it is not yet expired
    result = await MediaCleaner(repo).run_once()

    assert result.pending_uploads == 0
    info = await repo.store.get_media("hs.test", media_id)
    assert info is not None and not info.uploaded
    await repo.upload_to("@a:hs.test", "hs.test", media_id, io.BytesIO(b"in time"), 7, "text/plain", None)
    assert (await repo.get_media("hs.test", media_id)).size == 7


@pytest_twisted.ensureDeferred
async def test_uploaded_local_media_kept_regardless_of_age(database: Database, tmp_path: Path) -> None:
    clock = Clock()
    repo = _repo(database, tmp_path, clock)
    data = images.png(300, 200)
    direct = (await repo.upload("@a:hs.test", io.BytesIO(data), len(data), "image/png", None)).rsplit("/", 1)[1]
    await repo.get_thumbnail("hs.test", direct, 32, 32, "crop", False)
    uri, _ = await repo.create("@a:hs.test")
    late = uri.rsplit("/", 1)[1]
    await repo.upload_to("@a:hs.test", "hs.test", late, io.BytesIO(b"content"), 7, "text/plain", None)
    # Even a (bogus) stale use record for local media removes nothing.
    await database.execute("bogus", "INSERT INTO remote_media_cache (origin, media_id, last_access_ts) "
                           "VALUES (?, ?, ?)", "hs.test", direct, 0)
    files = sorted(_files(tmp_path))
    assert len(files) == 3

    clock.advance_ms(100 * 365 * DAY_MS)
    result = await MediaCleaner(repo).run_once()

    assert (result.pending_uploads, result.remote_media, result.remote_thumbnails) == (0, 0, 0)
    assert sorted(_files(tmp_path)) == files
    for media_id in (direct, late):
        info = await repo.store.get_media("hs.test", media_id)
        assert info is not None and info.uploaded
    assert await repo.store.get_thumbnail("hs.test", direct, 32, 32, "crop", False) is not None
    assert await repo.read_all(repo.servable(await repo.get_media("hs.test", direct))) == data


# -- cached remote media ----------------------------------------------------------


async def _cache_remote(repo: MediaRepository, federation: FakeFederation) -> tuple[bytes, bytes]:
    """remote.test/full: an original and a thumbnail made from it here;
    remote.test/avatar: only a thumbnail, fetched from the origin."""
    original = images.png(300, 200)
    thumb = images.png(32, 32)
    federation.media["full"] = original
    federation.thumbnails["avatar"] = thumb
    info = await repo.get_media("remote.test", "full")
    assert info.size == len(original)
    await repo.get_thumbnail("remote.test", "full", 32, 32, "crop", False)
    fetched = await repo.get_thumbnail("remote.test", "avatar", 32, 32, "crop", False)
    assert await repo.read_all(fetched) == thumb
    return original, thumb


@pytest_twisted.ensureDeferred
async def test_old_remote_media_thumbnails_and_files_removed(database: Database, tmp_path: Path) -> None:
    clock = Clock()
    federation = FakeFederation()
    repo = _repo(database, tmp_path, clock, federation)
    local = (await repo.upload("@a:hs.test", io.BytesIO(b"mine"), 4, "text/plain", None)).rsplit("/", 1)[1]
    original, _ = await _cache_remote(repo, federation)
    assert len(_files(tmp_path)) == 4  # local, remote original, its thumbnail, remote avatar thumbnail
    before = (_removed_metric("remote_media"), _removed_metric("remote_thumbnail"))

    clock.advance_ms(MAX_AGE_MS + 1)
    result = await MediaCleaner(repo).run_once()

    assert (result.remote_media, result.remote_thumbnails, result.files, result.file_errors) == (1, 2, 3, 0)
    assert (_removed_metric("remote_media"), _removed_metric("remote_thumbnail")) == (before[0] + 1, before[1] + 2)
    assert await repo.store.get_media("remote.test", "full") is None
    assert await repo.store.get_thumbnail("remote.test", "full", 32, 32, "crop", False) is None
    assert await repo.store.get_thumbnail("remote.test", "avatar", 32, 32, "crop", False) is None
    assert await _count(database, "remote_media_cache") == 0
    assert len(_files(tmp_path)) == 1
    assert (await repo.get_media("hs.test", local)).size == 4

    # Asked for again, it is fetched again from the origin, and tracked again.
    federation.requests.clear()
    info = await repo.get_media("remote.test", "full")
    assert await repo.read_all(repo.servable(info)) == original
    assert federation.requests == ["/_matrix/federation/v1/media/download/full"]
    assert await _count(database, "remote_media_cache") == 1


@pytest_twisted.ensureDeferred
async def test_recent_remote_media_kept(database: Database, tmp_path: Path) -> None:
    clock = Clock()
    federation = FakeFederation()
    repo = _repo(database, tmp_path, clock, federation)
    await _cache_remote(repo, federation)
    files = sorted(_files(tmp_path))
    cleaner = MediaCleaner(repo)

    clock.advance_ms(MAX_AGE_MS - HOUR_MS)
    result = await cleaner.run_once()
    assert (result.remote_media, result.remote_thumbnails) == (0, 0)
    assert sorted(_files(tmp_path)) == files

    # Served (as the download and thumbnail endpoints record it): kept a
    # further max age from then; the item that was not served goes.
    await RemoteAccessRecorder(repo).record("remote.test", "full")
    clock.advance_ms(2 * HOUR_MS)
    result = await cleaner.run_once()
    assert (result.remote_media, result.remote_thumbnails) == (0, 1)
    assert await repo.store.get_media("remote.test", "full") is not None
    assert await repo.store.get_thumbnail("remote.test", "full", 32, 32, "crop", False) is not None
    assert await repo.store.get_thumbnail("remote.test", "avatar", 32, 32, "crop", False) is None

    clock.advance_ms(MAX_AGE_MS)
    result = await cleaner.run_once()
    assert (result.remote_media, result.remote_thumbnails) == (1, 1)
    assert _files(tmp_path) == []


@pytest_twisted.ensureDeferred
async def test_remote_cache_kept_forever_when_max_age_is_null(database: Database, tmp_path: Path) -> None:
    clock = Clock()
    federation = FakeFederation()
    repo = _repo(database, tmp_path, clock, federation, remote_cache_max_age_ms=None)
    await _cache_remote(repo, federation)

    clock.advance_ms(100 * 365 * DAY_MS)
    result = await MediaCleaner(repo).run_once()

    assert (result.remote_media, result.remote_thumbnails) == (0, 0)
    assert len(_files(tmp_path)) == 3


@pytest_twisted.ensureDeferred
async def test_access_written_at_most_once_per_resolution(database: Database, tmp_path: Path) -> None:
    clock = Clock()
    federation = FakeFederation()
    repo = _repo(database, tmp_path, clock, federation)
    await _cache_remote(repo, federation)
    writes: list[tuple[str, str]] = []
    real = repo.store.note_remote_access

    async def counting(origin: str, media_id: str, now_ms: int, unless_since: int) -> None:
        writes.append((origin, media_id))
        await real(origin, media_id, now_ms, unless_since)

    repo.store.note_remote_access = counting  # type: ignore[method-assign]

    async def last_access() -> int:
        rows = await database.execute("t", "SELECT last_access_ts FROM remote_media_cache WHERE media_id = ?",
                                      "full")
        return int(rows[0][0])

    recorder = RemoteAccessRecorder(repo)
    assert recorder.resolution_ms == HOUR_MS
    fetched_at = await last_access()
    for _ in range(5):
        await recorder.record("remote.test", "full")
        clock.advance_ms(60_000)
    await recorder.record("hs.test", "local-media-is-not-tracked")
    assert writes == [("remote.test", "full")]
    # The first use came within the resolution of the fetch: not rewritten.
    assert await last_access() == fetched_at

    # Another process (a fresh recorder) also leaves a recent record alone.
    await RemoteAccessRecorder(repo).record("remote.test", "full")
    assert await last_access() == fetched_at

    clock.advance_ms(HOUR_MS)
    await recorder.record("remote.test", "full")
    assert len(writes) == 3
    assert await last_access() == repo.now_ms()


@pytest_twisted.ensureDeferred
async def test_access_recorder_memory_is_bounded(database: Database, tmp_path: Path) -> None:
    repo = _repo(database, tmp_path, Clock())
    recorder = RemoteAccessRecorder(repo, max_entries=3)
    for i in range(10):
        await recorder.record("remote.test", f"m{i}")
    assert len(recorder._recent) == 3
    assert await _count(database, "remote_media_cache") == 10


# -- batches, scheduling, errors -----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_batch_bound_respected(database: Database, tmp_path: Path) -> None:
    clock = Clock()
    repo = _repo(database, tmp_path, clock)
    now = repo.now_ms()
    for i in range(7):
        await repo.store.insert_media(MediaInfo("hs.test", f"pending{i}", "@a:hs.test", None, None, None, None,
                                                now, None, now + 1000, None, None, None))
        await repo.store.replace_remote_media(MediaInfo(
            "remote.test", f"remote{i}", None, "text/plain", None, None, 1, now, now, None, None, None, None))
    cleaner = MediaCleaner(repo, batch_size=2, max_batches=2)
    clock.advance_ms(MAX_AGE_MS + 1)

    first = await cleaner.run_once()
    assert (first.pending_uploads, first.remote_media) == (4, 4)
    assert await _count(database, "media") == 6
    second = await cleaner.run_once()
    assert (second.pending_uploads, second.remote_media) == (3, 3)
    assert await _count(database, "media") == 0
    third = await cleaner.run_once()
    assert (third.pending_uploads, third.remote_media) == (0, 0)


@pytest_twisted.ensureDeferred
async def test_loop_runs_passes_and_stops(database: Database, tmp_path: Path) -> None:
    clock = Clock()
    repo = _repo(database, tmp_path, clock, cleanup_interval_ms=60_000)
    scheduler = task.Clock()
    cleaner = MediaCleaner(repo, scheduler=scheduler)
    cleaner.start()
    uri, _ = await repo.create("@a:hs.test")
    clock.advance_ms(repo.config.unused_expires_after_ms + 1)
    assert len(scheduler.getDelayedCalls()) == 1  # not run at start

    scheduler.advance(60)  # starts a pass; stop() waits for it to finish
    await cleaner.stop()

    assert await repo.store.get_media("hs.test", uri.rsplit("/", 1)[1]) is None
    assert scheduler.getDelayedCalls() == []
    await cleaner.stop()  # twice is fine

    # Stopped between passes (the usual shutdown): nothing left scheduled.
    idle = MediaCleaner(repo, scheduler=scheduler)
    idle.start()
    assert len(scheduler.getDelayedCalls()) == 1
    await idle.stop()
    assert scheduler.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_errors_are_logged_not_raised(database: Database, tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    federation = FakeFederation()
    repo = _repo(database, tmp_path, clock, federation)
    await _cache_remote(repo, federation)
    uri, _ = await repo.create("@a:hs.test")

    async def broken(*args: Any) -> list[str]:
        raise RuntimeError("database on fire")

    repo.store.expired_pending_uploads = broken  # type: ignore[method-assign]
    deletes: list[str] = []
    real_delete = repo.backend.delete

    def flaky_delete(name: str) -> None:
        deletes.append(name)
        if len(deletes) == 1:
            raise OSError("disk on fire")
        real_delete(name)

    repo.backend.delete = flaky_delete  # type: ignore[method-assign]
    clock.advance_ms(MAX_AGE_MS + 1)
    with caplog.at_level(logging.WARNING):
        result = await MediaCleaner(repo).run_once()

    # The pending part failed; the remote part still ran, and one file
    # that could not be deleted did not stop the others.
    assert "removing expired pending uploads failed" in caplog.text
    assert "could not delete media file" in caplog.text
    assert (result.pending_uploads, result.remote_media, result.remote_thumbnails) == (0, 1, 2)
    assert (result.files, result.file_errors) == (2, 1)
    assert len(_files(tmp_path)) == 1
    assert await repo.store.get_media("hs.test", uri.rsplit("/", 1)[1]) is not None


# -- migration -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_migration_tracks_media_cached_before_it(db_config: Any, tmp_path: Path) -> None:
    schema = tmp_path / "schema"
    schema.mkdir()
    for f in sorted(SCHEMA_DIR.glob("*.sql")):
        if int(f.name[:4]) <= 6:
            shutil.copy(f, schema / f.name)
    db = Database(*db_config)
    try:
        assert await prepare_database(db, schema) == 6
        rows = [("hs.test", "local", "@a:hs.test"), ("hs.test", "pending", "@a:hs.test"),
                ("remote.test", "cached", None)]
        for origin, media_id, user_id in rows:
            await db.execute("i", "INSERT INTO media (origin, media_id, user_id, created_ts) VALUES (?, ?, ?, ?)",
                             origin, media_id, user_id, 1000)
        for origin, media_id, width in (("hs.test", "local", 32), ("remote.test", "cached", 32),
                                        ("remote.test", "avatar", 32), ("remote.test", "avatar", 96)):
            await db.execute(
                "i", "INSERT INTO media_thumbnails (origin, media_id, width, height, method, animated, "
                "content_type, size, storage_name, key_id, wrapped_key, created_ts) "
                "VALUES (?, ?, ?, ?, 'crop', 0, 'image/png', 1, ?, 'k', 'w', 1000)",
                origin, media_id, width, width, f"thumb/{media_id}{width}")
        shutil.copy(SCHEMA_DIR / "0007_media_access.sql", schema / "0007_media_access.sql")
        assert await prepare_database(db, schema) == 7
        tracked = await db.execute("t", "SELECT origin, media_id, last_access_ts FROM remote_media_cache "
                                   "ORDER BY media_id")
        assert [(o, m) for o, m, _ in tracked] == [("remote.test", "avatar"), ("remote.test", "cached")]
        # Counted as used at the upgrade, not at the (old) fetch.
        assert all(abs(ts - time.time() * 1000) < 600_000 for _, _, ts in tracked)
    finally:
        await db.close()
