"""URL previews through a real zhome on SQLite and PostgreSQL, against a
small web server on loopback run by the test.

Spec: client-server-api "Content repository", GET /_matrix/client/v1/media/
preview_url (and the deprecated /_matrix/media/v3 and r0 paths).
"""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any, Optional

import jsonschema

from tests.e2e.harness import ClientUser, ZhomeProcess
from tests.e2e.openapi import Spec
from tests.media import images

PREVIEW = "/_matrix/client/v1/media/preview_url"
MAX_PAGE = 16 * 1024
_spec: Optional[Spec] = None

Route = tuple[int, dict[str, str], bytes]


class Site:
    """A web server on 127.0.0.1 serving ``routes`` (path -> status, headers,
    body), remembering every path asked for."""

    def __init__(self, routes: dict[str, Route]) -> None:
        self.routes = routes
        self.requests: list[str] = []
        self.lock = threading.Lock()
        site = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                with site.lock:
                    site.requests.append(self.path)
                status, headers, body = site.routes.get(self.path, (404, {"Content-Type": "text/plain"}, b"no"))
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    def url(self, path: str) -> str:
        return self.base + path

    def count(self, path: str) -> int:
        with self.lock:
            return self.requests.count(path)


@contextlib.contextmanager
def serving(routes: dict[str, Route]) -> Iterator[Site]:
    site = Site(routes)
    site.thread.start()
    try:
        yield site
    finally:
        site.server.shutdown()
        site.server.server_close()
        site.thread.join(timeout=5)


def html(text: str, charset: str = "utf-8") -> Route:
    return 200, {"Content-Type": f"text/html; charset={charset}"}, text.encode(charset)


def redirect(status: int, to: str) -> Route:
    return status, {"Location": to}, b""


def preview(hs: ZhomeProcess, user: Optional[ClientUser], url: Optional[str], path: str = PREVIEW) -> tuple[int, Any]:
    query = "" if url is None else "?" + urllib.parse.urlencode({"url": url})
    status, body = hs.request("GET", path + query, token=user.token if user else None)
    if status == 200:
        global _spec
        _spec = _spec or Spec()
        schema = _spec.response_schema("/media/preview_url", "get", 200)
        errors = list(jsonschema.Draft202012Validator(schema).iter_errors(body))
        assert not errors, [e.message for e in errors[:5]]
    else:
        assert isinstance(body, dict) and isinstance(body.get("errcode"), str), (status, body)
    return status, body


def download(hs: ZhomeProcess, user: ClientUser, mxc: str) -> bytes:
    import urllib.request

    server, media_id = mxc[len("mxc://"):].split("/", 1)
    req = urllib.request.Request(f"{hs.base_url}/_matrix/client/v1/media/download/{server}/{media_id}")
    req.add_header("Authorization", f"Bearer {user.token}")
    with urllib.request.urlopen(req, timeout=30) as r:
        data: bytes = r.read()
        return data


def enabled(factory: Callable[..., ZhomeProcess], **extra: Any) -> ZhomeProcess:
    previews = {"enabled": True, "allow_private_addresses": True, "max_page_bytes": MAX_PAGE, **extra}
    return factory(overrides={"media": {"url_previews": previews}}).start()


COVER = images.png(64, 48)
PHOTO = images.jpeg(40, 30)

OG_PAGE = """<!doctype html><html><head>
<title>Not this one</title>
<meta property="og:title" content="Ward 7 rota &amp; notes">
<meta property="og:description" content="Who is on shift this week">
<meta property="og:type" content="website">
<meta property="og:site_name" content="Care portal">
<meta property="og:image" content="/images/cover.png">
<meta property="og:image:width" content="999">
</head><body><p>Hello</p></body></html>"""

PLAIN_PAGE = ("<html><head><meta charset='iso-8859-1'><title>Caf\u00e9 menu</title>"
              "<meta name='description' content='Soup of the day'></head><body></body></html>")


