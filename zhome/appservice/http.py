"""Requests from the homeserver to application services.

Spec: application-service-api "Authorization": the homeserver sends its
``hs_token`` in the ``Authorization: Bearer`` header (MSC2832; the old
``access_token`` query parameter is no longer in the spec, so it is not
sent: it ends up in the service's access logs).
"""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable, Optional, cast
from urllib.parse import quote, urlencode

from zhome.appservice.registration import ApplicationService

REQUEST_TIMEOUT_S = 30.0
MAX_RESPONSE_BYTES = 4 * 1024 * 1024


class AppServiceUnreachable(Exception):
    """The service did not answer (connection refused, timed out, DNS)."""

    def __init__(self, reason: str, timeout: bool = False) -> None:
        super().__init__(reason)
        self.timeout = timeout


#: (method, url, hs_token, body or None, timeout) -> (status, parsed JSON or None, raw text)
RequestFn = Callable[[str, str, str, Optional[Any], float], Awaitable[tuple[int, Any, str]]]


def make_request_fn(tls_policy: Any = None) -> RequestFn:
    """A ``RequestFn`` over treq with a small connection pool."""
    import treq
    from treq.client import HTTPClient
    from twisted.internet.error import TimeoutError as TxTimeoutError
    from twisted.web.client import Agent, ResponseNeverReceived

    from zhome.util.nodelay import NoDelayConnectionPool
    from twisted.web.http_headers import Headers
    from twisted.web.iweb import IAgent

    from zhome.util.reactor import reactor

    pool = NoDelayConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 2
    agent = Agent(reactor, contextFactory=tls_policy, pool=pool) if tls_policy is not None else Agent(
        reactor, pool=pool)
    client = HTTPClient(cast(IAgent, agent))

    async def request(method: str, url: str, hs_token: str, body: Optional[Any],
                      timeout: float) -> tuple[int, Any, str]:
        headers = Headers({b"Authorization": [f"Bearer {hs_token}".encode()], b"User-Agent": [b"zhome"]})
        data = None
        if body is not None:
            headers.addRawHeader(b"Content-Type", b"application/json")
            data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        try:
            resp = await client.request(method, url, data=data, headers=headers, timeout=timeout)
            chunks: list[bytes] = []
            size = [0]

            def collect(chunk: bytes) -> None:
                size[0] += len(chunk)
                if size[0] > MAX_RESPONSE_BYTES:
                    raise AppServiceUnreachable("response too large")
                chunks.append(chunk)

            await treq.collect(resp, collect)
        except AppServiceUnreachable:
            raise
        except (TxTimeoutError, ResponseNeverReceived) as e:
            raise AppServiceUnreachable(type(e).__name__, timeout=isinstance(e, TxTimeoutError)) from None
        except Exception as e:  # connection refused, DNS, TLS: all "unreachable"
            from twisted.internet.defer import CancelledError

            raise AppServiceUnreachable(type(e).__name__, timeout=isinstance(e, CancelledError)) from None
        text = b"".join(chunks).decode("utf-8", "replace")
        try:
            parsed = json.loads(text) if text else None
        except ValueError:
            parsed = None
        return int(resp.code), parsed, text

    return request


def service_url(service: ApplicationService, path: str, query: Optional[dict[str, Any]] = None) -> str:
    """``{url}/_matrix/app/v1{path}`` with ``query`` (values: str or list of str)."""
    assert service.url is not None
    url = service.url + "/_matrix/app/v1" + path
    if query:
        url += "?" + urlencode(query, doseq=True)
    return url


def segment(value: str) -> str:
    return quote(value, safe="")
