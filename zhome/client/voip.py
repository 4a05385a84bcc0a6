"""GET /voip/turnServer: credentials for the TURN servers clients relay
calls through.

Spec: client-server-api "Voice over IP" ("TURN server"). The credentials
follow the TURN REST API convention that coturn's ``static-auth-secret``
checks: the username is the expiry time (seconds since the epoch) and the
user ID, the password the base64 HMAC-SHA1 of the username under the
shared secret. With no TURN server configured the answer is 404
M_NOT_FOUND (a 200 must carry servers and credentials), which clients read
as "no relay".
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from typing import Any, Callable

from twisted.web.server import Request

from zhome.client.account import CS
from zhome.config import VoipConfig
from zhome.http.errors import guest_access_forbidden, not_found
from zhome.http.server import JsonResource


def shared_secret_credentials(secret: str, user_id: str, expires_s: int) -> tuple[str, str]:
    """The TURN REST API username and password for ``user_id`` until ``expires_s``."""
    username = f"{expires_s}:{user_id}"
    digest = hmac.new(secret.encode("utf-8"), username.encode("utf-8"), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode("ascii")


class VoipServlets:
    def __init__(self, auth: Any, config: VoipConfig, clock: Callable[[], float] = time.time) -> None:
        self.auth = auth
        self.config = config
        self.clock = clock

    def register_routes(self, r: JsonResource) -> None:
        r.register("GET", CS + r"/voip/turnServer", self.on_get, "turn_server", guests=True)

    async def on_get(self, request: Request) -> tuple[int, Any]:
        req = await self.auth.get_user_by_req(request)
        cfg = self.config
        if req.is_guest and not cfg.turn_allow_guests:
            raise guest_access_forbidden("Guests get no TURN credentials on this server")
        if not cfg.turn_uris:
            raise not_found("No TURN server is configured on this server")
        ttl_s = cfg.turn_user_lifetime_ms // 1000
        if cfg.turn_shared_secret is not None:
            username, password = shared_secret_credentials(
                cfg.turn_shared_secret, req.user_id, int(self.clock()) + ttl_s)
        else:
            assert cfg.turn_username is not None and cfg.turn_password is not None
            username, password = cfg.turn_username, cfg.turn_password
        return 200, {"username": username, "password": password, "uris": list(cfg.turn_uris), "ttl": ttl_s}
