"""A background job that works in rounds (an outbox, a queue processor).

``kick()`` runs a round now, or marks that one more is wanted when a round
is running (the round looks at ``_again`` before it ends, so work queued
while it ran is not left waiting); a round may set ``_timer`` to kick
again later. ``stop()`` cancels the timer and waits for the running round.
Subclasses write ``_round`` and set ``_running`` while it runs.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet import defer


class Rounds:
    def __init__(self) -> None:
        self._stopped = True
        self._running = False
        self._again = False
        self._timer: Any = None
        self._current: Optional[defer.Deferred[None]] = None

    async def _round(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._stopped = False
        self.kick()

    async def stop(self) -> None:
        self._stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._current is not None:
            try:
                await self._current
            except Exception:
                pass

    def kick(self) -> None:
        """Run a round now (or right after the one running)."""
        if self._stopped:
            return
        if self._running:
            self._again = True
            return
        self._current = defer.ensureDeferred(self._round())
