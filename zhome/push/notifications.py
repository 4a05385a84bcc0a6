"""The notification log: recording, listing and retention.

Spec: client-server-api "Push Notifications" → "Listing Notifications"
(``GET /notifications``: the events a user has been, or would have been,
notified about, newest first, with the actions and whether they are read).

Recording: push rules already run for every new event to count unread
notifications (``EventCreator.push_actions_for``); every local member whose
rules gave ``notify`` gets a row, written by a persistence transaction hook
together with the event, so a row and its event commit or roll back as one.

Read: computed when listed, never stored. A notification is read when one
of the user's read receipts (``m.read`` or ``m.read.private``) in its room
points at an event at or after it in stream order. An unthreaded receipt
covers the whole room; a threaded one only its thread, where events outside
any thread belong to ``main`` ("Threaded read receipts").

Retention: a user keeps at most ``MAX_PER_USER`` (1000) notifications and
none older than ``MAX_AGE_MS`` (30 days).

- The count: a user who got ``TRIM_EVERY`` (100) new notifications since
  their last trim is due; the periodic pass below trims the due users, one
  short transaction each with a pause between them, so the database keeps
  serving everything else meanwhile (a message into a big room makes
  hundreds of users due at once; trimming them right away slowed sends and
  federation several times over). A user so holds at most
  ``MAX_PER_USER`` plus what arrived since the last pass. The counter lives
  in memory: after a restart a user is due again after ``TRIM_EVERY`` more.
- Staging: the event's transaction appends its rows to a staging table
  in position order (``NotificationsStore.insert_txn``); ``FOLD_DELAY_S``
  after a write, one pass moves everything staged into the log in user
  order, so a run of messages into a big room rewrites each member's index
  page once rather than once per message. Every read or delete of the log
  moves them first, in its own transaction, so none misses a row.
- The age: the same pass, a minute after start-up and then every
  ``EXPIRY_INTERVAL_S``, deletes the rows past the age over the ``ts``
  index; each pass only meets the rows that aged out since the one before.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional

from twisted.internet import defer, task

from zhome.push.evaluator import actions_highlight
from zhome.rooms.events import Event
from zhome.storage.database import DatabaseClosedError, Txn
from zhome.storage.events import EventsStore, PersistItem
from zhome.storage.notifications import NotificationInsert, NotificationsStore, StoredNotification

logger = logging.getLogger(__name__)

MAX_PER_USER = 1000
MAX_AGE_MS = 30 * 24 * 3600 * 1000
TRIM_EVERY = 100
TRIM_PAUSE_S = 0.01
EXPIRY_INTERVAL_S = 900.0
FIRST_EXPIRY_DELAY_S = 60.0
FOLD_DELAY_S = 0.5


@dataclass(frozen=True)
class NotificationEntry:
    notification: StoredNotification
    event: Event
    read: bool


def thread_of(event: Event) -> str:
    """The thread an event belongs to for receipts by its own relation: its
    root, or ``main`` (RelationsStore.threads_of also follows relations to
    other events, as the spec asks)."""
    rel = event.content.get("m.relates_to")
    if isinstance(rel, dict) and rel.get("rel_type") == "m.thread":
        root = rel.get("event_id")
        if isinstance(root, str):
            return root
    return "main"


def is_read(stream_ordering: int, room_id: str, thread_id: str, read_up_to: dict[tuple[str, str], int]) -> bool:
    for key in ((room_id, ""), (room_id, thread_id)):
        mark = read_up_to.get(key)
        if mark is not None and mark >= stream_ordering:
            return True
    return False


def is_invite_outlier(item: PersistItem) -> bool:
    """An invite to a room this server is not in: stored as an outlier, it
    still notifies its invitee (".m.rule.invite_for_me")."""
    return item.outlier and item.event.type == "m.room.member" and item.event.membership == "invite"


def _records(item: PersistItem) -> bool:
    """Whether ``item`` gets notification rows: only events that reach the
    timeline now (not outliers but invites, rejected, soft-failed or
    backfilled ones)."""
    return bool(item.push_actions) and not (
        (item.outlier and not is_invite_outlier(item)) or item.soft_failed or item.backfilled
        or item.event.rejected_reason)


class NotificationLog:
    def __init__(self, store: NotificationsStore, events: EventsStore, max_per_user: int = MAX_PER_USER,
                 trim_every: int = TRIM_EVERY, max_age_ms: int = MAX_AGE_MS, clock: Any = None) -> None:
        self.store = store
        self.events = events
        self.max_per_user = max(1, max_per_user)
        self.trim_every = max(1, trim_every)
        self.max_age_ms = max_age_ms
        # An IReactorTime for the expiry passes; None: the reactor.
        self.clock = clock
        # New notifications per user since their last trim.
        self._since_trim: dict[str, int] = {}
        # Users whose trim is due, and the run trimming them.
        self._due: set[str] = set()
        self._trim_run: Optional[defer.Deferred[None]] = None
        self._first: Any = None
        self._loop: Optional[task.LoopingCall] = None
        self._loop_done: Optional[defer.Deferred[task.LoopingCall]] = None
        # The pending call that moves staged rows, and the move running.
        self._fold_call: Any = None
        self._fold_run: Optional[defer.Deferred[None]] = None
        self._stopping = False
        #: The thread of each event, following relations as unread counts
        #: do (RelationsStore.threads_of); None: by its own relation only.
        self.threads_of: Optional[Callable[[list[Event]], Awaitable[dict[str, str]]]] = None

    # -- recording (persistence hooks) ------------------------------------------
    def persist_txn_hook(self, txn: Txn, item: PersistItem) -> None:
        """Runs in the event's persistence transaction."""
        if not _records(item):
            return
        ev = item.event
        now = int(time.time() * 1000)
        # Members without rules of their own share their actions' list:
        # encode each distinct list once.
        encoded: dict[int, tuple[str, int]] = {}
        rows: list[NotificationInsert] = []
        for user_id, actions in item.push_actions.items():
            enc = encoded.get(id(actions))
            if enc is None:
                enc = encoded[id(actions)] = (json.dumps(actions, separators=(",", ":")),
                                              int(actions_highlight(actions)))
            rows.append((user_id, ev.room_id, ev.event_id, item.stream_ordering, now, enc[0], enc[1]))
        self.store.insert_txn(txn, rows)

    def after_persist(self, item: PersistItem) -> None:
        """After commit: count each user's new rows; mark them due for the
        next pass's trim every ``trim_every``."""
        if not _records(item):
            return
        self._schedule_fold()
        for user_id in item.push_actions:
            n = self._since_trim.get(user_id, 0) + 1
            if n >= self.trim_every:
                self._since_trim[user_id] = 0
                self._due.add(user_id)
            else:
                self._since_trim[user_id] = n

    def _schedule_fold(self) -> None:
        if self._fold_call is None and not self._stopping:
            self._fold_call = self._clock().callLater(FOLD_DELAY_S, self._fold)

    def _fold(self) -> None:
        self._fold_call = None
        if self._fold_run is not None:
            # Rows staged meanwhile are moved by a pass after this one.
            self._fold_run.addBoth(lambda _: self._schedule_fold())
            return
        run = defer.ensureDeferred(self._fold_once())
        if not run.called:
            self._fold_run = run

    async def _fold_once(self) -> None:
        try:
            await self.store.fold()
        except DatabaseClosedError:
            pass
        except Exception:
            # Left staged: the next pass, or the next read, moves them.
            logger.exception("moving staged notifications failed")
        finally:
            self._fold_run = None

    def _clock(self) -> Any:
        if self.clock is not None:
            return self.clock
        from zhome.util.reactor import reactor

        return reactor

    def _start_trims(self, pause: float = TRIM_PAUSE_S) -> Optional[defer.Deferred[None]]:
        if self._due and self._trim_run is None:
            run = defer.ensureDeferred(self._trim_due(pause))
            if not run.called:
                self._trim_run = run
        return self._trim_run

    async def _trim_due(self, pause: float) -> None:
        try:
            first = True
            while self._due:
                if not first and pause > 0:
                    await task.deferLater(self._clock(), pause, lambda: None)
                first = False
                user_id = min(self._due)
                self._due.discard(user_id)
                try:
                    await self.store.trim_user(user_id, self.max_per_user)
                except DatabaseClosedError:
                    return
                except Exception:
                    # Due again after this user's next TRIM_EVERY notifications.
                    logger.exception("trimming notifications failed")
        finally:
            self._trim_run = None

    # -- listing ------------------------------------------------------------------
    async def get_page(self, user_id: str, before: Optional[int], limit: int,
                       only_highlight: bool) -> tuple[list[NotificationEntry], Optional[str]]:
        """Up to ``limit`` notifications below position ``before``, newest
        first, and the ``next_token`` when older ones exist."""
        page = await self.store.get_page(user_id, before, limit, only_highlight)
        evs = await self.events.get_events([r.event_id for r in page.rows])
        threads = await self.threads_of(list(evs.values())) if self.threads_of is not None and evs else {}
        out: list[NotificationEntry] = []
        for r in page.rows:
            ev = evs.get(r.event_id)
            if ev is None or ev.rejected_reason:
                # Purged since (room deletion, erasure): nothing to show.
                continue
            thread = threads.get(ev.event_id) or thread_of(ev)
            out.append(NotificationEntry(r, ev, is_read(r.stream_ordering, r.room_id, thread, page.read_up_to)))
        next_token = str(page.rows[-1].stream_ordering) if page.more and page.rows else None
        return out, next_token

    # -- the periodic pass: age, then the count cap -------------------------------
    def start(self) -> None:
        if self._first is not None or self._loop is not None:
            return
        self._first = self._clock().callLater(FIRST_EXPIRY_DELAY_S, self._begin)

    def _begin(self) -> None:
        self._first = None
        self._loop = task.LoopingCall(self._tick)
        if self.clock is not None:
            self._loop.clock = self.clock
        self._loop_done = self._loop.start(EXPIRY_INTERVAL_S, now=True)
        self._loop_done.addErrback(lambda f: logger.error("notification expiry stopped: %s", f.getTraceback()))

    def _tick(self) -> defer.Deferred[int]:
        return defer.ensureDeferred(self.expire_once())

    async def expire_once(self) -> int:
        """Delete notifications older than the age limit, then trim the
        users due; never raises. Returns how many expired."""
        try:
            expired = await self.store.delete_older_than(int(time.time() * 1000) - self.max_age_ms)
        except DatabaseClosedError:
            return 0
        except Exception:
            logger.exception("expiring notifications failed")
            expired = 0
        run = self._start_trims()
        if run is not None:
            await run
        return expired

    async def stop(self) -> None:
        """Stop the expiry passes and wait for a running pass and trim."""
        # Trims not started yet are left for the next start (the counts are
        # the cap's business, not shutdown's): a running pass ends after the
        # user it is trimming.
        self._due.clear()
        self._stopping = True
        if self._fold_call is not None:
            if self._fold_call.active():
                self._fold_call.cancel()
            self._fold_call = None
        if self._fold_run is not None:
            await self._fold_run
        if self._first is not None:
            if self._first.active():
                self._first.cancel()
            self._first = None
        loop, done = self._loop, self._loop_done
        self._loop = self._loop_done = None
        if loop is not None and done is not None:
            if loop.running:
                loop.stop()
            await done
        run = self._trim_run
        if run is not None:
            await run

    async def flush(self) -> None:
        """Run the trims due now (without pauses), and wait for them."""
        run = self._start_trims(pause=0)
        if run is not None:
            await run
