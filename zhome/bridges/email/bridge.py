"""Wiring of the email bridge, in the homeserver's process or its own.

Spec: application-service-api. Room addresses come from the room state
event ``org.zhome.email_address`` (``{"localpart": ..., "policy":
"email_participants" | "authenticated"}``), which only users with the
power to send state events (the room's admins) can set; the bridge sees it
in its transactions once its own user (invited by them) is in the room.

Policies: ``authenticated`` takes mail from any sender that passes the
sender checks; ``email_participants`` takes mail only from addresses whose
ghost is joined or invited. The optional ``"unauthenticated": "reject" |
"quarantine" | "mark"`` (default ``mark``) says what happens to mail whose
DMARC check fails at a domain that does not itself ask for rejection
(senderauth.py; an unknown value counts as ``mark``); mail to a signed
reply address follows its room's policy.

Bounces: delivery reports (RFC 3464) come to the bridge's own envelope
sender address (``from_address``, when it is at ``mail_domain``) or, with
the null sender, to a reply address; they are accepted and handed to the
processor, which never posts them (bounces.py).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.mail import smtp as tw_smtp
from twisted.python.threadpool import ThreadPool
from twisted.web import server as web_server

from zhome.bridges.email.appservice import AppServiceResource
from zhome.bridges.email.hsclient import HomeserverClient, HomeserverError, HomeserverUnreachable
from zhome.bridges.email.compose import DkimSigner
from zhome.bridges.email.outbound import OutboundMailer, OutboundSettings
from zhome.bridges.email.processor import InboundProcessor, ProcessorSettings
from zhome.bridges.email.registration import BridgeRegistration, ensure_registration
from zhome.bridges.email import senderauth
from zhome.bridges.email.ratelimit import SenderLimits
from zhome.bridges.email.smtp import Refused, BridgeSMTPFactory, Envelope, Target
from zhome.bridges.email.store import BridgeStore, open_bridge_database
from zhome.bridges.email.tokens import (
    address_of_ghost, ghost_localpart, invite_key, normalise_address, parse_invite_localpart, parse_reply_localpart,
    verify_invite, verify_reply,
)
from zhome.config import EmailBridgeConfig, EmailConfig, split_host_port
from zhome.mail.compose import envelope_address
from zhome.mail.outbox import MailOutbox, Relay
from zhome.mail.outbox import ensure_schema as ensure_outbox_schema
from zhome.mail.smtp import SmtpRelay
from zhome.storage.at_rest import Sealer
from zhome.storage.ids import IdGenerator
from zhome.storage.database import Database
from zhome.util.reactor import reactor

logger = logging.getLogger(__name__)

ADDRESS_EVENT = "org.zhome.email_address"
POLICIES = ("email_participants", "authenticated")
#: Check results kept for the other recipients of the same mail.
_AUTH_MEMO = 32
_ROOM_LOCALPART = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


@dataclass(frozen=True)
class InviteTarget(Target):
    """A recipient that is an invitation's reply address."""

    invite_token: str = ""
    mac: str = ""
    address: str = ""


