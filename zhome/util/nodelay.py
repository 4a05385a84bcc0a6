"""TCP_NODELAY for the connections zhome opens.

An HTTP request with a body is written in two pieces (head, then body);
with Nagle's algorithm on, the body waits until the peer acknowledged the
head, and a peer that delays its ACK (Linux does, up to 40 ms) makes every
such request 40 ms slower. Short request/response dialogues (HTTP between
zhome and its application services or its email bridge, SMTP) want each
piece sent at once.
"""

from __future__ import annotations

from typing import Any, Hashable

from twisted.internet.defer import Deferred
from twisted.web.client import HTTPConnectionPool


def set_no_delay(transport: Any) -> None:
    """TCP_NODELAY on ``transport`` (or on the TCP transport a TLS one wraps)."""
    for t in (transport, getattr(transport, "transport", None)):
        setter = getattr(t, "setTcpNoDelay", None)
        if setter is not None:
            try:
                setter(True)
                return
            except Exception:  # noqa: S110 - an option: not having it only costs time
                pass


class NoDelayConnectionPool(HTTPConnectionPool):
    """An HTTP connection pool whose new connections send without delay."""

    def _newConnection(self, key: Hashable, endpoint: Any) -> Deferred[Any]:
        d: Deferred[Any] = super()._newConnection(key, endpoint)

        def made(protocol: Any) -> Any:
            set_no_delay(getattr(protocol, "transport", None))
            return protocol

        d.addCallback(made)
        return d
