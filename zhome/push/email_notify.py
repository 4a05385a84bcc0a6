"""Email notifications of missed messages, per room.

Spec: client-server-api "Push Notifications" → "Pushers": a pusher of
``kind: "email"`` (``app_id`` ``m.email``, ``pushkey`` the address) asks the
homeserver to mail the user about unread notifications. The pushkey must be
one of the user's validated email addresses (``/account/3pid``).

Which rooms: with an email pusher, every room, unless the room's account
data ``org.zhome.email_notifications`` is ``{"enabled": false}``; without
one, only rooms whose account data says ``{"enabled": true}`` (mailed to
the user's first validated address). So a user can turn the mails on for
one room, or on for all and off for some.

What is missed: a notification (the user's push rules said ``notify``, the
rows of the notification log, zhome/push/notifications.py) that is still
unread (no read receipt at or after it, in its room or thread) when it is
``email.notif_delay_ms`` old, in a room the user is still joined to or
invited to. One mail per user gathers what is missed in all their rooms,
at most one every ``email.notif_min_interval_ms``; it names the rooms, the
senders and the first line of each message (an encrypted message is named
as such: the server cannot read it) and links to the room in the web
client (``identity_service.invite_client_location``).

Position: per user, the notification log's stream position up to which
rows were considered (``email_notify_state``, SQL, so a restart neither
mails again nor skips). A user seen for the first time starts at the
current position: nothing from before they turned mails on is mailed.
The mail goes into the persistent outbox (zhome/mail) before the position
moves: a crash in between can mail a batch twice, never lose it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional
from urllib.parse import quote

from zhome.push.notifications import is_read, thread_of
from zhome.storage.database import Database, Txn
from zhome.storage.notifications import NotificationsStore, StoredNotification
from zhome.util.reactor import reactor
from zhome.util.rounds import Rounds

logger = logging.getLogger(__name__)

ROOM_SETTING = "org.zhome.email_notifications"
EMAIL_APP_ID = "m.email"
PAGE = 200
MAX_ROOMS_PER_MAIL = 10
MAX_MESSAGES_PER_ROOM = 5
MAX_USERS_PER_ROUND = 500


@dataclass(frozen=True)
class _Missed:
    room_id: str
    sender: str
    text: str


def _one_line(text: str, limit: int = 160) -> str:
    line = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


class EmailNotifyStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def users(self) -> list[str]:
        """Users who may have mails due: an email pusher, or a room turned on."""
        rows = await self.db.execute(
            "email_notify_users",
            "SELECT user_id FROM pushers WHERE kind = 'email'"
            " UNION SELECT user_id FROM account_data WHERE type = ? AND room_id != ''", ROOM_SETTING)
        return sorted(str(r[0]) for r in rows)

    async def rooms_with_setting(self, user_id: str) -> list[str]:
        rows = await self.db.execute(
            "email_notify_rooms", "SELECT room_id FROM account_data WHERE user_id = ? AND type = ? AND room_id != ''",
            user_id, ROOM_SETTING)
        return [str(r[0]) for r in rows]

    async def state(self, user_id: str, current: int) -> tuple[int, int]:
        """(position, last mail ts); a new user starts at ``current``."""

        def txn_fn(txn: Txn) -> tuple[int, int]:
            txn.execute("SELECT position, last_mail_ts FROM email_notify_state WHERE user_id = ?", (user_id,))
            row = txn.fetchone()
            if row is not None:
                return int(row[0]), int(row[1])
            txn.execute("INSERT INTO email_notify_state (user_id, position, last_mail_ts) VALUES (?, ?, 0)",
                        (user_id, current))
            return current, 0

        return await self.db.run_interaction("email_notify_state", txn_fn)

    async def restart_at(self, user_id: str, position: int) -> None:
        def txn_fn(txn: Txn) -> None:
            txn.execute("DELETE FROM email_notify_state WHERE user_id = ?", (user_id,))
            txn.execute("INSERT INTO email_notify_state (user_id, position, last_mail_ts) VALUES (?, ?, 0)",
                        (user_id, position))

        await self.db.run_interaction("email_notify_restart", txn_fn)

    async def advance(self, user_id: str, position: int, mailed_ts: Optional[int]) -> None:
        if mailed_ts is None:
            await self.db.execute("email_notify_advance",
                                  "UPDATE email_notify_state SET position = ? WHERE user_id = ?", position, user_id)
        else:
            await self.db.execute("email_notify_mailed",
                                  "UPDATE email_notify_state SET position = ?, last_mail_ts = ? WHERE user_id = ?",
                                  position, mailed_ts, user_id)

    async def delete_for_user(self, user_id: str) -> None:
        await self.db.execute("email_notify_forget", "DELETE FROM email_notify_state WHERE user_id = ?", user_id)


class EmailNotifier(Rounds):
    ROOM_SETTING = ROOM_SETTING

    def __init__(self, hs: Any, store: EmailNotifyStore, notifications: NotificationsStore,
                 current_position: Callable[[], int], delay_ms: int, min_interval_ms: int,
                 client_location: str) -> None:
        super().__init__()
        self.hs = hs
        self.store = store
        self.notifications = notifications
        self.current_position = current_position
        self.delay_ms = delay_ms
        self.min_interval_ms = min_interval_ms
        self.client_location = client_location
        # Often enough that a mail goes out soon after its delay, never busy.
        self.poll_s = min(60.0, max(0.2, delay_ms / 4000))

    async def enable(self, user_id: str) -> None:
        """The user turned mails on (a pusher, a room): what comes from now
        on counts (a user already known keeps their position)."""
        pushers = [p for p in await self.hs.pushers.get_for_user(user_id) if p.kind == "email"]
        on, _ = await self._enabled_rooms(user_id)
        if pushers or on:
            await self.store.state(user_id, self.current_position())
        else:
            # Nothing was on: what came while mails were off stays unmailed.
            await self.store.restart_at(user_id, self.current_position())

    async def _round(self) -> None:
        self._running = True
        try:
            users = await self.store.users()
            for user_id in users[:MAX_USERS_PER_ROUND]:
                if self._stopped:
                    return
                try:
                    await self._user(user_id)
                except Exception:
                    logger.exception("email notifications: a user's round failed")
        except Exception:
            logger.exception("email notifications: round failed")
        finally:
            self._running = False
        if not self._stopped:
            self._timer = reactor.callLater(self.poll_s, self.kick)

    async def _address(self, user_id: str, pushkey: Optional[str]) -> Optional[str]:
        validated = [t["address"] for t in await self.hs.threepids.list_for_user(user_id)
                     if t.get("medium") == "email" and t.get("validated_at")]
        if pushkey is not None:
            return pushkey if pushkey.lower() in {a.lower() for a in validated} else None
        return validated[0] if validated else None

    async def _enabled_rooms(self, user_id: str) -> tuple[set[str], set[str]]:
        """(rooms turned on, rooms turned off) by the room setting."""
        on: set[str] = set()
        off: set[str] = set()
        for room_id in await self.store.rooms_with_setting(user_id):
            content = await self.hs.user_data.get_account_data(user_id, room_id, ROOM_SETTING) or {}
            enabled = content.get("enabled")
            if enabled is True:
                on.add(room_id)
            elif enabled is False:
                off.add(room_id)
        return on, off

    async def _user(self, user_id: str) -> None:
        now = int(time.time() * 1000)
        upto = self.current_position()
        position, last_mail = await self.store.state(user_id, upto)
        if position >= upto:
            return
        pushers = [p for p in await self.hs.pushers.get_for_user(user_id) if p.kind == "email"]
        pushkey = pushers[0].pushkey if pushers else None
        on, off = await self._enabled_rooms(user_id)
        if pushkey is None and not on:
            await self.store.advance(user_id, upto, None)
            return
        if last_mail and now - last_mail < self.min_interval_ms:
            return
        rows: list[StoredNotification] = []
        new_position = position
        for _ in range(20):
            page = await self.notifications.get_after(user_id, new_position, upto, PAGE)
            for row in page:
                if row.ts > now - self.delay_ms:
                    break
                rows.append(row)
                new_position = row.stream_ordering
            else:
                if len(page) == PAGE:
                    continue
            break
        if new_position == position:
            return
        wanted = [r for r in rows if r.room_id in on or (pushkey is not None and r.room_id not in off)]
        missed = await self._missed(user_id, wanted)
        mailed = None
        if missed:
            address = await self._address(user_id, pushkey)
            if address is not None and self.hs.mailer is not None:
                subject, text = await self._compose(missed)
                await self.hs.mailer.send(address, subject, text)
                mailed = now
        await self.store.advance(user_id, new_position, mailed)

    async def _missed(self, user_id: str, rows: list[StoredNotification]) -> list[_Missed]:
        if not rows:
            return []
        read = await self.notifications.read_up_to(user_id, {r.room_id for r in rows})
        events = await self.hs.events.get_events([r.event_id for r in rows])
        threads = await self.hs.relations.threads_of(list(events.values())) if events else {}
        out: list[_Missed] = []
        membership: dict[str, Optional[str]] = {}
        for r in rows:
            ev = events.get(r.event_id)
            if ev is None or ev.rejected_reason or ev.sender == user_id:
                continue
            if is_read(r.stream_ordering, r.room_id, threads.get(ev.event_id) or thread_of(ev), read):
                continue
            if r.room_id not in membership:
                membership[r.room_id] = await self.hs.membership.current_membership(r.room_id, user_id)
            if membership[r.room_id] not in ("join", "invite"):
                continue
            if ev.type == "m.room.encrypted":
                text = "(an encrypted message: open the room to read it)"
            elif ev.type == "m.room.member" and ev.membership == "invite":
                text = "invited you"
            else:
                body = ev.content.get("body") if isinstance(ev.content, dict) else None
                text = _one_line(body) if isinstance(body, str) and body else f"({ev.type})"
            out.append(_Missed(r.room_id, ev.sender, text))
        return out

    async def _state_content(self, room_id: str, etype: str, state_key: str) -> dict[str, Any]:
        eid = await self.hs.events.get_current_state_event_id(room_id, etype, state_key)
        ev = await self.hs.events.get_event(eid) if eid else None
        return ev.content if ev is not None and isinstance(ev.content, dict) else {}

    async def _compose(self, missed: list[_Missed]) -> tuple[str, str]:
        by_room: dict[str, list[_Missed]] = {}
        for m in missed:
            by_room.setdefault(m.room_id, []).append(m)
        app = getattr(self.hs.mailer, "app_name", "Matrix")
        lines = [f"You have {len(missed)} unread message{'s' if len(missed) != 1 else ''} on {app}.", ""]
        names: list[str] = []
        for room_id, items in list(by_room.items())[:MAX_ROOMS_PER_MAIL]:
            name = (await self._state_content(room_id, "m.room.name", "")).get("name")
            room_name = _one_line(name, 80) if isinstance(name, str) and name else "a room"
            names.append(room_name)
            lines.append(f"{room_name}:")
            for m in items[:MAX_MESSAGES_PER_ROOM]:
                display = (await self._state_content(room_id, "m.room.member", m.sender)).get("displayname")
                who = _one_line(display, 60) if isinstance(display, str) and display else m.sender
                lines.append(f"  {who}: {m.text}")
            if len(items) > MAX_MESSAGES_PER_ROOM:
                lines.append(f"  … and {len(items) - MAX_MESSAGES_PER_ROOM} more")
            lines.append(f"  Open: {self.client_location}#/room/{quote(room_id, safe='!:')}")
            lines.append("")
        if len(by_room) > MAX_ROOMS_PER_MAIL:
            lines.append(f"… and messages in {len(by_room) - MAX_ROOMS_PER_MAIL} more rooms.")
            lines.append("")
        lines.append("You get this mail because email notifications are on for these rooms; turn them off "
                     "in your client's notification settings.")
        subject = f"Unread messages in {names[0]}" if len(by_room) == 1 else f"Unread messages in {len(by_room)} rooms"
        return subject, "\n".join(lines) + "\n"
