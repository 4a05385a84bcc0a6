"""Encryption at rest: file format, ranges, key checks and rotation."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import pytest_twisted

from zhome.config import MediaConfig
from zhome.media import crypto
from zhome.media.repository import KEY_CHECK, check_server_key, load_keys
from zhome.media.rotate import rewrap_all
from zhome.media.store import MediaInfo, MediaStore, ThumbnailInfo
from zhome.storage.database import Database


def test_round_trip_sizes() -> None:
    key = crypto.new_file_key()
    for size in (0, 1, 1000, 1023, 1024, 1025, 5000):
        data = os.urandom(size)
        sealed = crypto.encrypt_bytes(key, data, segment_size=1024)
        assert len(sealed) == crypto.encrypted_size(size, 1024)
        assert crypto.decrypt_all(key, io.BytesIO(sealed), size) == data
        if size >= 16:
            assert data[:16] not in sealed


def test_range_decrypts_only_needed_segments() -> None:
    key = crypto.new_file_key()
    data = os.urandom(10_000)
    sealed = bytearray(crypto.encrypt_bytes(key, data, segment_size=1000))
    for start, end in ((0, 1), (999, 1001), (2500, 7321), (9999, 10_000), (0, 10_000), (4000, 4000)):
        got = b"".join(crypto.decrypt_range(key, io.BytesIO(bytes(sealed)), len(data), start, end))
        assert got == data[start:end]
    # Corrupt segment 0: a range in segment 5 still decrypts (it is never read) ...
    sealed[crypto.HEADER_SIZE + 3] ^= 1
    assert b"".join(crypto.decrypt_range(key, io.BytesIO(bytes(sealed)), len(data), 5000, 5100)) == data[5000:5100]
    # ... and reading segment 0 fails loudly.
    with pytest.raises(crypto.DecryptionError):
        b"".join(crypto.decrypt_range(key, io.BytesIO(bytes(sealed)), len(data), 0, 10))


def test_tampering_truncation_and_wrong_key_fail() -> None:
    key = crypto.new_file_key()
    data = os.urandom(3000)
    sealed = crypto.encrypt_bytes(key, data, segment_size=1000)
    with pytest.raises(crypto.DecryptionError):
        crypto.decrypt_all(crypto.new_file_key(), io.BytesIO(sealed), len(data))
    # Dropping the last segment and claiming a shorter file fails: the
    # segment read as last was not sealed as last.
    truncated = sealed[: crypto.HEADER_SIZE + 2 * (1000 + crypto.TAG_SIZE)]
    with pytest.raises(crypto.DecryptionError):
        crypto.decrypt_all(key, io.BytesIO(truncated), 2000)
    with pytest.raises(crypto.DecryptionError):
        crypto.decrypt_all(key, io.BytesIO(b"garbage" * 10), 10)


def test_key_wrapping_and_key_files(tmp_path: Path) -> None:
    path = str(tmp_path / "k")
    crypto.write_key_file(path)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    key = crypto.read_key_file(path)
    other = crypto.ServerKey(os.urandom(32))
    file_key = crypto.new_file_key()
    wrapped = key.wrap(file_key)
    assert key.unwrap(wrapped) == file_key
    with pytest.raises(crypto.MediaKeyError):
        other.unwrap(wrapped)
    ring = crypto.KeyRing(other, (key,))
    assert ring.unwrap(key.key_id, wrapped) == file_key
    with pytest.raises(crypto.MediaKeyError):
        crypto.KeyRing(other).unwrap(key.key_id, wrapped)

    (tmp_path / "bad").write_text("not base64!!")
    with pytest.raises(crypto.MediaKeyError):
        crypto.read_key_file(str(tmp_path / "bad"))
    (tmp_path / "short").write_text("AAAA")
    with pytest.raises(crypto.MediaKeyError, match="32 bytes"):
        crypto.read_key_file(str(tmp_path / "short"))
    with pytest.raises(crypto.MediaKeyError, match="does not exist"):
        crypto.read_key_file(str(tmp_path / "missing"))


@pytest_twisted.ensureDeferred
async def test_wrong_or_missing_key_detected(database: Database, tmp_path: Path) -> None:
    store = MediaStore(database)
    good = str(tmp_path / "good.key")
    crypto.write_key_file(good)
    await load_keys(MediaConfig(encryption_key_file=good), store, str(tmp_path))
    assert await store.get_meta(KEY_CHECK) == crypto.read_key_file(good).check_value()
    # Same key again: fine.
    await load_keys(MediaConfig(encryption_key_file=good), store, str(tmp_path))

    wrong = str(tmp_path / "wrong.key")
    crypto.write_key_file(wrong)
    with pytest.raises(crypto.MediaKeyError, match="does not match"):
        await load_keys(MediaConfig(encryption_key_file=wrong), store, str(tmp_path))
    with pytest.raises(crypto.MediaKeyError, match="does not exist"):
        await load_keys(MediaConfig(encryption_key_file=str(tmp_path / "gone.key")), store, str(tmp_path))
    # The default key path is only made for a database that never had a key.
    default = os.path.join(str(tmp_path), "media_encryption.key")
    with pytest.raises(crypto.MediaKeyError, match="does not exist"):
        await load_keys(MediaConfig(encryption_key_file=default), store, str(tmp_path))
    assert not os.path.exists(default)


@pytest_twisted.ensureDeferred
async def test_default_key_generated_for_new_database(database: Database, tmp_path: Path) -> None:
    store = MediaStore(database)
    default = os.path.join(str(tmp_path), "media_encryption.key")
    keys = await load_keys(MediaConfig(encryption_key_file=default), store, str(tmp_path))
    assert os.path.exists(default)
    assert keys.current == crypto.read_key_file(default)


@pytest_twisted.ensureDeferred
async def test_rotation_rewraps_every_file_key(database: Database, tmp_path: Path) -> None:
    store = MediaStore(database)
    old = crypto.ServerKey(os.urandom(32))
    new = crypto.ServerKey(os.urandom(32))
    ring = crypto.KeyRing(old)
    await check_server_key(store, ring)
    file_keys = {}
    for i in range(3):
        fk = crypto.new_file_key()
        file_keys[f"m{i}"] = fk
        await store.insert_media(MediaInfo("hs", f"m{i}", "@u:hs", "text/plain", None, None, 10, 1, 1, None,
                                           f"local/00/00/m{i}", old.key_id, old.wrap(fk)))
    tk = crypto.new_file_key()
    await store.insert_thumbnail(ThumbnailInfo("hs", "m0", 32, 32, "crop", False, "image/png", 5,
                                               "thumb/00/00/t0", old.key_id, old.wrap(tk), 1))

    assert await rewrap_all(store, ring, new) == 4
    for media_id, fk in file_keys.items():
        info = await store.get_media("hs", media_id)
        assert info is not None and info.key_id == new.key_id and info.wrapped_key is not None
        assert new.unwrap(info.wrapped_key) == fk
        with pytest.raises(crypto.MediaKeyError):
            old.unwrap(info.wrapped_key)
    thumb = await store.get_thumbnail("hs", "m0", 32, 32, "crop", False)
    assert thumb is not None and new.unwrap(thumb.wrapped_key) == tk
    # The database now expects the new key and refuses the old one.
    await check_server_key(store, crypto.KeyRing(new))
    with pytest.raises(crypto.MediaKeyError):
        await check_server_key(store, crypto.KeyRing(old))


@pytest_twisted.ensureDeferred
async def test_the_same_thumbnail_stored_twice_at_once(database: Database) -> None:
    """Two makers of one thumbnail size at the same moment (the pass after
    an upload and a request for that size): one row is stored, the other
    maker is told so, and neither fails."""
    from twisted.internet import defer

    store = MediaStore(database)
    await store.insert_media(MediaInfo("hs", "m0", "@u:hs", "image/png", None, None, 10, 1, 1, None,
                                       "local/00/00/m0", "k1", "wrapped"))
    for round_ in range(10):
        infos = [ThumbnailInfo("hs", "m0", 32 + round_, 32, "crop", False, "image/png", 5, f"thumb/{round_}/{i}",
                               "k1", "wrapped", 1) for i in range(2)]
        stored = await defer.gatherResults(
            [defer.ensureDeferred(store.insert_thumbnail(i, of_stored_media=True)) for i in infos],
            consumeErrors=True)
        assert sorted(stored) == [False, True]
        thumb = await store.get_thumbnail("hs", "m0", 32 + round_, 32, "crop", False)
        assert thumb is not None and thumb.storage_name in {i.storage_name for i in infos}
