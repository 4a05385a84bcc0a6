"""The media repository end to end, on SQLite and PostgreSQL.

Spec: client-server-api "Content repository" (upload, create + PUT upload,
authenticated download and thumbnail, config, the frozen unauthenticated
endpoints, Content-Security-Policy and inline/attachment rules),
server-server-api "Content Repository" (federation media download).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

import nio
import pytest

from tests.e2e.harness import ZhomeProcess
from tests.media import images

AUTHED = "/_matrix/client/v1/media"


def http(proc: ZhomeProcess, method: str, path: str, token: Optional[str] = None, data: Optional[bytes] = None,
         headers: Optional[dict[str, str]] = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(proc.base_url + path, data=data, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def err(body: bytes) -> str:
    return json.loads(body)["errcode"]


def upload(proc: ZhomeProcess, token: str, data: bytes, content_type: str = "application/octet-stream",
           filename: Optional[str] = None) -> tuple[str, str]:
    from urllib.parse import quote

    path = "/_matrix/media/v3/upload" + (f"?filename={quote(filename)}" if filename else "")
    status, _, body = http(proc, "POST", path, token, data, {"Content-Type": content_type})
    assert status == 200, (status, body)
    uri = json.loads(body)["content_uri"]
    assert uri.startswith("mxc://")
    server, media_id = uri[len("mxc://"):].split("/", 1)
    assert len(media_id) >= 24
    return server, media_id


def download(proc: ZhomeProcess, token: Optional[str], server: str, media_id: str, suffix: str = "",
             headers: Optional[dict[str, str]] = None) -> tuple[int, dict[str, str], bytes]:
    return http(proc, "GET", f"{AUTHED}/download/{server}/{media_id}{suffix}", token, headers=headers)


def thumbnail(proc: ZhomeProcess, token: str, server: str, media_id: str, width: int, height: int,
              method: str, animated: Optional[bool] = None) -> tuple[int, dict[str, str], bytes]:
    q = f"width={width}&height={height}&method={method}"
    if animated is not None:
        q += f"&animated={'true' if animated else 'false'}"
    return http(proc, "GET", f"{AUTHED}/thumbnail/{server}/{media_id}?{q}", token)


def test_upload_download_round_trip_and_headers(zhome: ZhomeProcess) -> None:
    alice = zhome.register("alice")["access_token"]
    bob = zhome.register("bob")["access_token"]
    data = os.urandom(100_000)
    server, media_id = upload(zhome, alice, data, "application/pdf", "report.pdf")
    assert server == zhome.server_name

    status, headers, body = download(zhome, bob, server, media_id)
    assert status == 200 and body == data
    assert headers["content-type"] == "application/pdf"
    # application/pdf is not on the spec's inline list.
    assert headers["content-disposition"].startswith("attachment")
    assert 'filename="report.pdf"' in headers["content-disposition"]
    assert "sandbox" in headers["content-security-policy"]
    assert "default-src 'none'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["cross-origin-resource-policy"] == "cross-origin"
    assert headers["accept-ranges"] == "bytes"

    # The file name in the path overrides the upload name.
    status, headers, body = download(zhome, bob, server, media_id, "/other.pdf")
    assert status == 200 and body == data
    assert 'filename="other.pdf"' in headers["content-disposition"]

    status, _, body = http(zhome, "GET", f"{AUTHED}/config", bob)
    assert status == 200 and json.loads(body)["m.upload.size"] > 0


def test_content_type_sniffed_disposition_and_filename_sanitised(zhome: ZhomeProcess) -> None:
    token = zhome.register("alice")["access_token"]
    # No declared type: sniffed from the bytes.
    server, media_id = upload(zhome, token, images.png(20, 20), "application/octet-stream", "pic.png")
    status, headers, _ = download(zhome, token, server, media_id)
    assert status == 200 and headers["content-type"] == "image/png"
    assert headers["content-disposition"].startswith("inline")

    # HTML is never inline; the file name loses its path and quotes.
    html = b"<html><script>alert(1)</script></html>"
    server, media_id = upload(zhome, token, html, "text/html", '../../etc/"evil"\u202e.html')
    status, headers, body = download(zhome, token, server, media_id)
    assert status == 200 and body == html
    disposition = headers["content-disposition"]
    assert disposition.startswith("attachment")
    assert "/" not in disposition and ".." not in disposition and "\u202e" not in disposition
    assert disposition.count('"') == 2
    assert "sandbox" in headers["content-security-policy"]


def test_unknown_media_and_unauthenticated_access(zhome: ZhomeProcess) -> None:
    token = zhome.register("alice")["access_token"]
    status, _, body = download(zhome, token, zhome.server_name, "AAAAAAAAAAAAAAAAAAAAAAAAAAAA")
    assert status == 404 and err(body) == "M_NOT_FOUND"
    status, _, body = download(zhome, token, zhome.server_name, "bad.id")
    assert status == 404 and err(body) == "M_NOT_FOUND"

    server, media_id = upload(zhome, token, b"new media", "text/plain")
    status, _, body = download(zhome, None, server, media_id)
    assert status == 401 and err(body) == "M_MISSING_TOKEN"
    # The deprecated endpoints are frozen for media uploaded after the freeze.
    for path in (f"/_matrix/media/v3/download/{server}/{media_id}",
                 f"/_matrix/media/v3/download/{server}/{media_id}/x.txt",
                 f"/_matrix/media/v3/thumbnail/{server}/{media_id}?width=32&height=32"):
        status, _, body = http(zhome, "GET", path)
        assert status == 404 and err(body) == "M_NOT_FOUND", path
        status, _, body = http(zhome, "GET", path, token)
        assert status == 404 and err(body) == "M_NOT_FOUND", path
    status, _, body = http(zhome, "POST", "/_matrix/media/v3/upload", None, b"x", {"Content-Type": "text/plain"})
    assert status == 401


@pytest.mark.parametrize("kind", ["png", "jpeg", "gif", "webp"])
def test_thumbnails(zhome: ZhomeProcess, kind: str) -> None:
    token = zhome.register("alice")["access_token"]
    data = getattr(images, kind)(400, 300)
    server, media_id = upload(zhome, token, data, f"image/{kind}")

    status, headers, body = thumbnail(zhome, token, server, media_id, 96, 96, "crop")
    assert status == 200, body
    img = images.open_image(body)
    assert img.size == (96, 96)
    expected = "image/jpeg" if kind == "jpeg" else "image/png"
    assert headers["content-type"] == expected and img.get_format_mimetype() == expected
    assert headers["content-disposition"].startswith("inline")
    assert headers["x-content-type-options"] == "nosniff"

    status, headers, body = thumbnail(zhome, token, server, media_id, 320, 240, "scale")
    assert status == 200 and images.open_image(body).size == (320, 240)
    # Larger than the original: never upscaled.
    status, _, body = thumbnail(zhome, token, server, media_id, 800, 600, "scale")
    assert status == 200 and images.open_image(body).size == (400, 300)
    # Cached: the same bytes again.
    status, _, again = thumbnail(zhome, token, server, media_id, 800, 600, "scale")
    assert status == 200 and again == body

    status, headers, body = thumbnail(zhome, token, server, media_id, 96, 96, "crop", animated=True)
    assert status == 200
    img = images.open_image(body)
    if kind in ("gif", "webp"):
        assert headers["content-type"] == "image/webp"
        assert getattr(img, "is_animated", False) and img.n_frames == 3
    else:
        assert not getattr(img, "is_animated", False)
    status, _, body = thumbnail(zhome, token, server, media_id, 96, 96, "crop", animated=False)
    assert status == 200 and not getattr(images.open_image(body), "is_animated", False)


def test_thumbnail_refusals(zhome: ZhomeProcess) -> None:
    token = zhome.register("alice")["access_token"]
    server, media_id = upload(zhome, token, images.bomb_png(), "image/png")
    status, _, body = thumbnail(zhome, token, server, media_id, 32, 32, "crop")
    assert status == 413 and err(body) == "M_TOO_LARGE"
    # The server is still fine afterwards.
    assert http(zhome, "GET", "/_matrix/client/versions")[0] == 200

    server, media_id = upload(zhome, token, b"not an image", "image/png")
    status, _, body = thumbnail(zhome, token, server, media_id, 32, 32, "crop")
    assert status == 400
    status, _, body = thumbnail(zhome, token, server, media_id, 32, 32, "bogus")
    assert status == 400


def test_oversized_upload_and_quota(zhome_factory: Any) -> None:
    proc = zhome_factory(overrides={"media": {"max_upload_size": 10_000, "per_user_quota_bytes": 15_000}})
    proc.start()
    token = proc.register("alice")["access_token"]
    status, _, body = http(proc, "POST", "/_matrix/media/v3/upload", token, os.urandom(10_001),
                           {"Content-Type": "application/octet-stream"})
    assert status == 413 and err(body) == "M_TOO_LARGE"
    status, _, body = http(proc, "GET", f"{AUTHED}/config", token)
    assert json.loads(body)["m.upload.size"] == 10_000

    upload(proc, token, os.urandom(9_000))
    status, _, body = http(proc, "POST", "/_matrix/media/v3/upload", token, os.urandom(9_000),
                           {"Content-Type": "application/octet-stream"})
    assert status == 403 and err(body) == "M_FORBIDDEN"
    # Another user has their own quota.
    other = proc.register("bob")["access_token"]
    upload(proc, other, os.urandom(9_000))


def test_range_requests(zhome: ZhomeProcess) -> None:
    token = zhome.register("alice")["access_token"]
    data = os.urandom(300_000)
    server, media_id = upload(zhome, token, data)
    status, headers, body = download(zhome, token, server, media_id, headers={"Range": "bytes=100000-200099"})
    assert status == 206 and body == data[100000:200100]
    assert headers["content-range"] == f"bytes 100000-200099/{len(data)}"
    status, headers, body = download(zhome, token, server, media_id, headers={"Range": "bytes=-1000"})
    assert status == 206 and body == data[-1000:]
    status, headers, body = download(zhome, token, server, media_id, headers={"Range": "bytes=299990-"})
    assert status == 206 and body == data[299990:]
    status, headers, _ = download(zhome, token, server, media_id, headers={"Range": "bytes=400000-"})
    assert status == 416 and headers["content-range"] == f"bytes */{len(data)}"


def test_form_content_types_are_stored_as_sent(zhome: ZhomeProcess) -> None:
    """An upload declared as an HTML form is media like any other: its bytes
    are stored as sent, never parsed as form fields."""
    token = zhome.register("alice")["access_token"]
    for ctype, body in (("application/x-www-form-urlencoded", b"a=b&c=d"),
                        ("multipart/form-data; boundary=xyz", b"--xyz\r\nnot really a form\r\n--xyz--\r\n")):
        server, media_id = upload(zhome, token, body, ctype)
        status, _, got = download(zhome, token, server, media_id)
        assert status == 200 and got == body


def test_client_leaving_mid_download(zhome: ZhomeProcess) -> None:
    """A client that closes its connection part-way through a download is
    not an error: the server stops sending and keeps serving others."""
    import socket
    import time

    alice = zhome.register("alice")["access_token"]
    data = os.urandom(8 * 1024 * 1024)
    server, media_id = upload(zhome, alice, data)
    host, port = zhome.base_url.split("//", 1)[1].rsplit(":", 1)
    for _ in range(3):
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(f"GET {AUTHED}/download/{server}/{media_id} HTTP/1.1\r\nHost: x\r\n"
                      f"Authorization: Bearer {alice}\r\n\r\n".encode())
            first = s.recv(65536)
            assert first.startswith(b"HTTP/1.1 200"), first[:100]
    deadline = time.monotonic() + 15
    while zhome.log().count("media_download ") < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    log = zhome.log()
    assert log.count("media_download ") >= 3, log
    assert "Unhandled error" not in log and "Traceback" not in log, log
    assert " 500 " not in log, log
    status, _, body = download(zhome, alice, server, media_id)
    assert status == 200 and body == data


def test_async_create_and_put_upload(zhome: ZhomeProcess) -> None:
    alice = zhome.register("alice")["access_token"]
    bob = zhome.register("bob")["access_token"]
    status, _, body = http(zhome, "POST", "/_matrix/media/v1/create", alice, b"{}",
                           {"Content-Type": "application/json"})
    assert status == 200, body
    created = json.loads(body)
    assert created["unused_expires_at"] > 0
    server, media_id = created["content_uri"][len("mxc://"):].split("/")

    status, _, body = download(zhome, bob, server, media_id, "?timeout_ms=0")
    assert status == 504 and err(body) == "M_NOT_YET_UPLOADED"

    path = f"/_matrix/media/v3/upload/{server}/{media_id}?filename=later.txt"
    status, _, body = http(zhome, "PUT", path, bob, b"late bytes", {"Content-Type": "text/plain"})
    assert status == 403 and err(body) == "M_FORBIDDEN"
    status, _, body = http(zhome, "PUT", path, alice, b"late bytes", {"Content-Type": "text/plain"})
    assert status == 200 and json.loads(body) == {}
    status, _, body = http(zhome, "PUT", path, alice, b"again", {"Content-Type": "text/plain"})
    assert status == 409 and err(body) == "M_CANNOT_OVERWRITE_MEDIA"
    status, _, body = http(zhome, "PUT", f"/_matrix/media/v3/upload/{server}/NOSUCHMEDIAIDNOSUCHMEDIA", alice,
                           b"x", {"Content-Type": "text/plain"})
    assert status == 404 and err(body) == "M_NOT_FOUND"

    status, headers, body = download(zhome, bob, server, media_id)
    assert status == 200 and body == b"late bytes"
    assert 'filename="later.txt"' in headers["content-disposition"]


def _settled_contents(root: Path) -> dict[Path, bytes]:
    """Every file under ``root`` with its bytes, once no write is in flight.

    A thumbnail is stored after it is answered, through a temporary file
    that is renamed into place (and SQLite's journal comes and goes), so a
    listing can name a file that is gone when it is read: list again, a
    bounded number of times, until one listing reads whole with no
    temporary file in it."""
    for _ in range(100):
        try:
            contents = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
        except FileNotFoundError:
            time.sleep(0.05)
            continue
        if not any(p.name.startswith(".tmp_") for p in contents):
            return contents
        time.sleep(0.05)
    raise AssertionError(f"{root} never settled")


def test_media_store_holds_no_plaintext(zhome: ZhomeProcess) -> None:
    token = zhome.register("alice")["access_token"]
    marker = b"ZHOME-PLAINTEXT-MARKER-7f3a9c"
    server, media_id = upload(zhome, token, b"secret report " + marker * 50 + b" end", "text/plain", "r.txt")
    png_server, png_id = upload(zhome, token, images.png(200, 200, text=marker.decode()), "image/png")
    assert thumbnail(zhome, token, png_server, png_id, 96, 96, "crop")[0] == 200
    status, _, body = download(zhome, token, server, media_id)
    assert status == 200 and marker in body

    store = zhome.workdir / "data" / "media"
    files: dict[Path, bytes] = {}
    for _ in range(100):  # the thumbnail may still be on its way to disk
        files = _settled_contents(store)
        if len(files) >= 3:
            break
        time.sleep(0.05)
    assert len(files) >= 3  # two originals and a thumbnail
    for f, content in files.items():
        assert marker not in content, f
        assert not content.startswith(b"\x89PNG"), f
    # Nor does anything else under the server's data directory.
    for f, content in _settled_contents(zhome.workdir / "data").items():
        assert marker not in content, f


async def _nio_client(base: str, name: str) -> nio.AsyncClient:
    c = nio.AsyncClient(base, name)
    resp = await c.register(name, "correct horse battery staple")
    assert isinstance(resp, nio.RegisterResponse), resp
    return c


def test_nio_upload_send_download(zhome: ZhomeProcess) -> None:
    async def scenario() -> None:
        alice = await _nio_client(zhome.base_url, "alice")
        bob = await _nio_client(zhome.base_url, "bob")
        try:
            data = images.png(64, 48)
            resp, _ = await alice.upload(lambda *_: data, content_type="image/png", filename="cat.png",
                                         filesize=len(data))
            assert isinstance(resp, nio.UploadResponse), resp
            room = await alice.room_create(invite=[bob.user_id])
            assert isinstance(room, nio.RoomCreateResponse), room
            assert isinstance(await bob.join(room.room_id), nio.JoinResponse)
            sent = await alice.room_send(room.room_id, "m.room.message", {
                "msgtype": "m.image", "body": "cat.png", "url": resp.content_uri,
                "info": {"mimetype": "image/png", "size": len(data), "w": 64, "h": 48}})
            assert isinstance(sent, nio.RoomSendResponse), sent

            msgs = await bob.room_messages(room.room_id, start="", limit=20)
            urls = [e.source["content"].get("url") for e in msgs.chunk
                    if e.source.get("type") == "m.room.message"]
            assert resp.content_uri in urls
            got = await bob.download(resp.content_uri)
            assert isinstance(got, nio.MemoryDownloadResponse), got
            assert got.body == data
            assert got.content_type == "image/png"
        finally:
            await alice.close()
            await bob.close()

    asyncio.run(scenario())
