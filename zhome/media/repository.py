"""The media repository service: store, fetch, thumbnail and delete media.

Spec: client-server-api "Content repository" (upload, create + PUT upload,
download, thumbnails, limits) and server-server-api "Content Repository"
(fetching remote media over federation). Every file goes to the storage
backend encrypted (see ``crypto``); metadata goes to SQL (see ``store``).
File I/O, encryption and thumbnailing run off the reactor thread.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Optional

from twisted.internet import defer, threads
from twisted.python.failure import Failure

from zhome.config import MediaConfig, ThumbnailSize
from zhome.http.errors import MatrixError, forbidden, not_found, not_yet_uploaded, too_large
from zhome.media import crypto, remote
from zhome.media.backend import StorageBackend
from zhome.media.headers import normalise_content_type, sanitise_filename
from zhome.media.store import MediaInfo, MediaStore, ThumbnailInfo
from zhome.media.upload_sink import EncryptingUpload
from zhome.media.thumbnailer import SNIFF_BYTES, THUMBNAILABLE, ImageTooLarge, Thumbnail, ThumbnailError, \
    decode_still, make_thumbnail, render, sniff_content_type

logger = logging.getLogger(__name__)

KEY_CHECK = "media_key_check"
MAX_TIMEOUT_MS = 60_000
DEFAULT_TIMEOUT_MS = 20_000


def new_media_id() -> str:
    # 24 characters of [A-Za-z0-9_-], as the spec's media-id whitelist allows.
    return secrets.token_urlsafe(18)


def new_storage_name(kind: str) -> str:
    h = secrets.token_hex(16)
    return f"{kind}/{h[:2]}/{h[2:4]}/{h[4:]}"


@dataclass(frozen=True)
class Servable:
    """A stored file ready to serve: what it is and how to decrypt it."""

    content_type: str
    upload_name: Optional[str]
    size: int
    storage_name: str
    key_id: str
    wrapped_key: str


async def check_server_key(store: MediaStore, keys: crypto.KeyRing) -> None:
    """Refuse to start with a key that is not the one the database knows."""
    stored = await store.get_meta(KEY_CHECK)
    current = keys.current.check_value()
    if stored is None:
        await store.set_meta(KEY_CHECK, current)
    elif stored != current:
        raise crypto.MediaKeyError(
            "media encryption key does not match the one this database was set up with "
            "(wrong media.encryption_key_file? after a rotation, keep the old key in old_encryption_key_files)"
        )


async def load_keys(config: MediaConfig, store: MediaStore, data_dir: str) -> crypto.KeyRing:
    """The server media keys; MediaKeyError with one line when missing or wrong."""
    path = config.encryption_key_file
    assert path is not None
    default_path = os.path.join(data_dir, "media_encryption.key")
    if not os.path.exists(path) and path == default_path and await store.get_meta(KEY_CHECK) is None:
        # A new database with no key configured: make one, once.
        os.makedirs(os.path.dirname(path), exist_ok=True)
        crypto.write_key_file(path)
        logger.warning("Generated a new media encryption key at %s: back it up", path)
    current = crypto.read_key_file(path)
    old = tuple(crypto.read_key_file(p) for p in config.old_encryption_key_files)
    keys = crypto.KeyRing(current, old)
    await check_server_key(store, keys)
    return keys


class MediaRepository:
    def __init__(self, server_name: str, config: MediaConfig, store: MediaStore, backend: StorageBackend,
                 keys: crypto.KeyRing, federation_client: Any = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.server_name = server_name
        self.config = config
        self.store = store
        self.backend = backend
        self.keys = keys
        self.federation_client = federation_client
        self.clock = clock
        self.max_upload_size = config.effective_max_upload_size
        self._remote_inflight: dict[tuple[str, str], _Shared] = {}
        #: (origin, media_id) -> whether an admin quarantined it; set by the server.
        self.is_quarantined: Callable[[str, str], bool] = lambda origin, media_id: False
        self._thumb_inflight: dict[tuple[Any, ...], _Promise] = {}
        # Thumbnails made after uploads: one image at a time, so a burst of
        # uploads does not take every thread.
        self._batch_slot = defer.DeferredSemaphore(1)
        self.background: set["defer.Deferred[None]"] = set()

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    # ------------------------------------------------------------------
    # Writing files

    def _seal_stream_blocking(self, kind: str, src: BinaryIO) -> tuple[str, str, int, bytes]:
        """Encrypt ``src`` into a new stored file: (name, wrapped key, size, first bytes)."""
        file_key = crypto.new_file_key()
        name = new_storage_name(kind)
        head = src.read(SNIFF_BYTES)
        size = [0]

        def produce(f: BinaryIO) -> None:
            size[0] = crypto.encrypt_stream(file_key, src, f, first=head)

        self.backend.write(name, produce)
        return name, self.keys.current.wrap(file_key), size[0], head

    async def _seal_bytes(self, kind: str, data: bytes) -> tuple[str, str]:
        import io

        name, wrapped, _, _ = await threads.deferToThread(self._seal_stream_blocking, kind, io.BytesIO(data))
        return name, wrapped

    async def _delete_files(self, names: list[str]) -> None:
        for name in names:
            try:
                await threads.deferToThread(self.backend.delete, name)
            except OSError:
                logger.warning("could not delete media file %s", name)

    # ------------------------------------------------------------------
    # Uploads

    def check_size(self, length: Optional[int]) -> None:
        if length is not None and length > self.max_upload_size:
            raise too_large(f"Cannot upload files larger than {self.max_upload_size} bytes")

    async def _check_quota(self, user_id: str, size: int) -> None:
        quota = self.config.per_user_quota_bytes
        if quota is None:
            return
        used = await self.store.user_usage(user_id)
        if used + size > quota:
            raise forbidden("Media quota exceeded: delete some media first")

    def new_upload_body(self) -> EncryptingUpload:
        """The body file for an upload request, encrypting as it arrives."""
        return EncryptingUpload(self.backend)

    async def _store_upload(self, user_id: str, content: BinaryIO | EncryptingUpload, size: int
                            ) -> tuple[str, str, int, Optional[str]]:
        self.check_size(size)
        await self._check_quota(user_id, size)
        if isinstance(content, EncryptingUpload):
            name = new_storage_name("local")
            try:
                stored = await content.store(name)
            except OSError as e:
                logger.warning("could not store an upload: %s", e)
                await self._delete_files([name])
                raise MatrixError(500, "M_UNKNOWN", "Could not store the upload") from None
            return name, self.keys.current.wrap(content.file_key), stored, sniff_content_type(content.head)
        content.seek(0)
        name, wrapped, stored, head = await threads.deferToThread(self._seal_stream_blocking, "local", content)
        if stored != size:
            await self._delete_files([name])
            raise MatrixError(400, "M_UNKNOWN", "Upload changed while being stored")
        return name, wrapped, stored, sniff_content_type(head)

    @staticmethod
    def _content_type(declared: Optional[str], sniffed: Optional[str]) -> str:
        declared = normalise_content_type(declared)
        if declared is None or declared == "application/octet-stream":
            return sniffed or "application/octet-stream"
        return declared

    async def upload(self, user_id: str, content: BinaryIO | EncryptingUpload, size: int, content_type: Optional[str],
                     filename: Optional[str]) -> str:
        name, wrapped, stored, sniffed = await self._store_upload(user_id, content, size)
        media_id = new_media_id()
        now = self.now_ms()
        try:
            await self.store.insert_media(MediaInfo(
                self.server_name, media_id, user_id, self._content_type(content_type, sniffed), sniffed,
                sanitise_filename(filename), stored, now, now, None, name, self.keys.current.key_id, wrapped))
        except BaseException:
            await self._delete_files([name])
            raise
        self._thumbnails_after_upload(self.server_name, media_id, sniffed)
        return f"mxc://{self.server_name}/{media_id}"

    async def create(self, user_id: str) -> tuple[str, int]:
        now = self.now_ms()
        if await self.store.count_pending(user_id, now) >= self.config.max_pending_uploads:
            raise MatrixError(429, "M_LIMIT_EXCEEDED", "Too many pending uploads", retry_after_ms=60_000)
        media_id = new_media_id()
        expires = now + self.config.unused_expires_after_ms
        await self.store.insert_media(MediaInfo(
            self.server_name, media_id, user_id, None, None, None, None, now, None, expires, None, None, None))
        return f"mxc://{self.server_name}/{media_id}", expires

    async def upload_to(self, user_id: str, server_name: str, media_id: str, content: BinaryIO | EncryptingUpload,
                        size: int,
                        content_type: Optional[str], filename: Optional[str]) -> None:
        if server_name != self.server_name:
            raise not_found("Unknown media ID")
        info = await self.store.get_media(server_name, media_id)
        if info is None:
            raise not_found("Unknown media ID")
        if info.user_id != user_id:
            raise forbidden("This media ID was created by another user")
        if info.uploaded_ts is not None:
            raise MatrixError(409, "M_CANNOT_OVERWRITE_MEDIA", "Media already uploaded")
        if info.unused_expires_at is not None and info.unused_expires_at < self.now_ms():
            raise not_found("This media ID has expired")
        name, wrapped, stored, sniffed = await self._store_upload(user_id, content, size)
        ok = await self.store.complete_upload(
            server_name, media_id, self._content_type(content_type, sniffed), sniffed, sanitise_filename(filename),
            stored, self.now_ms(), name, self.keys.current.key_id, wrapped)
        if not ok:
            await self._delete_files([name])
            raise MatrixError(409, "M_CANNOT_OVERWRITE_MEDIA", "Media already uploaded")
        self._thumbnails_after_upload(server_name, media_id, sniffed)

    # ------------------------------------------------------------------
    # Finding media

    def _refuse_quarantined(self, origin: str, media_id: str) -> None:
        if self.is_quarantined(origin, media_id):
            raise not_found("Media not found")

    async def get_local(self, media_id: str, timeout_ms: int = DEFAULT_TIMEOUT_MS) -> MediaInfo:
        self._refuse_quarantined(self.server_name, media_id)
        deadline = time.monotonic() + min(max(timeout_ms, 0), MAX_TIMEOUT_MS) / 1000
        while True:
            info = await self.store.get_media(self.server_name, media_id)
            if info is None:
                raise not_found("Media not found")
            if info.uploaded:
                return info
            if info.unused_expires_at is not None and info.unused_expires_at < self.now_ms():
                raise not_found("Media not found")
            if time.monotonic() >= deadline:
                raise not_yet_uploaded()
            await _sleep(0.25)

    async def get_media(self, server_name: str, media_id: str, timeout_ms: int = DEFAULT_TIMEOUT_MS,
                        allow_remote: bool = True) -> MediaInfo:
        if server_name == self.server_name:
            return await self.get_local(media_id, timeout_ms)
        self._refuse_quarantined(server_name, media_id)
        cached = await self.store.get_media(server_name, media_id)
        if cached is not None and cached.uploaded:
            return cached
        if not allow_remote or self.federation_client is None:
            raise not_found("Media not found")
        key = (server_name, media_id)
        inflight = self._remote_inflight.get(key)
        if inflight is None:
            inflight = _Shared(self._fetch_remote(server_name, media_id, timeout_ms),
                               lambda: _drop(self._remote_inflight, key))
            if inflight._outcome is None:
                self._remote_inflight[key] = inflight
        info: MediaInfo = await inflight.wait()
        return info

    @staticmethod
    def _remote_timeout(timeout_ms: int) -> float:
        return min(max(timeout_ms, 0), MAX_TIMEOUT_MS) / 1000 + 10

    async def _fetch_remote(self, server_name: str, media_id: str, timeout_ms: int) -> MediaInfo:
        received = await remote.fetch(
            self.federation_client, self.backend, server_name, "download", media_id,
            {"timeout_ms": str(timeout_ms)}, self._remote_timeout(timeout_ms), self.max_upload_size)
        name = new_storage_name("remote")
        try:
            await received.store(name)
        finally:
            await received.discard()
        sniffed = sniff_content_type(received.head)
        info = MediaInfo(
            server_name, media_id, None, self._content_type(received.content_type, sniffed), sniffed,
            _filename_from_disposition(received.disposition), received.size, self.now_ms(),
            self.now_ms(), None, name, self.keys.current.key_id, self.keys.current.wrap(received.file_key))
        try:
            old = await self.store.get_media(server_name, media_id)
            await self.store.replace_remote_media(info)
        except BaseException:
            await self._delete_files([name])
            raise
        if old is not None and old.storage_name:
            await self._delete_files([old.storage_name])
        return info

    @staticmethod
    def servable(info: MediaInfo | ThumbnailInfo) -> Servable:
        if isinstance(info, ThumbnailInfo):
            return Servable(info.content_type, None, info.size, info.storage_name, info.key_id, info.wrapped_key)
        assert info.storage_name and info.key_id and info.wrapped_key and info.size is not None
        return Servable(info.content_type or "application/octet-stream", info.upload_name, info.size,
                        info.storage_name, info.key_id, info.wrapped_key)

    # ------------------------------------------------------------------
    # Reading (blocking helpers, for threads)

    def open_plaintext(self, item: Servable, start: int = 0, end: Optional[int] = None
                       ) -> tuple[BinaryIO, Iterator[bytes]]:
        file_key = self.keys.unwrap(item.key_id, item.wrapped_key)
        f = self.backend.open(item.storage_name)
        return f, crypto.decrypt_range(file_key, f, item.size, start, end)

    def read_all_blocking(self, item: Servable) -> bytes:
        f, chunks = self.open_plaintext(item)
        try:
            return b"".join(chunks)
        finally:
            f.close()

    async def read_all(self, item: Servable) -> bytes:
        return await threads.deferToThread(self.read_all_blocking, item)

    # ------------------------------------------------------------------
    # Thumbnails

    def choose_size(self, width: int, height: int, method: str) -> ThumbnailSize:
        sizes = [s for s in self.config.thumbnail_sizes if s.method == method] or list(self.config.thumbnail_sizes)
        big_enough = [s for s in sizes if s.width >= width and s.height >= height]
        if big_enough:
            return min(big_enough, key=lambda s: (s.width * s.height, s.width))
        return max(sizes, key=lambda s: (s.width * s.height, s.width))

    async def get_thumbnail(self, server_name: str, media_id: str, width: int, height: int, method: str,
                            animated: bool, timeout_ms: int = DEFAULT_TIMEOUT_MS,
                            allow_remote: bool = True) -> Servable:
        if width < 1 or height < 1:
            raise MatrixError(400, "M_INVALID_PARAM", "width and height must be positive")
        if method not in ("crop", "scale"):
            raise MatrixError(400, "M_INVALID_PARAM", "method must be crop or scale")
        self._refuse_quarantined(server_name, media_id)
        size = self.choose_size(width, height, method)
        if server_name != self.server_name:
            cached = await self.store.get_media(server_name, media_id)
            if cached is None or not cached.uploaded:
                return await self._remote_thumbnail(server_name, media_id, size, animated, timeout_ms,
                                                    allow_remote)
            info = cached
        else:
            info = await self.get_local(media_id, timeout_ms)
        return await self._local_thumbnail(info, size, width, height, animated)

    async def _local_thumbnail(self, info: MediaInfo, size: ThumbnailSize, want_w: int, want_h: int,
                               animated: bool) -> Servable:
        if info.sniffed_type not in THUMBNAILABLE:
            raise MatrixError(400, "M_UNKNOWN", "Cannot generate thumbnails for this content")
        animated_key = animated and info.sniffed_type in ("image/gif", "image/webp", "image/png")
        existing = await self.store.get_thumbnail(info.origin, info.media_id, size.width, size.height,
                                                  size.method, animated_key)
        if existing is not None:
            return self.servable(existing)
        key = (info.origin, info.media_id, size.width, size.height, size.method, animated_key)
        inflight = self._thumb_inflight.get(key)
        if isinstance(inflight, _Promise) and not isinstance(inflight, _Shared):
            # Promised by the batch made after the upload.
            try:
                made: Servable = await inflight.wait()
                return made
            except Exception:
                inflight = self._thumb_inflight.get(key)  # made below on its own, with its own error
        if inflight is None:
            inflight = _Shared(self._generate(info, size, animated_key),
                               lambda: _drop(self._thumb_inflight, key))
            if inflight._outcome is None:
                self._thumb_inflight[key] = inflight
        result: Servable = await inflight.wait()
        return result

    async def _generate(self, info: MediaInfo, size: ThumbnailSize, animated: bool) -> Servable:
        if info.size is not None and info.size > self.max_upload_size:
            raise too_large("Content is too large to thumbnail")
        original = self.servable(info)
        data = await self.read_all(original)
        max_pixels = self.config.max_image_pixels
        try:
            thumb = await threads.deferToThread(
                make_thumbnail, data, size.width, size.height, size.method, animated, max_pixels)
        except ImageTooLarge:
            raise too_large("Image is too large to thumbnail") from None
        except ThumbnailError:
            raise MatrixError(400, "M_UNKNOWN", "Cannot generate thumbnails for this content") from None
        del data
        return await self._store_thumbnail(info, size, animated, thumb)

    async def _store_thumbnail(self, info: MediaInfo, size: ThumbnailSize, animated: bool,
                               thumb: Thumbnail) -> Servable:
        name, wrapped = await self._seal_bytes("thumb", thumb.data)
        row = ThumbnailInfo(info.origin, info.media_id, size.width, size.height, size.method, animated,
                            thumb.content_type, len(thumb.data), name, self.keys.current.key_id, wrapped,
                            self.now_ms())
        return await self._insert_thumbnail(row, of_stored_media=True)

    async def _insert_thumbnail(self, row: ThumbnailInfo, of_stored_media: bool) -> Servable:
        """Record a stored thumbnail file. When an equal one was recorded
        meanwhile by another request, that one is served and this file goes;
        so does it when the media was deleted meanwhile (M_NOT_FOUND)."""
        if await self.store.insert_thumbnail(row, of_stored_media=of_stored_media):
            return self.servable(row)
        await self._delete_files([row.storage_name])
        existing = await self.store.get_thumbnail(row.origin, row.media_id, row.width, row.height, row.method,
                                                  row.animated)
        if existing is None:
            raise not_found("Media not found")
        return self.servable(existing)

    def _thumbnails_after_upload(self, origin: str, media_id: str, sniffed: Optional[str]) -> None:
        if not self.config.thumbnails_on_upload or sniffed not in THUMBNAILABLE:
            return
        d = defer.ensureDeferred(self._thumbnail_batch(origin, media_id))
        self.background.add(d)
        d.addBoth(lambda _: self.background.discard(d))

    async def _thumbnail_batch(self, origin: str, media_id: str) -> None:
        """Make every configured (still) thumbnail of a new upload, decoding it
        once; smallest first. A request for one of them waits for it alone."""
        await self._batch_slot.acquire()
        promised: list[tuple[ThumbnailSize, _Promise]] = []
        try:
            info = await self.store.get_media(origin, media_id)
            if info is None or not info.uploaded or (info.size is not None and info.size > self.max_upload_size):
                return
            for size in sorted(self.config.thumbnail_sizes, key=lambda z: (z.width * z.height, z.method)):
                key = (origin, media_id, size.width, size.height, size.method, False)
                if key in self._thumb_inflight or await self.store.get_thumbnail(
                        origin, media_id, size.width, size.height, size.method, False) is not None:
                    continue
                promise = _Promise(functools.partial(_drop, self._thumb_inflight, key))
                self._thumb_inflight[key] = promise
                promised.append((size, promise))
            if not promised:
                return
            data = await self.read_all(self.servable(info))
            decoded = await threads.deferToThread(
                decode_still, data, [(z.width, z.height, z.method) for z, _ in promised],
                self.config.max_image_pixels)
            del data
            for size, promise in promised:
                thumb = await threads.deferToThread(render, decoded, size.width, size.height, size.method)
                promise.settle(True, await self._store_thumbnail(info, size, False, thumb))
        except Exception as e:
            logger.info("thumbnails of new upload %s/%s not made: %s", origin, media_id, e)
        finally:
            for _, promise in promised:
                if promise._outcome is None:
                    promise.settle(False, Failure(RuntimeError("thumbnail not made")))
            self._batch_slot.release()

    async def _remote_thumbnail(self, server_name: str, media_id: str, size: ThumbnailSize, animated: bool,
                                timeout_ms: int, allow_remote: bool) -> Servable:
        existing = await self.store.get_thumbnail(server_name, media_id, size.width, size.height, size.method,
                                                  animated)
        if existing is not None:
            return self.servable(existing)
        if not allow_remote or self.federation_client is None:
            raise not_found("Media not found")
        query = {"width": str(size.width), "height": str(size.height), "method": size.method,
                 "timeout_ms": str(timeout_ms)}
        if animated:
            query["animated"] = "true"
        received = await remote.fetch(self.federation_client, self.backend, server_name, "thumbnail", media_id,
                                      query, self._remote_timeout(timeout_ms), self.max_upload_size)
        try:
            sniffed = sniff_content_type(received.head)
            if sniffed not in THUMBNAILABLE:
                raise MatrixError(502, "M_UNKNOWN", "The remote server sent a thumbnail that is not an image")
            name = new_storage_name("thumb")
            await received.store(name)
        finally:
            await received.discard()
        content_type = sniffed or normalise_content_type(received.content_type) or "application/octet-stream"
        row = ThumbnailInfo(server_name, media_id, size.width, size.height, size.method, animated, content_type,
                            received.size, name, self.keys.current.key_id,
                            self.keys.current.wrap(received.file_key), self.now_ms())
        return await self._insert_thumbnail(row, of_stored_media=False)

    # ------------------------------------------------------------------
    # Deletion

    async def delete_media(self, origin: str, media_id: str) -> bool:
        """Remove the metadata, the file and every thumbnail; False if unknown."""
        info = await self.store.get_media(origin, media_id)
        if info is None:
            return False
        names = await self.store.delete_media(origin, media_id)
        await self._delete_files(names)
        return True


def _filename_from_disposition(value: Optional[str]) -> Optional[str]:
    if not value:
        return None
    from urllib.parse import unquote

    for param in value.split(";")[1:]:
        name, _, v = param.strip().partition("=")
        if name.strip().lower() == "filename*" and v.lower().startswith("utf-8''"):
            return sanitise_filename(unquote(v[7:]))
    for param in value.split(";")[1:]:
        name, _, v = param.strip().partition("=")
        if name.strip().lower() == "filename":
            return sanitise_filename(v.strip().strip('"'))
    return None


def _drop(table: dict[Any, Any], key: Any) -> None:
    table.pop(key, None)


class _Promise:
    """A result several callers await, settled once by its maker."""

    def __init__(self, on_done: Callable[[], None]) -> None:
        self._waiters: list[defer.Deferred[Any]] = []
        self._outcome: Optional[tuple[bool, Any]] = None
        self._on_done = on_done

    def settle(self, ok: bool, value: Any) -> None:
        """``value`` is the result, or (not ``ok``) a Failure or exception."""
        self._outcome = (ok, value)
        self._on_done()
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            self._fire(w)

    def _fire(self, w: "defer.Deferred[Any]") -> None:
        assert self._outcome is not None
        ok, value = self._outcome
        if ok:
            w.callback(value)
        else:
            w.errback(value)

    async def wait(self) -> Any:
        w: defer.Deferred[Any] = defer.Deferred()
        if self._outcome is not None:
            self._fire(w)
        else:
            self._waiters.append(w)
        return await w


class _Shared(_Promise):
    """One running computation that several callers await (e.g. one remote fetch)."""

    def __init__(self, coro: Any, on_done: Callable[[], None]) -> None:
        super().__init__(on_done)
        defer.ensureDeferred(coro).addCallbacks(lambda result: self.settle(True, result),
                                                lambda failure: self.settle(False, failure))


async def _sleep(seconds: float) -> None:
    from zhome.util.reactor import reactor

    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    await d


__all__ = ["MediaRepository", "Servable", "load_keys", "check_server_key", "new_media_id"]
