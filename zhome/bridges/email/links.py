"""Signed links in the bridge's mails, and the homeserver's pages behind them.

Two links, each signed with HMAC-SHA256 under a key derived from the
bridge registration's ``as_token`` (``HMAC(as_token, label)``, a label per
kind of link), so the bridge and the homeserver agree on it without
sharing a table:

- ``{public_baseurl}_zhome/email/v1/download/{server}/{mediaId}?exp=MS&sig=S``:
  a file too large to attach; served without login until ``exp`` (ms since
  the epoch) with its content type and a safe Content-Disposition, read
  through the media repository (decrypted if encrypted at rest). A missing,
  bad or tampered signature is 403 ``M_FORBIDDEN``, an expired one 403 too,
  an unknown file 404.
- ``{public_baseurl}_zhome/email/v1/unsubscribe?t=TOKEN``: RFC 8058
  one-click unsubscribe. TOKEN is ``base64url(room_id NUL ghost).MAC``.
  ``POST`` with the form body ``List-Unsubscribe=One-Click`` makes the ghost
  leave the room (a leave of the ghost itself, reason "Unsubscribed by
  email": the homeserver acts for users of its application services'
  namespaces) and answers 200 with a short page; again is the same answer
  (idempotent). ``GET`` only shows a page with a button that POSTs (mail
  scanners fetch GET links). A bad token is a 403 page; nothing changes.

The signing functions are pure and used by both sides; ``EmailLinkServlets``
is the homeserver's half, registered by the homeserver process when the
email bridge's registration is among its application services.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import logging
import time
from typing import TYPE_CHECKING, Any, Optional
from urllib.parse import parse_qs, quote

if TYPE_CHECKING:
    from twisted.web.server import Request

    from zhome.http.server import JsonResource
    from zhome.server import HomeServer

logger = logging.getLogger(__name__)

DOWNLOAD_LABEL = b"zhome email links v1"
UNSUBSCRIBE_LABEL = b"zhome email unsubscribe v1"
PREFIX = "_zhome/email/v1"
UNSUBSCRIBE_REASON = "Unsubscribed by email"


def derive_key(as_token: str, label: bytes) -> bytes:
    return hmac.new(as_token.encode("utf-8"), label, hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# -- downloads ---------------------------------------------------------------------
def download_sig(key: bytes, server_name: str, media_id: str, exp_ms: int) -> str:
    msg = "\x00".join((server_name, media_id, str(exp_ms))).encode("utf-8")
    return _b64(hmac.new(key, msg, hashlib.sha256).digest())


def download_url(public_baseurl: str, key: bytes, mxc: str, exp_ms: int) -> Optional[str]:
    if not mxc.startswith("mxc://") or mxc.count("/") != 3:
        return None
    server_name, media_id = mxc[len("mxc://"):].split("/", 1)
    if not server_name or not media_id:
        return None
    base = public_baseurl if public_baseurl.endswith("/") else public_baseurl + "/"
    return (f"{base}{PREFIX}/download/{quote(server_name, safe='')}/{quote(media_id, safe='')}"
            f"?exp={exp_ms}&sig={download_sig(key, server_name, media_id, exp_ms)}")


def check_download(key: bytes, server_name: str, media_id: str, exp: Optional[str], sig: Optional[str],
                   now_ms: Optional[int] = None) -> Optional[str]:
    """None when the link is good, else why not."""
    if not exp or not sig or not exp.isdigit() or len(exp) > 16:
        return "missing or malformed signature"
    if not hmac.compare_digest(sig, download_sig(key, server_name, media_id, int(exp))):
        return "bad signature"
    if int(exp) < (now_ms if now_ms is not None else int(time.time() * 1000)):
        return "the link has expired"
    return None


# -- unsubscribe -------------------------------------------------------------------
def unsubscribe_token(key: bytes, room_id: str, ghost: str) -> str:
    payload = f"{room_id}\x00{ghost}".encode("utf-8")
    return _b64(payload) + "." + _b64(hmac.new(key, payload, hashlib.sha256).digest())


def unsubscribe_url(public_baseurl: str, key: bytes, room_id: str, ghost: str) -> str:
    base = public_baseurl if public_baseurl.endswith("/") else public_baseurl + "/"
    return f"{base}{PREFIX}/unsubscribe?t={unsubscribe_token(key, room_id, ghost)}"


def check_unsubscribe(key: bytes, token: Optional[str]) -> Optional[tuple[str, str]]:
    """(room ID, ghost user ID) of a good token, else None."""
    if not token or len(token) > 2048 or token.count(".") != 1:
        return None
    payload_s, mac_s = token.split(".")
    try:
        payload = _unb64(payload_s)
        mac = _unb64(mac_s)
    except (ValueError, TypeError):
        return None
    if not hmac.compare_digest(mac, hmac.new(key, payload, hashlib.sha256).digest()):
        return None
    try:
        room_id, ghost = payload.decode("utf-8").split("\x00")
    except ValueError:
        return None
    return room_id, ghost


# -- the homeserver's half ---------------------------------------------------------
def _page(request: "Request", code: int, title: str, text: str, form_action: Optional[str] = None) -> object:
    from zhome.http.server import already_written

    button = ""
    if form_action is not None:
        button = (f"<form method=\"post\" action=\"{html.escape(form_action, quote=True)}\">"
                  "<input type=\"hidden\" name=\"List-Unsubscribe\" value=\"One-Click\">"
                  "<button type=\"submit\">Unsubscribe</button></form>")
    page = (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title></head>"
            f"<body><h1>{html.escape(title)}</h1><p>{html.escape(text)}</p>{button}</body></html>").encode("utf-8")
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
    request.setHeader(b"Content-Length", str(len(page)).encode())
    request.setHeader(b"Cache-Control", b"no-store")
    # The form posts to this page itself; nothing else may load.
    request.setHeader(b"Content-Security-Policy", b"default-src 'none'; form-action 'self'")
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    request.setHeader(b"Referrer-Policy", b"no-referrer")
    request.write(page)
    request.finish()
    return already_written()


class EmailLinkServlets:
    """``/_zhome/email/v1/download`` and ``/unsubscribe`` for the email
    bridge whose registration has ``as_token``."""

    def __init__(self, hs: "HomeServer", service_id: str, as_token: str) -> None:
        from zhome.http.ratelimit import RateLimiter

        self.hs = hs
        self.service_id = service_id
        self.download_key = derive_key(as_token, DOWNLOAD_LABEL)
        self.unsubscribe_key = derive_key(as_token, UNSUBSCRIBE_LABEL)
        limits = hs.config.rate_limits
        # Per client IP: anyone with a mail's link may open these pages.
        self.ratelimit = RateLimiter(limits.email_links.per_second, limits.email_links.burst_count, limits.enabled)

    def _limit(self, request: "Request") -> None:
        from zhome.http.server import client_ip

        self.ratelimit.check("ip:" + client_ip(request))

    def register_routes(self, r: "JsonResource") -> None:
        base = r"/_zhome/email/v1"
        r.register("GET", base + r"/download/(?P<server_name>[^/]+)/(?P<media_id>[^/]+)", self.on_download,
                   "email_link_download")
        r.register("GET", base + r"/unsubscribe", self.on_unsubscribe_page, "email_unsubscribe_page")
        r.register("POST", base + r"/unsubscribe", self.on_unsubscribe, "email_unsubscribe")

    async def on_download(self, request: "Request", server_name: str, media_id: str) -> tuple[int, Any]:
        from zhome.http.errors import MatrixError
        from zhome.http.server import already_written, query_arg
        from zhome.media.headers import content_disposition
        from zhome.media.servlets import _check_ids, _common_headers, stream_plaintext

        self._limit(request)
        why = check_download(self.download_key, server_name, media_id, query_arg(request, "exp"),
                             query_arg(request, "sig"))
        if why is not None:
            raise MatrixError(403, "M_FORBIDDEN", why)
        _check_ids(server_name, media_id)
        repo = self.hs.media_repository
        info = await repo.get_media(server_name, media_id, 0, allow_remote=False)
        item = repo.servable(info)
        _common_headers(request)
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", item.content_type.encode("ascii", "replace"))
        request.setHeader(b"Content-Disposition", content_disposition(item.content_type, item.upload_name))
        request.setHeader(b"Cache-Control", b"private, no-store")
        request.setHeader(b"Content-Length", str(item.size).encode())
        await stream_plaintext(repo, request, item, 0, item.size)
        return 200, already_written()

    def _token(self, request: "Request") -> tuple[Optional[str], Optional[tuple[str, str]]]:
        from zhome.http.server import query_arg

        token = query_arg(request, "t")
        return token, check_unsubscribe(self.unsubscribe_key, token)

    async def on_unsubscribe_page(self, request: "Request") -> tuple[int, Any]:
        self._limit(request)
        token, found = self._token(request)
        if found is None:
            return 200, _page(request, 403, "Link not valid", "This unsubscribe link is not valid.")
        return 200, _page(request, 200, "Unsubscribe",
                          "Stop receiving mail from this conversation? You will be removed from it.",
                          form_action=f"unsubscribe?t={token}")

    async def on_unsubscribe(self, request: "Request") -> tuple[int, Any]:
        self._limit(request)
        _token, found = self._token(request)
        if found is None:
            return 200, _page(request, 403, "Link not valid", "This unsubscribe link is not valid.")
        body = b""
        if request.content is not None:
            request.content.seek(0)
            body = request.content.read(4096)
        form = parse_qs(body.decode("utf-8", "replace"))
        if form.get("List-Unsubscribe") != ["One-Click"]:
            return 200, _page(request, 400, "Not unsubscribed", "The request did not ask to unsubscribe.")
        room_id, ghost = found
        owner = self.hs.appservices.exclusive_user_owner(ghost)
        if owner is None or owner.id != self.service_id or not self.hs.membership.is_mine(ghost):
            return 200, _page(request, 403, "Link not valid", "This unsubscribe link is not valid.")
        current = await self.hs.membership.current_membership(room_id, ghost)
        if current in ("join", "invite"):
            try:
                await self.hs.membership.update(ghost, ghost, room_id, "leave", reason=UNSUBSCRIBE_REASON)
            except Exception as e:
                logger.info("email unsubscribe: the leave failed (%s)", type(e).__name__)
                return 200, _page(request, 503, "Not unsubscribed",
                                  "Unsubscribing failed; please try again later.")
        return 200, _page(request, 200, "Unsubscribed", "You will no longer receive mail from this conversation.")


def register_for(hs: "HomeServer", r: "JsonResource") -> None:
    """Serve the links when the email bridge's registration is loaded."""
    from zhome.bridges.email.registration import SERVICE_ID

    service = hs.appservices.by_id(SERVICE_ID)
    if service is not None:
        EmailLinkServlets(hs, service.id, service.as_token).register_routes(r)
