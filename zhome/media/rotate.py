"""Rotating the server media key without re-encrypting files.

Not a Matrix spec section. Every per-file key is unwrapped with the key
that wrapped it (the current key or one of old_encryption_key_files) and
wrapped again with the new key; the new key check value is stored in the
same transaction, so the database is never left half on each key. Files in
the media store are untouched. Stop the server first: a running server
keeps wrapping new uploads with the key it started with.
"""

from __future__ import annotations

import os

from zhome.config import HomeserverConfig
from zhome.media import crypto
from zhome.media.repository import KEY_CHECK, load_keys
from zhome.media.store import MediaStore


async def rewrap_all(store: MediaStore, keys: crypto.KeyRing, new_key: crypto.ServerKey) -> int:
    rows = await store.all_wrapped_keys()
    updates = []
    for table, origin, ident, key_id, wrapped in rows:
        file_key = keys.unwrap(key_id, wrapped)
        updates.append((table, origin, ident, new_key.key_id, new_key.wrap(file_key)))
    await store.rewrap_all(updates, KEY_CHECK, new_key.check_value())
    return len(updates)


def rotate_media_key(config: HomeserverConfig, new_key_file: str) -> int:
    """Re-wrap every file key under the key in ``new_key_file`` (made if
    absent); returns how many. MediaKeyError when the current key is wrong."""
    from zhome.admin_tasks import _run
    from zhome.storage.database import Database
    from zhome.storage.migrations import prepare_database

    if not os.path.exists(new_key_file):
        crypto.write_key_file(new_key_file)
    new_key = crypto.read_key_file(new_key_file)
    result: dict[str, int] = {}

    async def main(reactor: object) -> None:
        db = Database(config.database.engine, dict(config.database.args))
        try:
            await prepare_database(db)
            store = MediaStore(db)
            keys = await load_keys(config.media, store, config.data_dir)
            result["count"] = await rewrap_all(store, keys, new_key)
        finally:
            await db.close()

    _run(main)
    return result["count"]