def test_previews(zhome_factory: Callable[..., ZhomeProcess]) -> None:
    routes: dict[str, Route] = {
        "/og.html": html(OG_PAGE),
        "/images/cover.png": (200, {"Content-Type": "image/png"}, COVER),
        # The header says nothing of the charset: the meta tag does.
        "/plain.html": (200, {"Content-Type": "text/html"}, PLAIN_PAGE.encode("latin-1")),
        "/photo.jpg": (200, {"Content-Type": "image/jpeg"}, PHOTO),
        "/hop1": redirect(302, "/hop2"),
        "/hop2": redirect(301, "/hop3"),
        "/hop3": redirect(307, "/plain.html?via=redirects"),
        "/plain.html?via=redirects": (200, {"Content-Type": "text/html"}, PLAIN_PAGE.encode("latin-1")),
        "/loop": redirect(302, "/loop"),
        "/far1": redirect(302, "/far2"), "/far2": redirect(302, "/far3"), "/far3": redirect(302, "/far4"),
        "/far4": redirect(302, "/far5"), "/far5": redirect(302, "/far6"), "/far6": redirect(302, "/og.html"),
        "/big.html": html("<title>big</title>" + "x" * (MAX_PAGE + 1)),
        "/gone.html": (404, {"Content-Type": "text/html"}, b"<title>Not found</title>"),
        "/data.json": (200, {"Content-Type": "application/json"}, b'{"a": 1}'),
        "/broken-image.html": html('<title>t</title><meta property="og:image" content="/missing.png">'),
        "/cached.html": html("<title>Once</title>"),
    }
    hs = enabled(zhome_factory, blocked_hosts=["localhost", "*.internal.test"])
    alice, bob = ClientUser(hs, "alice"), ClientUser(hs, "bob")
    with serving(routes) as site:
        port = site.server.server_address[1]
        routes["/to-blocked"] = redirect(302, f"http://LocalHost:{port}/og.html")
        # OpenGraph tags, and the image stored as alice's media.
        status, body = preview(hs, alice, site.url("/og.html"))
        assert status == 200, body
        assert body["og:title"] == "Ward 7 rota & notes"
        assert body["og:description"] == "Who is on shift this week"
        assert (body["og:type"], body["og:site_name"]) == ("website", "Care portal")
        assert body["og:image"].startswith(f"mxc://{hs.server_name}/")
        # The image's own dimensions, not what the page claimed.
        assert (body["og:image:width"], body["og:image:height"]) == (64, 48)
        assert body["og:image:type"] == "image/png"
        assert body["matrix:image:size"] == len(COVER)
        assert download(hs, bob, body["og:image"]) == COVER
        assert site.count("/images/cover.png") == 1

        # <title> and <meta name=description>, decoded by the meta charset.
        status, body = preview(hs, alice, site.url("/plain.html"))
        assert status == 200 and body == {"og:title": "Caf\u00e9 menu", "og:description": "Soup of the day"}

        # A redirect chain (302, 301, 307) is followed.
        status, body = preview(hs, alice, site.url("/hop1"))
        assert status == 200 and body["og:title"] == "Caf\u00e9 menu", body
        assert [site.count(p) for p in ("/hop1", "/hop2", "/hop3", "/plain.html?via=redirects")] == [1, 1, 1, 1]
        # A loop, or more than five redirects: no preview, and a bounded number of requests.
        assert preview(hs, alice, site.url("/loop"))[1]["errcode"] == "M_NOT_FOUND"
        assert site.count("/loop") == 6
        assert preview(hs, alice, site.url("/far1")) == (404, {"errcode": "M_NOT_FOUND",
                                                                "error": "Could not preview this URL"})
        assert site.count("/og.html") == 1
        # A blocked host, asked for or redirected to, is never fetched.
        assert preview(hs, alice, f"http://localhost:{port}/og.html")[1]["errcode"] == "M_NOT_FOUND"
        assert preview(hs, alice, site.url("/to-blocked"))[1]["errcode"] == "M_NOT_FOUND"
        assert site.count("/to-blocked") == 1 and site.count("/og.html") == 1

        # A URL that is an image is previewed as that image.
        status, body = preview(hs, bob, site.url("/photo.jpg"))
        assert status == 200, body
        assert (body["og:image:width"], body["og:image:height"], body["og:image:type"]) == (40, 30, "image/jpeg")
        assert body["matrix:image:size"] == len(PHOTO)
        assert download(hs, alice, body["og:image"]) == PHOTO

        # Too large, an error status: 404, never a 500.
        assert preview(hs, alice, site.url("/big.html"))[0:1] == (404,)
        assert preview(hs, alice, site.url("/gone.html"))[1]["errcode"] == "M_NOT_FOUND"
        # Neither a page nor an image: an empty preview.
        assert preview(hs, alice, site.url("/data.json")) == (200, {})
        # A page whose image is missing still has its title, without image keys.
        assert preview(hs, alice, site.url("/broken-image.html")) == (200, {"og:title": "t"})

        # Cached: the second request (from anyone) does not fetch again.
        first = preview(hs, alice, site.url("/cached.html"))
        assert first == (200, {"og:title": "Once"})
        assert preview(hs, bob, site.url("/cached.html")) == first
        # The deprecated paths answer the same (from the cache here).
        assert preview(hs, bob, site.url("/cached.html"), "/_matrix/media/v3/preview_url") == first
        assert preview(hs, bob, site.url("/cached.html"), "/_matrix/media/r0/preview_url") == first
        # The fragment is not part of the URL fetched.
        assert preview(hs, bob, site.url("/cached.html#top")) == first
        assert site.count("/cached.html") == 1

        # Bad requests.
        assert preview(hs, alice, None)[1]["errcode"] == "M_MISSING_PARAM"
        for bad in ("ftp://127.0.0.1/x", "file:///etc/passwd", "javascript:alert(1)", "not a url",
                    "http://user:pw@127.0.0.1/"):
            status, body = preview(hs, alice, bad)
            assert (status, body["errcode"]) == (400, "M_INVALID_PARAM"), (bad, body)
        status, body = hs.request("GET", PREVIEW + "?" + urllib.parse.urlencode(
            {"url": site.url("/cached.html"), "ts": "soon"}), token=alice.token)
        assert (status, body["errcode"]) == (400, "M_INVALID_PARAM")
        # No access token, on every path.
        for path in (PREVIEW, "/_matrix/media/v3/preview_url", "/_matrix/media/r0/preview_url"):
            status, body = preview(hs, None, site.url("/og.html"), path)
            assert (status, body["errcode"]) == (401, "M_MISSING_TOKEN")
    # Nothing of the URLs or pages in the log, only hosts and outcomes.
    log = hs.log_path.read_text(errors="replace")
    assert "URL preview of host 127.0.0.1" in log
    for secret in ("og.html", "cached.html", "hop1", "photo.jpg", "Ward 7", "shift this week"):
        assert secret not in log, secret


