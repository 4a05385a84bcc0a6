"""Access-token authentication of client requests.

Spec: client-server-api "Using access tokens": the token comes from the
``Authorization: Bearer`` header (or the deprecated ``access_token`` query
parameter); a missing token is ``M_MISSING_TOKEN``, an unknown one
``M_UNKNOWN_TOKEN``, an expired one ``M_UNKNOWN_TOKEN`` with
``soft_logout: true``.

Spec: client-server-api "Guest Access": a guest's token is accepted only on
the routes registered as open to guests (``JsonResource.register(...,
guests=True)``); anywhere else it is 403 ``M_GUEST_ACCESS_FORBIDDEN``.

Spec: client-server-api "Account locking": a locked account's tokens stay
valid but every authenticated request other than logging out answers 401
``M_USER_LOCKED`` with ``soft_logout: true``. "Account suspension": a
suspended account reads (every GET) and may do what keeps its data and
sessions in order (leave and forget rooms, redact, receipts, account data,
keys, devices, logging out); any other write is 403 ``M_USER_SUSPENDED``.
The list below is of route names, so a new write route is closed to
suspended accounts until it is added here.

Spec: application-service-api "Identity assertion": a request with a
service's ``as_token`` acts as the service's sender, or with ``?user_id=``
as any user in its users namespace (403 ``M_FORBIDDEN`` for anyone else,
and for a user that does not exist); ``?device_id=`` (MSC3202, also
``org.matrix.msc3202.device_id``) picks one of that user's existing
devices.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from twisted.web.server import Request

from zhome.http.errors import MatrixError, guest_access_forbidden
from zhome.http.server import guests_allowed
from zhome.storage.accounts import AccountsStore

if TYPE_CHECKING:
    from zhome.appservice.service import AppServices


# Routes a locked account may still call.
LOCKED_ALLOWED = frozenset({"logout", "logout_all"})

# Write routes a suspended account may still call.
SUSPENDED_ALLOWED = frozenset({
    "logout", "logout_all", "refresh", "leave", "forget", "redact", "receipt", "read_markers",
    "account_data", "room_account_data", "tag", "filter", "pushrules", "pushers_set",
    "device", "delete_devices", "password", "deactivate",
    "keys_upload", "keys_query", "keys_claim", "send_to_device", "keys_device_signing_upload",
    "keys_signatures_upload", "room_keys_version", "room_keys_version_n", "room_keys_keys", "room_keys_room",
    "room_keys_session", "dehydrated_device", "dehydrated_device_events", "user_directory", "publicRooms",
    "report_event", "report_room", "report_user", "privacy_settings",
})

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class Requester:
    user_id: str
    device_id: str
    token_id: int
    is_admin: bool
    is_guest: bool = False
    #: The ID of the application service whose as_token made the request.
    app_service: Optional[str] = None


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


#: The request attribute set on requests that came in on the operator's admin socket.
OPERATOR_ATTR = "zhome_operator"


class Auth:
    def __init__(self, accounts: AccountsStore) -> None:
        self.accounts = accounts
        #: Who requests on the operator's admin socket act as (a server admin
        #: with no account and no token); set by the server.
        self.operator_user_id = "@zhome-operator:localhost"
        #: The configured application services (None: none configured).
        self.appservices: Optional["AppServices"] = None

    async def _app_service_requester(self, request: Request, token: str,
                                     allow_missing_user: bool) -> Optional[Requester]:
        services = self.appservices
        service = services.by_token(token) if services else None
        if service is None:
            return None
        user_id = service.sender
        asked = request.args.get(b"user_id")
        if asked:
            user_id = asked[0].decode("utf-8", "replace")
            if not service.is_interested_in_user(user_id):
                raise MatrixError(403, "M_FORBIDDEN", "Application service cannot masquerade as this user")
        status = await self.accounts.get_user_status(user_id)
        if status is None and not allow_missing_user:
            raise MatrixError(403, "M_FORBIDDEN", "Application service has not registered this user")
        is_admin = False
        if status is not None:
            is_admin, deactivated, locked, suspended = status
            if deactivated:
                raise MatrixError(403, "M_FORBIDDEN", "This user is deactivated")
            request.zhome_user = user_id  # type: ignore[attr-defined]
            self._check_locked_or_suspended(request, locked, suspended)
        device_id = ""
        raw_device = request.args.get(b"device_id") or request.args.get(b"org.matrix.msc3202.device_id")
        if raw_device:
            device_id = raw_device[0].decode("utf-8", "replace")
            if not any(d["device_id"] == device_id for d in await self.accounts.get_devices(user_id)):
                raise MatrixError(400, "M_UNKNOWN_DEVICE", "This user has no device with this ID")
        request.zhome_user = user_id  # type: ignore[attr-defined]
        return Requester(user_id, device_id, 0, is_admin, False, app_service=service.id)

    @staticmethod
    def _check_locked_or_suspended(request: Request, locked: bool, suspended: bool) -> None:
        if locked or suspended:
            route = getattr(request, "zhome_endpoint", "")
            if locked and route not in LOCKED_ALLOWED:
                raise MatrixError(401, "M_USER_LOCKED", "This account has been locked", soft_logout=True)
            method = request.method.decode("ascii", "replace") if isinstance(request.method, bytes) else str(
                request.method)
            if suspended and method not in READ_METHODS and route not in SUSPENDED_ALLOWED:
                raise MatrixError(403, "M_USER_SUSPENDED", "This account is suspended")

    async def app_service_of(self, request: Request) -> Optional[Requester]:
        """The requester when the request carries an application service's
        as_token (its user need not exist yet: registration), else None."""
        try:
            token = token_from_request(request)
        except MatrixError:
            return None  # a malformed header is no service's; the endpoint decides what it needs
        if token is None:
            return None
        return await self._app_service_requester(request, token, allow_missing_user=True)

    async def get_user_by_req(self, request: Request) -> Requester:
        if getattr(request, OPERATOR_ATTR, False):
            request.zhome_user = self.operator_user_id  # type: ignore[attr-defined]
            return Requester(self.operator_user_id, "", 0, True)
        token = token_from_request(request)
        if token is None:
            raise MatrixError(401, "M_MISSING_TOKEN", "Missing access token")
        if self.appservices:
            as_requester = await self._app_service_requester(request, token, allow_missing_user=False)
            if as_requester is not None:
                return as_requester
        info = await self.accounts.get_token(token)
        if info is None or info.deactivated:
            raise MatrixError(401, "M_UNKNOWN_TOKEN", "Unknown access token", soft_logout=False)
        if info.valid_until_ms is not None and info.valid_until_ms < int(time.time() * 1000):
            raise MatrixError(401, "M_UNKNOWN_TOKEN", "Access token has expired", soft_logout=True)
        # Who made the request, for the audit log.
        request.zhome_user = info.user_id  # type: ignore[attr-defined]
        if info.is_guest and not guests_allowed(request):
            raise guest_access_forbidden()
        self._check_locked_or_suspended(request, info.locked, info.suspended)
        return Requester(info.user_id, info.device_id, info.token_id, info.is_admin, info.is_guest)
