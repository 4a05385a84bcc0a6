"""3PIDs of accounts, their validation by email, and OpenID tokens.

Spec: client-server-api "Adding Account Administrative Contact
Information" (``/account/3pid``, ``/account/3pid/add``, ``/delete``,
``/bind``, ``/unbind``, ``.../email/requestToken``), "Account
registration" (``/register/email/requestToken``, the
``m.login.email.identity`` stage), "Password management"
(``/account/password/email/requestToken``, a reset without an access
token), "OpenID" (``/user/{userId}/openid/request_token``) and
server-server-api "OpenID" (``/_matrix/federation/v1/openid/userinfo``).

The homeserver validates addresses itself: the mail carries a token and a
link to ``/_zhome/client/v1/validate/email/submitToken`` (built from
``public_baseurl``), whose POST form takes the same parameters as the
identity service's ``submitToken``. Only the email medium is supported.
"""

from __future__ import annotations

import html
import logging
import secrets
import time
from typing import Any, Awaitable, Callable, Optional
from urllib.parse import urlencode, urlsplit

from twisted.web.server import Request

from zhome.config import EmailConfig
from zhome.http.auth import Auth, token_from_request
from zhome.http.errors import MatrixError, bad_json, forbidden, invalid_param, missing_param
from zhome.http.server import JsonResource, already_written, client_ip, query_arg, read_json_body
from zhome.mail.mailer import Mailer
from zhome.storage.threepids import CLIENT_SECRET_RE, ThreepidStore, normalise_email
from zhome.util.ids import is_valid_user_id

logger = logging.getLogger(__name__)

CS = r"/_matrix/client/(?:r0|v3)"
#: The 3PID endpoints, also under the unstable prefix (older clients and sytest use it for bind).
CS3 = r"/_matrix/client/(?:r0|v3|unstable)"
SUBMIT_PATH = "/_zhome/client/v1/validate/email/submitToken"
OPENID_LIFETIME_MS = 3600 * 1000
EMAIL_STAGE = "m.login.email.identity"

PasswordUia = Callable[[dict[str, Any], str, str], Awaitable[None]]


def medium_not_supported(medium: str) -> MatrixError:
    return MatrixError(400, "M_THREEPID_MEDIUM_NOT_SUPPORTED", f"This server does not support the {medium} medium")


