"""Twisted web glue: routing, JSON in and out, Matrix errors, CORS, metrics.

Spec: client-server-api "API standards" (JSON bodies, error format, CORS).
A single leaf resource dispatches on method and a path regex to an async
handler. Handlers return ``(status, json_body)``; any ``MatrixError`` they
raise becomes its JSON error, and anything else becomes a logged
``M_UNKNOWN`` 500 without a traceback in the response.

Guest access (client-server-api "Guest Access") is decided here, once, per
route: a route registered with ``guests=True`` is one the spec lets guest
accounts call; the dispatcher marks the request with its route's flag and
``Auth.get_user_by_req`` refuses a guest's token on any other route with
403 ``M_GUEST_ACCESS_FORBIDDEN``. A route that forgets the flag is closed to
guests, never open.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any, Awaitable, Callable, Optional
from urllib.parse import unquote

from prometheus_client import Counter, Histogram
from twisted.internet import defer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from zhome.http import jsonsplice
from zhome.http.errors import MatrixError, bad_json, not_json, too_large, unrecognized
from zhome.storage.database import DatabaseClosedError
from zhome.util.fastjson import loads_fast

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("zhome.access")

Handler = Callable[..., Awaitable[tuple[int, Any]]]

# The metrics label of requests that matched no route (their paths would
# make the label set unbounded).
UNKNOWN_ENDPOINT = "unknown"
MAX_LOGGED_PATH = 300

REQUESTS = Counter("zhome_http_requests_total", "HTTP requests", ["method", "endpoint", "code"])
LATENCY = Histogram(
    "zhome_http_request_seconds",
    "HTTP request latency",
    ["method", "endpoint"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)

CORS_HEADERS = {
    b"Access-Control-Allow-Origin": b"*",
    b"Access-Control-Allow-Methods": b"GET, HEAD, POST, PUT, DELETE, OPTIONS",
    b"Access-Control-Allow-Headers": b"X-Requested-With, Content-Type, Authorization, Date",
    b"Access-Control-Expose-Headers": b"Synapse-Trace-Id, Server",
}


# The request attribute that carries the matched route's guest flag to Auth.
GUESTS_ALLOWED_ATTR = "zhome_guests_allowed"


def guests_allowed(request: Request) -> bool:
    """Whether the route serving ``request`` is open to guest accounts."""
    return bool(getattr(request, GUESTS_ALLOWED_ATTR, False))


class Route:
    __slots__ = ("method", "pattern", "handler", "name", "guests")

    def __init__(self, method: str, pattern: re.Pattern[str], handler: Handler, name: str,
                 guests: bool = False) -> None:
        self.method = method
        self.pattern = pattern
        self.handler = handler
        self.name = name
        self.guests = guests


class JsonResource(Resource):
    """The one resource serving every Matrix endpoint of a listener."""

    isLeaf = True

    def __init__(self, max_body_size: int = 1024 * 1024 * 2) -> None:
        super().__init__()
        self.routes: list[Route] = []
        self.max_body_size = max_body_size
        # Whole-prefix handlers that want the raw request (media, for one).
        self.raw_prefixes: list[tuple[str, Callable[[Request], Awaitable[None]]]] = []
        #: Called after each answered request with (request, method, route
        #: name, status, errcode or None); the audit log listens here.
        self.after_request: list[Callable[[Request, str, str, int, Optional[str]], None]] = []

    def register(self, method: str, path_regex: str, handler: Handler, name: Optional[str] = None,
                 guests: bool = False) -> None:
        """Register ``handler`` for ``method`` on paths matching ``path_regex``.

        Named groups in the regex are passed to the handler as keyword
        arguments, percent-decoded. ``guests``: guest accounts may call it
        (only the endpoints the spec's Guest Access module lists).
        """
        pat = re.compile("^" + path_regex + "$")
        self.routes.append(Route(method, pat, handler, name or path_regex, guests))

    def render(self, request: Request) -> Any:
        defer.ensureDeferred(self._handle(request))
        return NOT_DONE_YET

    async def _handle(self, request: Request) -> None:
        start = time.monotonic()
        method = request.method.decode("ascii", "replace")
        raw_path = request.path.decode("utf-8", "replace")
        endpoint = UNKNOWN_ENDPOINT
        code = 500
        body: Any
        try:
            if method == "OPTIONS":
                code, body = 200, {}
                endpoint = "OPTIONS"
            else:
                code, body, endpoint = await self._dispatch(request, method, raw_path)
        except MatrixError as e:
            code, body = e.code, e.to_json()
            # An error answered by a route still counts as that route's.
            endpoint = getattr(request, "zhome_endpoint", endpoint)
        except DatabaseClosedError:
            # The server is stopping and has closed its database under a
            # request still in flight: a client retries (with its txnId, so a
            # send that did commit is not doubled).
            code, body = 503, {"errcode": "M_UNKNOWN", "error": "The server is shutting down; try again shortly"}
            request.setHeader(b"Retry-After", b"5")
        except Exception:
            logger.exception("Unhandled error handling %s %s", method, _redacted_path(raw_path))
            code, body = 500, {"errcode": "M_UNKNOWN", "error": "Internal server error"}
        elapsed = time.monotonic() - start
        REQUESTS.labels(method, endpoint, str(code)).inc()
        LATENCY.labels(method, endpoint).observe(elapsed)
        if access_logger.isEnabledFor(logging.INFO):
            # A request that matched no route is logged by its path (never
            # the query string, which may carry an access token), so an
            # operator sees what clients ask for that zhome lacks.
            shown = endpoint if endpoint != UNKNOWN_ENDPOINT else _redacted_path(raw_path)[:MAX_LOGGED_PATH]
            extra = {"method": method, "endpoint": endpoint, "status": code,
                     "duration_ms": round(elapsed * 1000, 2)}
            if endpoint == UNKNOWN_ENDPOINT:
                extra["path"] = shown
            access_logger.info("%s %s %d %.1fms", method, shown, code, elapsed * 1000, extra=extra)
        for hook in self.after_request:
            try:
                hook(request, method, endpoint, code, body.get("errcode") if isinstance(body, dict) else None)
            except Exception:
                logger.exception("after-request hook failed")
        if body is _ALREADY_WRITTEN:
            return
        respond_json(request, code, body)

    async def _dispatch(self, request: Request, method: str, raw_path: str) -> tuple[int, Any, str]:
        path_matched = False
        for route in self.routes:
            m = route.pattern.match(raw_path)
            if m is None:
                continue
            path_matched = True
            if route.method != method and not (route.method == "GET" and method == "HEAD"):
                continue
            kwargs = {k: unquote(v) for k, v in m.groupdict().items() if v is not None}
            setattr(request, GUESTS_ALLOWED_ATTR, route.guests)
            request.zhome_endpoint = route.name  # type: ignore[attr-defined]
            request.zhome_path_args = kwargs  # type: ignore[attr-defined]
            code, body = await route.handler(request, **kwargs)
            return code, body, route.name
        if path_matched:
            raise unrecognized(405, "Unrecognized request: method not allowed")
        raise unrecognized(404, "Unrecognized request")


_ALREADY_WRITTEN = object()


def already_written() -> object:
    """Returned as a body by handlers that wrote the response themselves."""
    return _ALREADY_WRITTEN


def _redacted_path(path: str) -> str:
    # Access tokens may appear in query strings; paths never carry them, but
    # keep the log free of anything after a '?' regardless.
    return path.split("?", 1)[0]


def respond_json(request: Request, code: int, body: Any) -> None:
    if request.finished or request._disconnected:
        return
    data = (jsonsplice.encode(body).encode("utf-8") if isinstance(body, (jsonsplice.Spliced, jsonsplice.RawJson))
            else jsonsplice.dumps_bytes(body))
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Content-Length", str(len(data)).encode())
    request.setHeader(b"Cache-Control", b"no-cache, no-store, must-revalidate")
    for k, v in CORS_HEADERS.items():
        request.setHeader(k, v)
    if request.method != b"HEAD":
        request.write(data)
    request.finish()


def read_json_body(request: Request, max_size: int = 1024 * 1024 * 2, allow_empty: bool = False) -> Any:
    """Parse the request body as a JSON object or raise the Matrix error."""
    content = request.content.read(max_size + 1) if request.content is not None else b""
    if len(content) > max_size:
        raise too_large("Request body too large")
    if not content.strip():
        if allow_empty:
            return {}
        raise not_json("Content not JSON.")
    # orjson where it reads what the standard library would (fastjson),
    # else the standard library decides as it always did.
    body = loads_fast(content)
    if body is None:
        try:
            body = json.loads(content.decode("utf-8"), parse_constant=_reject_constant)
        except (ValueError, UnicodeDecodeError):
            raise not_json("Content not JSON.")
    if not isinstance(body, dict):
        # Valid JSON of the wrong shape is malformed, not "not JSON".
        raise bad_json("Content must be a JSON object.")
    return body


def _reject_constant(name: str) -> Any:
    # NaN and Infinity are not JSON.
    raise ValueError(name)


def query_arg(request: Request, name: str, default: Optional[str] = None) -> Optional[str]:
    vals = request.args.get(name.encode("ascii"))
    if not vals:
        return default
    return vals[0].decode("utf-8", "replace")


def query_args(request: Request, name: str) -> list[str]:
    return [v.decode("utf-8", "replace") for v in request.args.get(name.encode("ascii"), [])]


def query_int(request: Request, name: str, default: Optional[int] = None) -> Optional[int]:
    from zhome.http.errors import invalid_param

    v = query_arg(request, name)
    if v is None:
        return default
    try:
        return int(v)
    except ValueError:
        raise invalid_param(f"Query parameter {name!r} must be an integer")


def client_ip(request: Request) -> str:
    addr = request.getClientAddress()
    return getattr(addr, "host", "unknown")
