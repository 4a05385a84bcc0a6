"""HTTP endpoints of the media repository.

Spec: client-server-api "Content repository": POST /_matrix/media/v3/upload,
POST /_matrix/media/v1/create, PUT /_matrix/media/v3/upload/{serverName}/{mediaId},
GET /_matrix/client/v1/media/{config,download,thumbnail}; the deprecated
unauthenticated /_matrix/media/v3/download and /thumbnail are "frozen" (all
zhome media is newer than the freeze, so they answer 404 M_NOT_FOUND).
Server-server-api "Content Repository": GET /_matrix/federation/v1/media/
{download,thumbnail}/{mediaId}, answered as multipart/mixed.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, BinaryIO, Optional

from twisted.internet import defer, threads
from twisted.web.server import Request
from zope.interface import implementer
from twisted.internet.interfaces import IPushProducer

from zhome.http.errors import MatrixError, invalid_param, missing_param, not_found
from zhome.http.server import CORS_HEADERS, JsonResource, already_written, query_arg
from zhome.media import multipart
from zhome.media.cleanup import RemoteAccessRecorder
from zhome.media.headers import CSP, RangeNotSatisfiable, content_disposition, parse_range
from zhome.media.repository import DEFAULT_TIMEOUT_MS, MediaRepository, Servable

if TYPE_CHECKING:
    from zhome.server import HomeServer

logger = logging.getLogger(__name__)

_MEDIA_ID = re.compile(r"^[A-Za-z0-9_-]{1,255}\Z")
SERVER = r"(?P<server_name>[^/]+)"
MEDIA = r"(?P<media_id>[^/]+)"
# Decrypt and send this much at a time.
SEND_BATCH = 1024 * 1024


def _check_ids(server_name: Optional[str], media_id: str) -> None:
    from zhome.config import _Invalid, server_name as check_server_name

    if not _MEDIA_ID.fullmatch(media_id):
        raise not_found("Media not found")
    if server_name is not None:
        try:
            check_server_name(server_name, "serverName")
        except _Invalid:
            raise invalid_param("Invalid server name") from None


def _bool_arg(request: Request, name: str, default: bool) -> bool:
    v = query_arg(request, name)
    if v is None:
        return default
    if v.lower() in ("true", "1"):
        return True
    if v.lower() in ("false", "0"):
        return False
    raise invalid_param(f"{name} must be true or false")


def _int_arg(request: Request, name: str, default: Optional[int] = None) -> int:
    v = query_arg(request, name)
    if v is None:
        if default is None:
            raise missing_param(f"Missing {name}")
        return default
    try:
        return int(v)
    except ValueError:
        raise invalid_param(f"{name} must be an integer") from None


def _content_length(request: Request) -> Optional[int]:
    raw = request.getHeader(b"Content-Length")
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        return None


def _body(request: Request) -> tuple[BinaryIO, int]:
    content = request.content
    if content is None:
        import io

        return io.BytesIO(b""), 0
    content.seek(0, 2)
    size = content.tell()
    content.seek(0)
    return content, size


@implementer(IPushProducer)
class _Throttle:
    """Pauses the sending loop while the client's transport is full."""

    def __init__(self) -> None:
        self._resume: Optional[defer.Deferred[None]] = None
        self.stopped = False

    def pauseProducing(self) -> None:  # noqa: N802
        if self._resume is None:
            self._resume = defer.Deferred()

    def resumeProducing(self) -> None:  # noqa: N802
        d, self._resume = self._resume, None
        if d is not None:
            d.callback(None)

    def stopProducing(self) -> None:  # noqa: N802
        self.stopped = True
        self.resumeProducing()

    async def wait(self) -> None:
        if self._resume is not None:
            await self._resume


