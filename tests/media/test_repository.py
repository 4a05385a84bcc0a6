"""The repository against a real database and a filesystem store."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from tests.media import images
from zhome.config import MediaConfig
from zhome.http.errors import MatrixError
from zhome.media import crypto
from zhome.media.backend import FileSystemBackend
from zhome.media.repository import MediaRepository
from zhome.media.store import MediaStore
from zhome.storage.database import Database


def _repo(database: Database, tmp_path: Path, **config: object) -> MediaRepository:
    cfg = MediaConfig(max_upload_size=1_000_000, **config)  # type: ignore[arg-type]
    return MediaRepository("hs.test", cfg, MediaStore(database), FileSystemBackend(str(tmp_path / "store")),
                           crypto.KeyRing(crypto.ServerKey(os.urandom(32))))


def _files(tmp_path: Path) -> list[Path]:
    return [p for p in (tmp_path / "store").rglob("*") if p.is_file()]


@pytest_twisted.ensureDeferred
async def test_delete_removes_metadata_file_and_thumbnails(database: Database, tmp_path: Path) -> None:
    repo = _repo(database, tmp_path, thumbnails_on_upload=False)
    data = images.png(300, 200)
    uri = await repo.upload("@a:hs.test", io.BytesIO(data), len(data), "image/png", "p.png")
    media_id = uri.rsplit("/", 1)[1]
    keep = await repo.upload("@a:hs.test", io.BytesIO(b"other"), 5, "text/plain", None)
    for w, h, m in ((32, 32, "crop"), (320, 240, "scale")):
        await repo.get_thumbnail("hs.test", media_id, w, h, m, False)
    assert len(_files(tmp_path)) == 4
    info = await repo.get_media("hs.test", media_id)
    assert await repo.read_all(repo.servable(info)) == data

    assert await repo.delete_media("hs.test", media_id)
    assert len(_files(tmp_path)) == 1
    assert await repo.store.get_media("hs.test", media_id) is None
    assert await repo.store.get_thumbnail("hs.test", media_id, 32, 32, "crop", False) is None
    with pytest.raises(MatrixError) as e:
        await repo.get_media("hs.test", media_id, timeout_ms=0)
    assert e.value.errcode == "M_NOT_FOUND"
    assert not await repo.delete_media("hs.test", media_id)
    assert (await repo.get_media("hs.test", keep.rsplit("/", 1)[1])).size == 5


async def _settle(repo: MediaRepository) -> None:
    from twisted.internet import defer

    await defer.DeferredList(list(repo.background))


@pytest_twisted.ensureDeferred
async def test_thumbnails_made_after_upload(database: Database, tmp_path: Path) -> None:
    repo = _repo(database, tmp_path)
    data = images.jpeg(1200, 900)
    media_id = (await repo.upload("@a:hs.test", io.BytesIO(data), len(data), "image/jpeg", None)).rsplit("/", 1)[1]
    # A request while the batch runs waits for it rather than making its own.
    first = await repo.get_thumbnail("hs.test", media_id, 300, 200, "scale", False)
    await _settle(repo)
    sizes = repo.config.thumbnail_sizes
    for size in sizes:
        row = await repo.store.get_thumbnail("hs.test", media_id, size.width, size.height, size.method, False)
        assert row is not None and row.content_type == "image/jpeg"
    assert len(_files(tmp_path)) == 1 + len(sizes)
    again = await repo.get_thumbnail("hs.test", media_id, 300, 200, "scale", False)
    assert again.storage_name == first.storage_name
    thumb = await repo.read_all(again)
    from PIL import Image

    assert Image.open(io.BytesIO(thumb)).size == (320, 240)
    assert len(_files(tmp_path)) == 1 + len(sizes)


@pytest_twisted.ensureDeferred
async def test_no_thumbnails_after_upload_of_non_images_or_when_off(database: Database, tmp_path: Path) -> None:
    repo = _repo(database, tmp_path)
    await repo.upload("@a:hs.test", io.BytesIO(b"%PDF-1.4 x"), 10, "application/pdf", None)
    broken = b"\xff\xd8\xff\xe0 not really a jpeg"
    await repo.upload("@a:hs.test", io.BytesIO(broken), len(broken), "image/jpeg", None)
    await _settle(repo)
    assert len(_files(tmp_path)) == 2
    off = _repo(database, tmp_path / "off", thumbnails_on_upload=False)
    data = images.png(300, 200)
    await off.upload("@a:hs.test", io.BytesIO(data), len(data), "image/png", None)
    await _settle(off)
    assert len(_files(tmp_path / "off")) == 1


@pytest_twisted.ensureDeferred
async def test_media_deleted_while_its_thumbnails_are_made(database: Database, tmp_path: Path) -> None:
    repo = _repo(database, tmp_path)
    data = images.jpeg(1200, 900)
    read_all = repo.read_all
    ids: list[str] = []

    async def read_then_delete(item: Any) -> bytes:
        plain = await read_all(item)
        # The media goes away after the batch read the original.
        assert await repo.delete_media("hs.test", ids[0])
        return plain

    repo.read_all = read_then_delete  # type: ignore[method-assign]
    ids.append((await repo.upload("@a:hs.test", io.BytesIO(data), len(data), "image/jpeg", None)).rsplit("/", 1)[1])
    media_id = ids[0]
    await _settle(repo)
    assert await repo.store.get_media("hs.test", media_id) is None
    assert _files(tmp_path) == []
    assert await repo.store.get_thumbnail("hs.test", media_id, 32, 32, "crop", False) is None


@pytest_twisted.ensureDeferred
async def test_limits(database: Database, tmp_path: Path) -> None:
    repo = _repo(database, tmp_path, per_user_quota_bytes=1500, max_pending_uploads=2)
    with pytest.raises(MatrixError) as e:
        repo.check_size(1_000_001)
    assert (e.value.code, e.value.errcode) == (413, "M_TOO_LARGE")
    await repo.upload("@a:hs.test", io.BytesIO(b"x" * 1000), 1000, None, None)
    with pytest.raises(MatrixError) as e:
        await repo.upload("@a:hs.test", io.BytesIO(b"x" * 1000), 1000, None, None)
    assert (e.value.code, e.value.errcode) == (403, "M_FORBIDDEN")
    # Nothing was left behind by the refused upload.
    assert len(_files(tmp_path)) == 1
    await repo.create("@a:hs.test")
    await repo.create("@a:hs.test")
    with pytest.raises(MatrixError) as e:
        await repo.create("@a:hs.test")
    assert (e.value.code, e.value.errcode) == (429, "M_LIMIT_EXCEEDED")
