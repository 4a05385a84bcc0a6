"""The outbound federation loop of one destination: a wake-up that comes
while the loop is looking at an empty queue (the event's row committed
just after) makes it look once more instead of ending with the row left
behind; stopping fires every waiting wake-up."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer

from zhome.federation.sender import FederationSender


class _Db:
    def __init__(self) -> None:
        self.batches: list[defer.Deferred[Any]] = []

    def execute(self, desc: str, sql: str, *args: Any) -> "defer.Deferred[Any]":
        if desc == "outbound_batch":
            d: defer.Deferred[Any] = defer.Deferred()
            self.batches.append(d)
            return d
        return defer.succeed([])


def _sender(db: _Db) -> FederationSender:
    return FederationSender("a.example", db, None, None, None, None)  # type: ignore[arg-type]


def test_a_wake_up_during_the_empty_check_looks_again() -> None:
    db = _Db()
    s = _sender(db)
    s.wake("b.example")
    assert len(db.batches) == 1  # the loop is reading the queue
    s.wake("b.example")  # an event for b.example committed meanwhile
    db.batches[0].callback([])
    assert len(db.batches) == 2, "the loop ended without looking at the queue again"
    db.batches[1].callback([])
    assert "b.example" not in s._running
    # Nothing new: the loop ends after one look.
    s.wake("b.example")
    db.batches[2].callback([])
    assert len(db.batches) == 3 and "b.example" not in s._running


def test_stop_fires_every_wait() -> None:
    s = _sender(_Db())
    waits = {d: defer.Deferred() for d in ("b.example", "c.example", "d.example")}
    for d, w in waits.items():
        # A loop removes its entry when its wait fires.
        w.addCallback(lambda _, d=d: (s._wake.pop(d, None), None)[1])
        s._wake[d] = w
    s.stop()
    assert all(w.called for w in waits.values()) and s._wake == {}
