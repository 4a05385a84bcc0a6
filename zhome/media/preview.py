"""URL previews: ``GET /_matrix/client/v1/media/preview_url``.

Spec: client-server-api "Content repository" (``GET /media/preview_url``;
the deprecated ``/_matrix/media/v3/preview_url`` answers the same, with an
access token as well). The answer is the page's OpenGraph data
(``preview_html``); ``og:image`` is fetched too and stored in this
server's media repository as local media, and the answer names it by its
``mxc://`` URI with ``matrix:image:size`` and the dimensions read from the
image itself. A URL that is itself an image is previewed as that image.

Whose image: the stored copy is owned by the user whose request fetched
it, so it counts against that user's media quota and is deleted with that
user's media on erasure. A preview is cached in memory (by URL, for
``cache_ms``), so a user asking for a URL another user asked for within
that time gets the same answer and image; nothing of a page goes to the
database but that image (encrypted at rest like any media).

Fetching goes through ``safe_fetch`` (non-public addresses refused unless
allowed, and ``blocked_hosts`` always, checked on every hop). Off by default; off, the endpoint answers
404 M_NOT_FOUND. A URL that cannot be previewed (unreachable, refused, an
error status, too large, too slow) is 404 M_NOT_FOUND: the spec names no
error for it, and one answer for every cause tells a client nothing about
which hosts resolve to internal addresses. The log gets the host and the
outcome, never the URL.
"""

from __future__ import annotations

import io
import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Optional
from urllib.parse import urlsplit

from twisted.internet import defer, threads
from twisted.python.failure import Failure
from twisted.web.server import Request

from zhome.config import UrlPreviewConfig
from zhome.http.errors import MatrixError, invalid_param, missing_param, not_found
from zhome.http.ratelimit import RateLimiter
from zhome.http.server import JsonResource, query_arg
from zhome.media.preview_html import decode_html, parse_preview
from zhome.media.safe_fetch import AddressRefused, BadUrl, FetchError, Fetched, SafeFetcher, normalise_url
from zhome.media.thumbnailer import THUMBNAILABLE, ThumbnailError, image_size, sniff_content_type
from zhome.storage.lru import LruCache

if TYPE_CHECKING:
    from zhome.http.auth import Auth
    from zhome.media.repository import MediaRepository

logger = logging.getLogger(__name__)

CACHE_ENTRIES = 1000
HTML_TYPES = ("text/html", "application/xhtml+xml")
IMAGE_KEYS = ("og:image", "og:image:type", "og:image:width", "og:image:height", "matrix:image:size")


class PreviewFailed(Exception):
    """No preview of this URL; the text is the (URL-free) reason, for the log."""


def _media_type(content_type: Optional[str]) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def _host(url: str) -> str:
    try:
        return urlsplit(url).hostname or "?"
    except ValueError:
        return "?"


class _Shared:
    """One fetch that several requests wait for, each with its own Deferred
    (a failure one of them handles is not left unhandled in the others)."""

    def __init__(self, d: "defer.Deferred[dict[str, Any]]", forget: Callable[[], object]) -> None:
        self.done = False
        self._result: Any = None
        self._waiters: list[defer.Deferred[dict[str, Any]]] = []
        self._forget = forget
        d.addBoth(self._finish)

    def _finish(self, result: Any) -> None:
        self.done = True
        self._result = result
        self._forget()
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            self._fire(w)

    def _fire(self, w: "defer.Deferred[dict[str, Any]]") -> None:
        if isinstance(self._result, Failure):
            w.errback(self._result)
        else:
            w.callback(self._result)

    def wait(self) -> "defer.Deferred[dict[str, Any]]":
        w: defer.Deferred[dict[str, Any]] = defer.Deferred()
        if self.done:
            self._fire(w)
        else:
            self._waiters.append(w)
        return w


