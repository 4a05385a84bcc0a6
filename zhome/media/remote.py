"""Fetching media from the server that holds it, streamed into the store.

Spec: server-server-api "Content Repository": GET /_matrix/federation/v1/
media/{download,thumbnail}/{mediaId}, signed, answered as multipart/mixed
(JSON metadata, then the media or a ``Location`` to fetch it from with a
plain GET); "Unsupported endpoints" (404 or 405 ``M_UNRECOGNIZED``). A
server without those endpoints is asked the deprecated client-server
GET /_matrix/media/v3/{download,thumbnail}/{serverName}/{mediaId}
(client-server-api "Content repository") with ``allow_remote=false``,
unsigned, through the same discovery and TLS; its redirects are followed.

The media bytes are never held whole: they are encrypted as they arrive
into an anonymous staging file of the storage backend (so no plaintext
reaches a disk), then copied under their storage name. More than the
size limit ends the transfer with ``M_TOO_LARGE`` and nothing is kept.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, BinaryIO, Optional
from urllib.parse import quote

from twisted.internet import defer, threads
from twisted.python.failure import Failure

from zhome.http.errors import MatrixError, not_found, not_yet_uploaded
from zhome.media import crypto, multipart
from zhome.media.backend import StorageBackend
from zhome.media.thumbnailer import SNIFF_BYTES

if TYPE_CHECKING:
    from zhome.federation.transport import FederationClient, RemoteResponse

logger = logging.getLogger(__name__)

# Encrypt and write arriving bytes in batches of about this size, and pause
# the sender while this much more waits for the disk.
BATCH_BYTES = 256 * 1024
HIGH_WATER_BYTES = 1024 * 1024
MAX_REDIRECTS = 5


class MediaTooLarge(Exception):
    pass


def too_large_remote() -> MatrixError:
    return MatrixError(502, "M_TOO_LARGE", "Remote media is too large")


class ReceivedMedia:
    """Media bytes from a remote server as they arrive, encrypted under a new
    file key into a staging file. ``write`` runs on the reactor; encryption
    and file writes run in a thread, one batch at a time. Then ``finish``,
    ``store`` under a storage name, and always ``discard``."""

    def __init__(self, backend: StorageBackend, limit: int) -> None:
        self.backend = backend
        self.limit = limit
        self.file_key = crypto.new_file_key()
        self.size = 0
        self.head = b""
        self.content_type: Optional[str] = None
        self.disposition: Optional[str] = None
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._writing = False
        self._failure: Optional[Failure] = None
        self._paused: list[defer.Deferred[None]] = []
        self._idle: list[defer.Deferred[None]] = []
        self._staging: Optional[BinaryIO] = None
        self._encryptor: Optional[crypto.StreamEncryptor] = None
        self._discarded = False

    # -- on the reactor ----------------------------------------------------

    def write(self, data: bytes) -> Optional[defer.Deferred[None]]:
        """Take the next bytes; a Deferred means "pause the sender until it fires"."""
        if self._failure is not None:
            self._failure.raiseException()
        if self._discarded:
            raise RuntimeError("media staging already discarded")
        self.size += len(data)
        if self.size > self.limit:
            raise MediaTooLarge(f"remote media larger than {self.limit} bytes")
        if len(self.head) < SNIFF_BYTES:
            self.head += data[:SNIFF_BYTES - len(self.head)]
        self._pending.append(data)
        self._pending_size += len(data)
        if not self._writing and self._pending_size >= BATCH_BYTES:
            self._write_batch(final=False)
        if self._pending_size >= HIGH_WATER_BYTES:
            d: defer.Deferred[None] = defer.Deferred()
            self._paused.append(d)
            return d
        return None

    def _write_batch(self, final: bool) -> defer.Deferred[None]:
        batch = b"".join(self._pending)
        self._pending = []
        self._pending_size = 0
        self._writing = True
        d = threads.deferToThread(self._encrypt_blocking, batch, final)
        d.addCallbacks(self._batch_written, self._batch_failed)
        waiting, self._paused = self._paused, []
        for w in waiting:
            w.callback(None)
        return d

    def _batch_written(self, _: object) -> None:
        self._writing = False
        if self._pending_size >= BATCH_BYTES:
            self._write_batch(final=False)
        else:
            self._wake_idle()

    def _batch_failed(self, failure: Failure) -> None:
        self._writing = False
        self._failure = failure
        waiting, self._paused = self._paused, []
        for w in waiting:
            w.errback(failure)
        self._wake_idle()

    def _wake_idle(self) -> None:
        waiting, self._idle = self._idle, []
        for w in waiting:
            w.callback(None)

    async def _until_idle(self) -> None:
        while self._writing:
            d: defer.Deferred[None] = defer.Deferred()
            self._idle.append(d)
            await d

    async def finish(self) -> None:
        """Every byte is in: seal the last of them."""
        await self._until_idle()
        if self._failure is not None:
            self._failure.raiseException()
        await self._write_batch(final=True)
        if self._failure is not None:
            self._failure.raiseException()

    async def store(self, name: str) -> None:
        """Copy the sealed file into the backend as ``name`` (atomically)."""
        await threads.deferToThread(self._store_blocking, name)

    async def discard(self) -> None:
        """Close (and so remove) the staging file; call it whatever happened."""
        self._discarded = True
        await self._until_idle()
        staging, self._staging = self._staging, None
        if staging is not None:
            await threads.deferToThread(staging.close)

    # -- in a thread ---------------------------------------------------------

    def _encrypt_blocking(self, batch: bytes, final: bool) -> None:
        if self._encryptor is None:
            self._staging = self.backend.staging_file()
            self._encryptor = crypto.StreamEncryptor(self.file_key, self._staging)
        if batch:
            self._encryptor.write(batch)
        if final:
            self._encryptor.close()

    def _store_blocking(self, name: str) -> None:
        staging = self._staging
        assert staging is not None and self._encryptor is not None
        self.backend.store_staged(staging, name)


def endpoint_unknown(status: int, errcode: Optional[str]) -> bool:
    """Whether an error answer means "no such endpoint" rather than "no such media"."""
    return status in (404, 405) and errcode in (None, "M_UNRECOGNIZED")


async def fetch(client: "FederationClient", backend: StorageBackend, server_name: str, endpoint: str,
                media_id: str, query: dict[str, str], timeout: float, limit: int) -> ReceivedMedia:
    """GET ``endpoint`` ("download" or "thumbnail") of ``media_id`` from
    ``server_name`` into a ReceivedMedia (the caller stores and discards it).
    What goes wrong with the remote is a MatrixError (its 404: M_NOT_FOUND;
    too large: 502 M_TOO_LARGE; anything else it does: 502)."""
    received = ReceivedMedia(backend, limit)
    try:
        await _fetch_into(client, received, server_name, endpoint, media_id, query, timeout)
        await received.finish()
    except BaseException as e:
        await received.discard()
        if isinstance(e, Exception):
            raise _as_matrix_error(e, server_name) from None
        raise
    return received


async def _fetch_into(client: "FederationClient", received: ReceivedMedia, server_name: str, endpoint: str,
                      media_id: str, query: dict[str, str], timeout: float) -> None:
    from zhome.federation.transport import FederationHttpError

    path = f"/_matrix/federation/v1/media/{endpoint}/{quote(media_id, safe='')}"
    try:
        response = await client.open_get(server_name, path, query=query, timeout=timeout)
    except FederationHttpError as e:
        if not endpoint_unknown(e.status, e.errcode):
            raise
        logger.info("%s has no federation media endpoints (%s %s): trying /_matrix/media/v3/%s",
                    server_name, e.status, e.errcode or "without errcode", endpoint)
        legacy = f"/_matrix/media/v3/{endpoint}/{quote(server_name, safe=':')}/{quote(media_id, safe='')}"
        response = await client.open_get(
            server_name, legacy, query={**query, "allow_remote": "false", "allow_redirect": "true"},
            signed=False, timeout=timeout, follow_redirects=MAX_REDIRECTS)
        await _receive_plain(response, received)
        return
    location = await _receive_multipart(response, received)
    if location is not None:
        # Spec: a plain GET, no X-Matrix; the headers come from there.
        await _receive_plain(await client.open_url(location, timeout=timeout, follow_redirects=MAX_REDIRECTS),
                             received)


async def _receive_plain(response: "RemoteResponse", received: ReceivedMedia) -> None:
    received.content_type = response.header("Content-Type")
    received.disposition = response.header("Content-Disposition")
    await response.read_into(received.write, received.limit)


async def _receive_multipart(response: "RemoteResponse", received: ReceivedMedia) -> Optional[str]:
    """The media of a multipart answer into ``received``; or the Location given instead."""
    try:
        parser = multipart.StreamParser(response.content_type)
    except multipart.MultipartError:
        response.abort()
        raise

    def write(data: bytes) -> Optional[defer.Deferred[None]]:
        media = parser.feed(data)
        if not media or parser.location is not None:
            return None  # with a Location, the part's own body is ignored
        return received.write(media)

    await response.read_into(write, received.limit + multipart.MAX_HEAD_BYTES)
    parser.finish()
    if parser.location is not None:
        return parser.location
    headers = parser.headers or {}
    received.content_type = headers.get("content-type")
    received.disposition = headers.get("content-disposition")
    return None


def _as_matrix_error(e: Exception, server_name: str) -> Exception:
    from zhome.federation.transport import FederationError, FederationHttpError, FederationResponseTooLarge

    if isinstance(e, MatrixError):
        return e
    if isinstance(e, (MediaTooLarge, FederationResponseTooLarge)):
        return too_large_remote()
    if isinstance(e, FederationHttpError):
        if e.status == 404:
            return not_found("Media not found on the remote server")
        if e.status == 504 and e.errcode == "M_NOT_YET_UPLOADED":
            return not_yet_uploaded()
        if e.errcode == "M_TOO_LARGE":
            return too_large_remote()
        if e.status == 400 and e.errcode:
            # e.g. the remote cannot thumbnail the content.
            return MatrixError(400, e.errcode, "The remote server refused the request")
        return MatrixError(502, "M_UNKNOWN", f"Remote server answered {e.status}")
    if isinstance(e, multipart.MultipartError):
        return MatrixError(502, "M_UNKNOWN", f"Malformed response from the remote server: {e}")
    if isinstance(e, FederationError):
        logger.info("remote media fetch from %s failed: %s", server_name, e)
        return MatrixError(502, "M_UNKNOWN", "Could not fetch the remote media")
    return e


__all__ = ["ReceivedMedia", "fetch", "endpoint_unknown", "MediaTooLarge"]
