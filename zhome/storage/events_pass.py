"""Background passes over the stored events, in stream order.

An index that is written with each event (the files events show, the
relations between them, the search index) also has to cover the events
stored before it existed. A pass reads those in bounded batches from where
it stopped, one transaction a batch, with a short pause between batches so
requests keep their share of the database. Where it got is kept in
``at_rest_progress`` (the row named after the pass), and a ``<name>_done``
row says it is complete, so a restart carries on and a finished pass is
never run again.
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable, Optional

from twisted.internet import defer, task

from zhome.storage.database import Database, Txn

BATCH = 500
PAUSE_S = 0.05


def events_pass_position_txn(txn: Txn, name: str) -> int:
    """Where a background pass over the stored events (in stream order)
    stopped, from ``at_rest_progress``; a pass not begun starts before the
    first event and records that."""
    txn.execute("SELECT position FROM at_rest_progress WHERE name = ?", (name,))
    row = txn.fetchone()
    if row is not None:
        return int(row[0])
    txn.execute("SELECT MIN(stream_ordering) FROM events")
    low = txn.fetchone()
    pos = int(low[0]) - 1 if low and low[0] is not None else 0
    txn.execute("INSERT INTO at_rest_progress (name, position) VALUES (?, ?)", (name, pos))
    return pos


def events_pass_progress_txn(txn: Txn, name: str, pos: int, rows_read: int) -> None:
    """Record how far a background pass over the stored events got: its
    position after a batch that read rows, or ``<name>_done`` after one that
    found none (the pass is complete)."""
    if rows_read:
        txn.execute("UPDATE at_rest_progress SET position = ? WHERE name = ?", (pos, name))
    else:
        txn.execute("INSERT INTO at_rest_progress (name, position) VALUES (?, ?) ON CONFLICT DO NOTHING",
                    (name + "_done", pos))


#: Handles the events of one batch: ``(txn, position, limit)`` reads up to
#: ``limit`` events after ``position`` and returns (the position of the last
#: event read, or ``position`` if none; how many events were read).
BatchTxn = Callable[[Txn, int, int], tuple[int, int]]


class EventsPass:
    """One background pass: ``start()`` runs it once, ``stop()`` ends it
    between batches and waits for it, ``complete()`` says whether it has
    finished (in this process or before).

    ``prepare`` runs first, each time the pass starts; ``ready`` is asked
    before each batch and, while it says no, the pass waits ``ready_wait_s``
    instead of reading; ``on_complete`` runs when the pass is found complete
    at start or has just finished. A failure is logged with ``failed`` and
    ends the pass (the server's next start carries on from where it got)."""

    def __init__(self, db: Database, name: str, batch_txn: BatchTxn, *, logger: logging.Logger,
                 finished: str, failed: str, batch: int = BATCH, pause_s: float = PAUSE_S,
                 prepare: Optional[Callable[[], Awaitable[None]]] = None,
                 ready: Optional[Callable[[], Awaitable[bool]]] = None, ready_wait_s: float = 0.5,
                 on_complete: Optional[Callable[[], Awaitable[None]]] = None) -> None:
        self.db = db
        self.name = name
        self.batch = batch
        self.pause_s = pause_s
        self._batch_txn = batch_txn
        self._logger = logger
        self._finished = finished
        self._failed = failed
        self._prepare = prepare
        self._ready = ready
        self._ready_wait_s = ready_wait_s
        self._on_complete = on_complete
        self._complete = False
        self._stopped = False
        #: The running pass (None: not started).
        self.running: Optional[defer.Deferred[None]] = None

    async def complete(self) -> bool:
        """Whether every stored event has been through the pass."""
        if not self._complete:
            rows = await self.db.execute(self.name + "_done",
                                         "SELECT 1 FROM at_rest_progress WHERE name = ?", self.name + "_done")
            self._complete = bool(rows)
        return self._complete

    def batch_txn(self, txn: Txn, limit: int) -> int:
        """Handle up to ``limit`` events from where the pass stopped and record
        how far it got; returns how many were read (0: the pass is done)."""
        pos, n = self._batch_txn(txn, events_pass_position_txn(txn, self.name), limit)
        events_pass_progress_txn(txn, self.name, pos, n)
        return n

    def start(self) -> None:
        if self.running is None:
            self.running = defer.ensureDeferred(self.run())

    async def run(self, max_batches: int = 1_000_000) -> None:
        from zhome.util.reactor import reactor

        try:
            if self._prepare is not None:
                await self._prepare()
            if await self.complete():
                if self._on_complete is not None:
                    await self._on_complete()
                return
            for _ in range(max_batches):
                if self._stopped:
                    return
                if self._ready is not None and not await self._ready():
                    await task.deferLater(reactor, self._ready_wait_s, lambda: None)
                    continue
                n = await self.db.run_interaction(self.name + "_backfill", self.batch_txn, self.batch)
                if n == 0:
                    self._complete = True
                    self._logger.info(self._finished)
                    if self._on_complete is not None:
                        await self._on_complete()
                    return
                await task.deferLater(reactor, self.pause_s, lambda: None)
        except Exception:
            self._logger.exception(self._failed)

    async def stop(self) -> None:
        self._stopped = True
        if self.running is not None:
            await self.running
