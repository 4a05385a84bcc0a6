"""Delivery of notifications to push gateways through HTTP pushers.

Spec: client-server-api "Push Notifications" → "Pushers" (HTTP pushers,
``data.format``), and the Push Gateway API ``POST /_matrix/push/v1/notify``
(the ``notification`` body, ``rejected`` pushkeys).

What is pending is derived from SQL, never kept only in memory: a
pusher's pending notifications are its user's rows in the notification
log (``user_notifications``, written with each event) above the pusher's
``last_stream_ordering``. A worker per HTTP pusher sends them oldest first,
one request each, and records its position after each; so after a restart
every pusher takes up where it stopped.

The send path pays nothing for this: after an event commits, the users it
notified are looked up in an in-memory index of the users that have HTTP
pushers (built from SQL at start, kept current by the pusher API) and their
workers woken. Everything else (the row reads, the room name, the
unread count, the HTTP request) happens in the workers.

Failures: a network error, a timeout, a 5xx or 429 is retried with
exponential backoff from ``RETRY_MIN_S`` to ``RETRY_MAX_S``, up to
``MAX_ATTEMPTS`` times per notification; another 4xx is not retried. A
notification older than ``MAX_AGE_MS`` is no longer sent. Pushkeys the
gateway lists in ``rejected`` lose their pusher.

Badge updates: a read receipt that changes the user's unread count sends
the new count alone (no event) to the user's gateways, once and
best-effort: the next notification carries the count again anyway.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable, Coroutine, Optional, cast

from twisted.internet import defer

from zhome.push.evaluator import actions_highlight
from zhome.push.notifications import is_invite_outlier
from zhome.rooms.events import Event
from zhome.storage.events import EventsStore, PersistItem
from zhome.storage.notifications import NotificationsStore, StoredNotification
from zhome.storage.pushers import Pusher, PushersStore

logger = logging.getLogger(__name__)

RETRY_MIN_S = 1.0
RETRY_MAX_S = 300.0
MAX_ATTEMPTS = 12
MAX_AGE_MS = 24 * 3600 * 1000
PAGE = 50
REQUEST_TIMEOUT_S = 20.0
MAX_RESPONSE_BYTES = 64 * 1024

# (url, JSON body) -> (HTTP status, parsed JSON body or None); raises on
# network errors and timeouts.
PostJson = Callable[[str, dict[str, Any]], Coroutine[Any, Any, tuple[int, Any]]]


class DeliveryError(Exception):
    """A request that may succeed when retried."""


def tweaks_of(actions: list[Any]) -> dict[str, Any]:
    """The ``set_tweak`` actions as a dict; ``highlight`` without a value is true."""
    tweaks: dict[str, Any] = {}
    for a in actions:
        if isinstance(a, dict) and isinstance(a.get("set_tweak"), str):
            name = a["set_tweak"]
            tweaks[name] = a.get("value", True) if name == "highlight" else a.get("value")
    return tweaks


def priority_of(event: Event, actions: list[Any]) -> str:
    """``high`` for what should wake a phone: a sound or a highlight, or an
    encrypted event (its rules could not see whether it mentions the user)."""
    tweaks = tweaks_of(actions)
    if tweaks.get("sound") or actions_highlight(actions) or event.type == "m.room.encrypted":
        return "high"
    return "low"


def device_of(pusher: Pusher, tweaks: dict[str, Any]) -> dict[str, Any]:
    # Spec: ``data`` minus ``url``; ``pushkey_ts`` in seconds.
    data = {k: v for k, v in pusher.data.items() if k != "url"}
    return {"app_id": pusher.app_id, "pushkey": pusher.pushkey, "pushkey_ts": pusher.pushkey_ts // 1000,
            "data": data, "tweaks": tweaks}


class _Worker:
    """Sends one HTTP pusher's notifications, one at a time, oldest first."""

    def __init__(self, pool: "PushDelivery", pusher: Pusher) -> None:
        self.pool = pool
        self.pusher = pusher
        self.position = pusher.last_stream_ordering
        self._wanted = False
        self._badge = False
        self._stopped = False
        self._run_d: Optional[defer.Deferred[None]] = None
        self._sleep: Optional[defer.Deferred[None]] = None
        self._inflight: Optional[defer.Deferred[tuple[int, Any]]] = None

    def wake(self) -> None:
        self._wanted = True
        self._ensure_running()

    def badge(self) -> None:
        self._badge = True
        self._ensure_running()

    def _ensure_running(self) -> None:
        if self._run_d is None and not self._stopped:
            d = defer.ensureDeferred(self._run())
            if not d.called:
                self._run_d = d

    async def stop(self) -> None:
        self._stopped = True
        for pending in (self._sleep, self._inflight):
            if pending is not None and not pending.called:
                pending.cancel()
        d = self._run_d
        if d is not None:
            await d

    async def _run(self) -> None:
        try:
            # Each pass is started by a wake-up that came in since the last.
            while not self._stopped and (self._wanted or self._badge):
                if self._wanted:
                    self._wanted = False
                    await self._deliver_pending()
                if self._badge and not self._stopped:
                    self._badge = False
                    await self._send_badge()
        except defer.CancelledError:
            pass
        except Exception:
            logger.exception("push delivery failed for pusher %d", self.pusher.id)
        finally:
            self._run_d = None

    async def _deliver_pending(self) -> None:
        upto = self.pool.committed_position()
        # Every page moves the position forward, and there are at most the
        # user's notification rows (bounded by the log's retention) to go.
        while not self._stopped and self.position < upto:
            rows = await self.pool.notifications.get_after(self.pusher.user_id, self.position, upto, PAGE)
            if not rows:
                break
            for row in rows:
                if self._stopped:
                    return
                if not await self._deliver(row):
                    return
                self.position = row.stream_ordering
                await self.pool.store.advance(self.pusher.id, row.stream_ordering)

    async def _deliver(self, row: StoredNotification) -> bool:
        """Send one notification; False when this worker is done for good
        (stopped, or its pusher was rejected)."""
        if row.ts < self.pool.now_ms() - self.pool.max_age_ms:
            return True
        event = await self.pool.events.get_event(row.event_id)
        if event is None or event.rejected_reason:
            return True
        body = await self.pool.notification_body(self.pusher, row, event)
        return await self._send_with_retries(body, f"event {row.event_id}")

    async def _send_with_retries(self, body: dict[str, Any], what: str, attempts: int = MAX_ATTEMPTS) -> bool:
        delay = self.pool.retry_min_s
        for attempt in range(1, attempts + 1):
            if self._stopped:
                return False
            try:
                # Kept so that stop() need not wait out a slow gateway.
                self._inflight = defer.ensureDeferred(self.pool.post_json(self.pusher.data["url"], body))
                try:
                    status, response = await self._inflight
                finally:
                    self._inflight = None
            except defer.CancelledError:
                raise
            except Exception as e:
                status, response = 0, None
                logger.info("push gateway for pusher %d unreachable (%s), attempt %d", self.pusher.id,
                            type(e).__name__, attempt)
            if 200 <= status < 300:
                return await self._handle_rejected(response)
            if 400 <= status < 500 and status not in (408, 429):
                logger.warning("push gateway refused %s for pusher %d with %d; not retrying", what,
                               self.pusher.id, status)
                return True
            if attempt < attempts:
                await self._pause(delay)
                delay = min(delay * 2, self.pool.retry_max_s)
        logger.warning("giving up pushing %s to pusher %d after %d attempts", what, self.pusher.id, attempts)
        return not self._stopped

    async def _pause(self, seconds: float) -> None:
        from twisted.internet import task

        self._sleep = task.deferLater(self.pool.clock(), seconds, lambda: None)
        try:
            await self._sleep
        finally:
            self._sleep = None

    async def _handle_rejected(self, response: Any) -> bool:
        rejected = response.get("rejected") if isinstance(response, dict) else None
        if isinstance(rejected, list) and self.pusher.pushkey in rejected:
            # Spec: stop sending to a rejected pushkey and remove its pusher.
            logger.info("push gateway rejected the pushkey of pusher %d; removing it", self.pusher.id)
            await self.pool.store.delete_by_id(self.pusher.id)
            self.pool.forget(self.pusher)
            self._stopped = True
            return False
        return True

    async def _send_badge(self) -> None:
        count = await self.pool.events.get_total_unread(self.pusher.user_id)
        body = {"notification": {"prio": "high", "counts": {"unread": count},
                                 "devices": [device_of(self.pusher, {})]}}
        await self._send_with_retries(body, "a badge update", attempts=2)


