"""Remote media over federation between two zhome processes.

Spec: server-server-api "Content Repository" (GET /_matrix/federation/v1/
media/download and /thumbnail, multipart/mixed answers) and
client-server-api "Content repository" (a client reads remote media through
its own server, which caches it).
"""

from __future__ import annotations

import json
import os

from tests.e2e.conftest import ZhomeServers
from tests.e2e.test_media import _store_files, download, err, images, thumbnail, upload


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
    for f in _store_files(b):
        assert marker not in f.read_bytes(), f

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
