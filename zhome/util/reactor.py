"""The global Twisted reactor, typed for mypy.

``twisted.internet.reactor`` is seen by mypy as a plain module, and Twisted's
reactor interfaces (``IReactorTime``, ``IReactorTCP``, ``IDelayedCall``...) are
zope interfaces whose methods are declared without ``self``, so mypy misreads
every call made through them. Code that uses the global reactor imports it
from here (inside a function where the import was lazy before: importing this
module installs the default reactor), and types what ``callLater`` returns as
``DelayedCall``.
"""

from typing import Any, Hashable, MutableMapping, TypeAlias

from twisted.internet import defer
from twisted.internet import reactor as _reactor

reactor: Any = _reactor

# What reactor.callLater returns: an IDelayedCall provider.
DelayedCall: TypeAlias = Any



async def wakeable_sleep(waits: MutableMapping[Any, "defer.Deferred[None]"], key: Hashable, seconds: float) -> None:
    """Sleep ``seconds``, or until someone fires ``waits[key]`` (a loop's
    wake-up: new work, a backoff cut short, shutdown)."""
    d: defer.Deferred[None] = defer.Deferred()
    waits[key] = d

    def fire() -> None:
        if not d.called:
            d.callback(None)

    call = reactor.callLater(seconds, fire)
    try:
        await d
    finally:
        if call.active():
            call.cancel()


__all__ = ["DelayedCall", "reactor", "wakeable_sleep"]


async def next_turn() -> None:
    """Let the reactor run what is ready (I/O, other requests) before going
    on: long stretches of work (building many mails, parsing many) are cut
    into pieces, so others are not kept waiting behind them."""
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(0, d.callback, None)
    await d