class PushDelivery:
    """The HTTP pushers' workers and the index of users that have one."""

    def __init__(self, store: PushersStore, notifications: NotificationsStore, events: EventsStore,
                 post_json: PostJson, current_position: Callable[[], int], clock: Any = None,
                 retry_min_s: float = RETRY_MIN_S, retry_max_s: float = RETRY_MAX_S,
                 max_age_ms: int = MAX_AGE_MS) -> None:
        self.store = store
        self.notifications = notifications
        self.events = events
        self.post_json = post_json
        self.current_position = current_position
        self._clock = clock
        self.retry_min_s = retry_min_s
        self.retry_max_s = retry_max_s
        self.max_age_ms = max_age_ms
        # user_id -> pusher id -> worker, for HTTP pushers only.
        self._workers: dict[str, dict[int, _Worker]] = {}
        self._stopped = False
        # The newest committed position seen by after_persist, which runs
        # before the notifier hears of it.
        self._committed = 0

    def clock(self) -> Any:
        if self._clock is not None:
            return self._clock
        from zhome.util.reactor import reactor

        return reactor

    @staticmethod
    def now_ms() -> int:
        return int(time.time() * 1000)

    async def start(self) -> None:
        """Load every HTTP pusher and send what each has pending."""
        for p in await self.store.get_all("http"):
            self._add(p).wake()

    async def stop(self) -> None:
        self._stopped = True
        workers = [w for ws in self._workers.values() for w in ws.values()]
        self._workers.clear()
        for w in workers:
            await w.stop()

    def committed_position(self) -> int:
        """The stream position up to which every event has committed."""
        return max(self.current_position(), self._committed)

    def has_pushers(self, user_id: str) -> bool:
        return user_id in self._workers

    # -- the index ---------------------------------------------------------------
    def _add(self, pusher: Pusher) -> _Worker:
        ws = self._workers.setdefault(pusher.user_id, {})
        old = ws.get(pusher.id)
        if old is not None:
            # An update (new URL, data): the running worker picks it up.
            old.pusher = pusher
            return old
        w = ws[pusher.id] = _Worker(self, pusher)
        return w

    def forget(self, pusher: Pusher) -> None:
        ws = self._workers.get(pusher.user_id)
        if ws is None:
            return
        w = ws.pop(pusher.id, None)
        if not ws:
            del self._workers[pusher.user_id]
        if w is not None:
            defer.ensureDeferred(w.stop())

    def on_pusher_set(self, pusher: Pusher, removed: list[Pusher]) -> None:
        for p in removed:
            self.forget(p)
        if self._stopped:
            return
        if pusher.kind == "http":
            self._add(pusher)
        else:
            self.forget(pusher)

    def on_pusher_deleted(self, pusher: Pusher) -> None:
        self.forget(pusher)

    async def reload_user(self, user_id: str) -> None:
        """Re-read the user's pushers (after their devices went)."""
        current = {p.id: p for p in await self.store.get_for_user(user_id) if p.kind == "http"}
        for w in list(self._workers.get(user_id, {}).values()):
            if w.pusher.id not in current:
                self.forget(w.pusher)
        if not self._stopped:
            for p in current.values():
                self._add(p)

    def reload_user_soon(self, user_id: str) -> None:
        d = defer.ensureDeferred(self.reload_user(user_id))
        d.addErrback(lambda f: logger.error("reloading pushers failed: %s", f.getErrorMessage()))

    # -- wake-ups ------------------------------------------------------------------
    def after_persist(self, item: PersistItem) -> None:
        """After an event commits: wake the workers of the users it notified,
        and send a badge to those whose counts it lowered.

        Only dictionary look-ups here; this runs on the send path."""
        for user_id in item.unread_lowered:
            # Their devices' badges: the sender's counts cleared by sending
            # (their other devices still show them), a redacted event taken
            # off members' counts.
            self.on_unread_changed(user_id)
        if not item.push_actions or not self._workers or (item.outlier and not is_invite_outlier(item)) \
                or item.soft_failed or item.backfilled or item.event.rejected_reason:
            return
        # Events persist one at a time, in stream order.
        self._committed = max(self._committed, item.stream_ordering)
        for user_id in item.push_actions:
            ws = self._workers.get(user_id)
            if ws:
                for w in ws.values():
                    w.wake()

    def on_unread_changed(self, user_id: str) -> None:
        """The user's unread counts went down (a read receipt moved, they
        sent an event, a redaction): send the new badge count."""
        for w in self._workers.get(user_id, {}).values():
            w.badge()

    # -- the request body --------------------------------------------------------------
    async def notification_body(self, pusher: Pusher, row: StoredNotification, event: Event) -> dict[str, Any]:
        tweaks = tweaks_of(row.actions)
        n: dict[str, Any] = {
            "event_id": event.event_id,
            "room_id": row.room_id,
            "prio": priority_of(event, row.actions),
            "devices": [device_of(pusher, tweaks)],
        }
        count = await self.events.get_total_unread(pusher.user_id)
        # Always sent: a count of 0 is what clears the app's badge.
        n["counts"] = {"unread": count}
        if pusher.data.get("format") == "event_id_only":
            return {"notification": n}
        # "id" is the name older push gateways read the event ID under.
        n["id"] = event.event_id
        n["type"] = event.type
        n["sender"] = event.sender
        if event.content:
            n["content"] = event.content
        if event.type == "m.room.member" and event.state_key is not None:
            n["user_is_target"] = event.state_key == pusher.user_id
            membership = event.content.get("membership")
            if isinstance(membership, str):
                n["membership"] = membership
        name = await self._state_content(row.room_id, "m.room.name", "")
        alias = await self._state_content(row.room_id, "m.room.canonical_alias", "")
        room_alias = alias.get("alias") if isinstance(alias.get("alias"), str) else None
        room_name = name.get("name") if isinstance(name.get("name"), str) and name.get("name") else None
        if event.type == "m.room.member" and event.content.get("membership") == "invite" and room_name is None:
            # The invitee cannot read the room's state yet; the invite
            # carries a stripped copy of it.
            room_name = _stripped_name(event)
        if room_name is None:
            # The room's display name falls back to its alias ("Calculating
            # the display name for a room").
            room_name = room_alias
        if room_name is not None:
            n["room_name"] = room_name
        if room_alias is not None:
            n["room_alias"] = room_alias
        member = await self._state_content(row.room_id, "m.room.member", event.sender)
        display = member.get("displayname")
        if isinstance(display, str) and display:
            n["sender_display_name"] = display
        return {"notification": n}

    async def _state_content(self, room_id: str, etype: str, state_key: str) -> dict[str, Any]:
        eid = await self.events.get_current_state_event_id(room_id, etype, state_key)
        ev = await self.events.get_event(eid) if eid else None
        return ev.content if ev is not None and isinstance(ev.content, dict) else {}


