"""Requests whose bodies are refused as soon as they are known to be too big.

Spec: client-server-api "API standards" (413 ``M_TOO_LARGE``). Twisted would
otherwise buffer a whole body (to memory, or to a temporary file when it is
large) before any handler could look at it. Here the declared
``Content-Length``, or the running count of a chunked body, is checked
against the limit for the request's path while the body arrives; an
oversized request is answered 413 at once, the rest of its body is
discarded and the connection closed.
"""

from __future__ import annotations

import io
import json
from typing import Any, Callable, Optional

from twisted.web.server import Request

LimitFor = Callable[[bytes], int]
# (method, path) -> a file-like object to receive the body instead of
# Twisted's own buffer, or None for the default.
BodySinkFor = Callable[[bytes, bytes], Optional[Any]]
# What a refused request may still send before the connection is closed.
DISCARD_LIMIT = 64 * 1024 * 1024
LINGER_SECONDS = 10.0


class LimitedRequest(Request):
    limit_for: Optional[LimitFor] = None
    body_sink_for: Optional[BodySinkFor] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._limit = 0
        self._received = 0
        self._refused = False
        # Matrix bodies are JSON or raw media, never HTML forms: Twisted must
        # not read a body back to parse form fields.
        self._parsePOSTFormSubmission = False

    def _path_so_far(self) -> bytes:
        # The request line is parsed by the channel before the body arrives.
        path = getattr(self.channel, "_path", b"") or b""
        return path.split(b"?", 1)[0]

    def gotLength(self, length: Optional[int]) -> None:  # noqa: N802 - Twisted's name
        limit_for = type(self).limit_for
        self._limit = limit_for(self._path_so_far()) if limit_for is not None else 0
        if self._limit and length is not None and length > self._limit:
            self._refuse()
            return
        sink_for = type(self).body_sink_for
        if sink_for is not None:
            method = getattr(self.channel, "_command", b"") or b""
            sink = sink_for(method.upper(), self._path_so_far())
            if sink is not None:
                self.content = sink
                return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        if self._refused:
            # Keep reading (and dropping) what the client is still sending, so
            # it can finish and read the 413; stop at a bound.
            self._received += len(data)
            if self._received > DISCARD_LIMIT:
                self._close()
            return
        self._received += len(data)
        if self._limit and self._received > self._limit:
            self._refuse()
            return
        super().handleContentChunk(data)

    def _refuse(self) -> None:
        self._refused = True
        old = getattr(self, "content", None)
        if old is not None and hasattr(old, "close"):
            old.close()
        # An empty body: what arrives after the refusal is dropped unread.
        self.content = io.BytesIO()
        body = json.dumps({"errcode": "M_TOO_LARGE",
                           "error": f"Request body larger than {self._limit} bytes"}).encode()
        transport: Any = self.channel.transport if self.channel is not None else None
        if transport is None:
            return
        transport.write(
            b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/json\r\n"
            b"Access-Control-Allow-Origin: *\r\nConnection: close\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        # Closing at once would make a client still sending its body fail
        # with a broken pipe before it reads the answer: close once the body
        # is in, after DISCARD_LIMIT bytes, or after LINGER_SECONDS.
        from zhome.util.reactor import reactor

        self._linger = reactor.callLater(LINGER_SECONDS, self._close)

    def _close(self) -> None:
        linger = getattr(self, "_linger", None)
        if linger is not None and linger.active():
            linger.cancel()
        transport: Any = self.channel.transport if self.channel is not None else None
        if transport is not None:
            transport.loseConnection()

    def connectionLost(self, reason: Any) -> None:  # noqa: N802 - Twisted's name
        linger = getattr(self, "_linger", None)
        if linger is not None and linger.active():
            linger.cancel()
        super().connectionLost(reason)

    def process(self) -> None:
        if self._refused:
            # Already answered; the whole body is in: close as announced.
            self._close()
            return
        super().process()


def make_request_factory(limit_for: LimitFor, body_sink_for: Optional[BodySinkFor] = None) -> type[LimitedRequest]:
    return type("ZhomeRequest", (LimitedRequest,), {
        "limit_for": staticmethod(limit_for),
        "body_sink_for": staticmethod(body_sink_for) if body_sink_for is not None else None,
    })