class UrlPreviewer:
    """Fetches, reads and caches previews; stores their images."""

    def __init__(self, config: UrlPreviewConfig, repo: "MediaRepository", fetcher: SafeFetcher,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.repo = repo
        self.fetcher = fetcher
        self.clock = clock
        self.max_image_bytes = repo.max_upload_size
        self.max_image_pixels = repo.config.max_image_pixels
        # URL -> (expiry on clock, preview). A cache, not state: losing it
        # costs a fetch.
        self._cache: LruCache[str, tuple[float, dict[str, Any]]] = LruCache(CACHE_ENTRIES)
        self._inflight: dict[str, _Shared] = {}

    def cached(self, url: str) -> Optional[dict[str, Any]]:
        """The cached preview of ``url`` (normalised), if still fresh."""
        hit = self._cache.get(url)
        if hit is None:
            return None
        expires, preview = hit
        if expires <= self.clock():
            self._cache.pop(url)
            return None
        return dict(preview)

    async def preview(self, user_id: str, url: str) -> dict[str, Any]:
        """The preview of ``url`` (normalised); PreviewFailed if there is none.
        Requests for a URL already being fetched wait for that fetch."""
        hit = self.cached(url)
        if hit is not None:
            return hit
        shared = self._inflight.get(url)
        if shared is None:
            shared = _Shared(defer.ensureDeferred(self._fetch_and_cache(user_id, url)),
                             lambda: self._inflight.pop(url, None))
            if not shared.done:
                self._inflight[url] = shared
        return dict(await shared.wait())

    async def _fetch_and_cache(self, user_id: str, url: str) -> dict[str, Any]:
        host = _host(url)
        try:
            preview = await self._build(user_id, url)
        except PreviewFailed as e:
            logger.info("URL preview of host %s failed: %s", host, e)
            raise
        except Exception as e:
            # Never a 500, and never the URL or the page in the log: not even
            # in an exception's text, so only its type.
            logger.error("URL preview of host %s failed unexpectedly: %s", host, type(e).__name__)
            raise PreviewFailed("internal error") from None
        logger.info("URL preview of host %s: %d properties%s", host, len(preview),
                    ", with image" if "og:image" in preview else "")
        if self.config.cache_ms > 0:
            self._cache.set(url, (self.clock() + self.config.cache_ms / 1000, preview))
        return preview

    def _page_limit(self, content_type: Optional[str]) -> Optional[int]:
        media_type = _media_type(content_type)
        if media_type.startswith("image/"):
            return self.max_image_bytes
        if media_type in HTML_TYPES:
            return self.config.max_page_bytes
        return None

    def _image_limit(self, content_type: Optional[str]) -> Optional[int]:
        # Some servers label images badly; the bytes decide (below).
        media_type = _media_type(content_type)
        if media_type.startswith("text/") or media_type in HTML_TYPES:
            return None
        return self.max_image_bytes

    async def _build(self, user_id: str, url: str) -> dict[str, Any]:
        deadline = time.monotonic() + self.config.timeout_ms / 1000
        try:
            page = await self.fetcher.fetch(url, self._page_limit, deadline)
        except AddressRefused as e:
            raise PreviewFailed(f"refused: {e}") from None
        except (FetchError, BadUrl) as e:
            raise PreviewFailed(str(e)) from None
        media_type = _media_type(page.content_type)
        if page.body is None:
            # Neither a page nor an image: an empty preview (the spec allows it).
            return {}
        if media_type.startswith("image/"):
            preview: dict[str, Any] = {}
            await self._attach_image(user_id, preview, page.body)
            return preview
        body, final_url, content_type = page.body, page.url, page.content_type
        preview, image_url = await threads.deferToThread(
            lambda: parse_preview(decode_html(body, content_type), final_url))
        image: Optional[Fetched] = None
        if image_url is not None:
            try:
                image = await self.fetcher.fetch(normalise_url(image_url), self._image_limit, deadline)
            except (FetchError, BadUrl) as e:
                logger.info("URL preview of host %s: no image (%s)", _host(url), e)
        if image is not None and image.body is not None:
            await self._attach_image(user_id, preview, image.body)
        else:
            for key in IMAGE_KEYS:
                preview.pop(key, None)
        return preview

    async def _attach_image(self, user_id: str, preview: dict[str, Any], data: bytes) -> None:
        """Store ``data`` as the preview's image if it is an image we read."""
        for key in IMAGE_KEYS:
            preview.pop(key, None)
        content_type = sniff_content_type(data[:512])
        if content_type not in THUMBNAILABLE:
            return
        try:
            width, height = await threads.deferToThread(image_size, data, self.max_image_pixels)
        except ThumbnailError:
            return
        try:
            mxc = await self.repo.upload(user_id, io.BytesIO(data), len(data), content_type, None)
        except MatrixError as e:
            # Over the user's quota or the upload size: a preview without image.
            logger.info("URL preview image not stored: %s", e.errcode)
            return
        preview.update({"og:image": mxc, "og:image:type": content_type, "og:image:width": width,
                        "og:image:height": height, "matrix:image:size": len(data)})


class PreviewServlet:
    def __init__(self, auth: "Auth", config: UrlPreviewConfig, previewer: Optional[UrlPreviewer],
                 limiter: RateLimiter) -> None:
        self.auth = auth
        self.config = config
        self.previewer = previewer
        self.limiter = limiter

    def register_routes(self, r: JsonResource) -> None:
        r.register("GET", r"/_matrix/client/v1/media/preview_url", self.on_preview, "media_preview_url")
        r.register("GET", r"/_matrix/media/(?:v3|r0)/preview_url", self.on_preview, "media_preview_url_legacy")

    async def on_preview(self, request: Request) -> tuple[int, Any]:
        requester = await self.auth.get_user_by_req(request)
        if not self.config.enabled or self.previewer is None:
            raise not_found("URL previews are not enabled on this server")
        raw = query_arg(request, "url")
        if raw is None or raw == "":
            raise missing_param("Missing url")
        ts = query_arg(request, "ts")
        if ts is not None:
            # Only the newest preview is kept; the spec lets the server answer that.
            try:
                int(ts)
            except ValueError:
                raise invalid_param("ts must be an integer") from None
        try:
            url = normalise_url(raw)
        except BadUrl as e:
            raise invalid_param(str(e)) from None
        hit = self.previewer.cached(url)
        if hit is not None:
            return 200, hit
        # Only previews that fetch are counted.
        self.limiter.check(requester.user_id)
        try:
            return 200, await self.previewer.preview(requester.user_id, url)
        except PreviewFailed:
            raise not_found("Could not preview this URL") from None
