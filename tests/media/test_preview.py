"""The URL previewer (zhome/media/preview.py) with a fake fetcher and
repository: one fetch for concurrent requests, cache expiry, failures not
cached, images that cannot be stored."""

from __future__ import annotations

from typing import Any, BinaryIO, Callable, Optional

import pytest
import pytest_twisted
from twisted.internet import defer

from zhome.config import UrlPreviewConfig
from zhome.http.errors import forbidden
from zhome.media.preview import PreviewFailed, UrlPreviewer
from zhome.media.safe_fetch import FetchError, Fetched
from tests.media import images

PNG = images.png(20, 10)
PAGE = b'<title>T</title><meta property="og:image" content="/i.png"><meta property="og:image:width" content="5">'


class FakeFetcher:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.gate: Optional[defer.Deferred[None]] = None
        self.fail = False

    async def fetch(self, url: str, limit: Callable[[Optional[str]], Optional[int]], deadline: float) -> Fetched:
        self.calls.append(url)
        if self.gate is not None:
            await self.gate
        if self.fail:
            raise FetchError("answered 500")
        if url.endswith(".png"):
            assert limit("image/png") == 1000
            return Fetched(url, "image/png", PNG)
        assert limit("text/html; charset=utf-8") == 4096 and limit("application/pdf") is None
        return Fetched(url, "text/html", PAGE)


class FakeConfig:
    max_image_pixels = 1_000_000


class FakeRepo:
    max_upload_size = 1000
    config = FakeConfig()

    def __init__(self) -> None:
        self.uploads: list[tuple[str, bytes, Optional[str]]] = []
        self.full = False

    async def upload(self, user_id: str, content: BinaryIO, size: int, content_type: Optional[str],
                     filename: Optional[str]) -> str:
        if self.full:
            raise forbidden("Media quota exceeded")
        self.uploads.append((user_id, content.read(), content_type))
        return f"mxc://hs/{len(self.uploads)}"


def make(cache_ms: int = 60_000) -> tuple[UrlPreviewer, FakeFetcher, FakeRepo, list[float]]:
    now = [1000.0]
    fetcher, repo = FakeFetcher(), FakeRepo()
    config = UrlPreviewConfig(enabled=True, max_page_bytes=4096, cache_ms=cache_ms)
    previewer = UrlPreviewer(config, repo, fetcher, clock=lambda: now[0])  # type: ignore[arg-type]
    return previewer, fetcher, repo, now


@pytest_twisted.ensureDeferred
async def test_one_fetch_for_concurrent_requests_and_cache_expiry() -> None:
    previewer, fetcher, repo, now = make()
    fetcher.gate = defer.Deferred()
    first = defer.ensureDeferred(previewer.preview("@a:hs", "http://x.test/"))
    second = defer.ensureDeferred(previewer.preview("@b:hs", "http://x.test/"))
    fetcher.gate.callback(None)
    fetcher.gate = None
    a, b = await first, await second
    assert a == b == {"og:title": "T", "og:image": "mxc://hs/1", "og:image:type": "image/png",
                      "og:image:width": 20, "og:image:height": 10, "matrix:image:size": len(PNG)}
    assert fetcher.calls == ["http://x.test/", "http://x.test/i.png"]
    # Owned by whoever's request fetched it.
    assert repo.uploads == [("@a:hs", PNG, "image/png")]
    # A caller changing its copy changes nothing cached.
    a["og:title"] = "changed"
    assert previewer.cached("http://x.test/") == b
    now[0] += 59
    assert await previewer.preview("@b:hs", "http://x.test/") == b and len(fetcher.calls) == 2
    now[0] += 2
    assert previewer.cached("http://x.test/") is None
    await previewer.preview("@b:hs", "http://x.test/")
    assert len(fetcher.calls) == 4


@pytest_twisted.ensureDeferred
async def test_failures_are_not_cached_and_every_waiter_hears_of_them() -> None:
    previewer, fetcher, _, _ = make()
    fetcher.fail = True
    fetcher.gate = defer.Deferred()
    waiting = [defer.ensureDeferred(previewer.preview("@a:hs", "http://x.test/")) for _ in range(3)]
    fetcher.gate.callback(None)
    for d in waiting:
        with pytest.raises(PreviewFailed):
            await d
    assert len(fetcher.calls) == 1
    fetcher.gate = None
    fetcher.fail = False
    assert (await previewer.preview("@a:hs", "http://x.test/"))["og:title"] == "T"


@pytest_twisted.ensureDeferred
async def test_image_not_stored_and_not_cached_when_cache_off() -> None:
    previewer, fetcher, repo, _ = make(cache_ms=0)
    repo.full = True
    # Over quota: the preview has no image keys, not even the page's claimed width.
    assert await previewer.preview("@a:hs", "http://x.test/") == {"og:title": "T"}
    await previewer.preview("@a:hs", "http://x.test/")
    assert len(fetcher.calls) == 4 and previewer.cached("http://x.test/") is None
