"""What lies behind a request that failed.

Twisted's HTTP client reports a request that got no response as one
exception carrying the failures behind it (``ResponseNeverReceived`` and
``ResponseFailed`` keep them in ``reasons``, each a ``Failure`` that may
carry more), so the cause worth naming (a TLS error, a refused connection,
a timeout) is often not the exception raised but one behind it.
"""

from __future__ import annotations

from typing import Any

from twisted.python.failure import Failure


def failure_chain(error: BaseException) -> list[BaseException]:
    """``error`` and every exception behind it, nearest first, each once."""
    reasons: list[Any] = [error]
    seen: list[BaseException] = []
    while reasons:
        item = reasons.pop(0)
        exc = item.value if isinstance(item, Failure) else item
        if not isinstance(exc, BaseException) or exc in seen:
            continue
        seen.append(exc)
        reasons.extend(getattr(exc, "reasons", []) or [])
    return seen
