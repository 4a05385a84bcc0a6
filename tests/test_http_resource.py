"""The JSON resource's answers to what handlers raise, through a real site
on a loopback port: Matrix errors as they are, a closed database (the server
stopping under a request) as 503 with Retry-After, anything else as a bare
500 without a traceback."""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.web.server import Request, Site

from zhome.http.errors import forbidden
from zhome.http.server import JsonResource
from zhome.storage.database import DatabaseClosedError


@pytest_twisted.async_yield_fixture
async def site() -> AsyncIterator[str]:
    r = JsonResource()

    async def closed(request: Request) -> tuple[int, Any]:
        raise DatabaseClosedError("database closed; cannot run send_event")

    async def refused(request: Request) -> tuple[int, Any]:
        raise forbidden("no")

    async def broken(request: Request) -> tuple[int, Any]:
        raise ValueError("secret detail")

    r.register("PUT", r"/closed", closed, "closed")
    r.register("GET", r"/refused", refused, "refused")
    r.register("GET", r"/broken", broken, "broken")
    port = reactor.listenTCP(0, Site(r), interface="127.0.0.1")  # type: ignore[attr-defined]
    try:
        yield f"http://127.0.0.1:{port.getHost().port}"
    finally:
        await port.stopListening()


async def _call(method: str, url: str) -> tuple[int, dict[str, Any], Any]:
    resp = await treq.request(method, url)
    body = json.loads(await resp.content())
    return resp.code, {k.decode().lower(): v[0].decode() for k, v in resp.headers.getAllRawHeaders()}, body


@pytest_twisted.ensureDeferred
async def test_closed_database_is_a_503_not_a_500(site: str) -> None:
    code, headers, body = await _call("PUT", site + "/closed")
    assert code == 503 and body["errcode"] == "M_UNKNOWN" and headers.get("retry-after") == "5", (code, body)


@pytest_twisted.ensureDeferred
async def test_matrix_errors_and_unexpected_ones(site: str) -> None:
    code, _, body = await _call("GET", site + "/refused")
    assert code == 403 and body == {"errcode": "M_FORBIDDEN", "error": "no"}
    code, _, body = await _call("GET", site + "/broken")
    assert code == 500 and body == {"errcode": "M_UNKNOWN", "error": "Internal server error"}
    assert "secret" not in json.dumps(body)
