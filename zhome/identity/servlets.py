"""HTTP endpoints of the Identity Service API, under /_matrix/identity/v2.

Spec: identity-service-api (v2): status ``GET /``, ``account/register``,
``account``, ``account/logout``, ``terms``, ``hash_details``, ``lookup``,
``validate/email/requestToken`` and ``submitToken``,
``3pid/getValidated3pid``, ``3pid/bind``, ``3pid/unbind``,
``store-invite``, ``pubkey/{keyId}``, ``pubkey/isvalid``,
``pubkey/ephemeral/isvalid``, ``sign-ed25519``. Every endpoint but the
status, registration, key endpoints and the mailed validation link needs
the account token from ``account/register``.
"""

from __future__ import annotations

from typing import Any

from twisted.web.server import Request

from zhome.client.threepids import check_client_secret, check_email, check_sid, redirect, request_token_params, \
    write_html
from zhome.http.auth import token_from_request
from zhome.http.errors import MatrixError, bad_json, missing_param, not_found
from zhome.http.server import JsonResource, client_ip, query_arg, read_json_body
from zhome.identity.service import PREFIX, IdentityService
from zhome.util.ids import is_valid_user_id

P = PREFIX.replace(".", r"\.")
MAX_LOOKUP = 1000


def medium_not_supported(medium: Any) -> MatrixError:
    return MatrixError(400, "M_THREEPID_MEDIUM_NOT_SUPPORTED", f"The medium {medium!r} is not supported")


