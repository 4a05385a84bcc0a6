"""Pusher endpoints: ``GET /pushers`` and ``POST /pushers/set``.

Spec: client-server-api "Push Notifications" → "Pushers" (pusher.yaml).
A pusher is created with the requesting device (so it goes when the device
does); delivery is ``zhome.push.delivery``'s business.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Optional
from urllib.parse import urlsplit

from twisted.web.server import Request

from zhome.client.account import CS
from zhome.http.errors import MatrixError, bad_json, invalid_param, missing_param
from zhome.http.server import JsonResource, read_json_body
from zhome.storage.pushers import NewPusher, Pusher

if TYPE_CHECKING:
    from zhome.server import HomeServer

PUSHER_KINDS = ("http", "email")
# Spec limits: app_id "Max length, 64 chars", pushkey "Max length, 512 bytes".
MAX_APP_ID_CHARS = 64
MAX_PUSHKEY_BYTES = 512
# Ours: display names, language tags and the data object stay small.
MAX_TEXT_CHARS = 512
MAX_DATA_BYTES = 4096
MAX_URL_CHARS = 2048
MAX_PUSHERS_PER_USER = 100
# Spec pusher.yaml: data.url "MUST be an HTTPS URL with a path of
# /_matrix/push/v1/notify". Plain http is accepted too, for gateways on the
# same host or network.
NOTIFY_PATH = "/_matrix/push/v1/notify"


def render_pusher(p: Pusher) -> dict[str, Any]:
    out: dict[str, Any] = {
        "pushkey": p.pushkey,
        "kind": p.kind,
        "app_id": p.app_id,
        "app_display_name": p.app_display_name,
        "device_display_name": p.device_display_name,
        "lang": p.lang,
        "data": p.data,
    }
    if p.profile_tag is not None:
        out["profile_tag"] = p.profile_tag
    return out


def _string(body: dict[str, Any], key: str, max_chars: int = MAX_TEXT_CHARS) -> Optional[str]:
    v = body.get(key)
    if v is None:
        return None
    if not isinstance(v, str):
        raise bad_json(f"'{key}' must be a string")
    if len(v) > max_chars:
        raise invalid_param(f"'{key}' is longer than {max_chars} characters")
    return v


def check_gateway_url(url: Any) -> str:
    if not isinstance(url, str) or not url:
        raise missing_param("HTTP pushers need 'data.url', the push gateway's URL")
    if len(url) > MAX_URL_CHARS:
        raise invalid_param("'data.url' is too long")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise invalid_param("'data.url' is not a valid URL")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise invalid_param("'data.url' must be an http or https URL")
    if port == 0:
        raise invalid_param("'data.url' has an invalid port")
    if parts.path != NOTIFY_PATH:
        raise invalid_param(f"'data.url' must have the path {NOTIFY_PATH}")
    return url


class PusherServlets:
    def __init__(self, hs: "HomeServer") -> None:
        self.hs = hs

    def register_routes(self, r: JsonResource) -> None:
        r.register("GET", CS + r"/pushers", self.on_get_pushers, "pushers")
        r.register("POST", CS + r"/pushers/set", self.on_set_pusher, "pushers_set")

    async def on_get_pushers(self, request: Request) -> tuple[int, Any]:
        req = await self.hs.auth.get_user_by_req(request)
        pushers = await self.hs.pushers.get_for_user(req.user_id)
        return 200, {"pushers": [render_pusher(p) for p in pushers]}

    async def _check_email_pusher(self, user_id: str, app_id: str, pushkey: str) -> None:
        """Spec: an email pusher's app_id is ``m.email`` and its pushkey the
        address; zhome mails only the user's own validated addresses."""
        if app_id != "m.email":
            raise invalid_param("An email pusher's 'app_id' must be 'm.email'")
        if getattr(self.hs, "email_notifier", None) is None:
            raise MatrixError(400, "M_THREEPID_MEDIUM_NOT_SUPPORTED", "This server does not send mail")
        validated = {t["address"].lower() for t in await self.hs.threepids.list_for_user(user_id)
                     if t.get("medium") == "email" and t.get("validated_at")}
        if pushkey.lower() not in validated:
            raise MatrixError(400, "M_THREEPID_NOT_FOUND",
                              "An email pusher's 'pushkey' must be one of your validated email addresses")

    async def on_set_pusher(self, request: Request) -> tuple[int, Any]:
        req = await self.hs.auth.get_user_by_req(request)
        body = read_json_body(request)
        missing = [k for k in ("kind", "app_id", "pushkey") if k not in body]
        if missing:
            raise missing_param(f"Missing parameters: {', '.join(missing)}")
        kind = body["kind"]
        if kind is not None and not isinstance(kind, str):
            raise bad_json("'kind' must be a string or null")
        app_id = _string(body, "app_id", MAX_APP_ID_CHARS)
        pushkey = body.get("pushkey")
        if not app_id:
            raise invalid_param("'app_id' must be a non-empty string")
        if not isinstance(pushkey, str) or not pushkey:
            raise invalid_param("'pushkey' must be a non-empty string")
        if len(pushkey.encode("utf-8")) > MAX_PUSHKEY_BYTES:
            raise invalid_param(f"'pushkey' is longer than {MAX_PUSHKEY_BYTES} bytes")

        if kind is None:
            # Deleting a pusher that is not there leaves the same end state.
            deleted = await self.hs.pushers.delete_pusher(req.user_id, app_id, pushkey)
            if deleted is not None:
                self.hs.push_delivery.on_pusher_deleted(deleted)
            return 200, {}

        if kind not in PUSHER_KINDS:
            raise invalid_param(f"Unknown pusher kind {kind!r}: expected one of {', '.join(PUSHER_KINDS)}")
        missing = [k for k in ("app_display_name", "device_display_name", "lang", "data") if body.get(k) is None]
        if missing:
            raise missing_param(f"Missing parameters: {', '.join(missing)}")
        app_display_name = _string(body, "app_display_name") or ""
        device_display_name = _string(body, "device_display_name") or ""
        lang = _string(body, "lang") or ""
        profile_tag = _string(body, "profile_tag")
        data = body["data"]
        if not isinstance(data, dict):
            raise bad_json("'data' must be an object")
        if len(json.dumps(data)) > MAX_DATA_BYTES:
            raise invalid_param(f"'data' is larger than {MAX_DATA_BYTES} bytes")
        if kind == "http":
            check_gateway_url(data.get("url"))
            fmt = data.get("format")
            if fmt is not None and not isinstance(fmt, str):
                raise bad_json("'data.format' must be a string")
        if kind == "email":
            await self._check_email_pusher(req.user_id, app_id, pushkey)
            await self.hs.email_notifier.enable(req.user_id)
        append = body.get("append", False)
        if not isinstance(append, bool):
            raise bad_json("'append' must be a boolean")

        existing = await self.hs.pushers.get_for_user(req.user_id)
        if len(existing) >= MAX_PUSHERS_PER_USER and not any(
                p.app_id == app_id and p.pushkey == pushkey for p in existing):
            raise MatrixError(400, "M_LIMIT_EXCEEDED", f"A user may have at most {MAX_PUSHERS_PER_USER} pushers")
        new = NewPusher(req.user_id, req.device_id, req.token_id, kind, app_id, pushkey, app_display_name,
                        device_display_name, profile_tag, lang, dict(data))
        # A new pusher delivers what happens from now on, not the backlog.
        pusher, removed = await self.hs.pushers.set_pusher(new, append, self.hs.notifier.events_pos)
        self.hs.push_delivery.on_pusher_set(pusher, removed)
        return 200, {}