class _PlaintextReader:
    """Reads a stored file's plaintext in batches, in a worker thread: the
    first call opens the file, the call that reaches the end closes it, so a
    small file costs one thread hop."""

    def __init__(self, repo: MediaRepository, item: Servable, start: int, end: int) -> None:
        self.repo, self.item, self.start, self.end = repo, item, start, end
        self._f: Optional[BinaryIO] = None
        self._chunks: Optional[Iterator[bytes]] = None
        self._sent = 0

    def next_batch(self) -> tuple[bytes, bool]:
        """(bytes, whether that was the last of them)."""
        if self._chunks is None:
            self._f, self._chunks = self.repo.open_plaintext(self.item, self.start, self.end)
        out: list[bytes] = []
        n = 0
        for chunk in self._chunks:
            out.append(chunk)
            n += len(chunk)
            if n >= SEND_BATCH:
                break
        self._sent += n
        done = n == 0 or self._sent >= self.end - self.start
        if done:
            self.close()
        return b"".join(out), done

    def close(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            f.close()

    @property
    def open(self) -> bool:
        return self._f is not None


async def stream_plaintext(repo: MediaRepository, request: Request, item: Servable, start: int, end: int,
                           prefix: bytes = b"", suffix: bytes = b"") -> None:
    """Write ``prefix``, plaintext bytes [start, end) of ``item``, ``suffix``, then finish."""
    throttle = _Throttle()
    request.registerProducer(throttle, True)
    reader = _PlaintextReader(repo, item, start, end)
    try:
        if prefix:
            request.write(prefix)
        if end > start or item.size == 0:
            while not throttle.stopped:
                await throttle.wait()
                data, done = await threads.deferToThread(reader.next_batch)
                if request._disconnected:
                    throttle.stopped = True
                    break
                if data:
                    request.write(data)
                if done:
                    break
        if suffix and not throttle.stopped:
            request.write(suffix)
    except Exception:
        logger.exception("failed while sending media %s", item.storage_name)
        _unregister(request)
        if request.channel is not None:
            request.channel.loseConnection()
        return
    finally:
        if reader.open:
            await threads.deferToThread(reader.close)
    _unregister(request)
    if not request.finished and not request._disconnected:
        request.finish()


def _unregister(request: Request) -> None:
    # A client that went away has taken the channel (and its producer) with it.
    if request.channel is not None and not request._disconnected:
        request.unregisterProducer()


def _common_headers(request: Request) -> None:
    for k, v in CORS_HEADERS.items():
        request.setHeader(k, v)
    request.setHeader(b"Content-Security-Policy", CSP)
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    request.setHeader(b"Cross-Origin-Resource-Policy", b"cross-origin")
    request.setHeader(b"Referrer-Policy", b"no-referrer")


class MediaServlets:
    def __init__(self, hs: "HomeServer") -> None:
        self.hs = hs
        self.repo: MediaRepository = hs.media_repository
        # Keeps cached remote media in use from expiring (cleanup.py).
        self.remote_access = RemoteAccessRecorder(self.repo)

    def register_routes(self, r: JsonResource) -> None:
        legacy = r"/_matrix/media/(?:v3|r0)"
        authed = r"/_matrix/client/v1/media"
        r.register("POST", legacy + r"/upload", self.on_upload, "media_upload")
        r.register("POST", r"/_matrix/media/v1/create", self.on_create, "media_create")
        r.register("PUT", legacy + r"/upload/" + SERVER + "/" + MEDIA, self.on_upload_to, "media_upload_to")
        r.register("GET", authed + r"/config", self.on_config, "media_config")
        r.register("GET", legacy + r"/config", self.on_config, "media_config_legacy")
        r.register("GET", authed + r"/download/" + SERVER + "/" + MEDIA + r"(?:/(?P<file_name>[^/]+))?",
                   self.on_download, "media_download", guests=True)
        r.register("GET", authed + r"/thumbnail/" + SERVER + "/" + MEDIA,
                   self.on_thumbnail, "media_thumbnail", guests=True)
        r.register("GET", legacy + r"/download/" + SERVER + "/" + MEDIA + r"(?:/(?P<file_name>[^/]+))?",
                   self.on_frozen, "media_download_legacy")
        r.register("GET", legacy + r"/thumbnail/" + SERVER + "/" + MEDIA, self.on_frozen, "media_thumbnail_legacy")

    def register_federation_routes(self, r: JsonResource) -> None:
        fed = r"/_matrix/federation/v1/media"
        r.register("GET", fed + r"/download/" + MEDIA, self.on_federation_download, "fed_media_download")
        r.register("GET", fed + r"/thumbnail/" + MEDIA, self.on_federation_thumbnail, "fed_media_thumbnail")

    # -- uploads -----------------------------------------------------------
    async def on_upload(self, request: Request) -> tuple[int, Any]:
        requester = await self.hs.auth.get_user_by_req(request)
        self.repo.check_size(_content_length(request))
        content, size = _body(request)
        uri = await self.repo.upload(requester.user_id, content, size, _header(request, b"Content-Type"),
                                     query_arg(request, "filename"))
        return 200, {"content_uri": uri}

    async def on_create(self, request: Request) -> tuple[int, Any]:
        requester = await self.hs.auth.get_user_by_req(request)
        uri, expires = await self.repo.create(requester.user_id)
        return 200, {"content_uri": uri, "unused_expires_at": expires}

    async def on_upload_to(self, request: Request, server_name: str, media_id: str) -> tuple[int, Any]:
        requester = await self.hs.auth.get_user_by_req(request)
        _check_ids(None, media_id)
        self.repo.check_size(_content_length(request))
        content, size = _body(request)
        await self.repo.upload_to(requester.user_id, server_name, media_id, content, size,
                                  _header(request, b"Content-Type"), query_arg(request, "filename"))
        return 200, {}

    async def on_config(self, request: Request) -> tuple[int, Any]:
        await self.hs.auth.get_user_by_req(request)
        return 200, {"m.upload.size": self.repo.max_upload_size}

    # -- downloads ---------------------------------------------------------
    async def on_frozen(self, request: Request, server_name: str, media_id: str,
                        file_name: Optional[str] = None) -> tuple[int, Any]:
        # Spec 1.11+: media uploaded after the freeze is only served through
        # the authenticated endpoints; all of zhome's media is.
        raise not_found("Not found: use the authenticated /_matrix/client/v1/media endpoints")

    async def on_download(self, request: Request, server_name: str, media_id: str,
                          file_name: Optional[str] = None) -> tuple[int, Any]:
        await self.hs.auth.get_user_by_req(request)
        _check_ids(server_name, media_id)
        info = await self.repo.get_media(server_name, media_id, _int_arg(request, "timeout_ms", DEFAULT_TIMEOUT_MS),
                                         _bool_arg(request, "allow_remote", True))
        item = self.repo.servable(info)
        await self.remote_access.record(server_name, media_id)
        await self._send(request, item, file_name or item.upload_name)
        return 200, already_written()

    async def on_thumbnail(self, request: Request, server_name: str, media_id: str) -> tuple[int, Any]:
        await self.hs.auth.get_user_by_req(request)
        _check_ids(server_name, media_id)
        item = await self.repo.get_thumbnail(
            server_name, media_id, _int_arg(request, "width"), _int_arg(request, "height"),
            query_arg(request, "method", "scale") or "scale", _bool_arg(request, "animated", False),
            _int_arg(request, "timeout_ms", DEFAULT_TIMEOUT_MS), _bool_arg(request, "allow_remote", True))
        await self.remote_access.record(server_name, media_id)
        await self._send(request, item, _thumbnail_name(item))
        return 200, already_written()

    async def _send(self, request: Request, item: Servable, filename: Optional[str]) -> None:
        try:
            byte_range = parse_range(_header(request, b"Range"), item.size)
        except RangeNotSatisfiable:
            _common_headers(request)
            request.setResponseCode(416)
            request.setHeader(b"Content-Range", f"bytes */{item.size}".encode())
            request.setHeader(b"Content-Length", b"0")
            request.finish()
            return
        _common_headers(request)
        request.setHeader(b"Content-Type", item.content_type.encode("ascii", "replace"))
        request.setHeader(b"Content-Disposition", content_disposition(item.content_type, filename))
        request.setHeader(b"Accept-Ranges", b"bytes")
        request.setHeader(b"Cache-Control", b"private, max-age=86400")
        start, end = byte_range if byte_range is not None else (0, item.size)
        if byte_range is not None:
            request.setResponseCode(206)
            request.setHeader(b"Content-Range", f"bytes {start}-{end - 1}/{item.size}".encode())
        else:
            request.setResponseCode(200)
        request.setHeader(b"Content-Length", str(end - start).encode())
        if request.method == b"HEAD":
            request.finish()
            return
        await stream_plaintext(self.repo, request, item, start, end)

    # -- federation --------------------------------------------------------
    async def _federation_auth(self, request: Request) -> str:
        from zhome.federation.request_auth import authenticate_request

        async def verify_key(server: str, key_id: str, at_ts: int) -> Any:
            from zhome.federation.keyring import KeyLookupError

            try:
                return await self.hs.keyring.get_verify_key(server, key_id, at_ts)
            except KeyLookupError:
                return None

        policy = getattr(self.hs, "residency_policy", None)
        return await authenticate_request(
            request, None, self.hs.server_name, verify_key,
            is_server_allowed=policy.server_allowed if policy is not None else None,
        )

    async def on_federation_download(self, request: Request, media_id: str) -> tuple[int, Any]:
        await self._federation_auth(request)
        _check_ids(None, media_id)
        info = await self.repo.get_local(media_id, _int_arg(request, "timeout_ms", DEFAULT_TIMEOUT_MS))
        item = self.repo.servable(info)
        await self._send_multipart(request, item, item.upload_name)
        return 200, already_written()

    async def on_federation_thumbnail(self, request: Request, media_id: str) -> tuple[int, Any]:
        await self._federation_auth(request)
        _check_ids(None, media_id)
        item = await self.repo.get_thumbnail(
            self.hs.server_name, media_id, _int_arg(request, "width"), _int_arg(request, "height"),
            query_arg(request, "method", "scale") or "scale", _bool_arg(request, "animated", False),
            _int_arg(request, "timeout_ms", DEFAULT_TIMEOUT_MS), allow_remote=False)
        await self._send_multipart(request, item, _thumbnail_name(item))
        return 200, already_written()

    async def _send_multipart(self, request: Request, item: Servable, filename: Optional[str]) -> None:
        boundary = secrets.token_hex(16)
        head, tail = multipart.framing(boundary, item.content_type, content_disposition(item.content_type, filename))
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", f"multipart/mixed; boundary={boundary}".encode("ascii"))
        request.setHeader(b"Content-Length", str(len(head) + item.size + len(tail)).encode())
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        if request.method == b"HEAD":
            request.finish()
            return
        await stream_plaintext(self.repo, request, item, 0, item.size, head, tail)


def _header(request: Request, name: bytes) -> Optional[str]:
    v = request.getHeader(name)
    if v is None:
        return None
    return v.decode("latin-1") if isinstance(v, bytes) else str(v)


def _thumbnail_name(item: Servable) -> str:
    ext = {"image/png": "png", "image/jpeg": "jpg", "image/gif": "gif", "image/webp": "webp"}.get(
        item.content_type, "bin")
    return f"thumbnail.{ext}"


__all__ = ["MediaServlets", "MatrixError"]