def test_previews_disabled_by_default(zhome: ZhomeProcess) -> None:
    alice = ClientUser(zhome, "alice")
    with serving({"/og.html": html(OG_PAGE)}) as site:
        for path in (PREVIEW, "/_matrix/media/v3/preview_url"):
            assert preview(zhome, alice, site.url("/og.html"), path) == (
                404, {"errcode": "M_NOT_FOUND", "error": "URL previews are not enabled on this server"})
        assert preview(zhome, None, site.url("/og.html"))[1]["errcode"] == "M_MISSING_TOKEN"
        assert site.requests == []


def test_private_addresses_refused(zhome_factory: Callable[..., ZhomeProcess]) -> None:
    hs = enabled(zhome_factory, allow_private_addresses=False)
    alice = ClientUser(hs, "alice")
    with serving({"/og.html": html(OG_PAGE)}) as site:
        port = site.server.server_address[1]
        for url in (site.url("/og.html"), f"http://localhost:{port}/og.html", f"http://[::1]:{port}/og.html",
                    f"http://[::ffff:127.0.0.1]:{port}/og.html", f"http://0.0.0.0:{port}/og.html",
                    f"http://2130706433:{port}/og.html"):
            status, body = preview(hs, alice, url)
            assert (status, body["errcode"]) == (404, "M_NOT_FOUND"), (url, body)
        # Refused before connecting: the server never saw a request.
        assert site.requests == []
    assert "refused" in hs.log()


def test_previews_rate_limited_per_user(zhome_factory: Callable[..., ZhomeProcess]) -> None:
    previews = {"enabled": True, "allow_private_addresses": True}
    hs = zhome_factory(rate_limits=True, overrides={
        "media": {"url_previews": previews},
        "rate_limits": {"url_previews": {"per_second": 0.01, "burst_count": 2}}}).start()
    alice = ClientUser(hs, "alice")
    routes = {f"/p{i}.html": html(f"<title>{i}</title>") for i in range(3)}
    with serving(routes) as site:
        assert preview(hs, alice, site.url("/p0.html")) == (200, {"og:title": "0"})
        assert preview(hs, alice, site.url("/p1.html"))[0] == 200
        status, body = preview(hs, alice, site.url("/p2.html"))
        assert (status, body["errcode"]) == (429, "M_LIMIT_EXCEEDED") and body["retry_after_ms"] > 0
        assert site.count("/p2.html") == 0
        # An answer from the cache costs nothing.
        assert preview(hs, alice, site.url("/p0.html")) == (200, {"og:title": "0"})
