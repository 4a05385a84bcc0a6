"""The identity service's protocol: accounts, validation, binding, lookup,
invitations and signing.

Spec: identity-service-api "Authentication", "Terms of service", "Status
check", "Key management", "Association lookup", "Establishing
associations" (email), "Invitation storage", "Ephemeral invitation
signing"; server-server-api "Third-party invites" (``3pid/onbind``, which
the identity service calls on the user's homeserver after a bind).

The service signs with the homeserver's signing key under the identity
server's own name (the host and port of ``public_baseurl``), and makes one
ephemeral ed25519 key per stored invitation.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional
from urllib.parse import quote, urlencode, urlsplit

from signedjson.key import decode_signing_key_base64, encode_signing_key_base64, encode_verify_key_base64, \
    generate_signing_key, get_verify_key
from signedjson.sign import sign_json

from zhome.bridges.email.tokens import ghost_localpart, invite_localpart, normalise_address, verify_invite
from zhome.config import IdentityServiceConfig
from zhome.http.errors import MatrixError
from zhome.identity.http import HttpJsonError, JsonRequest
from zhome.identity.store import IdentityStore
from zhome.mail.mailer import Mailer
from zhome.storage.threepids import ThreepidStore
from zhome.util.ids import is_valid_user_id, server_of

logger = logging.getLogger(__name__)

PREFIX = "/_matrix/identity/v2"
ASSOCIATION_VALIDITY_MS = 100 * 365 * 24 * 3600 * 1000
#: How long the registration link of an invitation mail works.
INVITE_REGISTRATION_LIFETIME_MS = 14 * 24 * 3600 * 1000
REGISTER_PATH = "_zhome/register/invitation"


@dataclass(frozen=True)
class InviteBridge:
    """What the identity service knows of the email bridge (when it is on):
    the key of invitation reply addresses (tokens.invite_key of the bridge's
    as_token), the mail domain and the ghosts' prefix."""

    as_token: str
    key: bytes
    mail_domain: str
    ghost_prefix: str


