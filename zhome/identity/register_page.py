"""Invitations by email: the registration page of an invitation mail's link,
and the email bridge's claim of an invitation (the reply way).

``GET /_zhome/register/invitation?t=TOKEN`` serves a plain HTML form
(username, password twice, the token hidden; no script, no external
resource, ``Content-Security-Policy: default-src 'none'``; every value
escaped). ``POST`` (form-encoded) registers: the token is the secret that
authorises it (also when open registration is off) and, carried in the
form, what makes a forged cross-site POST useless. POSTs are rate-limited
per IP. The token is single use (used or expired: 403), bad input re-renders
the page with 400.

On success: the account is made as ``/register`` makes one
(``accounts.create_user``, the localpart as display name); the invited
address becomes its validated 3PID (the link reached it) and is bound to it
in zhome's identity service, replacing the binding of the address's email
ghost; the stored invitations of the address become the user's invites
(3pid/onbind) and the user joins those rooms; in every room where the
ghost is a member, the ghost (joined) or the ghost's inviter (invited)
invites the user, who joins, and the ghost leaves ("Now taking part as
@user:server"). The token is reserved for the username before the account
is made and marked done at the end, so a retry with the same username and
password after a failure finishes the job.

``POST /_zhome/email/v1/claim_invite`` (the bridge's as_token):
``{"token", "mac", "address", "user_id"}`` -> ``{"room_id"}``, see
IdentityService.claim_invite.

Never logs an address, a password or a token.
"""

from __future__ import annotations

import hmac
import html
import logging
from typing import Any, Optional
from urllib.parse import parse_qs

from twisted.web.server import Request

from zhome.http.auth import token_from_request
from zhome.http.errors import MatrixError, bad_json
from zhome.http.server import already_written, client_ip, query_arg, read_json_body
from zhome.identity.service import REGISTER_PATH, IdentityService
from zhome.util.passwords import check_password_async, hash_password_async

logger = logging.getLogger(__name__)

MAX_PASSWORD = 512
MAX_FORM = 8192


