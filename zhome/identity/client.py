"""The homeserver's side of talking to identity servers, over HTTP.

Spec: client-server-api "Adding Account Administrative Contact
Information" (``/account/3pid/bind`` makes the homeserver call the
identity server's ``/3pid/bind``), "Third-party invites" (the homeserver
looks the address up and, when nobody has it, calls ``/store-invite``).
Identity servers are reached over HTTPS; zhome's own one (its
``public_baseurl`` host) through that URL, so the homeserver uses the
same HTTP API whether the identity server is zhome or another.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

from zhome.http.errors import MatrixError
from zhome.identity.http import HttpJsonError, JsonRequest

logger = logging.getLogger(__name__)

PREFIX = "/_matrix/identity/v2"


class IdentityClient:
    def __init__(self, http: Callable[[], JsonRequest], public_baseurl: str, server_name: str = "",
                 signing_key: Any = None) -> None:
        self.http = http
        self.server_name = server_name
        self.signing_key = signing_key
        self.public_baseurl = public_baseurl.rstrip("/")
        self.own_name = urlsplit(public_baseurl).netloc

    def base(self, id_server: str) -> str:
        if id_server == self.own_name:
            return self.public_baseurl + PREFIX
        return f"https://{id_server}{PREFIX}"

    async def _call(self, method: str, id_server: str, path: str, token: str,
                    body: Optional[dict[str, Any]] = None) -> Any:
        try:
            status, out = await self.http()(method, self.base(id_server) + path, body, token=token)
        except HttpJsonError as e:
            logger.info("identity server %s: %s", id_server, e)
            raise MatrixError(502, "M_UNKNOWN", f"Could not reach the identity server {id_server}") from None
        if status == 200 and isinstance(out, dict):
            return out
        if isinstance(out, dict) and isinstance(out.get("errcode"), str) and 400 <= status < 500:
            msg = out.get("error") if isinstance(out.get("error"), str) else "refused"
            raise MatrixError(403 if status in (401, 403) else 400, out["errcode"],
                              f"The identity server answered: {msg}")
        raise MatrixError(502, "M_UNKNOWN", f"The identity server {id_server} answered {status}")

    async def bind(self, id_server: str, token: str, sid: str, client_secret: str, mxid: str) -> dict[str, Any]:
        out: dict[str, Any] = await self._call("POST", id_server, "/3pid/bind", token,
                                               {"sid": sid, "client_secret": client_secret, "mxid": mxid})
        return out

    async def lookup(self, id_server: str, token: str, medium: str, address: str) -> Optional[str]:
        """The Matrix user ID bound to the address, by a hashed lookup (sha256 with the server's pepper)."""
        details = await self._call("GET", id_server, "/hash_details", token)
        algorithms, pepper = details.get("algorithms"), details.get("lookup_pepper")
        if not isinstance(algorithms, list) or "sha256" not in algorithms or not isinstance(pepper, str):
            raise MatrixError(502, "M_UNKNOWN", "The identity server offers no sha256 lookup")
        h = base64.urlsafe_b64encode(hashlib.sha256(f"{address} {medium} {pepper}".encode("utf-8")).digest())
        hashed = h.decode("ascii").rstrip("=")
        out = await self._call("POST", id_server, "/lookup", token,
                               {"addresses": [hashed], "algorithm": "sha256", "pepper": pepper})
        mappings = out.get("mappings")
        mxid = mappings.get(hashed) if isinstance(mappings, dict) else None
        return mxid if isinstance(mxid, str) else None

    async def store_invite(self, id_server: str, token: str, body: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = await self._call("POST", id_server, "/store-invite", token, body)
        keys = out.get("public_keys")
        if not isinstance(out.get("token"), str) or not isinstance(keys, list) or not keys or not all(
                isinstance(k, dict) and isinstance(k.get("public_key"), str) for k in keys):
            raise MatrixError(502, "M_UNKNOWN", "The identity server's store-invite answer is malformed")
        return out

    async def unbind(self, id_server: str, mxid: str, medium: str, address: str) -> bool:
        """identity-service-api "POST /3pid/unbind", signed by this homeserver
        (X-Matrix, as a federation request to the identity server's name).
        True when the identity server removed (or no longer had) the binding."""
        from zhome.federation.request_auth import sign_request

        body = {"mxid": mxid, "threepid": {"medium": medium, "address": address}}
        path = PREFIX + "/3pid/unbind"
        try:
            auth = sign_request(self.server_name, id_server, "POST", path, body, self.signing_key)
            status, _ = await self.http()("POST", self.base(id_server) + "/3pid/unbind", body,
                                          authorization=auth)
        except (HttpJsonError, ValueError) as e:
            logger.info("unbind at identity server %s failed: %s", id_server, e)
            return False
        return status in (200, 404)