class IdentityServlets:
    def __init__(self, service: IdentityService, mail_ratelimit: Any = None) -> None:
        self.service = service
        self.store = service.store
        #: Limits validation mails per client and per mail address.
        self.mail_ratelimit = mail_ratelimit

    def register_routes(self, r: JsonResource) -> None:
        r.register("GET", P, self.on_status, "is_status")
        r.register("GET", P + "/", self.on_status, "is_status")
        r.register("POST", P + r"/account/register", self.on_register, "is_register")
        r.register("GET", P + r"/account", self.on_account, "is_account")
        r.register("POST", P + r"/account/logout", self.on_logout, "is_logout")
        r.register("GET", P + r"/terms", self.on_terms, "is_terms")
        r.register("POST", P + r"/terms", self.on_accept_terms, "is_terms")
        r.register("GET", P + r"/hash_details", self.on_hash_details, "is_hash_details")
        r.register("POST", P + r"/lookup", self.on_lookup, "is_lookup")
        r.register("POST", P + r"/validate/(?P<medium>email|msisdn)/requestToken", self.on_request_token,
                   "is_request_token")
        r.register("POST", P + r"/validate/(?P<medium>email|msisdn)/submitToken", self.on_submit_token,
                   "is_submit_token")
        r.register("GET", P + r"/validate/(?P<medium>email|msisdn)/submitToken", self.on_submit_token_page,
                   "is_submit_token")
        r.register("GET", P + r"/3pid/getValidated3pid", self.on_get_validated, "is_get_validated")
        r.register("POST", P + r"/3pid/bind", self.on_bind, "is_bind")
        r.register("POST", P + r"/3pid/unbind", self.on_unbind, "is_unbind")
        r.register("POST", P + r"/store-invite", self.on_store_invite, "is_store_invite")
        r.register("GET", P + r"/pubkey/isvalid", self.on_pubkey_isvalid, "is_pubkey_isvalid")
        r.register("GET", P + r"/pubkey/ephemeral/isvalid", self.on_ephemeral_isvalid, "is_ephemeral_isvalid")
        r.register("GET", P + r"/pubkey/(?P<key_id>[^/]+)", self.on_pubkey, "is_pubkey")
        r.register("POST", P + r"/sign-ed25519", self.on_sign, "is_sign")

    async def _account(self, request: Request) -> tuple[str, str]:
        token = token_from_request(request)
        if token is None:
            raise MatrixError(401, "M_UNAUTHORIZED", "Missing access token")
        user_id = await self.store.account_user(token)
        if user_id is None:
            raise MatrixError(401, "M_UNAUTHORIZED", "Unknown access token")
        return token, user_id

    # -- status, accounts, terms -------------------------------------------------------------
    async def on_status(self, request: Request) -> tuple[int, Any]:
        return 200, {}

    async def on_register(self, request: Request) -> tuple[int, Any]:
        body = read_json_body(request)
        return 200, {"token": await self.service.register(body)}

    async def on_account(self, request: Request) -> tuple[int, Any]:
        _, user_id = await self._account(request)
        return 200, {"user_id": user_id}

    async def on_logout(self, request: Request) -> tuple[int, Any]:
        token, _ = await self._account(request)
        await self.store.delete_account(token)
        return 200, {}

    async def on_terms(self, request: Request) -> tuple[int, Any]:
        return 200, {"policies": {}}

    async def on_accept_terms(self, request: Request) -> tuple[int, Any]:
        await self._account(request)
        body = read_json_body(request)
        accepts = body.get("user_accepts")
        if not isinstance(accepts, list) or not all(isinstance(u, str) for u in accepts):
            raise bad_json("'user_accepts' must be a list of URLs")
        return 200, {}

    # -- lookup ------------------------------------------------------------------------------
    async def on_hash_details(self, request: Request) -> tuple[int, Any]:
        await self._account(request)
        return 200, {"algorithms": ["sha256"], "lookup_pepper": await self.service.pepper()}

    async def on_lookup(self, request: Request) -> tuple[int, Any]:
        await self._account(request)
        body = read_json_body(request)
        addresses, algorithm, pepper = body.get("addresses"), body.get("algorithm"), body.get("pepper")
        if not isinstance(addresses, list) or not all(isinstance(a, str) and len(a) <= 512 for a in addresses):
            raise bad_json("'addresses' must be a list of strings")
        if len(addresses) > MAX_LOOKUP:
            raise MatrixError(400, "M_TOO_LARGE", f"At most {MAX_LOOKUP} addresses per lookup")
        if not isinstance(algorithm, str) or not isinstance(pepper, str):
            raise missing_param("'algorithm' and 'pepper' are required strings")
        return 200, {"mappings": await self.service.lookup(addresses, algorithm, pepper)}

    # -- validation --------------------------------------------------------------------------
    async def on_request_token(self, request: Request, medium: str) -> tuple[int, Any]:
        await self._account(request)
        body = read_json_body(request)
        if medium != "email":
            raise medium_not_supported(medium)
        try:
            secret, address, attempt, next_link = request_token_params(body)
        except MatrixError as e:
            if e.errcode == "M_INVALID_PARAM" and "email" in e.msg.lower():
                raise MatrixError(400, "M_INVALID_EMAIL", e.msg) from None
            raise
        if self.mail_ratelimit is not None:
            self.mail_ratelimit.check("ip:" + client_ip(request))
            self.mail_ratelimit.check("address:" + self.service.threepids.index("email", address))
        return 200, {"sid": await self.service.request_email_token(address, secret, attempt, next_link)}

    async def _submit(self, sid: Any, secret: Any, token: Any) -> dict[str, Any]:
        sid, secret = check_sid(sid), check_client_secret(secret)
        if not isinstance(token, str) or not token:
            raise missing_param("Missing token")
        session = await self.service.threepids.submit_token("is", sid, secret, token[:256])
        if session is None:
            raise MatrixError(400, "M_INVALID_PARAM", "Unknown session or wrong token")
        return session

    async def on_submit_token(self, request: Request, medium: str) -> tuple[int, Any]:
        await self._account(request)
        body = read_json_body(request)
        await self._submit(body.get("sid"), body.get("client_secret"), body.get("token"))
        return 200, {"success": True}

    async def on_submit_token_page(self, request: Request, medium: str) -> tuple[int, Any]:
        # The link in the mail: no account token (a mail client opens it).
        try:
            session = await self._submit(query_arg(request, "sid"), query_arg(request, "client_secret"),
                                         query_arg(request, "token"))
        except MatrixError as e:
            return e.code, write_html(request, e.code, "Not confirmed", "This link is not valid (any more).")
        if session.get("next_link"):
            return 302, redirect(request, session["next_link"])
        return 200, write_html(request, 200, "Address confirmed", "Your email address is confirmed.")

    async def on_get_validated(self, request: Request) -> tuple[int, Any]:
        await self._account(request)
        session = await self.service.validated(check_sid(query_arg(request, "sid")),
                                               check_client_secret(query_arg(request, "client_secret")))
        return 200, {"medium": session["medium"], "address": session["address"],
                     "validated_at": int(session["validated_at"])}

    # -- associations ------------------------------------------------------------------------
    async def on_bind(self, request: Request) -> tuple[int, Any]:
        _, user_id = await self._account(request)
        body = read_json_body(request)
        sid, secret = check_sid(body.get("sid")), check_client_secret(body.get("client_secret"))
        mxid = body.get("mxid")
        if not isinstance(mxid, str) or not is_valid_user_id(mxid):
            raise MatrixError(400, "M_INVALID_PARAM", "'mxid' must be a Matrix user ID")
        if mxid != user_id:
            raise MatrixError(403, "M_FORBIDDEN", "You may only bind addresses to your own user ID")
        return 200, await self.service.bind(sid, secret, mxid)

    async def on_unbind(self, request: Request) -> tuple[int, Any]:
        body = read_json_body(request)
        mxid, threepid = body.get("mxid"), body.get("threepid")
        if not isinstance(mxid, str) or not is_valid_user_id(mxid):
            raise MatrixError(400, "M_INVALID_PARAM", "'mxid' must be a Matrix user ID")
        if not isinstance(threepid, dict):
            raise missing_param("Missing threepid")
        if threepid.get("medium") != "email":
            raise medium_not_supported(threepid.get("medium"))
        address = check_email(threepid.get("address"), "threepid.address")
        sid, secret = body.get("sid"), body.get("client_secret")
        if sid is None or secret is None:
            # The other way the spec allows (a request signed by the user's
            # homeserver) is not offered: zhome's own homeserver unbinds
            # in-process.
            raise MatrixError(403, "M_FORBIDDEN", "Unbinding needs the sid and client_secret of a validated session")
        session = await self.service.validated(check_sid(sid), check_client_secret(secret))
        if session["medium"] != "email" or session["address"] != address:
            raise MatrixError(403, "M_FORBIDDEN", "The session validated another address")
        if not await self.service.unbind(mxid, "email", address):
            raise not_found("No such association")
        return 200, {}

    # -- invitations and keys ----------------------------------------------------------------
    async def on_store_invite(self, request: Request) -> tuple[int, Any]:
        await self._account(request)
        body = read_json_body(request)
        medium = body.get("medium")
        if not isinstance(medium, str) or not medium:
            raise missing_param("Missing medium")
        if medium != "email":
            raise medium_not_supported(medium)
        address = check_email(body.get("address"), "address")
        room_id, sender = body.get("room_id"), body.get("sender")
        if not isinstance(room_id, str) or not room_id.startswith("!") or len(room_id) > 255:
            raise missing_param("'room_id' must be a room ID")
        if not isinstance(sender, str) or not is_valid_user_id(sender):
            raise missing_param("'sender' must be a user ID")
        extra = {k: body[k] for k in ("room_alias", "room_avatar_url", "room_join_rules", "room_name",
                                      "sender_avatar_url", "sender_display_name")
                 if isinstance(body.get(k), str)}
        return 200, await self.service.store_invite(medium, address, room_id, sender, extra)

    async def on_pubkey(self, request: Request, key_id: str) -> tuple[int, Any]:
        if key_id != self.service.key_id:
            raise MatrixError(404, "M_NOT_FOUND", "The public key was not found")
        return 200, {"public_key": self.service.public_key()}

    async def on_pubkey_isvalid(self, request: Request) -> tuple[int, Any]:
        key = query_arg(request, "public_key")
        if not key:
            raise missing_param("Missing public_key")
        return 200, {"valid": key == self.service.public_key()}

    async def on_ephemeral_isvalid(self, request: Request) -> tuple[int, Any]:
        key = query_arg(request, "public_key")
        if not key:
            raise missing_param("Missing public_key")
        return 200, {"valid": await self.store.ephemeral_public_key_valid(key)}

    async def on_sign(self, request: Request) -> tuple[int, Any]:
        await self._account(request)
        body = read_json_body(request)
        mxid, token, private_key = body.get("mxid"), body.get("token"), body.get("private_key")
        if not isinstance(mxid, str) or not is_valid_user_id(mxid):
            raise missing_param("'mxid' must be a user ID")
        if not isinstance(token, str) or not token or not isinstance(private_key, str) or not private_key:
            raise missing_param("'token' and 'private_key' are required strings")
        return 200, await self.service.sign_ed25519(mxid, token, private_key)