def _page(request: Request, code: int, title: str, paragraphs: list[str], form: Optional[str] = None) -> object:
    body = "".join(f"<p>{html.escape(p)}</p>" for p in paragraphs)
    page = ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title></head><body><h1>{html.escape(title)}</h1>{body}"
            f"{form or ''}</body></html>").encode("utf-8")
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
    request.setHeader(b"Content-Length", str(len(page)).encode())
    request.setHeader(b"Cache-Control", b"no-store")
    request.setHeader(b"Referrer-Policy", b"no-referrer")
    request.setHeader(b"X-Frame-Options", b"DENY")
    request.setHeader(b"Content-Security-Policy",
                      b"default-src 'none'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
    request.write(page)
    request.finish()
    return already_written()


def _form(token: str, username: str = "") -> str:
    e = html.escape
    return (f"<form method=\"post\" action=\"invitation\">"
            f"<input type=\"hidden\" name=\"t\" value=\"{e(token)}\">"
            f"<p><label>Username <input name=\"username\" value=\"{e(username)}\" required"
            " autocomplete=\"username\"></label></p>"
            "<p><label>Password <input type=\"password\" name=\"password\" required"
            " autocomplete=\"new-password\"></label></p>"
            "<p><label>Password again <input type=\"password\" name=\"password2\" required"
            " autocomplete=\"new-password\"></label></p>"
            "<p><button type=\"submit\">Create the account</button></p></form>")


def _read_form(request: Request) -> dict[str, str]:
    """The POSTed form (application/x-www-form-urlencoded), bounded; the
    first value of each field."""
    raw = request.content.read(MAX_FORM + 1) if request.content is not None else b""
    if len(raw) > MAX_FORM:
        return {}
    try:
        parsed = parse_qs(raw.decode("utf-8"), keep_blank_values=True, max_num_fields=10)
    except (UnicodeDecodeError, ValueError):
        return {}
    return {k: v[0] for k, v in parsed.items() if v}


class InvitationRegistration:
    def __init__(self, hs: Any, service: IdentityService, ratelimit: Any) -> None:
        self.hs = hs
        self.service = service
        self.store = service.store
        #: Limits POSTs per IP.
        self.ratelimit = ratelimit

    def register_routes(self, r: Any) -> None:
        path = "/" + REGISTER_PATH.replace(".", r"\.")
        r.register("GET", path, self.on_get, "invite_register_page")
        r.register("POST", path, self.on_post, "invite_register")
        r.register("POST", r"/_zhome/email/v1/claim_invite", self.on_claim, "email_claim_invite")

    async def _usable(self, token: Optional[str]) -> Optional[dict[str, Any]]:
        if not token or len(token) > 128:
            return None
        row = await self.store.registration_token(token)
        if row is None or row["address"] is None:
            return None
        return row

    async def on_get(self, request: Request) -> tuple[int, Any]:
        token = query_arg(request, "t")
        row = await self._usable(token)
        assert token is not None or row is None
        if row is None or row["done_ts"] is not None or row["used_ts"] is not None:
            return 403, _page(request, 403, "Link not valid", ["This invitation link is not valid, or was used."])
        if row["expires_ts"] < self.service_now():
            return 403, _page(request, 403, "Link expired", ["This invitation link has expired."])
        assert token is not None
        return 200, _page(request, 200, f"Create your account on {self.hs.server_name}",
                          ["Choose a username and a password. Your email address is confirmed by this link."],
                          _form(token))

    @staticmethod
    def service_now() -> int:
        import time

        return int(time.time() * 1000)

    async def on_post(self, request: Request) -> tuple[int, Any]:
        try:
            self.ratelimit.check("invite-register:" + client_ip(request))
        except MatrixError:
            return 429, _page(request, 429, "Too many attempts", ["Please wait a little and try again."])
        form = _read_form(request)
        token = form.get("t", "")
        username = form.get("username", "").strip()
        password = form.get("password", "")
        password2 = form.get("password2", "")
        row = await self._usable(token)
        if row is None or row["done_ts"] is not None:
            return 403, _page(request, 403, "Link not valid", ["This invitation link is not valid, or was used."])
        if row["used_ts"] is None and row["expires_ts"] < self.service_now():
            return 403, _page(request, 403, "Link expired", ["This invitation link has expired."])

        def again(msg: str) -> object:
            return _page(request, 400, f"Create your account on {self.hs.server_name}", [msg],
                         _form(token, username[:255]))

        try:
            user_id = self.hs.account_servlets._check_username(username)
            self.hs.account_servlets._refuse_exclusive(user_id)
        except MatrixError as e:
            return 400, again(f"{e.msg} ({e.errcode})")
        if not password or len(password) > MAX_PASSWORD:
            return 400, again(f"The password must be 1 to {MAX_PASSWORD} characters.")
        if not hmac.compare_digest(password, password2):
            return 400, again("The two passwords differ.")
        accounts = self.hs.accounts
        owner = await self.hs.threepids.user_for(str(row["medium"]), str(row["address"]))
        if owner is not None and owner != user_id:
            return 403, _page(request, 403, "Address already registered",
                              ["This email address belongs to an account already: sign in with it."])
        existing = await accounts.get_user(user_id)
        if row["used_ts"] is not None:
            # Taken before: only the same registration, retried, may go on.
            if row["user_id"] != user_id:
                return 403, _page(request, 403, "Link not valid", ["This invitation link was used."])
        elif existing is not None or await accounts.user_exists_ci(user_id):
            return 400, again("This username is taken (M_USER_IN_USE).")
        if not await self.store.reserve_registration_token(token, user_id):
            return 403, _page(request, 403, "Link not valid", ["This invitation link is not valid, or was used."])
        if existing is None:
            created = await accounts.create_user(user_id, await hash_password_async(password),
                                                 displayname=user_id[1:].split(":")[0])
            if not created:
                await self.store.release_registration_token(token, user_id)
                return 400, again("This username is taken (M_USER_IN_USE).")
        elif not await check_password_async(password, existing.get("password_hash")):
            return 403, _page(request, 403, "Link not valid", ["This invitation link was used."])
        self.hs.ratelimit_registration.record("ip:" + client_ip(request))
        await self._finish(user_id, row)
        await self.store.finish_registration_token(token)
        logger.info("an invited address registered an account")
        base = self.hs.config.public_baseurl
        return 200, _page(request, 200, "Your account is ready", [
            f"Your Matrix ID is {user_id}.",
            f"Sign in with any Matrix client: enter the homeserver {base} and your username and password.",
            "You are in the rooms you were invited to."])

    async def _finish(self, user_id: str, row: dict[str, Any]) -> None:
        """The address becomes the user's; the user takes the ghost's place."""
        hs, medium, address = self.hs, str(row["medium"]), str(row["address"])
        now = self.service_now()
        await hs.threepids.add(user_id, medium, address, now)
        ghost = self._ghost_of(address)
        # The address's stored invitations become the user's invites (onbind).
        await self.service.bind_address(medium, address, user_id)
        rooms = await hs.events.get_rooms_for_user(user_id)
        for room_id, (membership, _) in rooms.items():
            if membership == "invite":
                await self._join(user_id, room_id)
        if ghost is None:
            return
        for room_id, (membership, event_id) in (await hs.events.get_rooms_for_user(ghost)).items():
            if membership not in ("join", "invite"):
                continue
            mine = (await hs.events.get_rooms_for_user(user_id)).get(room_id)
            if mine is None or mine[0] not in ("join", "invite"):
                inviter = ghost
                if membership == "invite":
                    ev = await hs.events.get_event(event_id)
                    inviter = ev.sender if ev is not None else ghost
                try:
                    await hs.membership.update(inviter, user_id, room_id, "invite")
                except MatrixError as e:
                    logger.info("invitation registration: no invite in a room of the ghost: %s", e.errcode)
                    continue
            await self._join(user_id, room_id)
            try:
                await hs.membership.update(ghost, ghost, room_id, "leave",
                                           reason=f"Now taking part as {user_id}")
            except MatrixError as e:
                logger.info("invitation registration: the ghost could not leave a room: %s", e.errcode)

    async def _join(self, user_id: str, room_id: str) -> None:
        if (await self.hs.events.get_rooms_for_user(user_id)).get(room_id, ("",))[0] == "join":
            return
        try:
            await self.hs.membership.update(user_id, user_id, room_id, "join")
        except MatrixError as e:
            logger.info("invitation registration: could not join a room: %s", e.errcode)

    def _ghost_of(self, address: str) -> Optional[str]:
        from zhome.bridges.email.tokens import ghost_localpart

        bridge = self.service.bridge
        if bridge is None:
            return None
        return f"@{ghost_localpart(bridge.ghost_prefix, address)}:{self.hs.server_name}"

    # -- the bridge's claim -----------------------------------------------------------------
    async def on_claim(self, request: Request) -> tuple[int, Any]:
        bridge = self.service.bridge
        token = token_from_request(request)
        if bridge is None or token is None or not hmac.compare_digest(token.encode(), bridge.as_token.encode()):
            raise MatrixError(403, "M_FORBIDDEN", "Only the email bridge may claim invitations")
        body = read_json_body(request)
        fields = [body.get(k) for k in ("token", "mac", "address", "user_id")]
        if not all(isinstance(f, str) and 0 < len(f) <= 512 for f in fields):
            raise bad_json("'token', 'mac', 'address' and 'user_id' must be strings")
        invite_token, mac, address, user_id = (str(f) for f in fields)
        return 200, {"room_id": await self.service.claim_invite(invite_token, mac, address, user_id)}
