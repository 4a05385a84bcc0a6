"""Room messages mailed to the room's email participants.

Spec: application-service-api "Pushing events" brings the room's
``m.room.message`` events; each is queued in the bridge's database
(``outbound_events``, content sealed) with a due time of its arrival plus
``quiet_period_ms``.

Coalescing: when a room's oldest queued message is due, every message of
that room queued by then (up to ``MAX_EVENTS_PER_MAIL``) becomes ONE mail
per email participant (a ghost joined or invited), in event order, each
introduced by its sender's display name in the room. A participant's own
messages (their ghost's, e.g. their mail posted into the room) are left
out of their mail, and mail from one email participant reaches the others
this way. A batch whose messages are all the participant's own sends them
nothing. What is the same for every participant (display names, the room
name, media bytes) is fetched once per batch, and the mail is built once
per distinct set of messages (compose.MailTemplate): each participant's
copy differs only in its ``To``, ``Reply-To`` and ``List-Unsubscribe``.

Pacing: after a round that mailed something the mailer rests twice as long
as the round took (at most half a second). A message to a quiet room is
mailed at once; in a burst, the messages that arrive meanwhile share the
next mail, so mailing never takes more than about a third of the time
from everything else.

Headers (compose.py builds the mail): ``Message-ID`` derived from the
batch's last event (``<zhome.HASH@mail_domain>``, so the bridge knows its
own mail when it comes back); ``Reply-To`` the participant's signed reply
address for the last event (tokens.py); for a Matrix reply or a thread
(``m.in_reply_to``, ``rel_type: m.thread``) ``In-Reply-To``/``References``
the Message-IDs of the replied-to event and the thread root when known
(a mail of ours that carried it, ``sent_mail_events``, or the inbound mail
it came from, ``known_events``); ``List-Unsubscribe`` with one-click
(links.py); DKIM-signed when a key is configured.

Media (``m.image``, ``m.file``, ``m.audio``, ``m.video`` with an ``mxc``
``url``) is downloaded once through the authenticated media API and
attached when it fits ``max_attachment_size`` and the mail's
``max_attachments_total``; otherwise the mail carries a signed, expiring
download link served by the homeserver (links.py). Encrypted files
(``file`` instead of ``url``) cannot be attached: the mail says so.

Once: the batch's mails are handed to the outbox (zhome/mail/outbox.py,
on the same database) and its rows deleted in one transaction, so a crash
neither loses nor doubles them; the outbox retries with backoff. A batch
that cannot be built (homeserver unreachable) waits ``RETRY_MS``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Optional

from zhome.bridges.email.compose import (
    Attachment, DkimSigner, MailHeaders, MailItem, MailTemplate, html_of, one_line,
)
from zhome.bridges.email.hsclient import HomeserverClient, HomeserverError, HomeserverUnreachable
from zhome.bridges.email.links import (
    DOWNLOAD_LABEL, UNSUBSCRIBE_LABEL, derive_key, download_url, unsubscribe_url,
)
from zhome.bridges.email.store import BridgeStore
from zhome.bridges.email.tokens import address_of_ghost, ghost_localpart, reply_localpart
from zhome.mail.outbox import MailOutbox
from zhome.storage.database import Txn
from zhome.util.reactor import next_turn, reactor
from zhome.util.rounds import Rounds

logger = logging.getLogger(__name__)

ROOMS_PER_ROUND = 20
MAX_EVENTS_PER_MAIL = 50
RETRY_MS = 60_000
ROOM_NAME_TTL_S = 60.0
MEDIA_TYPES = ("m.image", "m.file", "m.audio", "m.video")
#: After a round that mailed something the mailer rests REST_FACTOR times as
#: long as that round took (at most MAX_REST_S): in a burst, the messages
#: that arrive meanwhile share the next mail, and mailing takes at most about
#: a third of the time, leaving the rest to everything else (mail coming in,
#: clients). A quiet room's message is mailed at once as before.
REST_FACTOR = 2.0
MAX_REST_S = 0.5


def message_id_for(event_id: str, mail_domain: str) -> str:
    digest = hashlib.sha256(event_id.encode("utf-8")).hexdigest()[:32]
    return f"<zhome.{digest}@{mail_domain}>"


@dataclass(frozen=True)
class OutboundSettings:
    mail_domain: str
    from_address: str
    quiet_period_ms: int
    ghost_prefix: str
    server_name: str
    #: Where the signed links point (the homeserver's public base URL).
    public_baseurl: str
    as_token: str
    max_attachment_size: int = 10 * 1024 * 1024
    max_attachments_total: int = 20 * 1024 * 1024
    link_lifetime_ms: int = 7 * 24 * 3600 * 1000
    #: The bridge's own user, who tells a room of mail that could not go out.
    bot: Optional[str] = None


def _reply_target(content: dict[str, Any]) -> tuple[Optional[str], Optional[str]]:
    """(replied-to event, thread root) of a message's ``m.relates_to``."""
    relates = content.get("m.relates_to")
    if not isinstance(relates, dict):
        return None, None
    reply = relates.get("m.in_reply_to")
    target = reply.get("event_id") if isinstance(reply, dict) else None
    root = relates.get("event_id") if relates.get("rel_type") == "m.thread" else None
    return (target if isinstance(target, str) else None), (root if isinstance(root, str) else None)


