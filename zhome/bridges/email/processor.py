"""Posting the inbound table: each committed mail becomes events in its room.

Spec: application-service-api "Identity assertion" (the sender's ghost
sends with ``?user_id=``); client-server-api "Transaction identifiers":
every event of a mail is sent with a txnId derived from the mail's row ID,
so a retry after a crash (or a lost answer) gets the event already sent
back instead of a second one. Attachments go to the media repository first
(re-uploaded on a retry: a spare copy of a file, never a second message).

Sender checks (senderauth.py) were done before the mail was accepted:
a mail whose verdict is ``mark`` (or a released quarantined one) is posted
with the line "Unverified sender:" before its body (and formatted body)
and the results in ``org.zhome.email.auth``; a held one is not posted, and
its room gets one ``m.notice`` from the bridge's user (no address, no
content) until the administrator releases or deletes its held mail.
Delivery reports (bounces.py) are never posted: a hard bounce of mail to a
room's email participant stops mail to that address (``is_bouncing``) and
says so in the room with an ``m.notice``; a soft one is dropped. Mail from
a stopped address that passes the sender checks (verdict ``accept``) shows
its mailbox works again: mail to it resumes, and the room is told.
A mail to an invitation's reply address (table invite_replies) is posted
after its ghost claimed the invitation (zhome's claim_invite; idempotent,
so a retry claims again harmlessly) and joined on the invite it made.

A mail that cannot be posted for good (malformed, not allowed) is marked
failed and kept (sealed); a homeserver that cannot be reached is retried
with backoff. Logs name the row ID and the reason, never an address or a
body.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

from twisted.internet import defer

from zhome.bridges.email.hsclient import HomeserverClient, HomeserverError, HomeserverUnreachable
from zhome.bridges.email.bounces import parse_report
from zhome.bridges.email.mime import MalformedMail, ParsedMail, parse_mail, text_content
from zhome.bridges.email.store import FAILED, IGNORED, POSTED, BridgeStore, InboundContext, InboundMail
from zhome.bridges.email.tokens import address_of_ghost, ghost_localpart, normalise_address
from zhome.util.reactor import next_turn, reactor
from zhome.util.rounds import Rounds

logger = logging.getLogger(__name__)

#: Mails read (and posted) together.
BATCH = 100
#: Batches in one go before yielding to a timer (bounds one burst).
MAX_BATCHES_PER_ROUND = 20
#: Ghosts made ready (registered, joined, attachments uploaded) at once.
CONCURRENCY = 8
# Sends into one room at once (different senders' mails).
POST_CONCURRENCY = 4
#: Mails parsed before the reactor gets a turn.
PARSE_TURN = 5
MAX_ATTEMPTS = 12
MIN_BACKOFF_MS = 500
MAX_BACKOFF_MS = 300_000
#: With nothing due, the table is looked at this often (mail released from
#: quarantine by ``zhome bridge-email quarantine release`` in another process).
IDLE_POLL_S = 5.0
UNVERIFIED = "Unverified sender:"
HELD_NOTICE = ("A mail to this room's address did not pass the sender checks and is held for an administrator"
               " of the email bridge.")


@dataclass(frozen=True)
class ProcessorSettings:
    server_name: str
    mail_domain: str
    ghost_prefix: str
    #: The bridge's own user (sends notices).
    bot: str = ""


def _reason(e: Exception) -> str:
    """A short reason naming no content: the homeserver's status and errcode,
    or just the type of an unexpected error."""
    if isinstance(e, (HomeserverUnreachable, HomeserverError)):
        return f"homeserver: {e}"
    return f"error: {type(e).__name__}"


@dataclass
class _Mail:
    """A mail of a batch on its way to its room."""

    row: InboundMail
    parsed: ParsedMail
    ghost: str
    #: Why it could not be made ready (posting it is then retried or failed).
    error: Optional[Exception] = None
    #: The content URIs of its attachments, once uploaded.
    mxcs: list[str] = field(default_factory=list)


@dataclass
class _Results:
    """What a batch did, written in one transaction at its end."""

    remembered: list[tuple[str, str, Optional[str]]] = field(default_factory=list)
    finished: list[tuple[int, str, str]] = field(default_factory=list)
    retries: list[tuple[int, int, int, str]] = field(default_factory=list)
    not_bouncing: list[str] = field(default_factory=list)


@dataclass
class _Batch:
    rows: list[InboundMail]
    mails: list[_Mail] = field(default_factory=list)
    ctx: Optional[InboundContext] = None
    results: _Results = field(default_factory=_Results)


@dataclass
class _RoundState:
    """What the batches of one round did that their context (read before
    the batch) does not say."""

    #: room -> Message-ID -> the event posted for it.
    posted: dict[str, dict[str, str]] = field(default_factory=dict)
    #: Addresses whose mail works again (clear_bouncing).
    not_bouncing: set[str] = field(default_factory=set)


class InboundProcessor(Rounds):
    """Posts the inbound table in batches: each batch's mails are parsed,
    then made ready (ghost registered and named, invitation claimed, room
    joined, attachments uploaded) CONCURRENCY at a time, then posted: each
    sender's mails in a room one after another in the order they were
    accepted, a reply after the mail it answers, senders and rooms side by
    side; what the batch did is written in one transaction at its end (a
    crash before it posts the same events again: same txnIds, no second
    message)."""

    def __init__(self, store: BridgeStore, hs: HomeserverClient, settings: ProcessorSettings) -> None:
        super().__init__()
        self.store = store
        self.hs = hs
        self.settings = settings
        self._displaynames: dict[str, str] = {}
        # Ghosts known to be registered (a cache: asking again is harmless).
        self._registered: set[str] = set()

    async def _round(self) -> None:
        self._running = True
        try:
            state = _RoundState()
            for _ in range(MAX_BATCHES_PER_ROUND):
                if self._stopped:
                    break
                self._again = False
                batch = await self._ready_batch()
                await self._post_batch(batch, state)
                if len(batch.rows) < BATCH and not self._again:
                    break
            await self._tell_of_held_mail()
        except Exception:
            logger.exception("email bridge: inbound round failed")
            failed = True
        else:
            failed = False
        finally:
            self._running = False
        await self._schedule_next(min_delay_s=5.0 if failed else 0.05)

    async def _schedule_next(self, min_delay_s: float = 0.05) -> None:
        if self._stopped:
            return
        try:
            nxt = await self.store.next_due_ts()
        except Exception:
            logger.exception("email bridge: could not read the next attempt time")
            nxt = int(reactor.seconds() * 1000) + 30_000
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        import time

        if nxt is None:
            self._timer = reactor.callLater(IDLE_POLL_S, self.kick)
            return

        delay = max(min_delay_s, min(nxt / 1000 - time.time(), MAX_BACKOFF_MS / 1000))
        self._timer = reactor.callLater(delay, self.kick)

    # -- a batch -------------------------------------------------------------------------
    async def _ready_batch(self) -> "_Batch":
        """The next due mails, parsed and made ready (ghosts registered and
        named, invitations claimed, rooms joined, attachments uploaded)
        CONCURRENCY ghosts at a time."""
        rows = await self.store.due_inbound(BATCH)
        batch = _Batch(rows)
        results = batch.results
        for row in rows:
            if self._stopped:
                break
            if row.bounce and not row.unreadable and row.raw is not None:
                await self._bounce(row)  # rare: on its own, with its own writes
                continue
            if batch.mails and len(batch.mails) % PARSE_TURN == 0:
                await next_turn()  # parsing a batch keeps no one waiting long
            mail = self._parse(row, results)
            if mail is not None:
                batch.mails.append(mail)
        mails = batch.mails
        if not mails:
            return batch
        batch.ctx = ctx = await self.store.inbound_context(
            [m.row.id for m in mails], [(m.row.room_id, m.ghost) for m in mails],
            [(m.row.room_id, mid) for m in mails for mid in m.parsed.references[:50]],
            [m.parsed.from_address for m in mails if m.row.auth is not None and m.row.auth.get("verdict") == "accept"])
        # Per ghost: its mails' setup in order, one ghost's never twice at once.
        by_ghost: dict[str, list[_Mail]] = {}
        for m in mails:
            by_ghost.setdefault(m.ghost, []).append(m)
        sem = defer.DeferredSemaphore(CONCURRENCY)
        await defer.DeferredList([sem.run(self._prepare_ghost, ms, ctx) for ms in by_ghost.values()],
                                 consumeErrors=True)
        return batch

    async def _post_batch(self, batch: "_Batch", state: "_RoundState") -> None:
        """Post a ready batch (see _post_room), rooms side by side; then its
        results in one transaction."""
        results = batch.results
        if batch.mails and batch.ctx is not None:
            by_room: dict[str, list[_Mail]] = {}
            for m in batch.mails:
                by_room.setdefault(m.row.room_id, []).append(m)
            await defer.DeferredList([defer.ensureDeferred(self._post_room(ms, batch.ctx, state, results))
                                      for ms in by_room.values()], consumeErrors=True)
        if results.finished or results.retries or results.remembered or results.not_bouncing:
            await self.store.finish_inbound_batch(results.remembered, results.finished, results.retries,
                                                  results.not_bouncing)
        for row_id, st, _outcome in results.finished:
            if st == POSTED:
                logger.info("email bridge: mail %d posted", row_id)

    def _parse(self, row: InboundMail, results: _Results) -> Optional[_Mail]:
        """The mail of ``row`` to post, or None when it is not posted (its
        outcome is in ``results``)."""
        if row.unreadable:
            results.finished.append((row.id, FAILED, "sealed content does not open"))
            return None
        if row.raw is None:
            results.finished.append((row.id, IGNORED, "content no longer available"))
            return None
        try:
            parsed = parse_mail(row.raw, self.settings.mail_domain)
        except MalformedMail as e:
            logger.info("email bridge: mail %d not posted: malformed (%s)", row.id, e)
            results.finished.append((row.id, FAILED, f"malformed: {e}"))
            return None
        except Exception as e:
            logger.warning("email bridge: mail %d not posted: the parser failed (%s)", row.id, type(e).__name__)
            results.finished.append((row.id, FAILED, f"malformed: parser failed ({type(e).__name__})"))
            return None
        if parsed.not_posted is not None:
            logger.info("email bridge: mail %d not posted: %s", row.id, parsed.not_posted)
            results.finished.append((row.id, IGNORED, parsed.not_posted))
            return None
        if row.token_address is not None and normalise_address(parsed.from_address) != row.token_address:
            logger.info("email bridge: mail %d not posted: From is not the reply address's owner", row.id)
            results.finished.append((row.id, FAILED, "From does not match the reply address"))
            return None
        s = self.settings
        ghost = f"@{ghost_localpart(s.ghost_prefix, parsed.from_address)}:{s.server_name}"
        return _Mail(row, parsed, ghost)

    async def _prepare_ghost(self, mails: list[_Mail], ctx: InboundContext) -> None:
        ghost = mails[0].ghost
        try:
            await self._ensure_ghost(ghost, mails[-1].parsed)
        except Exception as e:
            for m in mails:
                m.error = e
            return
        joined: set[str] = set()
        for m in mails:
            if self._stopped:
                m.error = HomeserverUnreachable("stopping")
                continue
            try:
                invite = ctx.invites.get(m.row.id)
                if invite is not None and m.row.token_address is not None:
                    # A reply to an invitation mail: the ghost claims the
                    # invitation (again: idempotent), which invites it; it
                    # joins, then posts.
                    await self.hs.claim_invite(invite[0], invite[1], m.row.token_address, ghost)
                    joined.discard(m.row.room_id)
                if m.row.room_id not in joined:
                    await self._ensure_joined(m.row.room_id, ghost, ctx.memberships.get((m.row.room_id, ghost)))
                    ctx.memberships[(m.row.room_id, ghost)] = "join"
                    joined.add(m.row.room_id)
                for att in m.parsed.attachments:
                    m.mxcs.append(await self.hs.upload(ghost, att.data, att.content_type, att.filename))
            except Exception as e:
                m.error = e

    async def _ensure_ghost(self, ghost: str, parsed: ParsedMail) -> None:
        localpart = ghost[1:].split(":", 1)[0]
        if ghost not in self._registered:
            await self.hs.ensure_registered(localpart)
            if len(self._registered) > 10_000:
                self._registered.clear()
            self._registered.add(ghost)
        name = parsed.display_name[:200]
        if self._displaynames.get(ghost) != name:
            await self.hs.set_displayname(ghost, name)
            if len(self._displaynames) > 10_000:
                self._displaynames.clear()
            self._displaynames[ghost] = name

    async def _post_room(self, mails: list[_Mail], ctx: InboundContext, state: "_RoundState",
                         results: _Results) -> None:
        """Post one room's mails of a batch: each sender's in the order they
        were accepted, senders side by side (POST_CONCURRENCY sends at
        once); a mail that answers (In-Reply-To, References) or repeats the
        Message-ID of one accepted before it in the batch waits until that
        one is posted, so it replies to its event."""
        # Message-IDs posted in this round (not in ctx.known yet); the first
        # event posted for a Message-ID keeps it (as remember_event does).
        posted = state.posted.setdefault(mails[0].row.room_id, {})
        # Each Message-ID of the batch's mails: fired once the first mail
        # with it was posted (or given up).
        owner: dict[str, int] = {}
        for i, m in enumerate(mails):
            if m.parsed.message_id is not None:
                owner.setdefault(m.parsed.message_id, i)
        ready: list[defer.Deferred[None]] = [defer.Deferred() for _ in mails]
        sem = defer.DeferredSemaphore(POST_CONCURRENCY)

        async def one(i: int, m: _Mail) -> None:
            try:
                for mid in ([m.parsed.message_id] if m.parsed.message_id else []) + m.parsed.references[:50]:
                    first = owner.get(mid)
                    if first is not None and first < i:
                        # Only on mails accepted earlier: no two wait for each other.
                        await ready[first]
                if self._stopped:
                    return  # not posted yet: the row stays due
                await sem.acquire()
                try:
                    if m.error is not None:
                        raise m.error
                    await self._post(m, ctx, posted, state, results)
                finally:
                    sem.release()
            except Exception as e:
                self._not_posted(m.row, e, results)
                return
            finally:
                ready[i].callback(None)
            results.finished.append((m.row.id, POSTED, "posted"))

        async def chain(items: list[tuple[int, _Mail]]) -> None:
            for i, m in items:
                await one(i, m)

        by_ghost: dict[str, list[tuple[int, _Mail]]] = {}
        for i, m in enumerate(mails):
            by_ghost.setdefault(m.ghost, []).append((i, m))
        await defer.DeferredList([defer.ensureDeferred(chain(items)) for items in by_ghost.values()],
                                 consumeErrors=True)

    def _not_posted(self, row: InboundMail, e: Exception, results: _Results) -> None:
        # Unexpected errors too: a mail that keeps failing must not spin the
        # loop, it waits (and ends failed) like the rest.
        if not isinstance(e, (HomeserverUnreachable, HomeserverError)):
            logger.error("email bridge: mail %d: unexpected error while posting", row.id,
                         exc_info=(type(e), e, e.__traceback__))
        attempts = row.attempts + 1
        permanent = isinstance(e, HomeserverError) and 400 <= e.status < 500 and e.status != 429
        if attempts >= MAX_ATTEMPTS or (permanent and attempts >= 3):
            logger.warning("email bridge: mail %d failed for good after %d attempt(s): %s", row.id, attempts, e)
            results.finished.append((row.id, FAILED, _reason(e)))
            return
        delay = min(MAX_BACKOFF_MS, MIN_BACKOFF_MS * (2 ** (attempts - 1)))
        logger.info("email bridge: mail %d not posted yet (%s), retrying in %d ms", row.id, _reason(e), delay)
        results.retries.append((row.id, attempts, delay, _reason(e)))

    async def _post(self, m: _Mail, ctx: InboundContext, posted: dict[str, str], state: "_RoundState",
                    results: _Results) -> None:
        row, parsed, ghost = m.row, m.parsed, m.ghost
        reply_to: Optional[str] = row.reply_event
        for mid in parsed.references[:50]:
            found = ctx.known.get((row.room_id, mid)) or posted.get(mid)
            if found is not None:
                reply_to = found
                break
        remembered: list[tuple[str, str, Optional[str]]] = []
        n = 0
        mark = row.auth is not None and row.auth.get("verdict") != "accept"
        if parsed.body or (mark and parsed.attachments):
            content: dict[str, Any] = text_content(parsed)
            if mark and row.auth is not None:
                content = _marked(content, row.auth)
            if reply_to is not None:
                content["m.relates_to"] = {"m.in_reply_to": {"event_id": reply_to}}
            event_id = await self.hs.send(row.room_id, ghost, "m.room.message", content, f"zhome-mail-{row.id}-0")
            remembered.append((row.room_id, event_id, parsed.message_id))
            n += 1
        for i, (att, mxc) in enumerate(zip(parsed.attachments, m.mxcs), start=1):
            msgtype = "m.image" if att.content_type.startswith("image/") else "m.file"
            content = {"msgtype": msgtype, "body": att.filename, "filename": att.filename, "url": mxc,
                       "info": {"mimetype": att.content_type, "size": len(att.data)}}
            event_id = await self.hs.send(row.room_id, ghost, "m.room.message", content, f"zhome-mail-{row.id}-{i}")
            remembered.append((row.room_id, event_id, parsed.message_id if n == 0 else None))
            n += 1
        if (row.auth is not None and row.auth.get("verdict") == "accept" and parsed.from_address in ctx.bouncing
                and parsed.from_address not in state.not_bouncing):
            # Authenticated mail from an address a bounce stopped: its mailbox
            # works again. (Unauthenticated mail could be forged to do this.)
            await self.hs.send(row.room_id, self.settings.bot, "m.room.message", {
                "msgtype": "m.notice", "body": f"Mail from {ghost} arrived again: the bridge mails this participant"
                                              " again."}, f"zhome-unbounce-{row.id}")
            state.not_bouncing.add(parsed.from_address)
            results.not_bouncing.append(parsed.from_address)
        results.remembered.extend(remembered)
        for _room, posted_event, posted_mid in remembered:
            if posted_mid is not None:
                posted.setdefault(posted_mid, posted_event)

    async def _ensure_joined(self, room_id: str, ghost: str, membership: Optional[str]) -> None:
        if membership == "join":
            return
        try:
            await self.hs.join(room_id, ghost)
        except HomeserverError as e:
            if e.status != 403:
                raise
            # Not invited and not public: the bridge's own user (a member,
            # it learnt of the address there) invites the ghost.
            await self.hs.invite(room_id, ghost)
            await self.hs.join(room_id, ghost)
        await self.store.set_membership(room_id, ghost, "join")

    # -- held mail and bounces -----------------------------------------------------------
    async def _tell_of_held_mail(self) -> None:
        for room_id, first in await self.store.rooms_to_tell_of_held_mail():
            if self._stopped:
                return
            try:
                await self.hs.send(room_id, self.settings.bot, "m.room.message",
                                   {"msgtype": "m.notice", "body": HELD_NOTICE}, f"zhome-held-{first}")
            except (HomeserverUnreachable, HomeserverError) as e:
                if not _permanent(e):
                    logger.info("email bridge: could not tell a room of held mail yet: %s", _reason(e))
                    continue
                # Refused for good (the bridge's user left the room, say):
                # not asked again every round.
                logger.info("email bridge: could not tell a room of held mail: %s", _reason(e))
            await self.store.held_notice_sent(room_id)

    async def _bounce(self, row: InboundMail) -> None:
        assert row.raw is not None
        report = parse_report(row.raw)
        if report is None:
            logger.info("email bridge: mail %d to the bounce address is no delivery report: dropped", row.id)
            await self.store.finish_inbound(row.id, IGNORED, "not a delivery report")
            return
        room_id = await self.store.room_of_message_id(report.returned_message_id) \
            if report.returned_message_id else None
        if room_id is None or (row.room_id and room_id != row.room_id):
            # Not about a mail of ours (a forged or stray report).
            await self.store.finish_inbound(row.id, IGNORED, "delivery report for no mail of ours")
            return
        participants = set(await self.store.email_participants(room_id, self.settings.ghost_prefix))
        # To a reply address: only about the participant whose token it is.
        hard = [r for r in report.recipients if r.hard and r.address in participants
                and (row.token_address is None or r.address == row.token_address)]
        if not hard:
            soft = any(r.action == "delayed" or r.status.startswith("4.") for r in report.recipients)
            await self.store.finish_inbound(row.id, IGNORED, "soft bounce" if soft else "delivery report")
            return
        for i, rcpt in enumerate(hard):
            if await self.store.is_bouncing(rcpt.address):
                continue  # told already (a later bounce of mail sent before)
            ghost = f"@{ghost_localpart(self.settings.ghost_prefix, rcpt.address)}:{self.settings.server_name}"
            assert address_of_ghost(self.settings.ghost_prefix, ghost) is not None
            body = (f"Mail to {ghost} bounces (status {rcpt.status}): the bridge sends this participant no more"
                    " mail.")
            try:
                await self.hs.send(room_id, self.settings.bot, "m.room.message",
                                   {"msgtype": "m.notice", "body": body}, f"zhome-bounce-{row.id}-{i}")
            except (HomeserverUnreachable, HomeserverError) as e:
                attempts = row.attempts + 1
                if not _permanent(e) and attempts < MAX_ATTEMPTS:
                    await self.store.retry_inbound_later(
                        row.id, attempts, min(MAX_BACKOFF_MS, MIN_BACKOFF_MS * (2 ** attempts)), _reason(e))
                    return
                # The room cannot be told: the address is stopped all the same.
                logger.info("email bridge: mail %d: a bounce notice could not be posted: %s", row.id, _reason(e))
            # After the notice (sent with a txnId of this row: a retry does
            # not post it twice), so a failure to tell leaves it to retry.
            await self.store.mark_bouncing(rcpt.address, rcpt.status)
        logger.info("email bridge: mail %d was a hard bounce: %d address(es) stopped", row.id, len(hard))
        await self.store.finish_inbound(row.id, IGNORED, "hard bounce")


def _permanent(e: Exception) -> bool:
    return isinstance(e, HomeserverError) and 400 <= e.status < 500 and e.status != 429


def _marked(content: dict[str, Any], auth: dict[str, Any]) -> dict[str, Any]:
    """The visible marker of mail that did not pass the sender checks."""
    import html as html_lib

    out = dict(content)
    out["body"] = f"{UNVERIFIED}\n{content.get('body', '')}"
    formatted = content.get("formatted_body")
    if isinstance(formatted, str):
        out["formatted_body"] = f"<p><em>{html_lib.escape(UNVERIFIED)}</em></p>{formatted}"
    out["org.zhome.email.auth"] = {k: auth.get(k) for k in ("dkim", "spf", "dmarc", "dmarc_policy", "verdict")}
    return out