def _stripped_name(event: Event) -> Optional[str]:
    unsigned = event.pdu.get("unsigned")
    state = unsigned.get("invite_room_state") if isinstance(unsigned, dict) else None
    for s in state if isinstance(state, list) else ():
        if isinstance(s, dict) and s.get("type") == "m.room.name":
            content = s.get("content")
            name = content.get("name") if isinstance(content, dict) else None
            if isinstance(name, str) and name:
                return name
    return None


def make_post_json(tls_policy: Any = None, timeout_s: float = REQUEST_TIMEOUT_S) -> PostJson:
    """A ``PostJson`` over treq with a connection pool, a timeout and a
    bounded response body."""
    import treq
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool
    from twisted.web.http_headers import Headers
    from twisted.web.iweb import IAgent

    from zhome.util.reactor import reactor

    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 4
    agent = Agent(reactor, contextFactory=tls_policy, pool=pool) if tls_policy is not None else Agent(
        reactor, pool=pool)
    client = HTTPClient(cast(IAgent, agent))
    headers = Headers({b"Content-Type": [b"application/json"], b"User-Agent": [b"zhome"]})

    async def post_json(url: str, body: dict[str, Any]) -> tuple[int, Any]:
        data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        resp = await client.post(url, data=data, headers=headers, timeout=timeout_s)
        chunks: list[bytes] = []
        size = [0]

        def collect(chunk: bytes) -> None:
            size[0] += len(chunk)
            if size[0] > MAX_RESPONSE_BYTES:
                raise DeliveryError("response too large")
            chunks.append(chunk)

        await treq.collect(resp, collect)
        try:
            parsed = json.loads(b"".join(chunks).decode("utf-8")) if chunks else None
        except (ValueError, UnicodeDecodeError):
            parsed = None
        return int(resp.code), parsed

    return post_json
