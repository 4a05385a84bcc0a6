"""Upload bodies sealed as they arrive (zhome.media.upload_sink)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import BinaryIO

import pytest
import pytest_twisted

from zhome.media import crypto
from zhome.media.backend import FileSystemBackend
from zhome.media.upload_sink import EncryptingUpload, is_upload


def _plain(backend: FileSystemBackend, name: str, key: bytes, size: int) -> bytes:
    with backend.open(name) as f:
        return crypto.decrypt_all(key, f, size)


def test_upload_paths() -> None:
    assert is_upload(b"POST", b"/_matrix/media/v3/upload")
    assert is_upload(b"POST", b"/_matrix/media/r0/upload")
    assert is_upload(b"PUT", b"/_matrix/media/v3/upload/hs.example/abcDEF123")
    assert not is_upload(b"GET", b"/_matrix/media/v3/upload")
    assert not is_upload(b"POST", b"/_matrix/media/v1/create")
    assert not is_upload(b"POST", b"/_matrix/client/v3/rooms/!r:hs/send/m.room.message/1")
    assert not is_upload(b"PUT", b"/_matrix/media/v3/upload/a/b/c")


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("piece", [1, 7, 4096, 65536, 65537, 300_000])
async def test_pieces_sealed_as_they_arrive_round_trip(tmp_path: Path, piece: int) -> None:
    backend = FileSystemBackend(str(tmp_path / "store"))
    marker = b"zhome-upload-sink-plaintext-marker"
    data = b"\x89PNG\r\n\x1a\n" + marker + os.urandom(100_000) + marker * 50 + os.urandom(100_000)
    body = EncryptingUpload(backend)
    for i in range(0, len(data), piece):
        body.write(data[i:i + piece])
    assert body.tell() == len(data) and body.seek(0) == 0 and body.seek(0, 2) == len(data)
    with pytest.raises(OSError):
        body.read()
    assert body.head == data[:512]
    assert await body.store("local/aa/bb") == len(data)
    body.close()
    assert _plain(backend, "local/aa/bb", body.file_key, len(data)) == data
    # Only the stored file is left in the store: the staging file was named, not copied.
    files = [p for p in (tmp_path / "store").rglob("*") if p.is_file()]
    assert [p.relative_to(tmp_path / "store").as_posix() for p in files] == ["local/aa/bb"]
    # (A short string like "PNG" turns up in random ciphertext now and then.)
    assert not any(marker in p.read_bytes() for p in files)


@pytest_twisted.ensureDeferred
async def test_empty_body(tmp_path: Path) -> None:
    backend = FileSystemBackend(str(tmp_path))
    body = EncryptingUpload(backend)
    assert await body.store("local/e") == 0
    assert _plain(backend, "local/e", body.file_key, 0) == b""


@pytest_twisted.ensureDeferred
async def test_closed_body_is_not_stored(tmp_path: Path) -> None:
    body = EncryptingUpload(FileSystemBackend(str(tmp_path)))
    body.write(b"abc")
    body.close()  # the client went away
    with pytest.raises(OSError):
        await body.store("local/x")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


class _FullDisk(FileSystemBackend):
    def staging_file(self) -> BinaryIO:
        class Full(io.BytesIO):
            def write(self, b: object) -> int:
                raise OSError(28, "No space left on device")

        return Full()


@pytest_twisted.ensureDeferred
async def test_write_error_is_reported_when_stored(tmp_path: Path) -> None:
    body = EncryptingUpload(_FullDisk(str(tmp_path)))
    body.write(os.urandom(200_000))  # does not raise into Twisted
    with pytest.raises(OSError, match="No space"):
        await body.store("local/x")
