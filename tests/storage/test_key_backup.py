"""Server-side key backups in SQL, on both engines: versions per user and
never reused, writes only to the current version, the etag moving with
every change, the replacement rule applied inside the transaction, and
``delete_for_user`` forgetting a user's backups and nobody else's.

Spec: client-server-api "End-to-End Encryption" → "Server-side key backups".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer

from tests.storage.test_event_graph import _server
from zhome.e2ee.key_backup import MEGOLM_BACKUP_V1, should_replace
from zhome.server import HomeServer
from zhome.storage.key_backup import KeyBackupStore, NoSuchVersion, RoomKey, WrongVersion

ALICE = "@alice:test.local"
BOB = "@bob:test.local"
AUTH = {"public_key": "A" * 43}


def _key(session: str, first: int = 0, forwarded: int = 0, verified: bool = False, room: str = "!r:test.local",
         tag: str = "x") -> RoomKey:
    return RoomKey(room, session, first, forwarded, verified, {"ciphertext": tag, "mac": "m", "ephemeral": "e"})


async def _store(tmp_path: Path, db_config: tuple[str, dict[str, Any]]) -> tuple[HomeServer, KeyBackupStore]:
    hs = await _server(tmp_path, db_config)
    return hs, hs.key_backup.store


async def _rows(hs: HomeServer, table: str, user_id: str) -> int:
    rows = await hs.db.execute("t", f"SELECT COUNT(*) FROM {table} WHERE user_id = ?", user_id)
    return int(rows[0][0])


@pytest_twisted.ensureDeferred
async def test_versions_are_per_user_and_never_reused(tmp_path: Path, db_config: tuple[str, dict[str, Any]]) -> None:
    hs, store = await _store(tmp_path, db_config)
    assert await store.get_version(ALICE) is None
    v1 = await store.create_version(ALICE, MEGOLM_BACKUP_V1, AUTH)
    v2 = await store.create_version(ALICE, MEGOLM_BACKUP_V1, {"public_key": "B" * 43})
    assert (v1, v2) == (1, 2)
    assert await store.create_version(BOB, MEGOLM_BACKUP_V1, AUTH) == 1
    current = await store.get_version(ALICE)
    assert current is not None and (current.version, current.auth_data, current.count, current.etag) == \
        (2, {"public_key": "B" * 43}, 0, 0)

    await store.update_version(ALICE, 1, {"public_key": "C" * 43})
    got = await store.get_version(ALICE, 1)
    assert got is not None and got.auth_data == {"public_key": "C" * 43}
    with pytest.raises(NoSuchVersion):
        await store.update_version(ALICE, 7, AUTH)

    assert await store.delete_version(ALICE, 2) is True
    assert await store.delete_version(ALICE, 2) is True  # deleted before: still fine
    assert await store.delete_version(ALICE, 3) is False  # never existed
    again = await store.get_version(ALICE)
    assert again is not None and again.version == 1
    assert await store.create_version(ALICE, MEGOLM_BACKUP_V1, AUTH) == 3
    assert await store.delete_version(ALICE, 3) and await store.delete_version(ALICE, 1)
    assert await store.get_version(ALICE) is None
    assert await store.create_version(ALICE, MEGOLM_BACKUP_V1, AUTH) == 4


@pytest_twisted.ensureDeferred
async def test_concurrent_creates_get_distinct_versions(tmp_path: Path,
                                                        db_config: tuple[str, dict[str, Any]]) -> None:
    hs, store = await _store(tmp_path, db_config)
    got = await defer.gatherResults([defer.ensureDeferred(store.create_version(ALICE, MEGOLM_BACKUP_V1, AUTH))
                                     for _ in range(8)])
    assert sorted(got) == list(range(1, 9))


@pytest_twisted.ensureDeferred
async def test_keys_only_in_current_version_with_etag(tmp_path: Path, db_config: tuple[str, dict[str, Any]]) -> None:
    hs, store = await _store(tmp_path, db_config)
    with pytest.raises(NoSuchVersion):
        await store.put_keys(ALICE, 1, [_key("s1")], should_replace)
    v1 = await store.create_version(ALICE, MEGOLM_BACKUP_V1, AUTH)
    etag, count = await store.put_keys(ALICE, v1, [_key("s1"), _key("s2", room="!o:test.local")], should_replace)
    assert (etag, count) == (1, 2)
    # The same keys again: nothing changes, the etag stays.
    assert await store.put_keys(ALICE, v1, [_key("s1")], should_replace) == (1, 2)
    # A worse key is not stored, a better one is.
    assert await store.put_keys(ALICE, v1, [_key("s1", first=5, tag="worse")], should_replace) == (1, 2)
    assert await store.put_keys(ALICE, v1, [_key("s1", verified=True, first=9, tag="better")],
                                should_replace) == (2, 2)
    keys = await store.get_keys(ALICE, v1, "!r:test.local", "s1")
    assert keys == [_key("s1", verified=True, first=9, tag="better")]
    assert [k.session_id for k in await store.get_keys(ALICE, v1)] == ["s2", "s1"]  # ordered by room
    assert await store.get_keys(ALICE, v1, "!nothing:test.local") == []

    v2 = await store.create_version(ALICE, MEGOLM_BACKUP_V1, AUTH)
    with pytest.raises(WrongVersion) as e:
        await store.put_keys(ALICE, v1, [_key("s3")], should_replace)
    assert e.value.current == v2
    assert await store.get_keys(ALICE, v2) == []
    with pytest.raises(NoSuchVersion):
        await store.get_keys(ALICE, 99)
    with pytest.raises(NoSuchVersion):
        await store.get_keys(BOB, v1)

    # Deletes bump the etag only when they delete something.
    assert await store.delete_keys(ALICE, v1, "!r:test.local", "nope") == (2, 2)
    assert await store.delete_keys(ALICE, v1, "!r:test.local", "s1") == (3, 1)
    assert await store.delete_keys(ALICE, v1) == (4, 0)
    with pytest.raises(NoSuchVersion):
        await store.delete_keys(ALICE, 99)

    # Deleting a version takes its keys with it.
    await store.put_keys(ALICE, v2, [_key("s9")], should_replace)
    assert await _rows(hs, "e2e_room_keys", ALICE) == 1
    assert await store.delete_version(ALICE, v2)
    assert await _rows(hs, "e2e_room_keys", ALICE) == 0
    # The older version is current again and takes keys.
    assert await store.put_keys(ALICE, v1, [_key("s1")], should_replace) == (5, 1)


@pytest_twisted.ensureDeferred
async def test_a_failing_upload_stores_nothing(tmp_path: Path, db_config: tuple[str, dict[str, Any]]) -> None:
    hs, store = await _store(tmp_path, db_config)
    v = await store.create_version(ALICE, MEGOLM_BACKUP_V1, AUTH)

    def explode(stored: RoomKey, new: RoomKey) -> bool:
        raise RuntimeError("replace rule failed")

    await store.put_keys(ALICE, v, [_key("s1")], should_replace)
    with pytest.raises(RuntimeError):
        await store.put_keys(ALICE, v, [_key("s0"), _key("s1")], explode)
    assert [k.session_id for k in await store.get_keys(ALICE, v)] == ["s1"]
    got = await store.get_version(ALICE, v)
    assert got is not None and (got.etag, got.count) == (1, 1)


@pytest_twisted.ensureDeferred
async def test_delete_for_user(tmp_path: Path, db_config: tuple[str, dict[str, Any]]) -> None:
    hs, store = await _store(tmp_path, db_config)
    for user in (ALICE, BOB):
        v = await store.create_version(user, MEGOLM_BACKUP_V1, AUTH)
        await store.create_version(user, MEGOLM_BACKUP_V1, AUTH)
        await store.put_keys(user, v + 1, [_key("s1"), _key("s2")], should_replace)
    await hs.key_backup.delete_for_user(ALICE)
    for table in ("e2e_room_keys", "e2e_room_keys_versions", "e2e_room_keys_version_seq"):
        assert await _rows(hs, table, ALICE) == 0, table
    assert await store.get_version(ALICE) is None
    # Bob's backups are untouched.
    bob = await store.get_version(BOB)
    assert bob is not None and (bob.version, bob.count) == (2, 2)
    assert await _rows(hs, "e2e_room_keys_versions", BOB) == 2
    # Erasing a user without backups is fine too.
    await store.delete_for_user("@nobody:test.local")
