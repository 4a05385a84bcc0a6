"""Remote media over federation between two zhome processes.

Spec: server-server-api "Content Repository" (GET /_matrix/federation/v1/
media/download and /thumbnail, multipart/mixed answers) and
client-server-api "Content repository" (a client reads remote media through
its own server, which caches it).
"""

from __future__ import annotations

import json
import os
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Callable

from tests.e2e.conftest import ZhomeServers
from tests.e2e.harness import ZhomeProcess
from tests.e2e.test_media import _settled_contents, download, err, images, thumbnail, upload


def test_remote_media_through_own_server_then_from_cache(zhome_pair: ZhomeServers) -> None:
    a, b = zhome_pair.a, zhome_pair.b
    alice = a.register("alice")["access_token"]
    bob = b.register("bob")["access_token"]
    marker = b"ZHOME-REMOTE-MARKER-51ce"
    data = marker + os.urandom(150_000) + marker
    server, media_id = upload(a, alice, data, "application/pdf", "remote.pdf")
    assert server == a.server_name
    png_server, png_id = upload(a, alice, images.png(400, 300), "image/png", "p.png")

    status, headers, body = download(b, bob, server, media_id)
    assert status == 200, body
    assert body == data
    assert headers["content-type"] == "application/pdf"
    assert headers["content-disposition"].startswith("attachment")
    assert "remote.pdf" in headers["content-disposition"]
    assert headers["x-content-type-options"] == "nosniff"

    status, headers, body = thumbnail(b, bob, png_server, png_id, 96, 96, "crop")
    assert status == 200, body
    assert images.open_image(body).size == (96, 96)

    # Unknown remote media: the origin's 404 comes back as M_NOT_FOUND.
    status, _, body = download(b, bob, server, "NOSUCHMEDIAxxxxxxxxxxxxxxxx")
    assert status == 404 and err(body) == "M_NOT_FOUND"

    # Federation media endpoints require X-Matrix auth.
    import urllib.error
    import urllib.request
    import ssl

    fed_host = a.server_name
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        urllib.request.urlopen(f"https://{fed_host}/_matrix/federation/v1/media/download/{media_id}",
                               context=ctx, timeout=10)
        raise AssertionError("unauthenticated federation media download was served")
    except urllib.error.HTTPError as e:
        assert e.code == 401 and json.loads(e.read())["errcode"] == "M_UNAUTHORIZED"

    # B's cache is encrypted too.
    for f, content in _settled_contents(b.workdir / "data" / "media").items():
        assert marker not in content, f

    # A goes away: B serves from its cache.
    a.stop()
    try:
        status, _, body = download(b, bob, server, media_id)
        assert status == 200 and body == data
        status, _, body = download(b, bob, server, media_id, headers={"Range": "bytes=0-23"})
        assert status == 206 and body == marker
        status, _, body = thumbnail(b, bob, png_server, png_id, 96, 96, "crop")
        assert status == 200 and images.open_image(body).size == (96, 96)
        # Media B never fetched cannot come from the stopped server.
        status, _, body = download(b, bob, server, "NEVERFETCHEDxxxxxxxxxxxxxxx", "?timeout_ms=2000")
        assert status in (502, 504), (status, body)
    finally:
        a.start()


# -- an origin without the federation media endpoints, and limits -------------------


def _answer(code: int, headers: dict[str, str], body: bytes) -> Callable[[BaseHTTPRequestHandler], None]:
    def reply(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(code)
        for k, v in headers.items():
            handler.send_header(k, v)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        for i in range(0, len(body), 10_007):
            handler.wfile.write(body[i:i + 10_007])

    return reply


def _two_parts(media: bytes, content_type: str) -> Callable[[BaseHTTPRequestHandler], None]:
    from zhome.media import multipart

    head, tail = multipart.framing("e0e0e0", content_type, None)
    return _answer(200, {"Content-Type": "multipart/mixed; boundary=e0e0e0"}, head + media + tail)


def test_legacy_fallback_and_size_limit_against_a_fake_origin(tmp_path: Path) -> None:
    """E knows the federation media endpoint for some media only: for the
    rest it answers 404 M_UNRECOGNIZED (no such endpoint, so A asks the
    deprecated /_matrix/media/v3/download) or 404 M_NOT_FOUND (no such
    media, final). A refuses media over its max_upload_size."""
    from tests.e2e.test_federation_hostile import FakeServer

    a = ZhomeProcess(tmp_path / "a", federation_ip="127.0.0.2", overrides={"media": {"max_upload_size": 300_000}})
    e = FakeServer(tmp_path / "e")
    try:
        a.start()
        token = a.register("alice")["access_token"]
        fed = "/_matrix/federation/v1/media/download/"
        legacy = f"/_matrix/media/v3/download/{e.server_name}/"
        new_style = os.urandom(120_000)
        old_style = b"%PDF-1.5 " + os.urandom(120_000)
        e.routes[fed + "newstyle"] = _two_parts(new_style, "application/octet-stream")
        e.routes[fed + "oldstyle"] = _answer(404, {"Content-Type": "application/json"},
                                             b'{"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"}')
        e.routes[legacy + "oldstyle"] = _answer(200, {"Content-Type": "application/pdf"}, old_style)
        e.routes[legacy + "gone"] = _answer(200, {"Content-Type": "text/plain"}, b"must not be asked")
        e.routes[fed + "huge"] = _two_parts(os.urandom(300_001), "application/octet-stream")

        status, _, body = download(a, token, e.server_name, "newstyle")
        assert status == 200 and body == new_style
        status, headers, body = download(a, token, e.server_name, "oldstyle")
        assert status == 200 and body == old_style, (status, body[:200])
        assert headers["content-type"] == "application/pdf"
        asked = [p for _, p in e.requests_seen]
        assert [p.split("?")[0] for p in asked if "oldstyle" in p] == [fed + "oldstyle", legacy + "oldstyle"]
        query = [p.split("?", 1)[1] for p in asked if p.startswith(legacy + "oldstyle")][0]
        assert set(query.split("&")) >= {"allow_remote=false", "allow_redirect=true"}, query

        # E's default answer for an unknown path is 404 M_NOT_FOUND: final.
        status, _, body = download(a, token, e.server_name, "gone")
        assert status == 404 and err(body) == "M_NOT_FOUND"
        assert not any(p.startswith(legacy + "gone") for _, p in e.requests_seen)

        files_before = set(_settled_contents(a.workdir / "data" / "media"))
        status, _, body = download(a, token, e.server_name, "huge")
        assert status == 502 and err(body) == "M_TOO_LARGE", (status, body)
        assert set(_settled_contents(a.workdir / "data" / "media")) == files_before
        assert a.request("GET", "/_matrix/client/versions")[0] == 200
    finally:
        a.stop()
        e.stop()