class IdentityService:
    def __init__(self, store: IdentityStore, threepids: ThreepidStore, config: IdentityServiceConfig,
                 mailer: Optional[Mailer], signing_key: Any, server_name: str, public_baseurl: str,
                 validation_lifetime_ms: int, openid_user: Callable[[str], Awaitable[Optional[str]]],
                 http: Callable[[], JsonRequest], federation_get: Any = None,
                 bridge: Optional[InviteBridge] = None) -> None:
        self.store = store
        self.threepids = threepids
        self.config = config
        self.mailer = mailer
        self.signing_key = signing_key
        self.server_name = server_name
        self.public_baseurl = public_baseurl
        #: The identity server's name: how clients and homeservers name it in id_server.
        self.name = urlsplit(public_baseurl).netloc
        self.validation_lifetime_ms = validation_lifetime_ms
        self.openid_user = openid_user
        self.http = http
        self.federation_get = federation_get
        #: The email bridge: invitation mails offer the reply way too.
        self.bridge = bridge
        #: async room_id -> whether it is a room of this server with
        #: end-to-end encryption (its invitations offer no reply way).
        self.room_encrypted: Optional[Callable[[str], Awaitable[bool]]] = None

    @property
    def key_id(self) -> str:
        return f"{self.signing_key.alg}:{self.signing_key.version}"

    def public_key(self) -> str:
        return str(encode_verify_key_base64(self.signing_key.verify_key))

    def base_url(self) -> str:
        return self.public_baseurl.rstrip("/") + PREFIX

    async def pepper(self) -> str:
        return await self.store.pepper(self.config.lookup_pepper)

    # -- accounts ----------------------------------------------------------------------------
    async def register(self, openid: dict[str, Any]) -> str:
        """An account token for the user an OpenID token names (checked on
        its homeserver: here directly, elsewhere with openid/userinfo)."""
        token, server = openid.get("access_token"), openid.get("matrix_server_name")
        if not isinstance(token, str) or not token or not isinstance(server, str) or not server:
            raise MatrixError(400, "M_MISSING_PARAMS", "access_token and matrix_server_name are required")
        if server == self.server_name:
            user_id = await self.openid_user(token)
        else:
            user_id = await self._remote_openid_user(server, token)
        if user_id is None or not is_valid_user_id(user_id) or server_of(user_id) != server:
            raise MatrixError(401, "M_UNKNOWN_TOKEN", "The OpenID token was not accepted by its homeserver")
        account = "zhi_" + secrets.token_urlsafe(32)
        await self.store.create_account(account, user_id)
        return account

    async def _remote_openid_user(self, server: str, token: str) -> Optional[str]:
        if self.federation_get is None:
            raise MatrixError(403, "M_UNKNOWN", "This identity service does not talk to other homeservers")
        try:
            resp = await self.federation_get(server, "/_matrix/federation/v1/openid/userinfo",
                                             query={"access_token": token}, signed=False, timeout=20)
        except Exception as e:
            logger.info("openid/userinfo on %s failed: %s", server, type(e).__name__)
            return None
        sub = resp.get("sub") if isinstance(resp, dict) else None
        return sub if isinstance(sub, str) else None

    # -- validation --------------------------------------------------------------------------
    async def request_email_token(self, address: str, client_secret: str, send_attempt: int,
                                  next_link: Optional[str]) -> str:
        if self.mailer is None:
            raise MatrixError(400, "M_THREEPID_MEDIUM_NOT_SUPPORTED", "This identity service cannot send mail")
        sid, token = await self.threepids.request_session("is", "email", address, client_secret, send_attempt,
                                                          self.validation_lifetime_ms, next_link)
        if token is not None:
            link = self.base_url() + "/validate/email/submitToken?" + urlencode(
                {"sid": sid, "client_secret": client_secret, "token": token})
            await self.mailer.send_validation(address, token, link, "bind")
        return sid

    async def validated(self, sid: str, client_secret: str) -> dict[str, Any]:
        session = await self.threepids.get_session("is", sid, client_secret)
        if session is None:
            raise MatrixError(404, "M_NO_VALID_SESSION", "No session with this sid and client_secret")
        if session["validated_at"] is None:
            raise MatrixError(400, "M_SESSION_NOT_VALIDATED", "This session has not been validated")
        return session

    # -- associations ------------------------------------------------------------------------
    async def bind(self, sid: str, client_secret: str, mxid: str) -> dict[str, Any]:
        session = await self.validated(sid, client_secret)
        return await self.bind_address(session["medium"], session["address"], mxid)

    async def bind_address(self, medium: str, address: str, mxid: str) -> dict[str, Any]:
        """Bind a validated address to ``mxid`` (replacing an earlier
        binding) and turn its stored invitations into invites (3pid/onbind)."""
        ts = await self.store.bind(medium, address, mxid, await self.pepper())
        association: dict[str, Any] = {"address": address, "medium": medium, "mxid": mxid, "not_before": ts,
                                       "not_after": ts + ASSOCIATION_VALIDITY_MS, "ts": ts}
        invites = await self.store.take_invites(medium, address)
        if invites:
            association["invites"] = [self._signed_invite(i, medium, address, mxid) for i in invites]
        signed = sign_json(dict(association), self.name, self.signing_key)
        await self._notify_homeserver(mxid, signed)
        signed.pop("invites", None)
        return signed

    def _signed_invite(self, invite: dict[str, Any], medium: str, address: str, mxid: str) -> dict[str, Any]:
        signed = sign_json({"mxid": mxid, "token": invite["token"]}, self.name, self.signing_key)
        return {"address": address, "medium": medium, "mxid": mxid, "room_id": invite["room_id"],
                "sender": invite["sender"], "signed": signed}

    async def _notify_homeserver(self, mxid: str, association: dict[str, Any]) -> None:
        """server-server-api "Third-party invites": POST 3pid/onbind on the user's homeserver."""
        if not association.get("invites"):
            return
        server = server_of(mxid)
        base = self.public_baseurl.rstrip("/") if server == self.server_name else f"https://{server}"
        try:
            status, body = await self.http()("PUT", base + "/_matrix/federation/v1/3pid/onbind", association)
        except HttpJsonError as e:
            logger.warning("3pid/onbind on %s failed: %s", server, e)
            return
        if status != 200:
            logger.warning("3pid/onbind on %s answered %d", server, status)

    async def unbind(self, mxid: str, medium: str, address: str) -> bool:
        return await self.store.unbind(medium, address, mxid)

    async def lookup(self, addresses: list[str], algorithm: str, pepper: str) -> dict[str, str]:
        current = await self.pepper()
        if algorithm != "sha256":
            raise MatrixError(400, "M_INVALID_PARAM", "Only the sha256 algorithm is supported",
                              algorithm="sha256", lookup_pepper=current)
        if pepper != current:
            raise MatrixError(400, "M_INVALID_PEPPER", "Unknown or incorrect pepper",
                              algorithm="sha256", lookup_pepper=current)
        return await self.store.lookup(addresses)

    # -- invitations -------------------------------------------------------------------------
    async def store_invite(self, medium: str, address: str, room_id: str, sender: str,
                           extra: dict[str, Any]) -> dict[str, Any]:
        if await self.store.mxid_for(medium, address) is not None:
            raise MatrixError(400, "M_THREEPID_IN_USE", "This address is bound to a Matrix user: invite them")
        # Lower-case hex: it also goes into a reply address (tokens.invite_localpart).
        token = secrets.token_hex(16)
        ephemeral = generate_signing_key("0")
        public = str(encode_verify_key_base64(get_verify_key(ephemeral)))
        await self.store.store_invite(token, medium, address, room_id, sender,
                                      str(encode_signing_key_base64(ephemeral)), public)
        local, domain = address.split("@", 1)
        display = f"{local[:3]}...@{domain}"
        if self.mailer is not None:
            inviter = extra.get("sender_display_name") or sender
            room = extra.get("room_name") or extra.get("room_alias") or "a room"
            link = self.config.invite_client_location + "#/room/" + quote(room_id, safe="!:")
            reg_token = secrets.token_urlsafe(32)
            await self.store.add_registration_token(reg_token, medium, address, token, room_id,
                                                    INVITE_REGISTRATION_LIFETIME_MS)
            register_link = self.public_baseurl.rstrip("/") + "/" + REGISTER_PATH + "?" + urlencode(
                {"t": reg_token})
            reply_to = None
            # The bridge cannot read an encrypted room: no reply way there
            # (zhome/rooms/email_participants.py refuses its ghost too).
            encrypted = self.room_encrypted is not None and await self.room_encrypted(room_id)
            if self.bridge is not None and not encrypted:
                local_reply = invite_localpart(self.bridge.key, token, address)
                if local_reply is not None:
                    reply_to = f"{local_reply}@{self.bridge.mail_domain}"
            await self.mailer.send_invitation(address, str(inviter), str(room), link, reply_to=reply_to,
                                              register_link=register_link, encrypted=encrypted)
        base = self.base_url()
        return {
            "token": token, "display_name": display,
            "public_keys": [
                {"public_key": self.public_key(), "key_validity_url": base + "/pubkey/isvalid"},
                {"public_key": public, "key_validity_url": base + "/pubkey/ephemeral/isvalid"},
            ],
        }

    # -- invitations by email: the reply way --------------------------------------------------
    async def claim_invite(self, token: str, mac: str, address: str, user_id: str) -> str:
        """The email bridge's ghost of ``address`` claims the invitation
        ``token`` (a reply to its invitation mail): the address is bound to
        the ghost (it counts as validated: the mail came from the address
        the invitation was sent to, to a reply address only it received),
        which turns the invitation into the ghost's invite. Returns the
        room ID. Claiming again (a retried mail) answers the same."""
        bridge = self.bridge
        if bridge is None:
            raise MatrixError(404, "M_UNRECOGNIZED", "The email bridge is not on")
        address = normalise_address(address)
        if user_id != f"@{ghost_localpart(bridge.ghost_prefix, address)}:{self.server_name}":
            raise MatrixError(403, "M_FORBIDDEN", "user_id is not the ghost of this address")
        if not verify_invite(bridge.key, token, mac, address):
            raise MatrixError(403, "M_FORBIDDEN", "The invitation token does not verify for this address")
        bound = await self.store.mxid_for("email", address)
        if bound is not None and bound != user_id:
            raise MatrixError(409, "M_THREEPID_IN_USE", "This address is bound to a Matrix user")
        claimed = await self.store.claim(token)
        if claimed is not None:
            if claimed[1] != user_id:
                raise MatrixError(403, "M_FORBIDDEN", "The invitation was claimed by another user")
            room_id = claimed[0]
        else:
            row = await self.store.invite_row(token)
            if row is None or row[0] != "email" or row[1] != self.threepids.index("email", address):
                raise MatrixError(404, "M_NOT_FOUND", "No such pending invitation for this address")
            room_id = row[2]
            await self.store.record_claim(token, room_id, user_id)
        if bound != user_id or await self.store.invite_row(token) is not None:
            # Bound now (again after a crash in between: what is left is taken).
            await self.bind_address("email", address, user_id)
        return room_id

    async def sign_ed25519(self, mxid: str, token: str, private_key: str) -> dict[str, Any]:
        try:
            key = decode_signing_key_base64("ed25519", "0", private_key)
        except Exception:
            raise MatrixError(400, "M_INVALID_PARAM", "private_key is not an unpadded base64 ed25519 key") from None
        stored = await self.store.invite_private_key(token)
        if stored is None:
            raise MatrixError(404, "M_UNRECOGNIZED", "Unknown invitation token")
        if stored != private_key:
            raise MatrixError(403, "M_FORBIDDEN", "The key is not this invitation's")
        rows = await self.store.db.execute("identity_invite_sender", "SELECT sender FROM identity_invites"
                                           " WHERE token = ?", token)
        sender = rows[0][0] if rows else ""
        return sign_json({"mxid": mxid, "sender": sender, "token": token}, self.name, key)


def now_ms() -> int:
    return int(time.time() * 1000)
