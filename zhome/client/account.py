"""Accounts: versions, capabilities, registration, login, logout, tokens,
password change, deactivation, devices, profiles, user directory.

Spec: client-server-api "Client Authentication", "Account registration and
management", "Capabilities negotiation", "Device management", "Profiles",
"User directory".
"""

from __future__ import annotations

import hashlib
import json
import hmac
import secrets
import time
from typing import TYPE_CHECKING, Any, Optional

from twisted.web.server import Request

from zhome.admin.accounts import deactivate_account, set_profile
from zhome.admin.erasure import erase_user
from zhome.http.errors import (
    MatrixError,
    bad_json,
    forbidden,
    guest_access_forbidden,
    invalid_param,
    missing_param,
    not_found,
)
from zhome.http.server import JsonResource, client_ip, query_arg, read_json_body
from zhome.rooms.versions import KNOWN_ROOM_VERSIONS
from zhome.util.ids import PROFILE_KEY, is_valid_user_id, is_valid_user_localpart, random_string, server_of
from zhome.util.passwords import check_password_async, hash_password_async

if TYPE_CHECKING:
    from zhome.server import HomeServer

CS = r"/_matrix/client/(?:r0|v3)"
#: Localparts zhome keeps for its own accounts.
RESERVED_LOCALPARTS = frozenset({"server-notices", "zhome-operator"})
SPEC_VERSIONS = ["r0.6.1", "v1.1", "v1.2", "v1.3", "v1.4", "v1.5", "v1.6", "v1.7", "v1.8", "v1.9", "v1.10",
                 "v1.11", "v1.12", "v1.13", "v1.14", "v1.15", "v1.16"]
UIA_SESSION_LIFETIME_MS = 30 * 60 * 1000


MAX_PROFILE_KEY_BYTES = 255
#: The whole profile "MUST be under 64 KiB".
MAX_PROFILE_BYTES = 64 * 1024 - 1


def _check_profile_key(field: str) -> None:
    if len(field.encode()) > MAX_PROFILE_KEY_BYTES:
        raise MatrixError(400, "M_KEY_TOO_LARGE", f"Profile keys are at most {MAX_PROFILE_KEY_BYTES} bytes")
    if not PROFILE_KEY.match(field):
        raise invalid_param("Invalid profile key: use displayname, avatar_url, m.tz or a namespaced key")


def new_token(prefix: str) -> str:
    return f"{prefix}_{secrets.token_urlsafe(32)}"


