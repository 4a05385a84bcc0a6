"""The bridge's client of the homeserver: Client-Server API calls made with
the service's ``as_token``.

Spec: application-service-api "Identity assertion" (``?user_id=`` acts as a
user in the service's namespace), "Server admin style permissions"
(registration with ``m.login.application_service``); client-server-api
``/register``, ``/profile``, ``/rooms/{roomId}/invite|join|send``,
``/_matrix/media/v3/upload``. Tokens and bodies are never logged.
"""

from __future__ import annotations

import json
from typing import Any, Optional, cast
from urllib.parse import quote, urlencode

import treq
from treq.client import HTTPClient
from twisted.web.client import Agent
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent

from zhome.util.nodelay import NoDelayConnectionPool
from zhome.util.reactor import reactor

CS = "_matrix/client/v3"
TIMEOUT_S = 60.0
MAX_RESPONSE_BYTES = 1024 * 1024


class HomeserverError(Exception):
    """The homeserver answered with an error (``status``, ``errcode``)."""

    def __init__(self, status: int, errcode: str) -> None:
        super().__init__(f"{status} {errcode}")
        self.status = status
        self.errcode = errcode


class HomeserverUnreachable(Exception):
    """No answer from the homeserver (it may be starting or restarting)."""


def _q(value: str) -> str:
    return quote(value, safe="")


class HomeserverClient:
    def __init__(self, base_url: str, as_token: str, server_name: str) -> None:
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.as_token = as_token
        self.server_name = server_name
        pool = NoDelayConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 4
        self._pool = pool
        self._http = HTTPClient(cast(IAgent, Agent(reactor, pool=pool)))

    async def close(self) -> None:
        await self._pool.closeCachedConnections()

    async def request(self, method: str, path: str, body: Any = None, *, user_id: Optional[str] = None,
                      query: Optional[dict[str, str]] = None, raw: Optional[bytes] = None,
                      content_type: str = "application/json") -> dict[str, Any]:
        args = dict(query or {})
        if user_id is not None:
            args["user_id"] = user_id
        url = self.base_url + path + ("?" + urlencode(args) if args else "")
        headers = Headers({b"Authorization": [f"Bearer {self.as_token}".encode()],
                           b"User-Agent": [b"zhome-email-bridge"]})
        data = raw
        if raw is None and body is not None:
            data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        if data is not None:
            headers.addRawHeader(b"Content-Type", content_type.encode("ascii", "replace"))
        try:
            resp = await self._http.request(method, url, data=data, headers=headers, timeout=TIMEOUT_S)
            payload = await resp.content()
        except Exception as e:
            raise HomeserverUnreachable(type(e).__name__) from None
        try:
            parsed = json.loads(payload[:MAX_RESPONSE_BYTES]) if payload else {}
        except ValueError:
            parsed = {}
        if not isinstance(parsed, dict):
            parsed = {}
        if resp.code != 200:
            raise HomeserverError(resp.code, str(parsed.get("errcode", "")))
        return parsed

    # -- the calls the bridge makes ----------------------------------------------------
    async def ensure_registered(self, localpart: str) -> None:
        try:
            await self.request("POST", f"{CS}/register",
                               {"type": "m.login.application_service", "username": localpart,
                                "inhibit_login": True})
        except HomeserverError as e:
            if e.errcode != "M_USER_IN_USE":
                raise

    async def set_displayname(self, user_id: str, name: str) -> None:
        await self.request("PUT", f"{CS}/profile/{_q(user_id)}/displayname", {"displayname": name},
                           user_id=user_id)

    async def join(self, room_id: str, user_id: Optional[str] = None) -> None:
        await self.request("POST", f"{CS}/join/{_q(room_id)}", {}, user_id=user_id)

    async def invite(self, room_id: str, target: str) -> None:
        await self.request("POST", f"{CS}/rooms/{_q(room_id)}/invite", {"user_id": target})

    async def displayname(self, user_id: str) -> Optional[str]:
        out = await self.request("GET", f"{CS}/profile/{_q(user_id)}/displayname")
        name = out.get("displayname")
        return name if isinstance(name, str) else None

    async def state_event(self, room_id: str, event_type: str, state_key: str) -> dict[str, Any]:
        return await self.request("GET", f"{CS}/rooms/{_q(room_id)}/state/{_q(event_type)}/{_q(state_key)}")

    async def send(self, room_id: str, user_id: str, event_type: str, content: dict[str, Any], txn_id: str) -> str:
        out = await self.request("PUT", f"{CS}/rooms/{_q(room_id)}/send/{_q(event_type)}/{_q(txn_id)}", content,
                                 user_id=user_id)
        return str(out["event_id"])

    async def upload(self, user_id: str, data: bytes, content_type: str, filename: str) -> str:
        out = await self.request("POST", "_matrix/media/v3/upload", raw=data, content_type=content_type,
                                 user_id=user_id, query={"filename": filename})
        return str(out["content_uri"])

    async def claim_invite(self, token: str, mac: str, address: str, user_id: str) -> str:
        """The ghost ``user_id`` claims the invitation of an invitation
        mail's reply address (zhome's own endpoint); returns its room ID."""
        out = await self.request("POST", "_zhome/email/v1/claim_invite",
                                 {"token": token, "mac": mac, "address": address, "user_id": user_id})
        return str(out["room_id"])

    async def download(self, mxc: str, max_bytes: int) -> Optional[tuple[bytes, str]]:
        """(bytes, content type) of ``mxc`` through the authenticated media
        API; None when it is larger than ``max_bytes`` (not read further)."""
        server_name, _, media_id = mxc[len("mxc://"):].partition("/")
        url = f"{self.base_url}_matrix/client/v1/media/download/{_q(server_name)}/{_q(media_id)}"
        headers = Headers({b"Authorization": [f"Bearer {self.as_token}".encode()],
                           b"User-Agent": [b"zhome-email-bridge"]})
        try:
            resp = await self._http.request("GET", url, headers=headers, timeout=TIMEOUT_S)
        except Exception as e:
            raise HomeserverUnreachable(type(e).__name__) from None
        if resp.code != 200:
            await resp.content()
            raise HomeserverError(resp.code, "")
        parts: list[bytes] = []
        # Announced larger: the first chunk ends the transfer.
        size = [max_bytes + 1 if isinstance(resp.length, int) and resp.length > max_bytes else 0]

        def collect(data: bytes) -> None:
            size[0] += len(data)
            if size[0] > max_bytes:
                raise _TooLarge()
            parts.append(data)

        try:
            await treq.collect(resp, collect)
        except _TooLarge:
            return None
        except Exception as e:
            raise HomeserverUnreachable(type(e).__name__) from None
        ctype = resp.headers.getRawHeaders(b"Content-Type", [b"application/octet-stream"])[0]
        return b"".join(parts), ctype.decode("latin-1").split(";")[0].strip() or "application/octet-stream"


class _TooLarge(Exception):
    pass