class OutboundMailer(Rounds):
    def __init__(self, store: BridgeStore, hs: HomeserverClient, outbox: MailOutbox, secret: bytes,
                 settings: OutboundSettings, signer: Optional[DkimSigner] = None) -> None:
        super().__init__()
        self.store = store
        self.hs = hs
        self.outbox = outbox
        self.secret = secret
        self.s = settings
        self.signer = signer
        self.ghost_prefix = settings.ghost_prefix
        self.quiet_period_ms = settings.quiet_period_ms
        self._download_key = derive_key(settings.as_token, DOWNLOAD_LABEL)
        self._unsubscribe_key = derive_key(settings.as_token, UNSUBSCRIBE_LABEL)
        # A cache (the room's state is the truth): room ID -> (name, fetched at).
        self._room_names: dict[str, tuple[str, float]] = {}
        self._sender_names: dict[tuple[str, str], tuple[str, float]] = {}
        #: No round starts before this (reactor time): the rest after one that mailed.
        self._rest_until = 0.0
        self._mailed = False
        # The outbox is on the bridge's database: a sent mail's record goes
        # in the transaction that deletes the mail.
        outbox.sent_txn.append(BridgeStore.forget_outbox_mails_txn)
        outbox.on_dropped.append(self._mail_dropped)

    async def _mail_dropped(self, outbox_id: int, refused: bool) -> None:
        """The outbox gave a mail up: the room hears that a participant did
        not get its messages. Refused by the relay for good, the address is
        also stopped, as after a hard bounce."""
        found = await self.store.take_outbox_mail(outbox_id)
        if found is None or self.s.bot is None:
            return
        room_id, ghost = found
        address = address_of_ghost(self.ghost_prefix, ghost)
        if refused and address is not None:
            await self.store.mark_bouncing(address, "5.0.0")
        why = ("the mail server refused it" if refused
               else f"it could not be handed to the mail server after {self.outbox.max_attempts} attempts")
        body = f"Mail to {ghost} was not delivered: {why}. They did not get the messages it carried."
        if refused:
            body += " The bridge sends this participant no more mail."
        try:
            await self.hs.send(room_id, self.s.bot, "m.room.message", {"msgtype": "m.notice", "body": body},
                               f"zhome-undelivered-{outbox_id}")
        except (HomeserverUnreachable, HomeserverError) as e:
            logger.info("email bridge: a room could not be told of an undelivered mail: %s", type(e).__name__)

    async def queue(self, event: dict[str, Any], remember: bool = False) -> None:
        """An event from a transaction; queued when its room has email
        participants. ``remember``: the event is also remembered
        (BridgeStore.remember_event), in the same transaction."""
        room_id, event_id, content = event["room_id"], event["event_id"], event["content"]
        body = content.get("body")
        data: Optional[dict[str, Any]] = None
        if isinstance(body, str) and body:
            kept = {k: content[k] for k in ("msgtype", "body", "format", "formatted_body", "url", "info", "filename",
                                             "m.relates_to") if k in content}
            if "file" in content:
                kept["encrypted_file"] = True
            data = {"sender": str(event.get("sender", "")), "content": kept}
        due = int(time.time() * 1000) + self.quiet_period_ms
        if remember:
            if not await self.store.remember_and_queue(room_id, event_id, data, due, self.ghost_prefix):
                return
        else:
            if data is None or not await self.store.email_participants(room_id, self.ghost_prefix):
                return
            await self.store.add_outbound_event(room_id, event_id, data, due)
        self._schedule(self.quiet_period_ms / 1000)

    def _schedule(self, delay_s: float) -> None:
        if self._stopped:
            return
        delay_s = max(delay_s, self._rest_until - reactor.seconds())
        if self._running:
            if delay_s <= 0.05:
                self._again = True
            # The running round schedules the next due time when it ends.
            return
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= reactor.seconds() + delay_s:
                return
            self._timer.cancel()
        self._timer = reactor.callLater(max(0.0, delay_s), self.kick)

    async def _round(self) -> None:
        self._running = True
        min_delay = 0.0
        started = reactor.seconds()
        self._mailed = False
        try:
            while not self._stopped:
                self._again = False
                rooms = await self.store.due_outbound_rooms(ROOMS_PER_ROUND)
                for room_id in rooms:
                    if self._stopped:
                        return
                    await self._mail_room(room_id)
                # Messages queued meanwhile (``_again``) wait for the next
                # round, after the rest.
                if len(rooms) < ROOMS_PER_ROUND:
                    break
        except Exception:
            logger.exception("email bridge: outbound round failed")
            min_delay = 5.0
        finally:
            self._running = False
            if self._mailed:
                took = reactor.seconds() - started
                self._rest_until = reactor.seconds() + min(MAX_REST_S, REST_FACTOR * took)
        if self._stopped:
            return
        try:
            nxt = await self.store.next_outbound_ts()
        except Exception:
            logger.exception("email bridge: could not read the next outbound time")
            nxt = int(time.time() * 1000) + 30_000
        if nxt is not None:
            self._schedule(max(min_delay, nxt / 1000 - time.time()))

    # -- one room's batch ------------------------------------------------------------
    async def _mail_room(self, room_id: str) -> None:
        rows = await self.store.room_outbound(room_id, MAX_EVENTS_PER_MAIL)
        if not rows:
            return
        try:
            await self._mail_event(room_id, rows)
        except (HomeserverError, HomeserverUnreachable) as e:
            # Tried again later, never in a tight loop.
            logger.warning("email bridge: a room's messages not mailed yet (%s)", e)
            await self.store.postpone_outbound_rows([r[0] for r in rows], RETRY_MS)
        except Exception as e:
            # The type only: a message of a mail error may hold an address.
            logger.warning("email bridge: a room's messages not mailed yet (unexpected %s)", type(e).__name__)
            await self.store.postpone_outbound_rows([r[0] for r in rows], RETRY_MS)

    async def _room_name(self, room_id: str) -> str:
        cached = self._room_names.get(room_id)
        if cached is not None and cached[1] > time.monotonic() - ROOM_NAME_TTL_S:
            return cached[0]
        name = ""
        try:
            content = await self.hs.state_event(room_id, "m.room.name", "")
            got = content.get("name")
            name = one_line(got, 100) if isinstance(got, str) else ""
        except HomeserverError as e:
            if e.status not in (403, 404):
                raise
        self._room_names[room_id] = (name, time.monotonic())
        if len(self._room_names) > 10_000:
            self._room_names.clear()
        return name

    async def _sender_name(self, room_id: str, sender: str) -> str:
        """The sender's display name in the room, else in their profile
        (cached briefly, like the room name)."""
        cached = self._sender_names.get((room_id, sender))
        if cached is not None and cached[1] > time.monotonic() - ROOM_NAME_TTL_S:
            return cached[0]
        name = await self._fetch_sender_name(room_id, sender)
        if len(self._sender_names) > 10_000:
            self._sender_names.clear()
        self._sender_names[(room_id, sender)] = (name, time.monotonic())
        return name

    async def _fetch_sender_name(self, room_id: str, sender: str) -> str:
        try:
            member = await self.hs.state_event(room_id, "m.room.member", sender)
            name = member.get("displayname")
            if isinstance(name, str) and name.strip():
                return name
        except HomeserverError:
            pass
        try:
            return await self.hs.displayname(sender) or sender
        except HomeserverError:
            return sender

    async def _media(self, content: dict[str, Any], budget: list[int]) -> MailItem:
        """Attachments, links and notes of one message (without its sender)."""
        msgtype = content.get("msgtype")
        body = str(content.get("body", ""))
        if msgtype not in MEDIA_TYPES:
            return MailItem("", body)
        filename = content.get("filename") if isinstance(content.get("filename"), str) else body
        filename = "".join(c for c in str(filename) if c.isprintable() and c not in "/\\")[:200] or "attachment"
        if content.get("encrypted_file"):
            return MailItem("", body, notes=("an end-to-end encrypted file was sent; it cannot be mailed",))
        url = content.get("url")
        if not isinstance(url, str) or not url.startswith("mxc://"):
            return MailItem("", body)
        info = content.get("info") if isinstance(content.get("info"), dict) else {}
        announced = info.get("size") if isinstance(info, dict) else None
        cap = min(self.s.max_attachment_size, budget[0])
        got: Optional[tuple[bytes, str]] = None
        if not (isinstance(announced, int) and announced > cap):
            got = await self.hs.download(url, cap)
        if got is not None:
            budget[0] -= len(got[0])
            return MailItem("", body, attachments=(Attachment(filename, got[1], got[0]),))
        exp = int(time.time() * 1000) + self.s.link_lifetime_ms
        link = download_url(self.s.public_baseurl, self._download_key, url, exp)
        if link is None:
            return MailItem("", body)
        return MailItem("", body, links=((filename, link),))

    async def _mail_event(self, room_id: str, rows: list[tuple[int, str, Optional[dict[str, Any]]]]) -> None:
        """Mail one room's batch ``rows`` (row ID, event ID, data) to each
        email participant, handing the mails over with the rows' deletion."""
        events = [(row_id, event_id, data) for row_id, event_id, data in rows if data is not None]
        row_ids = [r[0] for r in rows]
        mails: list[tuple[Any, ...]] = []
        ghosts: list[tuple[int, str]] = []  # (outbox row, participant) of each mail
        last_event = events[-1][1] if events else None
        mid = message_id_for(last_event, self.s.mail_domain) if last_event else None
        if events:
            assert last_event is not None and mid is not None
            names: dict[str, str] = {}
            budget = [self.s.max_attachments_total]
            items: list[tuple[str, MailItem]] = []
            refs: list[str] = []
            for _row_id, _event_id, data in events:
                sender = str(data.get("sender", ""))
                content = data.get("content")
                if not isinstance(content, dict):
                    # Queued by an older version: the body alone.
                    content = {"msgtype": "m.text", "body": str(data.get("body") or "")}
                    if data.get("reply_to"):
                        content["m.relates_to"] = {"m.in_reply_to": {"event_id": data["reply_to"]}}
                if sender not in names:
                    names[sender] = await self._sender_name(room_id, sender)
                media = await self._media(content, budget)
                html = None if content.get("msgtype") in MEDIA_TYPES else html_of(
                    media.body, content.get("format"), content.get("formatted_body"))
                items.append((sender, MailItem(names[sender], media.body, html, media.attachments, media.links,
                                               media.notes)))
                target, root = _reply_target(content)
                for ev in (root, target):
                    if ev is not None:
                        for m in await self.store.message_ids_of(ev):
                            if m not in refs:
                                refs.append(m)
            room_name = await self._room_name(room_id)
            subject = f"New messages in {room_name}" if room_name else "New messages"
            if refs:
                subject = "Re: " + subject
            n = await self.store.remember_event(room_id, last_event, mid)
            participants = await self.store.email_participants(room_id, self.ghost_prefix)
            # A hard bounce stopped mail to these (bounces.py).
            bouncing = await self.store.bouncing_among(participants)
            # One template per distinct set of messages (most participants
            # get all of them; an author gets the others').
            templates: dict[tuple[int, ...], MailTemplate] = {}
            for address in participants:
                if address in bouncing:
                    continue
                if mails:
                    await next_turn()  # one mail at a time between other work
                ghost = f"@{ghost_localpart(self.ghost_prefix, address)}:{self.s.server_name}"
                picked = tuple(i for i, (sender, _item) in enumerate(items) if sender != ghost)
                if not picked:
                    continue
                template = templates.get(picked)
                if template is None:
                    mine = [items[i][1] for i in picked]
                    template = templates[picked] = MailTemplate(MailHeaders(
                        from_name=mine[-1].sender_name, from_address=self.s.from_address, to=address,
                        subject=subject, message_id=mid, reply_to="", references=tuple(refs),
                        unsubscribe_url=""), mine)
                raw = template.render(
                    address,
                    f"{reply_localpart(self.secret, n, room_id, last_event, address)}@{self.s.mail_domain}",
                    unsubscribe_url(self.s.public_baseurl, self._unsubscribe_key, room_id, ghost))
                if self.signer is not None:
                    raw = self.signer.sign(raw)
                mails.append(self.outbox.prepare(self.s.from_address, address, raw))
                ghosts.append((int(mails[-1][0]), ghost))
        event_ids = [e[1] for e in events]

        def txn_fn(txn: Txn) -> None:
            for mail in mails:
                MailOutbox.enqueue_txn(txn, mail)
            BridgeStore.finish_outbound_txn(txn, row_ids, room_id, mid, event_ids, ghosts)

        await self.store.db.run_interaction("email_bridge_mail_batch", txn_fn)
        if mails:
            self._mailed = True
            self.outbox.kick()
