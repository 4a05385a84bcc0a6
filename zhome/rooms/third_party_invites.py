"""Third-party invites: inviting by email address.

Spec: client-server-api "Third-party invites" (``POST /rooms/{roomId}/invite``
with ``id_server``, ``id_access_token``, ``medium``, ``address``): the
homeserver looks the address up on the identity server; a bound address is
an ordinary invite of that user, otherwise the identity server stores the
invitation and the homeserver sends ``m.room.third_party_invite`` (state
key: the invitation's token). server-server-api "Third-party invites"
(``PUT 3pid/onbind``): when the address is bound later, the identity server
hands the signed invitations to the user's homeserver, which sends the
``m.room.member`` invite carrying ``third_party_invite.signed``, which the
auth rules check against the public keys of the room's
``m.room.third_party_invite`` event.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from zhome.http.errors import MatrixError, bad_json, forbidden, missing_param
from zhome.identity.client import IdentityClient
from zhome.storage.threepids import normalise_email
from zhome.util.ids import is_valid_user_id, server_of

logger = logging.getLogger(__name__)

#: Invitations one onbind call may carry.
MAX_ONBIND_INVITES = 100


class ThirdPartyInvites:
    def __init__(self, server_name: str, identity: IdentityClient, membership: Any, event_creator: Any,
                 events: Any, accounts: Any, federation_put: Any = None) -> None:
        self.server_name = server_name
        #: PUT over federation (exchange_third_party_invite); None without federation.
        self.federation_put = federation_put
        self.identity = identity
        self.membership = membership
        self.event_creator = event_creator
        self.events = events
        self.accounts = accounts

    async def _state_content(self, room_id: str, etype: str, state_key: str = "") -> dict[str, Any]:
        eid = await self.events.get_current_state_event_id(room_id, etype, state_key)
        ev = await self.events.get_event(eid) if eid else None
        return dict(ev.content) if ev is not None and isinstance(ev.content, dict) else {}

    @staticmethod
    def check_params(body: Any) -> tuple[str, str, str, str]:
        """(id_server, id_access_token, medium, normalised address) of an
        invite by 3PID, or the Matrix error for bad ones."""
        if not isinstance(body, dict):
            raise bad_json("a third-party invite must be an object")
        id_server, token = body.get("id_server"), body.get("id_access_token")
        medium, address = body.get("medium"), body.get("address")
        if not isinstance(id_server, str) or not id_server:
            raise missing_param("Missing id_server")
        if len(id_server) > 255 or "/" in id_server or "@" in id_server or any(c.isspace() for c in id_server):
            raise MatrixError(400, "M_INVALID_PARAM", "id_server must be a server name")
        if not isinstance(token, str) or not token:
            raise missing_param("Missing id_access_token")
        if not isinstance(medium, str) or not isinstance(address, str):
            raise bad_json("'medium' and 'address' must be strings")
        if medium != "email":
            raise MatrixError(400, "M_THREEPID_MEDIUM_NOT_SUPPORTED", "Only email invitations are supported")
        addr = normalise_email(address)
        if addr is None:
            raise MatrixError(400, "M_INVALID_PARAM", "Not a valid email address")
        return id_server, token, medium, addr

    async def invite(self, sender: str, room_id: str, body: dict[str, Any]) -> None:
        id_server, token, medium, addr = self.check_params(body)
        if await self.membership.current_membership(room_id, sender) != "join":
            raise forbidden("You are not in this room")
        mxid = await self.identity.lookup(id_server, token, medium, addr)
        if mxid is not None:
            await self.membership.update(sender, mxid, room_id, "invite")
            return
        name = (await self._state_content(room_id, "m.room.name")).get("name")
        join_rule = (await self._state_content(room_id, "m.room.join_rules")).get("join_rule")
        alias = (await self._state_content(room_id, "m.room.canonical_alias")).get("alias")
        profile = await self.accounts.get_profile(sender) or {}
        request: dict[str, Any] = {"medium": medium, "address": addr, "room_id": room_id, "sender": sender}
        for key, value in (("room_name", name), ("room_join_rules", join_rule), ("room_alias", alias),
                           ("sender_display_name", profile.get("displayname")),
                           ("sender_avatar_url", profile.get("avatar_url"))):
            if isinstance(value, str):
                request[key] = value
        stored = await self.identity.store_invite(id_server, token, request)
        keys = stored["public_keys"]
        display = stored.get("display_name") if isinstance(stored.get("display_name"), str) else "an email address"
        content = {"display_name": display, "public_keys": keys, "public_key": keys[0]["public_key"],
                   "key_validity_url": keys[0].get("key_validity_url", "")}
        await self.event_creator.send(room_id, "m.room.third_party_invite", sender, content,
                                      state_key=stored["token"])

    async def on_bind(self, body: dict[str, Any]) -> None:
        """Turn the invitations of a newly bound address into invites."""
        invites = body.get("invites")
        mxid = body.get("mxid")
        if not isinstance(mxid, str) or not is_valid_user_id(mxid):
            raise bad_json("'mxid' must be a user ID")
        if server_of(mxid) != self.server_name:
            raise forbidden("The user is not on this server")
        if not isinstance(invites, list) or len(invites) > MAX_ONBIND_INVITES:
            raise bad_json("'invites' must be a list")
        failed: Optional[MatrixError] = None
        for invite in invites:
            if not isinstance(invite, dict):
                continue
            try:
                await self._invite_from_bind(mxid, invite)
            except MatrixError as e:
                logger.info("3pid/onbind: an invitation was not turned into an invite: %s %s", e.errcode, e.msg)
                failed = failed or e
        if failed is not None:
            # The identity server learns that (at least one) invitation failed.
            raise MatrixError(failed.code if 400 <= failed.code < 500 else 403, failed.errcode, failed.msg)

    async def check_signed(self, tpi: dict[str, Any], signed: dict[str, Any]) -> None:
        """The signature of ``signed`` must be by one of the invitation's
        public keys, and that key still valid at its key_validity_url
        (client-server-api "Third-party invites": the homeserver checks the
        key is not revoked)."""
        from canonicaljson import encode_canonical_json
        from nacl.exceptions import BadSignatureError
        from nacl.signing import VerifyKey
        from unpaddedbase64 import decode_base64

        from zhome.identity.http import HttpJsonError

        entries: list[dict[str, Any]] = [e for e in tpi.get("public_keys") or [] if isinstance(e, dict)]
        if isinstance(tpi.get("public_key"), str):
            entries.append({"public_key": tpi["public_key"], "key_validity_url": tpi.get("key_validity_url")})
        sigs = signed.get("signatures")
        message = encode_canonical_json({k: v for k, v in signed.items() if k not in ("signatures", "unsigned")})
        matched: Optional[dict[str, Any]] = None
        for by_key in (sigs.values() if isinstance(sigs, dict) else []):
            for sig in (by_key.values() if isinstance(by_key, dict) else []):
                for entry in entries:
                    try:
                        VerifyKey(decode_base64(entry["public_key"])).verify(message, decode_base64(sig))
                    except (BadSignatureError, ValueError, TypeError, KeyError):
                        continue
                    matched = entry
                    break
                if matched:
                    break
            if matched:
                break
        if matched is None:
            raise forbidden("the invitation is not signed by any of its public keys")
        url = matched.get("key_validity_url")
        if not isinstance(url, str) or not url.startswith(("https://", "http://")):
            return  # no validity URL to ask: the signature is what there is
        from urllib.parse import quote

        sep = "&" if "?" in url else "?"
        try:
            status, body = await self.identity.http()("GET", url + sep + "public_key=" + quote(matched["public_key"]))
        except HttpJsonError:
            raise forbidden("the identity server that signed the invitation cannot be reached") from None
        if status != 200 or not isinstance(body, dict) or body.get("valid") is not True:
            raise forbidden("the invitation's key is no longer valid")

    async def _invite_from_bind(self, mxid: str, invite: dict[str, Any]) -> None:
        room_id, sender, signed = invite.get("room_id"), invite.get("sender"), invite.get("signed")
        if not isinstance(room_id, str) or not isinstance(sender, str) or not isinstance(signed, dict):
            raise bad_json("invite lacks room_id, sender or signed")
        if signed.get("mxid") != mxid or invite.get("mxid", mxid) != mxid:
            raise forbidden("the invitation is for another user")
        token = signed.get("token")
        if not isinstance(token, str):
            raise bad_json("signed lacks token")
        if server_of(sender) != self.server_name:
            await self._exchange(mxid, room_id, sender, signed, invite)
            return
        tpi = await self._state_content(room_id, "m.room.third_party_invite", token)
        if not tpi:
            raise forbidden("the room has no such third-party invitation")
        await self.check_signed(tpi, signed)
        display: Optional[str] = tpi.get("display_name") if isinstance(tpi.get("display_name"), str) else None
        third_party: dict[str, Any] = {"signed": signed, "display_name": display or "an email address"}
        await self.membership.update(sender, mxid, room_id, "invite", extra={"third_party_invite": third_party})

    async def _exchange(self, mxid: str, room_id: str, sender: str, signed: dict[str, Any],
                        invite: dict[str, Any]) -> None:
        """server-server-api "Third-party invites": the inviter's server makes
        the invite (PUT exchange_third_party_invite/{roomId})."""
        from urllib.parse import quote

        if self.federation_put is None:
            raise MatrixError(403, "M_FORBIDDEN", "Federation is off: the invitation's room is elsewhere")
        display = invite.get("display_name") if isinstance(invite.get("display_name"), str) else None
        body = {"type": "m.room.member", "room_id": room_id, "sender": sender, "state_key": mxid,
                "content": {"membership": "invite",
                            "third_party_invite": {"display_name": display or "an email address",
                                                   "signed": signed}}}
        from zhome.federation.transport import FederationError

        try:
            await self.federation_put(server_of(sender), "/_matrix/federation/v1/exchange_third_party_invite/"
                                      + quote(room_id, safe=""), body)
        except FederationError as e:
            raise MatrixError(502, "M_UNKNOWN", f"exchange_third_party_invite failed: {type(e).__name__}") from None

    async def on_exchange(self, origin: str, room_id: str, body: dict[str, Any]) -> None:
        """The inbound side: make the invite the invitee's server asks for."""
        content = body.get("content")
        sender, state_key = body.get("sender"), body.get("state_key")
        if body.get("type") != "m.room.member" or body.get("room_id") != room_id or not isinstance(content, dict):
            raise bad_json("expected an m.room.member event for this room")
        if content.get("membership") != "invite":
            raise bad_json("membership must be invite")
        if not isinstance(sender, str) or not is_valid_user_id(sender) or server_of(sender) != self.server_name:
            raise forbidden("the sender is not a user of this server")
        if not isinstance(state_key, str) or not is_valid_user_id(state_key) or server_of(state_key) != origin:
            raise forbidden("only the invitee's server may exchange the invitation")
        tpi_in = content.get("third_party_invite")
        signed = tpi_in.get("signed") if isinstance(tpi_in, dict) else None
        if not isinstance(signed, dict) or not isinstance(signed.get("token"), str):
            raise bad_json("third_party_invite.signed is required")
        tpi = await self._state_content(room_id, "m.room.third_party_invite", signed["token"])
        if not tpi:
            raise forbidden("the room has no such third-party invitation")
        await self.check_signed(tpi, signed)
        display = tpi.get("display_name") if isinstance(tpi.get("display_name"), str) else None
        await self.membership.update(sender, state_key, room_id, "invite",
                                     extra={"third_party_invite": {"signed": signed,
                                                                   "display_name": display or "an email address"}})