def check_client_secret(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise missing_param("Missing client_secret")
    if not CLIENT_SECRET_RE.match(value):
        raise invalid_param("client_secret may only hold [0-9a-zA-Z.=_-], at most 255 characters")
    return value


def check_sid(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise missing_param("Missing sid")
    if len(value) > 255 or not CLIENT_SECRET_RE.match(value):
        raise invalid_param("Invalid sid")
    return value


def check_email(value: Any, key: str = "email") -> str:
    if not isinstance(value, str) or not value:
        raise missing_param(f"Missing {key}")
    addr = normalise_email(value)
    if addr is None:
        raise invalid_param("Not a valid email address")
    return addr


def request_token_params(body: dict[str, Any]) -> tuple[str, str, int, Optional[str]]:
    """(client_secret, normalised email, send_attempt, next_link) of a requestToken body."""
    secret = check_client_secret(body.get("client_secret"))
    addr = check_email(body.get("email"))
    attempt = body.get("send_attempt")
    if not isinstance(attempt, int) or isinstance(attempt, bool):
        raise bad_json("'send_attempt' must be an integer")
    next_link = body.get("next_link")
    if next_link is not None:
        if not isinstance(next_link, str) or len(next_link) > 2048 \
                or urlsplit(next_link).scheme not in ("http", "https"):
            raise invalid_param("next_link must be an http or https URL")
    return secret, addr, attempt, next_link


def write_html(request: Request, code: int, title: str, text: str) -> object:
    page = (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title></head>"
            f"<body><h1>{html.escape(title)}</h1><p>{html.escape(text)}</p></body></html>").encode("utf-8")
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
    request.setHeader(b"Content-Length", str(len(page)).encode())
    request.setHeader(b"Cache-Control", b"no-store")
    request.setHeader(b"Content-Security-Policy", b"default-src 'none'")
    request.write(page)
    request.finish()
    return already_written()


def redirect(request: Request, location: str) -> object:
    request.setResponseCode(302)
    request.setHeader(b"Location", location.encode("utf-8"))
    request.setHeader(b"Content-Length", b"0")
    request.finish()
    return already_written()


class ThreepidServlets:
    def __init__(self, auth: Auth, store: ThreepidStore, accounts: Any, email: Optional[EmailConfig],
                 mailer: Optional[Mailer], server_name: str, public_baseurl: str,
                 require_password_uia: PasswordUia, identity_client: Any = None,
                 local_identity: Any = None, mail_ratelimit: Any = None) -> None:
        self.auth = auth
        self.store = store
        self.accounts = accounts
        self.email = email
        self.mailer = mailer
        self.server_name = server_name
        self.public_baseurl = public_baseurl
        self.require_password_uia = require_password_uia
        #: Talks to identity servers over HTTP (bind); set by the server.
        self.identity_client = identity_client
        #: The identity service zhome serves itself, if on (unbind in-process).
        self.local_identity = local_identity
        #: Limits validation mails per client address and per mail address
        #: (nobody gets to mail-bomb an inbox through the server).
        self.mail_ratelimit = mail_ratelimit

    @property
    def email_enabled(self) -> bool:
        return self.email is not None and self.mailer is not None

    def register_routes(self, r: JsonResource) -> None:
        r.register("POST", CS + r"/user/(?P<user_id>[^/]+)/openid/request_token", self.on_openid_request_token,
                   "openid_request_token")
        r.register("GET", CS3 + r"/account/3pid", self.on_get_3pids, "threepids")
        r.register("POST", CS3 + r"/account/3pid", self.on_legacy_3pid, "threepids")
        r.register("POST", CS3 + r"/account/3pid/add", self.on_add, "threepid_add")
        r.register("POST", CS3 + r"/account/3pid/delete", self.on_delete, "threepid_delete")
        r.register("POST", CS3 + r"/account/3pid/bind", self.on_bind, "threepid_bind")
        r.register("POST", CS3 + r"/account/3pid/unbind", self.on_unbind, "threepid_unbind")
        r.register("POST", CS3 + r"/account/3pid/(?P<medium>email|msisdn)/requestToken", self.on_add_request_token,
                   "threepid_request_token")
        r.register("POST", CS + r"/register/(?P<medium>email|msisdn)/requestToken",
                   self.on_register_request_token, "register_request_token")
        r.register("POST", CS + r"/account/password/(?P<medium>email|msisdn)/requestToken",
                   self.on_password_request_token, "password_request_token")
        r.register("GET", SUBMIT_PATH, self.on_submit_token_page, "threepid_submit_token")
        r.register("POST", SUBMIT_PATH, self.on_submit_token, "threepid_submit_token")

    def register_federation_routes(self, r: JsonResource) -> None:
        r.register("GET", r"/_matrix/federation/v1/openid/userinfo", self.on_openid_userinfo, "openid_userinfo")

    # -- OpenID --------------------------------------------------------------------------
    async def on_openid_request_token(self, request: Request, user_id: str) -> tuple[int, Any]:
        req = await self.auth.get_user_by_req(request)
        if not is_valid_user_id(user_id):
            raise invalid_param("Invalid user ID")
        if user_id != req.user_id:
            raise forbidden("You may only request OpenID tokens for yourself")
        read_json_body(request, allow_empty=True)
        token = secrets.token_urlsafe(32)
        await self.store.create_openid_token(token, req.user_id, int(time.time() * 1000) + OPENID_LIFETIME_MS)
        return 200, {"access_token": token, "token_type": "Bearer", "matrix_server_name": self.server_name,
                     "expires_in": OPENID_LIFETIME_MS // 1000}

    async def on_openid_userinfo(self, request: Request) -> tuple[int, Any]:
        token = query_arg(request, "access_token")
        if not token:
            raise MatrixError(401, "M_MISSING_TOKEN", "Missing access_token")
        user_id = await self.store.openid_user(token)
        if user_id is None:
            raise MatrixError(401, "M_UNKNOWN_TOKEN", "Unknown or expired OpenID token")
        return 200, {"sub": user_id}

    # -- the account's 3PIDs ------------------------------------------------------------------
    async def on_get_3pids(self, request: Request) -> tuple[int, Any]:
        req = await self.auth.get_user_by_req(request)
        return 200, {"threepids": await self.store.list_for_user(req.user_id)}

    async def on_legacy_3pid(self, request: Request) -> tuple[int, Any]:
        await self.auth.get_user_by_req(request)
        read_json_body(request)
        raise MatrixError(400, "M_UNRECOGNIZED",
                          "POST /account/3pid was removed from the specification: use /account/3pid/add "
                          "and /account/3pid/bind")

    def _require_changes(self) -> None:
        if not self.email_enabled:
            raise medium_not_supported("email")
        assert self.email is not None
        if not self.email.enable_3pid_changes:
            raise forbidden("3PID changes are disabled on this server")

    async def validated_session(self, creds: Any) -> dict[str, Any]:
        """The validated homeserver session named by ``{sid, client_secret}``;
        403 M_THREEPID_AUTH_FAILED otherwise."""
        if not isinstance(creds, dict):
            raise bad_json("Missing threepid credentials")
        sid = check_sid(creds.get("sid"))
        secret = check_client_secret(creds.get("client_secret"))
        session = await self.store.get_session("hs", sid, secret)
        if session is None or session["validated_at"] is None:
            raise MatrixError(403, "M_THREEPID_AUTH_FAILED", "No validated session for these credentials")
        return session

    async def on_add(self, request: Request) -> tuple[int, Any]:
        req = await self.auth.get_user_by_req(request)
        body = read_json_body(request)
        self._require_changes()
        sid = check_sid(body.get("sid"))
        check_client_secret(body.get("client_secret"))
        await self.require_password_uia(body, req.user_id, f"POST /account/3pid/add {sid}")
        session = await self.validated_session(body)
        if not await self.store.add(req.user_id, session["medium"], session["address"], int(session["validated_at"])):
            raise MatrixError(400, "M_THREEPID_IN_USE", "This address is already in use by another account")
        await self.store.delete_session(sid)
        return 200, {}

    async def on_delete(self, request: Request) -> tuple[int, Any]:
        req = await self.auth.get_user_by_req(request)
        body = read_json_body(request)
        medium, address = self._medium_address(body)
        if self.email is not None and not self.email.enable_3pid_changes:
            raise forbidden("3PID changes are disabled on this server")
        id_server = self._check_id_server(body.get("id_server"), optional=True)
        # A 3PID the account does not have may still be bound (out of band):
        # the unbind is tried all the same.
        await self.store.delete(req.user_id, medium, address)
        return 200, {"id_server_unbind_result": await self.unbind_at(req.user_id, medium, address, id_server)}

    async def unbind_at(self, user_id: str, medium: str, address: str, id_server: Optional[str]) -> str:
        """Unbind the 3PID at ``id_server``, or wherever the homeserver bound
        it; "success" when every unbind succeeded, else "no-support"."""
        targets = [id_server] if id_server is not None else [
            s for _m, _a, s in await self.store.id_servers(user_id, medium, address)]
        own = self.identity_client.own_name if self.identity_client is not None else None
        ok = bool(targets)
        if self.local_identity is not None and (id_server is None or id_server == own):
            # zhome's own identity service: in-process.
            if await self.local_identity.unbind(user_id, medium, address):
                ok = True
            targets = [t for t in targets if t != own]
        for target in targets:
            done = self.identity_client is not None and await self.identity_client.unbind(
                target, user_id, medium, address)
            if done:
                await self.store.remove_id_server(user_id, medium, address, target)
            ok = ok and bool(done)
        return "success" if ok else "no-support"

    async def unbind_everywhere(self, user_id: str) -> None:
        """Unbind every 3PID the homeserver bound for the user (deactivation)."""
        for medium, address, id_server in await self.store.id_servers(user_id):
            await self.unbind_at(user_id, medium, address, id_server)

    def _medium_address(self, body: dict[str, Any]) -> tuple[str, str]:
        medium = body.get("medium")
        if not isinstance(medium, str) or not medium:
            raise missing_param("Missing medium")
        if medium != "email":
            raise medium_not_supported(medium)
        return medium, check_email(body.get("address"), "address")

    def _check_id_server(self, value: Any, optional: bool = False) -> Optional[str]:
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value:
            raise missing_param("Missing id_server")
        if len(value) > 255 or "/" in value or "@" in value or any(c.isspace() for c in value):
            raise invalid_param("id_server must be a server name")
        return value

    async def on_bind(self, request: Request) -> tuple[int, Any]:
        req = await self.auth.get_user_by_req(request)
        body = read_json_body(request)
        id_server = self._check_id_server(body.get("id_server"))
        assert id_server is not None
        token = body.get("id_access_token")
        if not isinstance(token, str) or not token:
            raise missing_param("Missing id_access_token")
        sid = check_sid(body.get("sid"))
        secret = check_client_secret(body.get("client_secret"))
        if self.identity_client is None:
            raise MatrixError(400, "M_SERVER_NOT_TRUSTED", "This server does not talk to identity servers")
        association = await self.identity_client.bind(id_server, token, sid, secret, req.user_id)
        medium, address = association.get("medium"), association.get("address")
        if isinstance(medium, str) and isinstance(address, str) and len(address) <= 512:
            # Remembered, so deleting the 3PID or deactivating unbinds it there.
            await self.store.add_id_server(req.user_id, medium, address, id_server)
        return 200, {}

    async def on_unbind(self, request: Request) -> tuple[int, Any]:
        req = await self.auth.get_user_by_req(request)
        body = read_json_body(request)
        medium, address = self._medium_address(body)
        id_server = self._check_id_server(body.get("id_server"), optional=True)
        return 200, {"id_server_unbind_result": await self.unbind_at(req.user_id, medium, address, id_server)}

    # -- validation by email -------------------------------------------------------------------
    async def _send_token(self, request: Request, body: dict[str, Any], medium: str, purpose: str,
                          check: Callable[[str], Awaitable[bool]]) -> tuple[int, Any]:
        """A validation session and its mail. ``check(address)`` False: answer
        as if sent, but send nothing (an address that must not be told apart)."""
        if medium != "email":
            raise medium_not_supported(medium)
        if not self.email_enabled:
            raise medium_not_supported("email")
        assert self.email is not None and self.mailer is not None
        secret, address, attempt, next_link = request_token_params(body)
        if self.mail_ratelimit is not None:
            self.mail_ratelimit.check("ip:" + client_ip(request))
            self.mail_ratelimit.check("address:" + self.store.index("email", address))
        send = await check(address)
        sid, token = await self.store.request_session("hs", "email", address, secret, attempt,
                                                      self.email.validation_token_lifetime_ms, next_link)
        if token is not None and send:
            link = self.public_baseurl + SUBMIT_PATH.lstrip("/") + "?" + urlencode(
                {"sid": sid, "client_secret": secret, "token": token})
            await self.mailer.send_validation(address, token, link, purpose)
        return 200, {"sid": sid, "submit_url": self.public_baseurl + SUBMIT_PATH.lstrip("/")}

    async def on_add_request_token(self, request: Request, medium: str) -> tuple[int, Any]:
        body = read_json_body(request)

        async def check(address: str) -> bool:
            if await self.store.user_for("email", address) is not None:
                raise MatrixError(400, "M_THREEPID_IN_USE", "This address is already in use")
            return True

        return await self._send_token(request, body, medium, "add", check)

    async def on_register_request_token(self, request: Request, medium: str) -> tuple[int, Any]:
        body = read_json_body(request)

        async def check(address: str) -> bool:
            if await self.store.user_for("email", address) is not None:
                raise MatrixError(400, "M_THREEPID_IN_USE", "This address is already registered")
            return True

        return await self._send_token(request, body, medium, "register", check)

    async def on_password_request_token(self, request: Request, medium: str) -> tuple[int, Any]:
        body = read_json_body(request)
        hide = self.email is not None and self.email.hide_unknown_password_reset_addresses

        async def check(address: str) -> bool:
            if await self.store.user_for("email", address) is not None:
                return True
            if hide:
                return False
            raise MatrixError(400, "M_THREEPID_NOT_FOUND", "No account has this address")

        return await self._send_token(request, body, medium, "password", check)

    async def _submit(self, sid: Any, secret: Any, token: Any) -> dict[str, Any]:
        sid = check_sid(sid)
        secret = check_client_secret(secret)
        if not isinstance(token, str) or not token:
            raise missing_param("Missing token")
        session = await self.store.submit_token("hs", sid, secret, token[:256])
        if session is None:
            raise MatrixError(400, "M_THREEPID_AUTH_FAILED", "Unknown session or wrong token")
        return session

    async def on_submit_token(self, request: Request) -> tuple[int, Any]:
        body = read_json_body(request)
        await self._submit(body.get("sid"), body.get("client_secret"), body.get("token"))
        return 200, {"success": True}

    async def on_submit_token_page(self, request: Request) -> tuple[int, Any]:
        try:
            session = await self._submit(query_arg(request, "sid"), query_arg(request, "client_secret"),
                                         query_arg(request, "token"))
        except MatrixError as e:
            return e.code, write_html(request, e.code, "Not confirmed",
                                      "This link is not valid (any more). Ask for a new mail and try again.")
        if session.get("next_link"):
            return 302, redirect(request, session["next_link"])
        return 200, write_html(request, 200, "Address confirmed",
                               "Your email address is confirmed. You can go back to your app now.")

    # -- the m.login.email.identity stage ------------------------------------------------------
    async def email_stage(self, auth: dict[str, Any], flows: list[dict[str, Any]],
                          uia_session: Any) -> dict[str, Any]:
        """Check an ``m.login.email.identity`` auth dict; the validated session."""
        creds = auth.get("threepid_creds", auth.get("threepidCreds"))
        try:
            return await self.validated_session(creds)
        except MatrixError as e:
            raise MatrixError(401, "M_UNAUTHORIZED", e.msg, flows=flows, params={}, session=uia_session,
                              completed=[]) from None

    async def password_reset(self, request: Request, body: dict[str, Any]) -> tuple[int, Any]:
        """``POST /account/password`` without an access token: the email stage proves the address."""
        from zhome.util.passwords import hash_password_async

        flows = [{"stages": [EMAIL_STAGE]}]
        auth = body.get("auth")
        if not self.email_enabled:
            raise MatrixError(401, "M_MISSING_TOKEN", "Missing access token")
        if not isinstance(auth, dict):
            raise MatrixError(401, "M_UNAUTHORIZED", "Authentication required", flows=flows, params={},
                              session=secrets.token_urlsafe(18), completed=[])
        if auth.get("type") != EMAIL_STAGE:
            raise MatrixError(401, "M_UNAUTHORIZED", "Only m.login.email.identity resets a password",
                              flows=flows, params={}, session=auth.get("session"), completed=[])
        new = body.get("new_password")
        if not isinstance(new, str) or not new or len(new) > 512:
            raise bad_json("'new_password' must be a non-empty string")
        session = await self.email_stage(auth, flows, auth.get("session"))
        user_id = await self.store.user_for(session["medium"], session["address"])
        if user_id is None:
            raise MatrixError(400, "M_THREEPID_NOT_FOUND", "No account has this address")
        await self.accounts.set_password_hash(user_id, await hash_password_async(new))
        if body.get("logout_devices", True) is not False:
            await self.accounts.delete_other_tokens(user_id, None)
        await self.store.delete_session(session["sid"])
        return 200, {}


def has_token(request: Request) -> bool:
    try:
        return token_from_request(request) is not None
    except MatrixError:
        return True

