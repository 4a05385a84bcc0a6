"""The repository against a real database and a filesystem store."""

from __future__ import annotations

import io
import os
from pathlib import Path

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
    repo = _repo(database, tmp_path)
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