class AccountServlets:
    def __init__(self, hs: "HomeServer") -> None:
        self.hs = hs
        self.accounts = hs.accounts
        self.config = hs.config

    def register_routes(self, r: JsonResource) -> None:
        r.register("GET", r"/_matrix/client/versions", self.on_versions, "versions", guests=True)
        r.register("GET", CS + r"/capabilities", self.on_capabilities, "capabilities")
        r.register("GET", CS + r"/login", self.on_login_flows, "login_flows")
        r.register("POST", CS + r"/login", self.on_login, "login")
        r.register("POST", CS + r"/register", self.on_register, "register", guests=True)
        r.register("GET", CS + r"/register/available", self.on_register_available, "register_available")
        for prefix in (CS, r"/_matrix/client/v1"):
            r.register("GET", prefix + r"/register/m\.login\.registration_token/validity",
                       self.on_regtoken_validity, "regtoken_validity")
        r.register("POST", r"/_matrix/client/v1/login/get_token", self.on_get_login_token, "get_login_token")
        r.register("POST", CS + r"/refresh", self.on_refresh, "refresh")
        r.register("POST", CS + r"/logout", self.on_logout, "logout", guests=True)
        r.register("POST", CS + r"/logout/all", self.on_logout_all, "logout_all")
        r.register("GET", CS + r"/account/whoami", self.on_whoami, "whoami", guests=True)
        r.register("POST", CS + r"/account/password", self.on_password, "password")
        r.register("POST", CS + r"/account/deactivate", self.on_deactivate, "deactivate")
        r.register("GET", CS + r"/devices", self.on_devices, "devices", guests=True)
        r.register("GET", CS + r"/devices/(?P<device_id>[^/]+)", self.on_get_device, "device", guests=True)
        r.register("PUT", CS + r"/devices/(?P<device_id>[^/]+)", self.on_put_device, "device", guests=True)
        r.register("DELETE", CS + r"/devices/(?P<device_id>[^/]+)", self.on_delete_device, "device")
        r.register("POST", CS + r"/delete_devices", self.on_delete_devices, "delete_devices")
        r.register("GET", CS + r"/profile/(?P<user_id>[^/]+)", self.on_get_profile, "profile", guests=True)
        r.register("GET", CS + r"/profile/(?P<user_id>[^/]+)/(?P<field>[^/]+)",
                   self.on_get_profile_field, "profile_field", guests=True)
        r.register("PUT", CS + r"/profile/(?P<user_id>[^/]+)/(?P<field>[^/]+)",
                   self.on_put_profile_field, "profile_field", guests=True)
        r.register("DELETE", CS + r"/profile/(?P<user_id>[^/]+)/(?P<field>[^/]+)",
                   self.on_delete_profile_field, "profile_field")
        r.register("POST", CS + r"/user_directory/search", self.on_user_directory, "user_directory")
        # Shared-secret registration, also under Synapse's path (admin tools use it).
        for prefix in (r"/_zhome/admin/v1", r"/_synapse/admin/v1"):
            r.register("GET", prefix + r"/register", self.on_admin_register_nonce, "admin_register")
            r.register("POST", prefix + r"/register", self.on_admin_register, "admin_register")

    # -- discovery ---------------------------------------------------------
    async def on_versions(self, request: Request) -> tuple[int, Any]:
        from zhome.e2ee.dehydrated_devices import UNSTABLE_FEATURE as DEHYDRATED_DEVICES

        from zhome.client.mutual_rooms import UNSTABLE_FEATURE as MUTUAL_ROOMS

        return 200, {"versions": SPEC_VERSIONS,
                     "unstable_features": {DEHYDRATED_DEVICES: True, MUTUAL_ROOMS: True, "org.matrix.msc3391": True}}

    async def on_capabilities(self, request: Request) -> tuple[int, Any]:
        req = await self.hs.auth.get_user_by_req(request)
        caps: dict[str, Any] = {
            "m.change_password": {"enabled": True},
            "m.room_versions": {
                "default": self.config.rooms.default_room_version,
                "available": {v: "stable" for v in KNOWN_ROOM_VERSIONS},
            },
            "m.set_displayname": {"enabled": True},
            "m.set_avatar_url": {"enabled": True},
            "m.3pid_changes": {"enabled": self.config.email is not None and self.config.email.enable_3pid_changes},
            "m.get_login_token": {"enabled": self.config.access_tokens.login_token_enabled},
            "m.profile_fields": {"enabled": True},
        }
        if req.is_admin:
            # Server administration: admins may lock and suspend accounts.
            caps["m.account_moderation"] = {"lock": True, "suspend": True}
        return 200, {"capabilities": caps}

    # -- login -------------------------------------------------------------
    async def on_login_flows(self, request: Request) -> tuple[int, Any]:
        flows: list[dict[str, Any]] = [{"type": "m.login.password"}]
        if self.config.access_tokens.login_token_enabled:
            # get_login_token: a signed-in client may make tokens of this type.
            flows.append({"type": "m.login.token", "get_login_token": True})
        if self.hs.appservices:
            flows.append({"type": "m.login.application_service"})
        return 200, {"flows": flows}

    async def on_login(self, request: Request) -> tuple[int, Any]:
        body = read_json_body(request)
        self.hs.ratelimit_login.check("ip:" + client_ip(request))
        if not isinstance(body.get("type"), str):
            raise bad_json("'type' must be a string")
        if body.get("type") == "m.login.application_service" and self.hs.appservices:
            return 200, await self._login_application_service(request, body)
        if body.get("type") == "m.login.token" and self.config.access_tokens.login_token_enabled:
            return 200, await self._login_with_token(request, body)
        if body.get("type") != "m.login.password":
            raise MatrixError(400, "M_UNKNOWN", "Unknown login type")
        user_id = self._user_id_from_identifier(body)
        password = body.get("password")
        if not isinstance(password, str):
            raise bad_json("'password' must be a string")
        self.hs.ratelimit_login.check("user:" + user_id)
        user = await self.accounts.get_user(user_id)
        ok = user is not None and not user["deactivated"] and await check_password_async(
            password, user["password_hash"]
        )
        if not ok:
            raise forbidden("Invalid username or password")
        return 200, await self._issue_login(user_id, body, request)

    async def _login_application_service(self, request: Request, body: dict[str, Any]) -> dict[str, Any]:
        """Spec: "Appservice Login": a device and token for a user in the
        service's users namespace, authorised by its as_token."""
        req = await self.hs.auth.app_service_of(request)
        if req is None or req.app_service is None:
            raise MatrixError(401, "M_UNKNOWN_TOKEN", "m.login.application_service needs an application service's"
                              " as_token", soft_logout=False)
        service = self.hs.appservices.by_id(req.app_service)
        assert service is not None
        user_id = self._user_id_from_identifier(body)
        if not service.is_interested_in_user(user_id):
            raise MatrixError(403, "M_FORBIDDEN", "This user is not in the application service's namespace")
        user = await self.accounts.get_user(user_id)
        if user is None or user["deactivated"]:
            raise forbidden("Invalid username")
        return await self._issue_login(user_id, body, request)

    async def on_get_login_token(self, request: Request) -> tuple[int, Any]:
        """Spec: client-server-api "POST /_matrix/client/v1/login/get_token":
        a one-use token for logging in another device as this user, after
        the user proves it is them again (UIA with their password)."""
        req = await self.hs.auth.get_user_by_req(request)
        if not self.config.access_tokens.login_token_enabled:
            raise MatrixError(404, "M_UNRECOGNIZED", "Login tokens are not enabled on this server")
        body = read_json_body(request)
        self.hs.ratelimit_login.check("user:" + req.user_id)
        if req.app_service is None:
            await self.require_password_uia(body, req.user_id, "POST /login/get_token")
        lifetime = self.config.access_tokens.login_token_lifetime_ms
        token = new_token("zhl")
        await self.accounts.create_login_token(token, req.user_id, int(time.time() * 1000) + lifetime)
        return 200, {"login_token": token, "expires_in_ms": lifetime}

    async def _login_with_token(self, request: Request, body: dict[str, Any]) -> dict[str, Any]:
        token = body.get("token")
        if not isinstance(token, str) or not token:
            raise bad_json("'token' must be a non-empty string")
        user_id = await self.accounts.use_login_token(token, int(time.time() * 1000))
        user = await self.accounts.get_user(user_id) if user_id is not None else None
        if user_id is None or user is None or user["deactivated"]:
            raise forbidden("Invalid or expired login token")
        return await self._issue_login(user_id, body, request)

    def _user_id_from_identifier(self, body: dict[str, Any]) -> str:
        ident = body.get("identifier")
        if ident is None:
            user = body.get("user")
        else:
            if not isinstance(ident, dict) or ident.get("type") != "m.id.user":
                raise MatrixError(400, "M_UNKNOWN", "Only m.id.user identifiers are supported")
            user = ident.get("user")
        if not isinstance(user, str) or not user:
            raise missing_param("Missing user identifier")
        if user.startswith("@"):
            return user.lower() if user.lower().endswith(":" + self.hs.server_name) else user
        return f"@{user.lower()}:{self.hs.server_name}"

    async def _issue_login(self, user_id: str, body: dict[str, Any], request: Request) -> dict[str, Any]:
        device_id = body.get("device_id")
        if device_id is None:
            device_id = random_string(10).upper()
        if not isinstance(device_id, str) or not device_id or len(device_id) > 255:
            raise invalid_param("Invalid device_id")
        display = body.get("initial_device_display_name")
        if display is not None and not isinstance(display, str):
            raise bad_json("'initial_device_display_name' must be a string")
        access = new_token("zha")
        lifetime = self.config.access_tokens.lifetime_ms
        want_refresh = body.get("refresh_token") is True and self.config.access_tokens.refresh_tokens and lifetime
        refresh = new_token("zhr") if want_refresh else None
        valid_until = int(time.time() * 1000) + lifetime if lifetime else None
        await self.accounts.create_device_and_token(user_id, device_id, access, display, valid_until, refresh,
                                                    client_ip(request))
        out: dict[str, Any] = {"user_id": user_id, "access_token": access, "device_id": device_id,
                               "home_server": self.hs.server_name}
        if lifetime:
            out["expires_in_ms"] = lifetime
        if refresh:
            out["refresh_token"] = refresh
        return out

    async def on_refresh(self, request: Request) -> tuple[int, Any]:
        body = read_json_body(request)
        rt = body.get("refresh_token")
        if not isinstance(rt, str):
            raise missing_param("Missing refresh_token")
        lifetime = self.config.access_tokens.lifetime_ms
        access, new_refresh = new_token("zha"), new_token("zhr")
        valid_until = int(time.time() * 1000) + lifetime if lifetime else None
        res = await self.accounts.refresh(rt, access, valid_until, new_refresh)
        if res is None:
            raise MatrixError(401, "M_UNKNOWN_TOKEN", "Unknown refresh token", soft_logout=False)
        out: dict[str, Any] = {"access_token": access, "refresh_token": new_refresh}
        if lifetime:
            out["expires_in_ms"] = lifetime
        return 200, out

    async def on_logout(self, request: Request) -> tuple[int, Any]:
        req = await self.hs.auth.get_user_by_req(request)
        await self.accounts.delete_devices(req.user_id, [req.device_id])
        return 200, {}

    async def on_logout_all(self, request: Request) -> tuple[int, Any]:
        req = await self.hs.auth.get_user_by_req(request)
        await self.accounts.delete_devices(req.user_id, None)
        return 200, {}

    async def on_whoami(self, request: Request) -> tuple[int, Any]:
        req = await self.hs.auth.get_user_by_req(request)
        return 200, {"user_id": req.user_id, "device_id": req.device_id, "is_guest": req.is_guest}

    # -- registration -------------------------------------------------------
    def _registration_flows(self) -> list[dict[str, Any]]:
        if self.config.registration.registration_requires_token:
            return [{"stages": ["m.login.registration_token"]}]
        if self.config.email is not None and self.config.email.registration_requires_email:
            return [{"stages": ["m.login.email.identity"]}]
        return [{"stages": ["m.login.dummy"]}]

    async def on_register_available(self, request: Request) -> tuple[int, Any]:
        # Counted apart from registrations, with the same numbers.
        self.hs.ratelimit_registration.check("available-ip:" + client_ip(request))
        username = query_arg(request, "username")
        if not username:
            raise missing_param("Missing username")
        user_id = self._check_username(username)
        if await self.accounts.user_exists_ci(user_id):
            raise MatrixError(400, "M_USER_IN_USE", "User ID already taken.")
        self._refuse_exclusive(user_id)
        return 200, {"available": True}

    def _refuse_exclusive(self, user_id: str) -> None:
        """Spec: application-service-api "Registration": a user ID in a
        service's exclusive namespace is only for that service."""
        if self.hs.appservices and self.hs.appservices.exclusive_user_owner(user_id) is not None:
            raise MatrixError(400, "M_EXCLUSIVE", "This user ID is reserved by an application service")

    async def on_regtoken_validity(self, request: Request) -> tuple[int, Any]:
        token = query_arg(request, "token")
        if token is None:
            raise missing_param("Missing token")
        return 200, {"valid": await self.accounts.registration_token_valid(token)}

    def _check_username(self, username: Any) -> str:
        if not isinstance(username, str):
            raise bad_json("'username' must be a string")
        local = username.lower() if not username.startswith("@") else username[1:].split(":", 1)[0].lower()
        if not local or not is_valid_user_localpart(local):
            raise MatrixError(400, "M_INVALID_USERNAME", "User ID may only contain a-z, 0-9, '.', '_', '=', '-', '/', '+'")
        user_id = f"@{local}:{self.hs.server_name}"
        if len(user_id.encode()) > 255:
            raise MatrixError(400, "M_INVALID_USERNAME", "User ID is too long")
        if local in RESERVED_LOCALPARTS:
            # The server's own accounts (server notices, the operator).
            raise MatrixError(400, "M_USER_IN_USE", "User ID already taken.")
        return user_id

    async def on_register(self, request: Request) -> tuple[int, Any]:
        """Spec: "Account registration": user-interactive auth in steps.

        The first call's parameters (username, password, device, login
        wishes) are remembered in the UIA session, so later steps may send
        only ``auth``; the session also remembers the account it created,
        so completing it again answers for that account instead of making
        another. Only completed registrations count against the
        registration rate limit; refused attempts count in a bucket of
        their own.
        """
        body = read_json_body(request, allow_empty=True)
        kind = query_arg(request, "kind", "user")
        if self.hs.appservices:
            as_req = await self.hs.auth.app_service_of(request)
            if as_req is not None:
                return await self._register_application_service(request, body, as_req.app_service or "")
            if body.get("type") == "m.login.application_service":
                raise MatrixError(401, "M_MISSING_TOKEN", "m.login.application_service needs an application"
                                  " service's as_token")
        if kind == "guest":
            return await self._register_guest(request, body)
        if kind != "user":
            raise invalid_param("Unknown kind")
        if not self.config.registration.enable_registration:
            raise forbidden("Registration has been disabled")
        ip = client_ip(request)
        limiter = self.hs.ratelimit_registration
        limiter.peek("ip:" + ip)
        limiter.peek("failed-ip:" + ip)
        try:
            return await self._register(request, body)
        except MatrixError as e:
            if isinstance(body.get("auth"), dict) or e.code != 401:
                # Anything but the first step's offer of flows is a failure.
                limiter.record("failed-ip:" + ip)
            raise

    async def _register_application_service(self, request: Request, body: dict[str, Any],
                                            as_id: str) -> tuple[int, Any]:
        """Spec: client-server-api "Account registration" with ``type:
        m.login.application_service``: no user-interactive auth; the
        username must be in the service's users namespace."""
        service = self.hs.appservices.by_id(as_id)
        assert service is not None
        if body.get("type") != "m.login.application_service":
            raise MatrixError(400, "M_APPSERVICE_LOGIN_UNSUPPORTED",
                              "An application service registers with type m.login.application_service")
        username = body.get("username")
        if username is None:
            raise missing_param("Missing username")
        user_id = self._check_username(username)
        if not service.is_interested_in_user(user_id):
            raise MatrixError(400, "M_EXCLUSIVE", "This user ID is not in the application service's namespace")
        owner = self.hs.appservices.exclusive_user_owner(user_id)
        if owner is not None and owner.id != service.id:
            raise MatrixError(400, "M_EXCLUSIVE", "This user ID is reserved by another application service")
        if not await self.accounts.create_user(user_id, None, displayname=user_id[1:].split(":")[0]):
            raise MatrixError(400, "M_USER_IN_USE", "User ID already taken.")
        keys = ("device_id", "initial_device_display_name", "inhibit_login", "refresh_token")
        params: dict[str, Any] = {k: body[k] for k in keys if k in body}
        return 200, await self._registered(request, user_id, params)

    async def _register_guest(self, request: Request, body: dict[str, Any]) -> tuple[int, Any]:
        """Spec: "Guest Access": a guest account, without user-interactive auth.

        Every body parameter but ``initial_device_display_name`` is ignored
        and the server picks the device ID, as the spec says for guests. The
        localpart is numeric, so a guest never takes a name someone may want.
        """
        if not self.config.registration.allow_guest_access:
            raise guest_access_forbidden("Guest access is disabled")
        ip = client_ip(request)
        self.hs.ratelimit_registration.check("guest-ip:" + ip)
        display = body.get("initial_device_display_name")
        if display is not None and not isinstance(display, str):
            raise bad_json("'initial_device_display_name' must be a string")
        for _ in range(10):
            user_id = f"@{secrets.randbelow(10**12):012d}:{self.hs.server_name}"
            # A display name like any new account's, so profile look-ups find one.
            if await self.accounts.create_user(user_id, None, guest=True, displayname=user_id[1:].split(":")[0]):
                break
        else:
            raise MatrixError(503, "M_UNKNOWN", "Could not allocate a guest user ID; try again")
        params: dict[str, Any] = {}
        if display is not None:
            params["initial_device_display_name"] = display
        return 200, await self._issue_login(user_id, params, request)

    async def _register(self, request: Request, body: dict[str, Any]) -> tuple[int, Any]:
        auth = body.get("auth")
        session_id = auth.get("session") if isinstance(auth, dict) else None
        session = await self.accounts.get_uia_session(session_id) if isinstance(session_id, str) else None
        remembered: dict[str, Any] = session[1] if session is not None else {}
        if remembered.get("registered_user_id"):
            # This session already created its account: the same answer again.
            return 200, await self._registered(request, remembered["registered_user_id"], {**remembered, **body})
        params = await self._registration_params(body, remembered)
        if not isinstance(auth, dict):
            session_id = random_string(24)
            await self.accounts.create_uia_session(session_id, params)
            raise MatrixError(401, "M_FORBIDDEN", "Authentication required", flows=self._registration_flows(),
                              params={}, session=session_id, completed=[])
        used_token, email_session = await self._registration_uia(auth)
        user_id = params.get("user_id")
        if user_id is None:
            for _ in range(10):
                candidate = f"@{random_string(12).lower()}:{self.hs.server_name}"
                if not await self.accounts.user_exists_ci(candidate):
                    user_id = candidate
                    break
            else:
                raise MatrixError(500, "M_UNKNOWN", "Could not allocate a user ID")
        if params.get("guest_user_id") is not None:
            # Spec: "Guest Access": the guest's account becomes a full one,
            # keeping its user ID (and so its rooms, devices and data).
            if not await self.accounts.upgrade_guest(user_id, params.get("password_hash")):
                raise MatrixError(400, "M_USER_IN_USE", "User ID already taken.")
        elif not await self.accounts.create_user(user_id, params.get("password_hash"),
                                                 displayname=user_id[1:].split(":")[0]):
            raise MatrixError(400, "M_USER_IN_USE", "User ID already taken.")
        self.hs.ratelimit_registration.record("ip:" + client_ip(request))
        if used_token is not None:
            await self.accounts.use_registration_token(used_token)
        if email_session is not None:
            # The address the m.login.email.identity stage validated
            # becomes the new account's.
            if await self.hs.threepids.add(user_id, email_session["medium"], email_session["address"],
                                           int(email_session["validated_at"])):
                await self.hs.threepids.delete_session(email_session["sid"])
        if isinstance(session_id, str):
            # What a repeat needs, without the password's hash and digest.
            done = {k: v for k, v in params.items() if k not in ("password_hash", "password_digest")}
            done["registered_user_id"] = user_id
            if session is not None:
                await self.accounts.set_uia_params(session_id, done)
            else:
                await self.accounts.create_uia_session(session_id, done)
        return 200, await self._registered(request, user_id, params)

    async def _registration_params(self, body: dict[str, Any], remembered: dict[str, Any]) -> dict[str, Any]:
        """What this registration asks for: the body's values, else those
        the session remembers from an earlier step."""
        params = dict(remembered)
        username = body.get("username")
        if username is not None:
            params["user_id"] = self._check_username(username)
            self._refuse_exclusive(params["user_id"])
        guest_token = body.get("guest_access_token")
        if guest_token is not None:
            params["guest_user_id"] = await self._guest_to_upgrade(guest_token)
        guest_user_id = params.get("guest_user_id")
        if guest_user_id is not None:
            # An upgrade keeps the guest's user ID: a username, if given,
            # must name that account and no other.
            if params.get("user_id", guest_user_id) != guest_user_id:
                raise forbidden("guest_access_token belongs to another user")
            params["user_id"] = guest_user_id
        elif params.get("user_id") is not None and await self.accounts.user_exists_ci(params["user_id"]):
            raise MatrixError(400, "M_USER_IN_USE", "User ID already taken.")
        password = body.get("password")
        if password is not None:
            if not isinstance(password, str) or len(password) > 512:
                raise bad_json("'password' must be a string of at most 512 characters")
            # The same password sent again in a later step (as clients do)
            # is recognised by a keyed digest instead of being hashed again.
            digest = self._password_digest(password)
            if params.get("password_digest") != digest or "password_hash" not in params:
                params["password_hash"] = await hash_password_async(password) if password else None
                params["password_digest"] = digest
        for key in ("device_id", "initial_device_display_name", "inhibit_login", "refresh_token"):
            if key in body:
                params[key] = body[key]
        return params

    def _password_digest(self, password: str) -> str:
        """HMAC-SHA256 of a password under the server's form secret: tells
        two steps of one registration whether they sent the same password."""
        key = self.config.secrets.form_secret.encode()
        return hmac.new(key, b"registration-password\x00" + password.encode(), hashlib.sha256).hexdigest()

    async def _guest_to_upgrade(self, guest_token: Any) -> str:
        """The guest account a ``guest_access_token`` names."""
        if not isinstance(guest_token, str) or not guest_token:
            raise bad_json("'guest_access_token' must be a string")
        info = await self.accounts.get_token(guest_token)
        if info is None or info.deactivated or (
                info.valid_until_ms is not None and info.valid_until_ms < int(time.time() * 1000)):
            raise forbidden("Unknown or expired guest_access_token")
        if not info.is_guest:
            raise forbidden("guest_access_token is not a guest's token")
        return info.user_id

    async def _registered(self, request: Request, user_id: str, params: dict[str, Any]) -> dict[str, Any]:
        if params.get("inhibit_login") is True:
            return {"user_id": user_id, "home_server": self.hs.server_name}
        return await self._issue_login(user_id, params, request)

    async def _registration_uia(self, auth: dict[str, Any]) -> tuple[Optional[str], Optional[dict[str, Any]]]:
        """Check the registration UIA stage; returns the registration token
        used and the validated email session, if any."""
        flows = self._registration_flows()
        stage = flows[0]["stages"][0]
        session = auth.get("session")
        if auth.get("type") != stage:
            raise MatrixError(401, "M_FORBIDDEN", "This authentication type is not allowed here", flows=flows,
                              params={}, session=session, completed=[])
        if stage == "m.login.email.identity":
            email = await self.hs.threepid_servlets.email_stage(auth, flows, session)
            if await self.hs.threepids.user_for(email["medium"], email["address"]) is not None:
                raise MatrixError(400, "M_THREEPID_IN_USE", "This address is already registered")
            return None, email
        if stage == "m.login.registration_token":
            token = auth.get("token")
            if not isinstance(token, str) or not await self.accounts.registration_token_valid(token):
                raise MatrixError(401, "M_FORBIDDEN", "Invalid registration token", flows=flows, params={},
                                  session=session, completed=[])
            return token, None
        return None, None

    # -- UIA for existing users ------------------------------------------------
    async def require_password_uia(self, body: dict[str, Any], user_id: str, operation: str) -> None:
        """User-interactive auth with m.login.password for sensitive actions.

        ``operation`` names what is being authorised (method, path and the
        parameters that matter): a session started for one operation cannot
        complete another (spec "User-interactive authentication API": the
        server must bind the session to the request it started with).
        """
        flows = [{"stages": ["m.login.password"]}]
        auth = body.get("auth")
        session: object  # client-supplied once auth is given: any JSON value
        if not isinstance(auth, dict):
            session = random_string(24)
            await self.accounts.create_uia_session(session, {"user_id": user_id, "operation": operation})
            raise MatrixError(401, "M_FORBIDDEN", "Authentication required", flows=flows, params={}, session=session,
                              completed=[])
        session = auth.get("session")
        if isinstance(session, str):
            stored = await self.accounts.get_uia_session(session)
            if stored is not None and stored[1].get("operation") not in (None, operation):
                raise forbidden("This authentication session was started for another operation")
        if auth.get("type") != "m.login.password":
            raise MatrixError(401, "M_FORBIDDEN", "Unsupported authentication type", flows=flows, params={},
                              session=session, completed=[])
        claimed = self._user_id_from_identifier(auth)
        if claimed != user_id:
            # Someone else's credentials never authorise this account's actions.
            raise forbidden("The authenticated user does not match the requester")
        user = await self.accounts.get_user(user_id)
        pw = auth.get("password")
        ok = user is not None and isinstance(pw, str) and await check_password_async(pw, user["password_hash"])
        if not ok:
            raise MatrixError(401, "M_FORBIDDEN", "Invalid password", flows=flows, params={}, session=session,
                              completed=[])
        if isinstance(session, str):
            await self.accounts.delete_uia_session(session)

    async def on_password(self, request: Request) -> tuple[int, Any]:
        from zhome.client.threepids import has_token

        if not has_token(request) and self.config.email is not None:
            # Spec: "Password management": a forgotten password is reset
            # with m.login.email.identity, without an access token.
            return await self.hs.threepid_servlets.password_reset(request, read_json_body(request))
        req = await self.hs.auth.get_user_by_req(request)
        body = read_json_body(request)
        if req.app_service is None:  # an application service's users have no password (spec: UIA)
            await self.require_password_uia(body, req.user_id, "POST /account/password")
        new = body.get("new_password")
        if not isinstance(new, str) or not new or len(new) > 512:
            raise bad_json("'new_password' must be a non-empty string")
        await self.accounts.set_password_hash(req.user_id, await hash_password_async(new))
        if body.get("logout_devices", True):
            await self.accounts.delete_other_tokens(req.user_id, req.device_id)
        return 200, {}

    async def on_deactivate(self, request: Request) -> tuple[int, Any]:
        req = await self.hs.auth.get_user_by_req(request)
        body = read_json_body(request)
        if req.app_service is None:  # an application service's users have no password (spec: UIA)
            await self.require_password_uia(body, req.user_id, "POST /account/deactivate")
        erase = body.get("erase", False)
        if not isinstance(erase, bool):
            raise bad_json("'erase' must be a boolean")
        if erase:
            # The user's own right to erasure: the same erasure an admin runs.
            await erase_user(self.hs, req.user_id, req.user_id)
        else:
            await deactivate_account(self.hs, req.user_id, erase=False)
        return 200, {"id_server_unbind_result": "no-support"}

    # -- devices ---------------------------------------------------------------
    async def on_devices(self, request: Request) -> tuple[int, Any]:
        req = await self.hs.auth.get_user_by_req(request)
        return 200, {"devices": await self.accounts.get_devices(req.user_id)}

    async def on_get_device(self, request: Request, device_id: str) -> tuple[int, Any]:
        req = await self.hs.auth.get_user_by_req(request)
        for d in await self.accounts.get_devices(req.user_id):
            if d["device_id"] == device_id:
                return 200, d
        raise not_found("Device not found")

    async def on_put_device(self, request: Request, device_id: str) -> tuple[int, Any]:
        req = await self.hs.auth.get_user_by_req(request)
        body = read_json_body(request, allow_empty=True)
        name = body.get("display_name")
        if name is not None and not isinstance(name, str):
            raise bad_json("'display_name' must be a string")
        if not await self.accounts.set_device_name(req.user_id, device_id, name):
            raise not_found("Device not found")
        return 200, {}

    async def on_delete_device(self, request: Request, device_id: str) -> tuple[int, Any]:
        req = await self.hs.auth.get_user_by_req(request)
        body = read_json_body(request, allow_empty=True)
        if not any(d["device_id"] == device_id for d in await self.accounts.get_devices(req.user_id)):
            raise not_found("Device not found")
        if req.app_service is None:  # an application service's users have no password (spec: UIA)
            await self.require_password_uia(body, req.user_id, "DELETE /devices/" + device_id)
        await self.accounts.delete_devices(req.user_id, [device_id])
        return 200, {}

    async def on_delete_devices(self, request: Request) -> tuple[int, Any]:
        req = await self.hs.auth.get_user_by_req(request)
        body = read_json_body(request)
        devices = body.get("devices")
        if not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
            raise bad_json("'devices' must be a list of device IDs")
        if req.app_service is None:  # an application service's users have no password (spec: UIA)
            await self.require_password_uia(body, req.user_id, "POST /delete_devices " + json.dumps(sorted(devices)))
        await self.accounts.delete_devices(req.user_id, devices)
        return 200, {}

    # -- profiles ----------------------------------------------------------------
    async def _profile_or_404(self, user_id: str) -> dict[str, Optional[str]]:
        if not is_valid_user_id(user_id):
            raise invalid_param("Invalid user ID")
        server = user_id.split(":", 1)[1]
        if server != self.hs.server_name and self.hs.federation_client is not None:
            return await self._remote_profile(server, user_id)
        p = await self.accounts.get_profile(user_id)
        if p is None and self.hs.appservices and await self.hs.appservices.query_user(user_id):
            # Spec: application-service-api "Querying": the service made it.
            p = await self.accounts.get_profile(user_id)
        if p is None:
            raise not_found("Profile not found")
        return p

    async def _remote_profile(self, server: str, user_id: str) -> dict[str, Any]:
        """Spec: server-server-api "Query Types" (GET /query/profile)."""
        from zhome.federation.transport import FederationDenied, FederationError, FederationHttpError

        try:
            resp = await self.hs.federation_client.get_json(
                server, "/_matrix/federation/v1/query/profile", query={"user_id": user_id})
        except FederationHttpError as e:
            if e.status == 404:
                raise not_found("Profile not found")
            raise MatrixError(502, "M_UNKNOWN", f"{server} answered {e.status} to the profile query")
        except FederationDenied:
            raise forbidden(f"Federation with {server} is not allowed")
        except FederationError as e:
            raise MatrixError(502, "M_UNKNOWN", f"Could not reach {server}: {type(e).__name__}")
        if not isinstance(resp, dict):
            raise MatrixError(502, "M_UNKNOWN", f"{server} sent a bad profile")
        out: dict[str, Any] = {k: (resp[k] if isinstance(resp.get(k), str) else None)
                               for k in ("displayname", "avatar_url")}
        # Extended fields under keys the spec allows; anything else is dropped.
        out.update({k: v for k, v in resp.items() if k not in out and isinstance(k, str) and PROFILE_KEY.match(k)})
        return out

    async def _full_profile(self, user_id: str) -> dict[str, Any]:
        p: dict[str, Any] = dict(await self._profile_or_404(user_id))
        if server_of(user_id) == self.hs.server_name:
            p.update(await self.accounts.get_profile_fields(user_id))
        return {k: v for k, v in p.items() if v is not None}

    async def on_get_profile(self, request: Request, user_id: str) -> tuple[int, Any]:
        return 200, await self._full_profile(user_id)

    async def on_get_profile_field(self, request: Request, user_id: str, field: str) -> tuple[int, Any]:
        _check_profile_key(field)
        p = await self._full_profile(user_id)
        if field not in p:
            raise not_found(f"No {field} set")
        return 200, {field: p[field]}

    async def _own_profile(self, request: Request, user_id: str, field: str) -> None:
        req = await self.hs.auth.get_user_by_req(request)
        _check_profile_key(field)
        if req.user_id != user_id and not req.is_admin:
            raise forbidden("You may only change your own profile")
        if server_of(user_id) != self.hs.server_name:
            raise forbidden("Only profiles of this server's users can be changed here")
        await self._profile_or_404(user_id)

    async def on_put_profile_field(self, request: Request, user_id: str, field: str) -> tuple[int, Any]:
        await self._own_profile(request, user_id, field)
        body = read_json_body(request)
        if field not in body:
            raise missing_param(f"The body must have '{field}', the field named in the path")
        value = body[field]
        if field in ("displayname", "avatar_url"):
            if value is not None and not isinstance(value, str):
                raise bad_json(f"'{field}' must be a string")
            if isinstance(value, str) and len(value) > 256 and field == "displayname":
                raise bad_json("displayname is too long")
            # Carried into the user's membership in every joined room.
            await set_profile(self.hs, user_id, field, value)
            return 200, {}
        if field == "m.tz" and not isinstance(value, str):
            raise bad_json("'m.tz' must be a string (an IANA time zone name)")
        if not await self.accounts.set_extended_profile_field(user_id, field, value, MAX_PROFILE_BYTES):
            raise MatrixError(400, "M_PROFILE_TOO_LARGE", f"The profile would exceed {MAX_PROFILE_BYTES} bytes")
        return 200, {}

    async def on_delete_profile_field(self, request: Request, user_id: str, field: str) -> tuple[int, Any]:
        await self._own_profile(request, user_id, field)
        if field in ("displayname", "avatar_url"):
            await set_profile(self.hs, user_id, field, None)
        else:
            await self.accounts.delete_extended_profile_field(user_id, field)
        return 200, {}

    async def on_user_directory(self, request: Request) -> tuple[int, Any]:
        req = await self.hs.auth.get_user_by_req(request)
        body = read_json_body(request)
        term = body.get("search_term")
        if not isinstance(term, str):
            raise bad_json("'search_term' must be a string")
        limit = body.get("limit", 10)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            raise bad_json("'limit' must be a non-negative integer")
        limit = min(limit, 100)
        rows = await self.hs.user_directory.search(req.user_id, term, limit + 1)
        results = []
        for user_id, name, avatar in rows[:limit]:
            r: dict[str, Any] = {"user_id": user_id}
            if name is not None:
                r["display_name"] = name
            if avatar is not None:
                r["avatar_url"] = avatar
            results.append(r)
        return 200, {"results": results, "limited": len(rows) > limit}

    # -- shared-secret registration for operators ----------------------------------
    async def on_admin_register_nonce(self, request: Request) -> tuple[int, Any]:
        if not self.config.registration.registration_shared_secret:
            raise forbidden("Shared-secret registration is not enabled")
        nonce = secrets.token_hex(16)
        self.hs.registration_nonces[nonce] = time.monotonic()
        return 200, {"nonce": nonce}

    async def on_admin_register(self, request: Request) -> tuple[int, Any]:
        secret = self.config.registration.registration_shared_secret
        if not secret:
            raise forbidden("Shared-secret registration is not enabled")
        body = read_json_body(request)
        nonce = body.get("nonce")
        created = self.hs.registration_nonces.pop(nonce, None) if isinstance(nonce, str) else None
        if created is None or time.monotonic() - created > 60:
            raise forbidden("Unknown or expired nonce")
        username, password, admin, mac = (body.get("username"), body.get("password"), body.get("admin", False),
                                          body.get("mac"))
        if not isinstance(username, str) or not isinstance(password, str) or not isinstance(mac, str):
            raise bad_json("username, password and mac are required strings")
        # HMAC-SHA256, or HMAC-SHA1 as Synapse's admin tools compute it.
        if not any(hmac.compare_digest(registration_mac(secret, nonce, username, password, bool(admin), algo), mac)
                   for algo in ("sha256", "sha1")):
            raise forbidden("HMAC incorrect")
        user_id = self._check_username(username)
        pw_hash = await hash_password_async(password)
        if not await self.accounts.create_user(user_id, pw_hash, admin=bool(admin), displayname=username.lower()):
            raise MatrixError(400, "M_USER_IN_USE", "User ID already taken.")
        return 200, await self._issue_login(user_id, body, request)


def registration_mac(secret: str, nonce: str, username: str, password: str, admin: bool,
                     algorithm: str = "sha256") -> str:
    """HMAC (SHA-256 by default) over nonce, username, password and the admin flag, NUL-separated."""
    msg = b"\x00".join([nonce.encode(), username.encode(), password.encode(), b"admin" if admin else b"notadmin"])
    return hmac.new(secret.encode(), msg, getattr(hashlib, algorithm)).hexdigest()