class EmailBridge:
    def __init__(self, cfg: EmailBridgeConfig, server_name: str, registration: BridgeRegistration,
                 store: BridgeStore, hs: HomeserverClient, processor: InboundProcessor, secret: bytes,
                 sealer: Optional[Sealer] = None, outbound: Optional[OutboundMailer] = None) -> None:
        assert cfg.mail_domain is not None
        self.cfg = cfg
        self.mail_domain = cfg.mail_domain
        self.server_name = server_name
        self.registration = registration
        self.store = store
        self.hs = hs
        self.processor = processor
        self.secret = secret
        self.sealer = sealer
        self.outbound = outbound
        self.bot = f"@{registration.sender_localpart}:{server_name}"
        self.dns = senderauth.Resolver(cfg.dns_servers)
        self.limits = SenderLimits(cfg.sender_rate_per_minute, cfg.sender_burst, cfg.client_ip_rate_per_minute,
                                   cfg.client_ip_burst)
        #: Where delivery reports for our outbound mail come (its envelope sender).
        self.bounce_address = outbound.s.from_address.lower() if outbound is not None else None
        self._auth_memo: dict[tuple[bytes, Envelope], senderauth.AuthResult] = {}
        # Sender checks block on DNS: in threads of their own (a few, so a
        # flood waits its turn there and no other component's threads are
        # taken).
        self._check_pool = ThreadPool(minthreads=0, maxthreads=4, name="zhome-email-senderauth")
        self._ports: list[Any] = []
        self._background: set[defer.Deferred[None]] = set()

    @classmethod
    async def create(cls, cfg: EmailBridgeConfig, server_name: str, data_dir: str, *,
                     seal: bool = True, relay: Optional[Relay] = None,
                     from_address: Optional[str] = None, public_baseurl: Optional[str] = None) -> "EmailBridge":
        """``relay`` and ``from_address``: where mail to email participants
        goes and whose address it is from; none: no outbound mail.
        ``public_baseurl``: where the links in that mail point (default:
        ``homeserver_url``)."""
        registration = ensure_registration(cfg, server_name)
        assert cfg.database_path is not None and cfg.homeserver_url is not None and cfg.mail_domain is not None
        os.makedirs(os.path.dirname(cfg.database_path), exist_ok=True)
        db = open_bridge_database(cfg)
        # A key ring and key store of the bridge's own, beside its database.
        sealer = Sealer(os.path.join(data_dir, "email_bridge_encryption.key"),
                        os.path.join(data_dir, "email_bridge_keystore.db"), enabled=seal)
        store = BridgeStore(db, sealer)
        await store.setup()
        hs = HomeserverClient(cfg.homeserver_url, registration.as_token, server_name)
        processor = InboundProcessor(store, hs, ProcessorSettings(
            server_name, cfg.mail_domain, cfg.ghost_prefix, bot=f"@{registration.sender_localpart}:{server_name}"))
        secret = await store.secret()
        outbound = None
        if relay is not None and from_address is not None:
            await ensure_outbox_schema(db)
            outbox = MailOutbox(db, await IdGenerator.from_table(db, "mail_outbox", "id"), sealer if seal else None,
                                relay, owner="zhome:email_bridge:outbox")
            outbound = OutboundMailer(store, hs, outbox, secret, OutboundSettings(
                mail_domain=cfg.mail_domain, from_address=from_address, quiet_period_ms=cfg.quiet_period_ms,
                ghost_prefix=cfg.ghost_prefix, server_name=server_name,
                public_baseurl=public_baseurl or cfg.homeserver_url, as_token=registration.as_token,
                max_attachment_size=cfg.max_attachment_size, max_attachments_total=cfg.max_attachments_total,
                link_lifetime_ms=cfg.download_link_lifetime_ms,
                bot=f"@{registration.sender_localpart}:{server_name}"), dkim_signer(cfg, from_address))
        return cls(cfg, server_name, registration, store, hs, processor, secret, sealer, outbound)

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        as_host, as_port = split_host_port(self.cfg.appservice_listen)
        site = web_server.Site(AppServiceResource(self.registration.hs_token, self.on_event, self.query_user))
        site.noisy = False
        self._ports.append(reactor.listenTCP(as_port, site, interface=as_host))
        host, port = split_host_port(self.cfg.smtp_listen)
        self._ports.append(reactor.listenTCP(port, BridgeSMTPFactory(
            self.mail_domain, self, self.accept, self.cfg.max_mail_size, admit=self.limits.admit,
            tls_context=self._tls_context()), interface=host))
        if self.cfg.lmtp_listen:
            host, port = split_host_port(self.cfg.lmtp_listen)
            self._ports.append(reactor.listenTCP(port, BridgeSMTPFactory(
                self.mail_domain, self, self.accept, self.cfg.max_mail_size, lmtp=True, admit=self.limits.admit),
                interface=host))
        self._check_pool.start()
        self.processor.start()
        if self.outbound is not None:
            self.outbound.outbox.start()
            self.outbound.start()
        logger.info("email bridge listening (SMTP %s%s)", self.cfg.smtp_listen,
                    f", LMTP {self.cfg.lmtp_listen}" if self.cfg.lmtp_listen else "")

    def _tls_context(self) -> Any:
        """The STARTTLS context of the SMTP listener; None without a certificate."""
        if not self.cfg.tls_certificate_path or not self.cfg.tls_private_key_path:
            return None
        from zhome.federation.tls import server_context_factory

        return server_context_factory(self.cfg.tls_certificate_path, self.cfg.tls_private_key_path)

    async def stop(self) -> None:
        for port in self._ports:
            await port.stopListening()
        self._ports = []
        if self._check_pool.started:
            self._check_pool.stop()
        await self.processor.stop()
        if self.outbound is not None:
            await self.outbound.stop()
            await self.outbound.outbox.stop()
        for d in list(self._background):
            try:
                await d
            except Exception:
                pass
        await self.hs.close()
        await self.store.db.close()
        if self.sealer is not None:
            self.sealer.close()

    # -- SMTP: recipients and accepted mail ------------------------------------------------
    async def resolve(self, localpart: str, domain: str, mail_from: str) -> Optional[Target]:
        if domain != self.mail_domain:
            return None
        if self.bounce_address is not None and f"{localpart}@{domain}" == self.bounce_address:
            # Only a delivery report is taken here (checked after DATA).
            return Target("", bounce=True)
        token = parse_reply_localpart(localpart)
        if token is not None:
            n, mac = token
            known = await self.store.event_by_number(n)
            if known is None:
                return None
            room_id, event_id = known
            if not mail_from:
                # The null sender: a delivery report about mail sent with
                # this reply address. The token must be one of the room's
                # participants'; the report is taken for that one only.
                for address in await self.store.email_participants(room_id, self.cfg.ghost_prefix):
                    if verify_reply(self.secret, mac, room_id, event_id, address):
                        return Target(room_id, event_id, normalise_address(address), bounce=True)
                return None
            if not verify_reply(self.secret, mac, room_id, event_id, mail_from):
                return None
            await self._refuse_if_encrypted(room_id)
            return Target(room_id, event_id, normalise_address(mail_from),
                          unauthenticated=await self.store.room_auth_policy(room_id))
        invite = parse_invite_localpart(localpart)
        if invite is not None:
            return await self._resolve_invite(invite[0], invite[1], mail_from)
        found = await self.store.room_for_localpart(localpart)
        if found is None:
            return None
        room_id, policy = found
        if policy == "email_participants":
            if not mail_from:
                return None
            ghost = f"@{ghost_localpart(self.cfg.ghost_prefix, mail_from)}:{self.server_name}"
            if await self.store.membership(room_id, ghost) not in ("join", "invite"):
                return None
        await self._refuse_if_encrypted(room_id)
        return Target(room_id, unauthenticated=await self.store.room_auth_policy(room_id))

    async def _refuse_if_encrypted(self, room_id: str) -> None:
        if await self.store.is_encrypted(room_id):
            # Posting it in the clear would undo the room's encryption.
            raise Refused(550, "5.7.1 This room is end-to-end encrypted: mail cannot be posted there")

    async def check_sender(self, raw: bytes, envelope: Envelope) -> senderauth.AuthResult:
        import hashlib

        key = (hashlib.sha256(raw).digest(), envelope)
        memo = self._auth_memo.get(key)
        if memo is not None:
            return memo
        try:
            result: senderauth.AuthResult = await deferToThreadPool(
                reactor, self._check_pool, senderauth.check, self.dns, raw, client_ip=envelope.client_ip, mail_from=envelope.mail_from,
                helo=envelope.helo, run_spf=not envelope.lmtp)
        except senderauth.TemporaryFailure:
            logger.info("email bridge: sender checks got no DNS answer; the sender is asked to retry")
            raise tw_smtp.SMTPServerError(451, "4.4.3 Sender checks could not be done, try again later") from None
        self._auth_memo[key] = result
        while len(self._auth_memo) > _AUTH_MEMO:
            self._auth_memo.pop(next(iter(self._auth_memo)))
        return result

    async def accept(self, target: Target, raw: bytes, envelope: Optional[Envelope] = None) -> int:
        if envelope is None:
            envelope = Envelope("", "", "")
        result = await self.check_sender(raw, envelope)
        if isinstance(target, InviteTarget):
            # An invitation's reply: the invitee's own address (the MAC says
            # so) unless its domain's DMARC policy refuses this mail.
            if senderauth.decide(result, "mark") == senderauth.REJECT:
                raise tw_smtp.SMTPServerError(550, "5.7.1 Sender authentication (DMARC) failed")
            row_id = await self.store.add_invite_reply(target.room_id, target.address, target.invite_token,
                                                       target.mac, raw)
            self.processor.kick()
            return row_id
        verdict = senderauth.decide(result, "mark" if target.bounce else target.unauthenticated)
        logger.info("email bridge: sender checks dkim=%s spf=%s dmarc=%s: %s", result.dkim, result.spf,
                    result.dmarc, verdict)
        if verdict == senderauth.REJECT:
            raise tw_smtp.SMTPServerError(550, "5.7.1 Sender authentication (DMARC) failed")
        auth = dict(result.as_dict(), verdict=verdict)
        row_id = await self.store.add_inbound(target.room_id, target.reply_event, target.token_address, raw,
                                              auth=auth, held=verdict == senderauth.QUARANTINE,
                                              bounce=target.bounce)
        self.processor.kick()
        return row_id

    async def _resolve_invite(self, invite_token: str, mac: str, mail_from: str) -> Optional[Target]:
        """An invitation's reply address: valid only from the invited
        address (the MAC says which); the homeserver names the room (a
        dry claim would be one more endpoint: the claim itself is
        idempotent and is made later, before posting)."""
        if not mail_from or not verify_invite(invite_key(self.registration.as_token), invite_token, mac, mail_from):
            return None
        address = normalise_address(mail_from)
        ghost = f"@{ghost_localpart(self.cfg.ghost_prefix, address)}:{self.server_name}"
        try:
            await self.hs.ensure_registered(ghost_localpart(self.cfg.ghost_prefix, address))
            room_id = await self.hs.claim_invite(invite_token, mac, address, ghost)
        except (HomeserverError, HomeserverUnreachable) as e:
            logger.info("email bridge: an invitation reply address was refused: %s", e)
            return None
        return InviteTarget(room_id, None, address, invite_token=invite_token, mac=mac, address=address)

    # -- AS transactions ---------------------------------------------------------------
    async def on_event(self, event: dict[str, Any]) -> None:
        etype, room_id = event.get("type"), event.get("room_id")
        content = event.get("content")
        if not isinstance(room_id, str) or not isinstance(content, dict):
            return
        state_key = event.get("state_key")
        if etype == "m.room.member" and isinstance(state_key, str):
            membership = content.get("membership")
            if not isinstance(membership, str):
                return
            if state_key == self.bot and membership == "invite":
                self._in_background(self._join_bot(room_id))
            elif state_key == self.bot and membership in ("leave", "ban"):
                # Out of the room: it can no longer post there.
                await self.store.set_room_address(room_id, None, "")
            elif address_of_ghost(self.cfg.ghost_prefix, state_key) is not None:
                await self.store.set_membership(room_id, state_key, membership)
        elif etype == ADDRESS_EVENT and state_key == "":
            await self._address_event(room_id, content)
        elif etype == "m.room.encryption" and state_key == "":
            await self._room_encrypted(room_id)
        elif etype == "m.room.message" and isinstance(event.get("event_id"), str):
            sender = event.get("sender")
            # A ghost's message (a participant's mail) goes to the other
            # email participants; outbound leaves it out of its sender's mail.
            if self.outbound is not None and isinstance(sender, str) and sender != self.bot:
                await self.outbound.queue(event, remember=True)
            else:
                await self.store.remember_event(room_id, str(event["event_id"]))

    async def _room_encrypted(self, room_id: str) -> None:
        """The room turned end-to-end encryption on: the bridge cannot read
        it any more. Its email participants are told, by a notice in the
        room and by mail, and mail to the room is refused from now on."""
        if not await self.store.set_encrypted(room_id):
            return
        participants = await self.store.email_participants(room_id, self.cfg.ghost_prefix)
        if not participants:
            return
        body = (f"This room is now end-to-end encrypted. The {len(participants)} "
                f"{'person' if len(participants) == 1 else 'people'} taking part by email can no longer get its "
                "messages or post to it; to go on, they need a Matrix account.")
        content = {"msgtype": "m.notice", "body": body}
        try:
            event_id = await self.hs.send(room_id, self.bot, "m.room.message", content,
                                          f"zhome-encrypted-{room_id}")
        except (HomeserverError, HomeserverUnreachable) as e:
            logger.info("email bridge: could not tell a room it is encrypted now: %s", e)
            return
        if self.outbound is not None:
            # The bot's own messages are not mailed; this one is, so the
            # participants learn why mail stops.
            await self.outbound.queue({"room_id": room_id, "event_id": event_id, "sender": self.bot,
                                       "type": "m.room.message", "content": content})

    async def query_user(self, user_id: str) -> bool:
        """A ghost the homeserver asks about exists once it is registered."""
        address = address_of_ghost(self.cfg.ghost_prefix, user_id)
        if (address is None or not user_id.endswith(":" + self.server_name) or address.count("@") != 1
                or ghost_localpart(self.cfg.ghost_prefix, address) != user_id[1:].split(":", 1)[0]):
            return False
        local, _, domain = address.partition("@")
        if not local or "." not in domain:
            return False
        try:
            await self.hs.ensure_registered(ghost_localpart(self.cfg.ghost_prefix, address))
        except Exception as e:
            logger.info("email bridge: could not register a queried ghost: %s", e)
            return False
        return True

    async def _address_event(self, room_id: str, content: dict[str, Any]) -> None:
        localpart = content.get("localpart")
        policy = content.get("policy", "email_participants")
        if localpart is None:
            await self.store.set_room_address(room_id, None, "")
            await self.store.set_room_auth_policy(room_id, None)
            return
        if (not isinstance(localpart, str) or not _ROOM_LOCALPART.fullmatch(localpart.lower())
                or localpart.lower().startswith("reply") or policy not in POLICIES):
            logger.info("email bridge: ignoring an invalid %s in a room", ADDRESS_EVENT)
            return
        unauthenticated = content.get("unauthenticated", "mark")
        if unauthenticated not in senderauth.ROOM_POLICIES:
            logger.info("email bridge: ignoring an invalid unauthenticated policy in a room")
            unauthenticated = "mark"
        if not await self.store.set_room_address(room_id, localpart.lower(), str(policy)):
            logger.info("email bridge: a room asked for an address another room has")
            return
        await self.store.set_room_auth_policy(room_id, str(unauthenticated))

    def _in_background(self, coro: Any) -> None:
        d = defer.ensureDeferred(coro)
        self._background.add(d)

        def done(result: Any) -> None:
            self._background.discard(d)

        d.addBoth(done)

    async def _join_bot(self, room_id: str) -> None:
        try:
            await self.hs.join(room_id)
        except Exception as e:
            logger.info("email bridge: could not join a room it was invited to: %s", e)
            return
        try:
            await self.hs.state_event(room_id, "m.room.encryption", "")
            # Encrypted before the bridge came: no mail is posted there.
            await self.store.set_encrypted(room_id)
        except HomeserverError as e:
            if e.status != 404:
                logger.info("email bridge: could not read a room's encryption: %s", e)
        except HomeserverUnreachable as e:
            logger.info("email bridge: could not read a room's encryption: %s", e)
        # An address set before the bridge was in the room came in no
        # transaction of ours: read it from the room's state.
        try:
            content = await self.hs.state_event(room_id, ADDRESS_EVENT, "")
        except HomeserverError as e:
            if e.status != 404:
                logger.info("email bridge: could not read a room's address: %s", e)
            return
        except HomeserverUnreachable as e:
            logger.info("email bridge: could not read a room's address: %s", e)
            return
        await self._address_event(room_id, content)


