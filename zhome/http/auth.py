"""Access-token authentication of client requests.

Spec: client-server-api "Using access tokens": the token comes from the
``Authorization: Bearer`` header (or the deprecated ``access_token`` query
parameter); a missing token is ``M_MISSING_TOKEN``, an unknown one
``M_UNKNOWN_TOKEN``, an expired one ``M_UNKNOWN_TOKEN`` with
``soft_logout: true``.

Spec: client-server-api "Guest Access": a guest's token is accepted only on
the routes registered as open to guests (``JsonResource.register(...,
guests=True)``); anywhere else it is 403 ``M_GUEST_ACCESS_FORBIDDEN``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

from twisted.web.server import Request

from zhome.http.errors import MatrixError, guest_access_forbidden
from zhome.http.server import guests_allowed
from zhome.storage.accounts import AccountsStore


@dataclass(frozen=True)
class Requester:
    user_id: str
    device_id: str
    token_id: int
    is_admin: bool
    is_guest: bool = False


def token_from_request(request: Request) -> Optional[str]:
    raw = request.getHeader(b"Authorization")
    if raw:
        header = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        parts = header.split(" ", 1)
        if len(parts) == 2 and parts[0].lower() == "bearer" and parts[1].strip():
            return parts[1].strip()
        raise MatrixError(401, "M_MISSING_TOKEN", "Invalid Authorization header")
    q = request.args.get(b"access_token")
    if q:
        return q[0].decode("utf-8", "replace")
    return None


class Auth:
    def __init__(self, accounts: AccountsStore) -> None:
        self.accounts = accounts

    async def get_user_by_req(self, request: Request) -> Requester:
        token = token_from_request(request)
        if token is None:
            raise MatrixError(401, "M_MISSING_TOKEN", "Missing access token")
        info = await self.accounts.get_token(token)
        if info is None or info.deactivated:
            raise MatrixError(401, "M_UNKNOWN_TOKEN", "Unknown access token", soft_logout=False)
        if info.valid_until_ms is not None and info.valid_until_ms < int(time.time() * 1000):
            raise MatrixError(401, "M_UNKNOWN_TOKEN", "Access token has expired", soft_logout=True)
        if info.is_guest and not guests_allowed(request):
            raise guest_access_forbidden()
        return Requester(info.user_id, info.device_id, info.token_id, info.is_admin, info.is_guest)
