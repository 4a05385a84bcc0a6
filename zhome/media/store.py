"""SQL for the media repository: media metadata and cached thumbnails.

Spec: client-server-api "Content repository". Tables from
``storage/schema/0006_media.sql`` and ``0007_media_access.sql`` (when
cached remote media was last used); the server_meta row ``media_key_check``
holds the check value of the current server media key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from zhome.storage.at_rest import Sealer, open_text, seal_text
from zhome.storage.database import Database, Txn

_MEDIA_COLUMNS = ("origin, media_id, user_id, content_type, sniffed_type, upload_name, size, created_ts, "
                  "uploaded_ts, unused_expires_at, storage_name, key_id, wrapped_key")
_THUMB_COLUMNS = ("origin, media_id, width, height, method, animated, content_type, size, storage_name, "
                  "key_id, wrapped_key, created_ts")


@dataclass(frozen=True)
class MediaInfo:
    origin: str
    media_id: str
    user_id: Optional[str]
    content_type: Optional[str]
    sniffed_type: Optional[str]
    upload_name: Optional[str]
    size: Optional[int]
    created_ts: int
    uploaded_ts: Optional[int]
    unused_expires_at: Optional[int]
    storage_name: Optional[str]
    key_id: Optional[str]
    wrapped_key: Optional[str]

    @property
    def uploaded(self) -> bool:
        return self.uploaded_ts is not None and self.storage_name is not None


@dataclass(frozen=True)
class ThumbnailInfo:
    origin: str
    media_id: str
    width: int
    height: int
    method: str
    animated: bool
    content_type: str
    size: int
    storage_name: str
    key_id: str
    wrapped_key: str
    created_ts: int


def _thumb(row: tuple[Any, ...]) -> ThumbnailInfo:
    r = list(row)
    r[5] = bool(r[5])
    return ThumbnailInfo(*r)


def _note_remote_use(t: Txn, origin: str, media_id: str, ts: int, unless_since: Optional[int] = None) -> None:
    """Record that cached remote media was fetched or served at ``ts``; an
    already recorded use at or after ``unless_since`` (default ``ts``) stays."""
    t.execute(
        "INSERT INTO remote_media_cache (origin, media_id, last_access_ts) VALUES (?, ?, ?) "
        "ON CONFLICT (origin, media_id) DO UPDATE SET last_access_ts = excluded.last_access_ts "
        "WHERE remote_media_cache.last_access_ts < ?",
        (origin, media_id, ts, ts if unless_since is None else unless_since))


def _delete_thumbnails(t: Txn, origin: str, media_id: str) -> list[str]:
    """Delete the thumbnail rows of one media; their storage names."""
    t.execute("SELECT storage_name FROM media_thumbnails WHERE origin = ? AND media_id = ?", (origin, media_id))
    names = [r[0] for r in t.fetchall()]
    if names:
        t.execute("DELETE FROM media_thumbnails WHERE origin = ? AND media_id = ?", (origin, media_id))
    return names


class MediaStore:
    def __init__(self, db: Database, local_origin: Optional[str] = None, sealer: Optional[Sealer] = None) -> None:
        self.db = db
        #: Encryption at rest of file names, under the uploader's key (a
        #: remote file's: its server's).
        self.sealer = sealer
        # This server's name: rows of any other origin are a cache of remote
        # media and are tracked for expiry (see cleanup.py). None: not known,
        # nothing is tracked on insert.
        self.local_origin = local_origin

    def seal_name(self, origin: str, media_id: str, user_id: Optional[str], name: Optional[str]) -> Optional[str]:
        return seal_text(self.sealer, user_id or f"server:{origin}", name, f"media.upload_name\x00{origin}\x00{media_id}")

    def open_name(self, origin: str, media_id: str, name: Optional[str]) -> Optional[str]:
        return open_text(self.sealer, name, f"media.upload_name\x00{origin}\x00{media_id}")

    def _media(self, row: tuple[Any, ...]) -> MediaInfo:
        r = list(row)
        r[5] = self.open_name(r[0], r[1], r[5])
        return MediaInfo(*r)

    def _is_remote(self, origin: str) -> bool:
        return self.local_origin is not None and origin != self.local_origin

    # -- server key check -------------------------------------------------
    async def get_meta(self, key: str) -> Optional[str]:
        rows = await self.db.execute("media_get_meta", "SELECT value FROM server_meta WHERE key = ?", key)
        return rows[0][0] if rows else None

    async def set_meta(self, key: str, value: str) -> None:
        def txn(t: Txn) -> None:
            t.execute("DELETE FROM server_meta WHERE key = ?", (key,))
            t.execute("INSERT INTO server_meta (key, value) VALUES (?, ?)", (key, value))

        await self.db.run_interaction("media_set_meta", txn)

    # -- media ------------------------------------------------------------
    async def get_media(self, origin: str, media_id: str) -> Optional[MediaInfo]:
        rows = await self.db.execute(
            "media_get", f"SELECT {_MEDIA_COLUMNS} FROM media WHERE origin = ? AND media_id = ?", origin, media_id)
        return self._media(rows[0]) if rows else None

    async def insert_media(self, info: MediaInfo) -> None:
        def txn(t: Txn) -> None:
            t.execute(
                f"INSERT INTO media ({_MEDIA_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (info.origin, info.media_id, info.user_id, info.content_type, info.sniffed_type,
                 self.seal_name(info.origin, info.media_id, info.user_id, info.upload_name), info.size, info.created_ts, info.uploaded_ts, info.unused_expires_at,
                 info.storage_name, info.key_id, info.wrapped_key))
            if self._is_remote(info.origin):
                _note_remote_use(t, info.origin, info.media_id, info.created_ts)

        await self.db.run_interaction("media_insert", txn)

    async def replace_remote_media(self, info: MediaInfo) -> None:
        def txn(t: Txn) -> None:
            t.execute("DELETE FROM media WHERE origin = ? AND media_id = ?", (info.origin, info.media_id))
            t.execute(
                f"INSERT INTO media ({_MEDIA_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (info.origin, info.media_id, info.user_id, info.content_type, info.sniffed_type,
                 self.seal_name(info.origin, info.media_id, info.user_id, info.upload_name), info.size, info.created_ts, info.uploaded_ts, info.unused_expires_at, info.storage_name,
                 info.key_id, info.wrapped_key))
            # Remote by contract, whether or not local_origin is known.
            _note_remote_use(t, info.origin, info.media_id, info.created_ts)

        await self.db.run_interaction("media_replace_remote", txn)

    async def complete_upload(self, origin: str, media_id: str, content_type: Optional[str],
                              sniffed_type: Optional[str], upload_name: Optional[str], size: int, uploaded_ts: int,
                              storage_name: str, key_id: str, wrapped_key: str) -> bool:
        """Fill in a pending (created) upload; False when it was already filled."""

        def txn(t: Txn) -> bool:
            t.execute("SELECT user_id FROM media WHERE origin = ? AND media_id = ?", (origin, media_id))
            row = t.fetchone()
            sealed_name = self.seal_name(origin, media_id, row[0] if row else None, upload_name)
            t.execute(
                "UPDATE media SET content_type = ?, sniffed_type = ?, upload_name = ?, size = ?, uploaded_ts = ?, "
                "storage_name = ?, key_id = ?, wrapped_key = ?, unused_expires_at = NULL "
                "WHERE origin = ? AND media_id = ? AND uploaded_ts IS NULL",
                (content_type, sniffed_type, sealed_name, size, uploaded_ts, storage_name, key_id, wrapped_key,
                 origin, media_id))
            return t.rowcount == 1

        return await self.db.run_interaction("media_complete_upload", txn)

    async def count_pending(self, user_id: str, now_ms: int) -> int:
        rows = await self.db.execute(
            "media_count_pending",
            "SELECT COUNT(*) FROM media WHERE user_id = ? AND uploaded_ts IS NULL AND unused_expires_at > ?",
            user_id, now_ms)
        return int(rows[0][0])

    async def user_usage(self, user_id: str) -> int:
        rows = await self.db.execute(
            "media_user_usage", "SELECT COALESCE(SUM(size), 0) FROM media WHERE user_id = ?", user_id)
        return int(rows[0][0])

    async def delete_media(self, origin: str, media_id: str) -> list[str]:
        """Delete the metadata of media and its thumbnails; returns their storage names."""

        def txn(t: Txn) -> list[str]:
            t.execute("SELECT storage_name FROM media WHERE origin = ? AND media_id = ?", (origin, media_id))
            names = [r[0] for r in t.fetchall() if r[0]]
            names += _delete_thumbnails(t, origin, media_id)
            t.execute("DELETE FROM media WHERE origin = ? AND media_id = ?", (origin, media_id))
            t.execute("DELETE FROM remote_media_cache WHERE origin = ? AND media_id = ?", (origin, media_id))
            return names

        return await self.db.run_interaction("media_delete", txn)

    # -- housekeeping (cleanup.py) ----------------------------------------
    async def note_remote_access(self, origin: str, media_id: str, now_ms: int, unless_since: int) -> None:
        """Cached remote media was served at ``now_ms``; written only when the
        last recorded use is older than ``unless_since``."""

        def txn(t: Txn) -> None:
            _note_remote_use(t, origin, media_id, now_ms, unless_since)

        await self.db.run_interaction("media_note_remote_access", txn)

    async def expired_pending_uploads(self, local_origin: str, now_ms: int, limit: int) -> list[str]:
        """Media IDs created for an asynchronous upload whose content never came in time."""
        rows = await self.db.execute(
            "media_expired_pending",
            "SELECT media_id FROM media WHERE unused_expires_at < ? AND origin = ? AND uploaded_ts IS NULL "
            "AND storage_name IS NULL ORDER BY unused_expires_at LIMIT ?",
            now_ms, local_origin, limit)
        return [r[0] for r in rows]

    async def delete_expired_pending_uploads(self, local_origin: str, media_ids: list[str],
                                             now_ms: int) -> tuple[int, list[str]]:
        """Delete those of ``media_ids`` still pending and expired at ``now_ms``
        (an upload may have completed meanwhile): (rows deleted, storage names
        of their thumbnails, normally none)."""

        def txn(t: Txn) -> tuple[int, list[str]]:
            deleted = 0
            names: list[str] = []
            for media_id in media_ids:
                t.execute(
                    "DELETE FROM media WHERE origin = ? AND media_id = ? AND unused_expires_at < ? "
                    "AND uploaded_ts IS NULL AND storage_name IS NULL",
                    (local_origin, media_id, now_ms))
                if t.rowcount != 1:
                    continue
                deleted += 1
                names += _delete_thumbnails(t, local_origin, media_id)
            return deleted, names

        return await self.db.run_interaction("media_delete_expired_pending", txn)

    async def stale_remote_media(self, local_origin: str, unused_since: int, limit: int) -> list[tuple[str, str]]:
        """(origin, media_id) of cached remote media not used since ``unused_since``, least recent first."""
        rows = await self.db.execute(
            "media_stale_remote",
            "SELECT origin, media_id FROM remote_media_cache WHERE last_access_ts < ? AND origin <> ? "
            "ORDER BY last_access_ts LIMIT ?",
            unused_since, local_origin, limit)
        return [(r[0], r[1]) for r in rows]

    async def delete_stale_remote_media(self, local_origin: str, items: list[tuple[str, str]],
                                        unused_since: int) -> tuple[int, int, list[str]]:
        """Delete the cached original and thumbnails of those of ``items`` still
        unused since ``unused_since`` (one may have been served meanwhile):
        (originals deleted, thumbnails deleted, their storage names)."""

        def txn(t: Txn) -> tuple[int, int, list[str]]:
            originals = thumbnails = 0
            names: list[str] = []
            for origin, media_id in items:
                if origin == local_origin:
                    continue  # never local media, whatever the table says
                t.execute(
                    "DELETE FROM remote_media_cache WHERE origin = ? AND media_id = ? AND last_access_ts < ?",
                    (origin, media_id, unused_since))
                if t.rowcount != 1:
                    continue
                t.execute("SELECT storage_name FROM media WHERE origin = ? AND media_id = ?", (origin, media_id))
                found = [r[0] for r in t.fetchall()]
                names += [n for n in found if n]
                thumbs = _delete_thumbnails(t, origin, media_id)
                names += thumbs
                if found:
                    t.execute("DELETE FROM media WHERE origin = ? AND media_id = ?", (origin, media_id))
                originals += len(found)
                thumbnails += len(thumbs)
            return originals, thumbnails, names

        return await self.db.run_interaction("media_delete_stale_remote", txn)

    # -- thumbnails -------------------------------------------------------
    async def get_thumbnail(self, origin: str, media_id: str, width: int, height: int, method: str,
                            animated: bool) -> Optional[ThumbnailInfo]:
        rows = await self.db.execute(
            "media_get_thumbnail",
            f"SELECT {_THUMB_COLUMNS} FROM media_thumbnails WHERE origin = ? AND media_id = ? AND width = ? "
            "AND height = ? AND method = ? AND animated = ?",
            origin, media_id, width, height, method, 1 if animated else 0)
        return _thumb(rows[0]) if rows else None

    async def insert_thumbnail(self, info: ThumbnailInfo, of_stored_media: bool = False) -> bool:
        """False when an equal thumbnail was stored meanwhile, or (``of_stored_media``:
        made from a stored original) that media is gone; the caller's file is then unused."""

        def txn(t: Txn) -> bool:
            if of_stored_media:
                t.execute("SELECT 1 FROM media WHERE origin = ? AND media_id = ?", (info.origin, info.media_id))
                if t.fetchone() is None:
                    return False
            # Two makers of the same size can race (the pass after an upload
            # and a request for it): the second stores nothing.
            t.execute(
                f"INSERT INTO media_thumbnails ({_THUMB_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                (info.origin, info.media_id, info.width, info.height, info.method, 1 if info.animated else 0,
                 info.content_type, info.size, info.storage_name, info.key_id, info.wrapped_key, info.created_ts))
            if t.rowcount == 0:
                return False
            if self._is_remote(info.origin):
                _note_remote_use(t, info.origin, info.media_id, info.created_ts)
            return True

        return await self.db.run_interaction("media_insert_thumbnail", txn)

    # -- key rotation -----------------------------------------------------
    async def all_wrapped_keys(self) -> list[tuple[str, str, str, str, str]]:
        """(table, origin, media_id or storage name, key_id, wrapped_key) of every stored file."""
        media = await self.db.execute(
            "media_all_keys", "SELECT origin, media_id, key_id, wrapped_key FROM media WHERE wrapped_key IS NOT NULL")
        thumbs = await self.db.execute(
            "media_all_thumb_keys", "SELECT origin, storage_name, key_id, wrapped_key FROM media_thumbnails")
        return ([("media", r[0], r[1], r[2], r[3]) for r in media]
                + [("thumb", r[0], r[1], r[2], r[3]) for r in thumbs])

    async def rewrap_all(self, updates: list[tuple[str, str, str, str, str]], check_key: str,
                         check_value: str) -> None:
        """Store re-wrapped keys and the new key check value in one transaction."""

        def txn(t: Txn) -> None:
            for table, origin, ident, key_id, wrapped in updates:
                if table == "media":
                    t.execute("UPDATE media SET key_id = ?, wrapped_key = ? WHERE origin = ? AND media_id = ?",
                              (key_id, wrapped, origin, ident))
                else:
                    t.execute("UPDATE media_thumbnails SET key_id = ?, wrapped_key = ? WHERE storage_name = ?",
                              (key_id, wrapped, ident))
            t.execute("DELETE FROM server_meta WHERE key = ?", (check_key,))
            t.execute("INSERT INTO server_meta (key, value) VALUES (?, ?)", (check_key, check_value))

        await self.db.run_interaction("media_rewrap_all", txn)