def dkim_signer(cfg: EmailBridgeConfig, from_address: str) -> Optional[DkimSigner]:
    """The signer of outbound mail (its key read once), or None: unsigned."""
    if cfg.dkim_key_path is None:
        logger.info("email bridge: no dkim_key_path: outbound mail is not DKIM-signed")
        return None
    domain = from_address.rsplit("@", 1)[-1]
    try:
        return DkimSigner.from_file(cfg.dkim_key_path, cfg.dkim_selector, domain)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"email_bridge.dkim_key_path: cannot load the key ({type(e).__name__})") from None


def relay_settings(email_cfg: Optional[EmailConfig]) -> dict[str, Any]:
    """The outbound relay and From address: the ``email`` section's (the
    relay zhome's own mail goes through); none: no outbound mail."""
    if email_cfg is None:
        return {}
    return {"relay": SmtpRelay.from_config(email_cfg), "from_address": envelope_address(email_cfg.notif_from)}


def run_standalone(cfg: EmailBridgeConfig, server_name: str, data_dir: str, seal: bool,
                   relay: Optional[Relay] = None, from_address: Optional[str] = None,
                   public_baseurl: Optional[str] = None) -> int:
    """``zhome bridge-email``: the bridge in a process of its own."""
    bridge: list[EmailBridge] = []
    code = [0]

    async def start() -> None:
        try:
            b = await EmailBridge.create(cfg, server_name, data_dir, seal=seal, relay=relay,
                                         from_address=from_address, public_baseurl=public_baseurl)
            b.start()
            bridge.append(b)
        except Exception as e:
            logger.error("email bridge start-up failed: %s", e)
            code[0] = 1
            reactor.stop()

    async def shutdown() -> None:
        if bridge:
            await bridge[0].stop()

    reactor.callWhenRunning(lambda: defer.ensureDeferred(start()))
    reactor.addSystemEventTrigger("before", "shutdown", lambda: defer.ensureDeferred(shutdown()))
    reactor.run()
    return code[0]
