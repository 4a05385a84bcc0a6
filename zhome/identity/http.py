"""A small JSON-over-HTTP client (treq) with a timeout and a bounded answer.

Used between the homeserver and identity services (identity-service-api,
server-server-api "Third-party invites"); never logs tokens or bodies.
"""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable, Optional, cast

REQUEST_TIMEOUT_S = 20.0
MAX_RESPONSE_BYTES = 1024 * 1024

JsonRequest = Callable[..., Awaitable[tuple[int, Any]]]


class HttpJsonError(Exception):
    """The other side could not be reached or answered garbage."""


def make_json_client(tls_policy: Any = None, timeout_s: float = REQUEST_TIMEOUT_S) -> JsonRequest:
    import treq
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool
    from twisted.web.http_headers import Headers
    from twisted.web.iweb import IAgent

    from zhome.util.reactor import reactor

    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 4
    agent = Agent(reactor, contextFactory=tls_policy, pool=pool) if tls_policy is not None else Agent(
        reactor, pool=pool)
    client = HTTPClient(cast(IAgent, agent))

    async def request(method: str, url: str, body: Optional[dict[str, Any]] = None,
                      token: Optional[str] = None, authorization: Optional[str] = None) -> tuple[int, Any]:
        headers = Headers({b"User-Agent": [b"zhome"]})
        if token is not None:
            headers.setRawHeaders(b"Authorization", [b"Bearer " + token.encode("utf-8")])
        elif authorization is not None:
            headers.setRawHeaders(b"Authorization", [authorization.encode("utf-8")])
        data = None
        if body is not None:
            headers.setRawHeaders(b"Content-Type", [b"application/json"])
            data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        try:
            resp = await client.request(method, url, data=data, headers=headers, timeout=timeout_s)
            chunks: list[bytes] = []
            size = [0]

            def collect(chunk: bytes) -> None:
                size[0] += len(chunk)
                if size[0] > MAX_RESPONSE_BYTES:
                    raise HttpJsonError("response too large")
                chunks.append(chunk)

            await treq.collect(resp, collect)
        except HttpJsonError:
            raise
        except Exception as e:
            raise HttpJsonError(f"request failed: {type(e).__name__}") from None
        try:
            parsed = json.loads(b"".join(chunks).decode("utf-8")) if chunks else None
        except (ValueError, UnicodeDecodeError):
            parsed = None
        return int(resp.code), parsed

    return request
