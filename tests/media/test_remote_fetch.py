"""Remote media fetched from a fake origin server over real HTTPS.

Spec: server-server-api "Content Repository" (signed GET of
/_matrix/federation/v1/media/{download,thumbnail}/{mediaId}, multipart/mixed
answers, ``Location`` parts fetched with a plain GET), "Unsupported
endpoints" (404/405 M_UNRECOGNIZED); client-server-api "Content repository"
(the deprecated /_matrix/media/v3/{download,thumbnail} asked with
``allow_remote=false`` when the origin has no federation media endpoints;
remote media too large: 502 M_TOO_LARGE).

The origin runs in this process (Twisted, TLS on 127.0.0.1); zhome's real
FederationClient and MediaRepository, on SQLite and PostgreSQL, fetch from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tracemalloc
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Optional
from urllib.parse import parse_qs, urlsplit

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from tests.media import images
from tests.media.remote_fakes import BytesResponse
from zhome.config import MediaConfig
from zhome.crypto.keys import new_signing_key
from zhome.federation.discovery import ServerResolver
from zhome.federation.tls import FederationTLSPolicy, generate_self_signed_certificate, server_context_factory
from zhome.federation.transport import FederationClient
from zhome.http.errors import MatrixError
from zhome.media import crypto, multipart
from zhome.media.backend import FileSystemBackend
from zhome.media.repository import MediaRepository
from zhome.media.store import MediaStore
from zhome.storage.database import Database

FED = "/_matrix/federation/v1/media"
LEGACY = "/_matrix/media/v3"
LIMIT = 1_000_000
BOUNDARY = "6e5f4a1c0b"

Handler = Callable[[Request], Any]


class Origin(Resource):
    """The fake origin: a handler per path; anything else is 404 M_UNRECOGNIZED."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.routes: dict[str, Handler] = {}
        self.seen: list[tuple[str, dict[str, list[str]], bool]] = []
        self.name = ""

    def render_GET(self, request: Request) -> Any:  # noqa: N802 - Twisted's name
        parts = urlsplit(request.uri.decode())
        self.seen.append((parts.path, parse_qs(parts.query), request.getHeader(b"authorization") is not None))
        handler = self.routes.get(parts.path)
        if handler is None:
            return error(404, {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"})(request)
        return handler(request)

    def paths(self) -> list[str]:
        return [p for p, _, _ in self.seen]

    def url(self, path: str) -> str:
        return f"https://{self.name}{path}"


def send(code: int, headers: dict[str, str], body: bytes, chunked: bool = True, piece: int = 7777) -> Handler:
    """Answer with ``body``; chunked (no Content-Length), in odd-sized writes."""

    def handle(request: Request) -> Any:
        request.setResponseCode(code)
        for k, v in headers.items():
            request.setHeader(k.encode(), v.encode())
        if not chunked:
            request.setHeader(b"Content-Length", str(len(body)).encode())
        for i in range(0, len(body), piece):
            request.write(body[i:i + piece])
        request.finish()
        return NOT_DONE_YET

    return handle


def error(code: int, body: Any) -> Handler:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    ctype = "text/html" if isinstance(body, bytes) else "application/json"
    return send(code, {"Content-Type": ctype}, raw, chunked=False)


def two_parts(media: bytes, content_type: str = "application/octet-stream",
              disposition: Optional[bytes] = None, **kw: Any) -> Handler:
    head, tail = multipart.framing(BOUNDARY, content_type, disposition)
    return send(200, {"Content-Type": f"multipart/mixed; boundary={BOUNDARY}"}, head + media + tail, **kw)


def located(url: str) -> Handler:
    body = (f"--{BOUNDARY}\r\nContent-Type: application/json\r\n\r\n{{}}\r\n--{BOUNDARY}\r\n"
            f"Location: {url}\r\n\r\n--{BOUNDARY}--\r\n").encode()
    return send(200, {"Content-Type": f"multipart/mixed; boundary={BOUNDARY}"}, body)


@pytest.fixture
def origin(tmp_path: Path) -> Any:
    cert, key = generate_self_signed_certificate("127.0.0.1")
    (tmp_path / "o.crt").write_bytes(cert)
    (tmp_path / "o.key").write_bytes(key)
    resource = Origin()
    factory = server_context_factory(str(tmp_path / "o.crt"), str(tmp_path / "o.key"))
    port = reactor.listenSSL(0, Site(resource), factory, interface="127.0.0.1")
    resource.name = f"127.0.0.1:{port.getHost().port}"
    yield resource
    pytest_twisted.blockon(port.stopListening())


@pytest_twisted.async_yield_fixture
async def repo(database: Database, tmp_path: Path) -> AsyncIterator[MediaRepository]:
    policy = FederationTLSPolicy(False)
    client = FederationClient("hs.test", new_signing_key("k1"), ServerResolver(allow_private_addresses=True,
                                                                               tls_policy=policy), policy)
    cfg = MediaConfig(max_upload_size=LIMIT, thumbnails_on_upload=False)
    yield MediaRepository("hs.test", cfg, MediaStore(database), FileSystemBackend(str(tmp_path / "store")),
                          crypto.KeyRing(crypto.ServerKey(os.urandom(32))), federation_client=client)
    await client.close()


def _files(repo: MediaRepository) -> list[Path]:
    """Every file under the store, hidden staging files included."""
    root = Path(repo.backend.root)  # type: ignore[attr-defined]
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


async def _refused(coro: Any) -> MatrixError:
    with pytest.raises(MatrixError) as info:
        await coro
    return info.value


async def _nothing_kept(repo: MediaRepository, origin: Origin, media_id: str) -> None:
    assert _files(repo) == []
    assert await repo.store.get_media(origin.name, media_id) is None


# -- federation endpoint ----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_download_streams_into_the_encrypted_cache(origin: Origin, repo: MediaRepository) -> None:
    marker = b"ZHOME-STREAM-MARKER-7f1d"
    media = marker + os.urandom(700_000) + b"\r\n--" + BOUNDARY.encode() + b"x" + marker
    origin.routes[f"{FED}/download/abc"] = two_parts(media, "application/pdf",
                                                      b'attachment; filename="report.pdf"')
    info = await repo.get_media(origin.name, "abc")
    assert (info.size, info.content_type, info.upload_name) == (len(media), "application/pdf", "report.pdf")
    assert await repo.read_all(repo.servable(info)) == media
    files = _files(repo)
    assert len(files) == 1 and all(marker not in f.read_bytes() for f in files)
    assert origin.seen == [(f"{FED}/download/abc", {"timeout_ms": ["20000"]}, True)]
    # From the cache now.
    assert (await repo.get_media(origin.name, "abc")).storage_name == info.storage_name
    assert len(origin.seen) == 1


@pytest_twisted.ensureDeferred
async def test_sniffed_type_and_exact_limit(origin: Origin, repo: MediaRepository) -> None:
    png = images.png(64, 48)
    media = png + b"\0" * (LIMIT - len(png))
    origin.routes[f"{FED}/download/full"] = two_parts(media, chunked=False)
    info = await repo.get_media(origin.name, "full")
    assert info.size == LIMIT and info.sniffed_type == "image/png" and info.content_type == "image/png"


@pytest_twisted.ensureDeferred
async def test_location_part_is_fetched_with_a_plain_get(origin: Origin, repo: MediaRepository) -> None:
    png = images.png(80, 60)
    origin.routes[f"{FED}/download/loc"] = located(origin.url("/cdn/some/file"))
    origin.routes["/cdn/some/file"] = send(200, {"Content-Type": "image/png",
                                                 "Content-Disposition": 'inline; filename="a.png"'}, png)
    info = await repo.get_media(origin.name, "loc")
    assert await repo.read_all(repo.servable(info)) == png
    assert (info.content_type, info.upload_name) == ("image/png", "a.png")
    assert [(p, signed) for p, _, signed in origin.seen] == [(f"{FED}/download/loc", True), ("/cdn/some/file", False)]


@pytest_twisted.ensureDeferred
async def test_concurrent_requests_share_one_fetch(origin: Origin, repo: MediaRepository) -> None:
    media = os.urandom(300_000)
    answer = two_parts(media)

    def slowly(request: Request) -> Any:
        reactor.callLater(0.3, answer, request)
        return NOT_DONE_YET

    origin.routes[f"{FED}/download/shared"] = slowly
    first, second = await defer.gatherResults([
        defer.ensureDeferred(repo.get_media(origin.name, "shared")),
        defer.ensureDeferred(repo.get_media(origin.name, "shared"))])
    assert first.storage_name == second.storage_name
    assert origin.paths() == [f"{FED}/download/shared"]
    assert len(_files(repo)) == 1


@pytest.mark.parametrize("how", ["chunked", "content-length", "location", "location-length"])
@pytest_twisted.ensureDeferred
async def test_oversized_remote_media_is_refused_and_nothing_kept(origin: Origin, repo: MediaRepository,
                                                                   how: str) -> None:
    media = os.urandom(LIMIT + 1)
    if how.startswith("location"):
        origin.routes[f"{FED}/download/big"] = located(origin.url("/cdn/big"))
        origin.routes["/cdn/big"] = send(200, {"Content-Type": "application/zip"}, media,
                                         chunked=how == "location")
    else:
        origin.routes[f"{FED}/download/big"] = two_parts(media, chunked=how == "chunked")
    err = await _refused(repo.get_media(origin.name, "big"))
    assert (err.code, err.errcode) == (502, "M_TOO_LARGE")
    await _nothing_kept(repo, origin, "big")


@pytest.mark.parametrize("body", [
    b"--zz\r\nContent-Type: application/json\r\n\r\n{}\r\n--zz--\r\n",  # one part
    b"--zz\r\nContent-Type: text/plain\r\n\r\n{}\r\n--zz\r\n\r\nmedia\r\n--zz--\r\n",  # metadata not JSON
    b"--zz\r\nContent-Type: application/json\r\n\r\n{}\r\n--zz\r\n\r\nmedia, never closed",
    b"no boundary at all " * 10,
])
@pytest_twisted.ensureDeferred
async def test_malformed_multipart_is_502(origin: Origin, repo: MediaRepository, body: bytes) -> None:
    origin.routes[f"{FED}/download/bad"] = send(200, {"Content-Type": "multipart/mixed; boundary=zz"}, body, piece=5)
    err = await _refused(repo.get_media(origin.name, "bad"))
    assert (err.code, err.errcode) == (502, "M_UNKNOWN") and "Malformed" in err.msg
    await _nothing_kept(repo, origin, "bad")


# -- the legacy endpoint ------------------------------------------------------------


@pytest.mark.parametrize("refusal", [
    error(404, {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"}),
    error(405, {"errcode": "M_UNRECOGNIZED", "error": "Unsupported method"}),
    error(404, b"<html><body>404 Not Found</body></html>"),
    error(405, b""),
])
@pytest_twisted.ensureDeferred
async def test_fallback_to_the_legacy_download(origin: Origin, repo: MediaRepository, refusal: Handler) -> None:
    media = b"%PDF-1.7 legacy " + os.urandom(200_000)
    origin.routes[f"{FED}/download/old"] = refusal
    origin.routes[f"{LEGACY}/download/{origin.name}/old"] = send(
        200, {"Content-Type": "application/pdf", "Content-Disposition": 'attachment; filename="old.pdf"'}, media)
    info = await repo.get_media(origin.name, "old")
    assert await repo.read_all(repo.servable(info)) == media
    assert (info.content_type, info.upload_name, info.sniffed_type) == ("application/pdf", "old.pdf",
                                                                        "application/pdf")
    (fed, fed_query, fed_signed), (legacy, query, signed) = origin.seen
    assert (fed, fed_signed) == (f"{FED}/download/old", True)
    assert (legacy, signed) == (f"{LEGACY}/download/{origin.name}/old", False)
    assert query == {"allow_remote": ["false"], "allow_redirect": ["true"], "timeout_ms": ["20000"]}


@pytest.mark.parametrize("refusal,expected", [
    (error(404, {"errcode": "M_NOT_FOUND", "error": "Media not found"}), (404, "M_NOT_FOUND")),
    (error(403, {"errcode": "M_FORBIDDEN", "error": "No"}), (502, "M_UNKNOWN")),
    (error(500, b"oops"), (502, "M_UNKNOWN")),
])
@pytest_twisted.ensureDeferred
async def test_no_fallback_when_the_endpoint_answered(origin: Origin, repo: MediaRepository, refusal: Handler,
                                                      expected: tuple[int, str]) -> None:
    origin.routes[f"{FED}/download/gone"] = refusal
    origin.routes[f"{LEGACY}/download/{origin.name}/gone"] = send(200, {"Content-Type": "text/plain"}, b"stale")
    err = await _refused(repo.get_media(origin.name, "gone"))
    assert (err.code, err.errcode) == expected
    assert origin.paths() == [f"{FED}/download/gone"]
    await _nothing_kept(repo, origin, "gone")


@pytest_twisted.ensureDeferred
async def test_legacy_not_found_and_redirects(origin: Origin, repo: MediaRepository) -> None:
    # Neither endpoint knows the media.
    err = await _refused(repo.get_media(origin.name, "nowhere"))
    assert (err.code, err.errcode) == (404, "M_NOT_FOUND")
    assert origin.paths() == [f"{FED}/download/nowhere", f"{LEGACY}/download/{origin.name}/nowhere"]
    # allow_redirect=true: a relative 307 is followed, unsigned.
    media = os.urandom(50_000)
    origin.routes[f"{LEGACY}/download/{origin.name}/moved"] = send(307, {"Location": "/cdn/moved"}, b"")
    origin.routes["/cdn/moved"] = send(200, {"Content-Type": "application/octet-stream"}, media)
    info = await repo.get_media(origin.name, "moved")
    assert await repo.read_all(repo.servable(info)) == media
    assert [(p, s) for p, _, s in origin.seen[2:]] == [
        (f"{FED}/download/moved", True), (f"{LEGACY}/download/{origin.name}/moved", False), ("/cdn/moved", False)]


@pytest.mark.parametrize("chunked", [True, False])
@pytest_twisted.ensureDeferred
async def test_legacy_oversized_is_refused(origin: Origin, repo: MediaRepository, chunked: bool) -> None:
    origin.routes[f"{LEGACY}/download/{origin.name}/big"] = send(
        200, {"Content-Type": "application/octet-stream"}, os.urandom(LIMIT + 10), chunked=chunked)
    err = await _refused(repo.get_media(origin.name, "big"))
    assert (err.code, err.errcode) == (502, "M_TOO_LARGE")
    await _nothing_kept(repo, origin, "big")


@pytest_twisted.ensureDeferred
async def test_thumbnails_federation_then_legacy(origin: Origin, repo: MediaRepository) -> None:
    thumb = images.png(96, 96)
    origin.routes[f"{FED}/thumbnail/new"] = two_parts(thumb, "image/png")
    item = await repo.get_thumbnail(origin.name, "new", 96, 96, "crop", False)
    assert item.content_type == "image/png" and await repo.read_all(item) == thumb
    # An origin without the federation thumbnail endpoint.
    origin.routes[f"{LEGACY}/thumbnail/{origin.name}/old"] = send(200, {"Content-Type": "image/png"}, thumb)
    item = await repo.get_thumbnail(origin.name, "old", 30, 30, "crop", False)
    assert await repo.read_all(item) == thumb
    path, query, signed = origin.seen[-1]
    assert (path, signed) == (f"{LEGACY}/thumbnail/{origin.name}/old", False)
    assert query == {"width": ["32"], "height": ["32"], "method": ["crop"], "timeout_ms": ["20000"],
                     "allow_remote": ["false"], "allow_redirect": ["true"]}
    # Not an image: refused, nothing kept.
    origin.routes[f"{FED}/thumbnail/html"] = two_parts(b"<html>no</html>", "image/png")
    err = await _refused(repo.get_thumbnail(origin.name, "html", 96, 96, "crop", False))
    assert (err.code, err.errcode) == (502, "M_UNKNOWN")
    assert len(_files(repo)) == 2
    # The remote's own 404 is final.
    origin.routes[f"{FED}/thumbnail/none"] = error(404, {"errcode": "M_NOT_FOUND", "error": "no"})
    err = await _refused(repo.get_thumbnail(origin.name, "none", 96, 96, "crop", False))
    assert (err.code, err.errcode) == (404, "M_NOT_FOUND")
    assert origin.paths()[-1] == f"{FED}/thumbnail/none"


# -- memory ---------------------------------------------------------------------------


class _Generated:
    """A large body made as it is sent, so the origin holds little of it."""

    def __init__(self, request: Request, size: int, head: bytes, tail: bytes) -> None:
        self.request = request
        self.left = size
        self.head = head
        self.tail = tail
        self.digest = hashlib.sha256()
        self.counter = 0

    def resumeProducing(self) -> None:  # noqa: N802 - Twisted's name
        if self.head:
            self.request.write(self.head)
            self.head = b""
            return
        if self.left <= 0:
            self.request.unregisterProducer()
            self.request.write(self.tail)
            self.request.finish()
            return
        n = min(self.left, 65536)
        block = hashlib.sha512(self.counter.to_bytes(8, "big")).digest() * (n // 64 + 1)
        block = block[:n]
        self.counter += 1
        self.left -= n
        self.digest.update(block)
        self.request.write(block)

    def stopProducing(self) -> None:  # noqa: N802
        self.left = 0


@pytest_twisted.ensureDeferred
async def test_peak_memory_does_not_grow_with_the_file(origin: Origin, database: Database, tmp_path: Path) -> None:
    size = 24 * 1024 * 1024
    policy = FederationTLSPolicy(False)
    client = FederationClient("hs.test", new_signing_key("k1"),
                              ServerResolver(allow_private_addresses=True, tls_policy=policy), policy)
    repo = MediaRepository("hs.test", MediaConfig(max_upload_size=32 * 1024 * 1024, thumbnails_on_upload=False),
                           MediaStore(database), FileSystemBackend(str(tmp_path / "big")),
                           crypto.KeyRing(crypto.ServerKey(os.urandom(32))), federation_client=client)
    made: list[_Generated] = []

    def generate(request: Request) -> Any:
        head, tail = multipart.framing(BOUNDARY, "application/octet-stream", None)
        request.setHeader(b"Content-Type", f"multipart/mixed; boundary={BOUNDARY}".encode())
        producer = _Generated(request, size, head, tail)
        made.append(producer)
        request.registerProducer(producer, False)
        return NOT_DONE_YET

    origin.routes[f"{FED}/download/huge"] = generate
    tracemalloc.start()
    try:
        info = await repo.get_media(origin.name, "huge")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        await client.close()
    assert info.size == size
    assert peak < 8 * 1024 * 1024, f"peak {peak} bytes while fetching {size}"
    f, chunks = repo.open_plaintext(repo.servable(info))
    digest = hashlib.sha256()
    try:
        for chunk in chunks:
            digest.update(chunk)
    finally:
        f.close()
    assert digest.digest() == made[0].digest.digest()


# -- the pipeline fed in odd pieces, without a network ----------------------------------


class _PiecesClient:
    """open_get answers from memory, in pieces of a given size."""

    def __init__(self, body: bytes, content_type: str, chunk: int) -> None:
        self.body = body
        self.content_type = content_type
        self.chunk = chunk
        self.responses: list[BytesResponse] = []

    async def open_get(self, server_name: str, path: str, query: Any = None, **kw: Any) -> BytesResponse:
        response = BytesResponse(self.content_type, self.body, chunk=self.chunk)
        self.responses.append(response)
        return response


@pytest.mark.parametrize("chunk", [1, 3, 509, 65537, 300_001])
@pytest_twisted.ensureDeferred
async def test_pipeline_with_odd_pieces(database: Database, tmp_path: Path, chunk: int) -> None:
    media = os.urandom(20_000 if chunk < 100 else 900_000)
    head, tail = multipart.framing(BOUNDARY, "video/mp4", None)
    client = _PiecesClient(head + media + tail, f'multipart/mixed; boundary="{BOUNDARY}"', chunk)
    repo = MediaRepository("hs.test", MediaConfig(max_upload_size=LIMIT, thumbnails_on_upload=False),
                           MediaStore(database), FileSystemBackend(str(tmp_path / "store")),
                           crypto.KeyRing(crypto.ServerKey(os.urandom(32))), federation_client=client)
    info = await repo.get_media("remote.test", "pieces")
    assert info.content_type == "video/mp4" and await repo.read_all(repo.servable(info)) == media
    # Over the limit: refused as soon as the limit is passed, not at the end.
    client.body = head + media * 2 + tail
    repo.max_upload_size = len(media)
    err = await _refused(repo.get_media("remote.test", "pieces2"))
    assert (err.code, err.errcode) == (502, "M_TOO_LARGE")
    # (The parser holds back what could start a delimiter: CRLF "--" boundary.)
    assert client.responses[-1].delivered < len(head) + len(media) + len(BOUNDARY) + 4 + chunk
    assert len([p for p in (tmp_path / "store").rglob("*") if p.is_file()]) == 1
