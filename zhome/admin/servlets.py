"""The admin API: the spec's server administration endpoints and the
Synapse-compatible ``/_synapse/admin`` paths existing admin tools use.

Spec: client-server-api "Server administration" (GET /admin/whois,
GET/PUT /v1/admin/lock and /v1/admin/suspend). The ``/_synapse/admin``
paths serve the same request and response shapes as Synapse's admin API
for what zhome has in common with it (users, their devices and rooms), so
that tools written for it work unmodified. Every endpoint checks that the
requester is a server admin before it looks anything up (so a non-admin
learns nothing about which accounts exist) and answers a non-admin 403
``M_FORBIDDEN``.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any, Optional

from twisted.web.server import Request

import zhome
from zhome.admin.accounts import deactivate_account, set_profile
from zhome.admin.erasure import erase_user
from zhome.http.auth import Requester
from zhome.admin.common import bool_arg, int_arg, require_admin
from zhome.http.errors import MatrixError, bad_json, forbidden, invalid_param, not_found
from zhome.http.server import JsonResource, query_arg, read_json_body
from zhome.storage.admin import USER_ORDER_COLUMNS, UserQuery
from zhome.util.ids import is_valid_user_id, random_string, server_of
from zhome.util.passwords import hash_password_async

if TYPE_CHECKING:
    from zhome.server import HomeServer

SYN1 = r"/_synapse/admin/v1"
SYN2 = r"/_synapse/admin/v2"
USER = r"(?P<user_id>[^/]+)"
MAX_PAGE = 1000


TOKEN_RE = re.compile(r"^[A-Za-z0-9._~-]{1,64}\Z")


def _token_limits(body: dict[str, Any]) -> tuple[Optional[int], Optional[int]]:
    uses = body.get("uses_allowed")
    if uses is not None and (not isinstance(uses, int) or isinstance(uses, bool) or uses < 0):
        raise invalid_param("uses_allowed must be a non-negative integer or null")
    expiry = body.get("expiry_time")
    if expiry is not None and (not isinstance(expiry, int) or isinstance(expiry, bool) or
                               expiry < int(time.time() * 1000)):
        raise invalid_param("expiry_time must be a time in the future, in milliseconds, or null")
    return uses, expiry


class AdminServlets:
    def __init__(self, hs: "HomeServer") -> None:
        self.hs = hs
        self.accounts = hs.accounts
        self.store = hs.admin_store

    def register_routes(self, r: JsonResource) -> None:
        r.register("GET", SYN1 + r"/server_version", self.on_server_version, "admin_server_version")
        for v in ("v2", "v3"):
            r.register("GET", rf"/_synapse/admin/{v}/users", self._list_users_handler(v), "admin_list_users")
        r.register("GET", SYN2 + r"/users/" + USER, self.on_get_user, "admin_user")
        r.register("PUT", SYN2 + r"/users/" + USER, self.on_put_user, "admin_user")
        r.register("POST", SYN1 + r"/deactivate/" + USER, self.on_deactivate, "admin_deactivate")
        r.register("POST", SYN1 + r"/reset_password/" + USER, self.on_reset_password, "admin_reset_password")
        r.register("GET", SYN1 + r"/whois/" + USER, self.on_whois, "admin_whois")
        r.register("GET", r"/_matrix/client/(?:r0|v3)/admin/whois/" + USER, self.on_whois, "admin_whois")
        r.register("GET", SYN1 + r"/users/" + USER + r"/joined_rooms", self.on_joined_rooms, "admin_joined_rooms")
        r.register("GET", SYN1 + r"/users/" + USER + r"/pushers", self.on_pushers, "admin_pushers")
        r.register("GET", SYN1 + r"/users/" + USER + r"/admin", self.on_get_admin, "admin_user_admin")
        r.register("PUT", SYN1 + r"/users/" + USER + r"/admin", self.on_put_admin, "admin_user_admin")
        r.register("GET", SYN2 + r"/users/" + USER + r"/devices", self.on_devices, "admin_devices")
        r.register("POST", SYN2 + r"/users/" + USER + r"/delete_devices", self.on_delete_devices,
                   "admin_delete_devices")
        dev = SYN2 + r"/users/" + USER + r"/devices/(?P<device_id>[^/]+)"
        r.register("GET", dev, self.on_get_device, "admin_device")
        r.register("PUT", dev, self.on_put_device, "admin_device")
        r.register("DELETE", dev, self.on_delete_device, "admin_device")
        tokens = SYN1 + r"/registration_tokens"
        r.register("GET", tokens, self.on_list_tokens, "admin_registration_tokens")
        r.register("POST", tokens + r"/new", self.on_new_token, "admin_registration_tokens")
        r.register("GET", tokens + r"/(?P<token>[^/]+)", self.on_get_token, "admin_registration_token")
        r.register("PUT", tokens + r"/(?P<token>[^/]+)", self.on_put_token, "admin_registration_token")
        r.register("DELETE", tokens + r"/(?P<token>[^/]+)", self.on_delete_token, "admin_registration_token")
        r.register("PUT", SYN1 + r"/suspend/" + USER, self.on_synapse_suspend, "admin_suspend")
        for flag in ("lock", "suspend"):
            path = rf"/_matrix/client/v1/admin/{flag}/" + USER
            r.register("GET", path, self._get_flag_handler(flag), f"admin_{flag}")
            r.register("PUT", path, self._put_flag_handler(flag), f"admin_{flag}")

    # -- helpers -------------------------------------------------------------------
    async def require_admin(self, request: Request) -> Requester:
        return await require_admin(self.hs, request)

    def _local(self, user_id: str) -> None:
        if not is_valid_user_id(user_id):
            raise invalid_param("Invalid user ID")
        if server_of(user_id) != self.hs.server_name:
            raise invalid_param("Can only look up local users")

    async def _existing(self, user_id: str) -> dict[str, Any]:
        self._local(user_id)
        user = await self.store.get_user(user_id)
        if user is None:
            raise not_found("User not found")
        return user

    async def _user_view(self, user_id: str) -> dict[str, Any]:
        user = await self._existing(user_id)
        user.update(threepids=await self.hs.threepids.list_for_user(user_id), external_ids=[], appservice_id=None,
                    consent_server_notice_sent=None, consent_version=None, consent_ts=None)
        return user

    # -- server ------------------------------------------------------------------------
    async def on_server_version(self, request: Request) -> tuple[int, Any]:
        await self.require_admin(request)
        return 200, {"server_version": zhome.__version__}

    # -- users -------------------------------------------------------------------------
    def _list_users_handler(self, version: str) -> Any:
        async def handler(request: Request) -> tuple[int, Any]:
            await self.require_admin(request)
            order_by = query_arg(request, "order_by") or "name"
            if order_by not in USER_ORDER_COLUMNS:
                raise invalid_param(f"Unknown value for order_by: {order_by}")
            direction = query_arg(request, "dir") or "f"
            if direction not in ("f", "b"):
                raise invalid_param("dir must be f or b")
            q = UserQuery(
                name=query_arg(request, "name") or None,
                user_id=query_arg(request, "user_id") or None,
                guests=bool(bool_arg(request, "guests", True)),
                admins=bool_arg(request, "admins", None),
                locked=bool(bool_arg(request, "locked", False)),
                not_user_types=tuple(v.decode("utf-8", "replace") for v in request.args.get(b"not_user_type", [])),
                order_by=order_by, backwards=direction == "b",
                offset=int_arg(request, "from", 0), limit=int_arg(request, "limit", 100, MAX_PAGE))
            if version == "v2":
                # v2: deactivated=true adds deactivated accounts to the active ones.
                q.deactivated = None if bool_arg(request, "deactivated", False) else False
            else:
                # v3: true only deactivated, false only active, absent both.
                q.deactivated = bool_arg(request, "deactivated", None)
            users, total = await self.store.list_users(q)
            body: dict[str, Any] = {"users": users, "total": total}
            if q.offset + len(users) < total and users:
                body["next_token"] = str(q.offset + len(users))
            return 200, body
        return handler

    async def on_get_user(self, request: Request, user_id: str) -> tuple[int, Any]:
        await self.require_admin(request)
        return 200, await self._user_view(user_id)

    async def on_put_user(self, request: Request, user_id: str) -> tuple[int, Any]:
        req = await self.require_admin(request)
        self._local(user_id)
        body = read_json_body(request, allow_empty=True)
        password = body.get("password")
        if password is not None and (not isinstance(password, str) or not password or len(password) > 512):
            raise invalid_param("password must be a non-empty string of at most 512 characters")
        for key in ("displayname", "avatar_url"):
            if key in body and body[key] is not None and not isinstance(body[key], str):
                raise invalid_param(f"{key} must be a string")
        avatar = body.get("avatar_url")
        if avatar and not avatar.startswith("mxc://"):
            raise invalid_param("avatar_url must be an mxc:// URI")
        for key in ("admin", "deactivated", "locked", "logout_devices"):
            if key in body and not isinstance(body[key], bool):
                raise invalid_param(f"{key} must be a boolean")
        if "user_type" in body and body["user_type"] not in (None, "bot", "support"):
            raise invalid_param("user_type must be null, bot or support")
        threepids = self._threepids_of(body)
        for medium, address in threepids or ():
            if await self.hs.threepids.user_for(medium, address) not in (None, user_id):
                raise MatrixError(400, "M_THREEPID_IN_USE", "A 3PID in 'threepids' belongs to another account")
        if user_id == req.user_id and body.get("admin") is False:
            raise invalid_param("You may not demote yourself")
        existing = await self.store.get_user(user_id)
        created = existing is None
        if existing is not None and existing["deactivated"] and body.get("deactivated") is False and not password:
            raise invalid_param("Reactivating an account needs a password")
        pw_hash = await hash_password_async(password) if password else None
        if created:
            if body.get("deactivated"):
                raise invalid_param("A new account cannot be deactivated")
            local = user_id[1:].split(":", 1)[0]
            ok = await self.accounts.create_user(user_id, pw_hash, admin=bool(body.get("admin", False)),
                                                 displayname=body.get("displayname") or local)
            if not ok:
                raise MatrixError(400, "M_USER_IN_USE", "User ID already taken.")
        else:
            assert existing is not None
            if body.get("deactivated") is True and not existing["deactivated"]:
                await deactivate_account(self.hs, user_id, erase=False)
            elif body.get("deactivated") is False and existing["deactivated"]:
                await self.accounts.reactivate(user_id)
            if pw_hash is not None:
                await self.accounts.set_password_hash(user_id, pw_hash)
                if body.get("logout_devices", True):
                    await self.accounts.delete_other_tokens(user_id, None)
            if "displayname" in body:
                await set_profile(self.hs, user_id, "displayname", body["displayname"] or None)
        if "avatar_url" in body and (not created or body["avatar_url"]):
            await set_profile(self.hs, user_id, "avatar_url", body["avatar_url"] or None)
        if threepids is not None:
            taken = await self.hs.threepids.replace_for_user(user_id, threepids)
            if taken:
                raise MatrixError(400, "M_THREEPID_IN_USE", "A 3PID in 'threepids' belongs to another account")
        flags = {k: body[k] for k in ("locked", "user_type") if k in body}
        if "admin" in body and not created:
            flags["admin"] = body["admin"]
        await self.store.set_flags(user_id, **flags)
        return (201 if created else 200), await self._user_view(user_id)

    @staticmethod
    def _threepids_of(body: dict[str, Any]) -> Optional[list[tuple[str, str]]]:
        """The (medium, normalised address) pairs of a PUT's ``threepids``, or None when absent."""
        from zhome.storage.threepids import normalise_email

        raw = body.get("threepids")
        if raw is None:
            return None
        if not isinstance(raw, list) or len(raw) > 100:
            raise invalid_param("threepids must be a list of {medium, address}")
        out: list[tuple[str, str]] = []
        for item in raw:
            if not isinstance(item, dict) or not isinstance(item.get("medium"), str) \
                    or not isinstance(item.get("address"), str):
                raise invalid_param("threepids must be a list of {medium, address}")
            if item["medium"] != "email":
                raise MatrixError(400, "M_THREEPID_MEDIUM_NOT_SUPPORTED", "Only the email medium is supported")
            addr = normalise_email(item["address"])
            if addr is None:
                raise invalid_param("Not a valid email address in threepids")
            out.append(("email", addr))
        return out

    async def on_deactivate(self, request: Request, user_id: str) -> tuple[int, Any]:
        req = await self.require_admin(request)
        body = read_json_body(request, allow_empty=True)
        erase = body.get("erase", False)
        if not isinstance(erase, bool):
            raise invalid_param("erase must be a boolean")
        user = await self._existing(user_id)
        if erase:
            report = await erase_user(self.hs, user_id, req.user_id)
            return 200, {"id_server_unbind_result": "success", "erasure_id": report["id"]}
        if not user["deactivated"]:
            await deactivate_account(self.hs, user_id, erase=False)
        return 200, {"id_server_unbind_result": "success"}

    async def on_reset_password(self, request: Request, user_id: str) -> tuple[int, Any]:
        await self.require_admin(request)
        body = read_json_body(request)
        new = body.get("new_password")
        if not isinstance(new, str) or not new or len(new) > 512:
            raise invalid_param("new_password must be a non-empty string of at most 512 characters")
        logout = body.get("logout_devices", True)
        if not isinstance(logout, bool):
            raise invalid_param("logout_devices must be a boolean")
        user = await self._existing(user_id)
        if user["deactivated"]:
            raise invalid_param("The account is deactivated")
        await self.accounts.set_password_hash(user_id, await hash_password_async(new))
        if logout:
            await self.accounts.delete_other_tokens(user_id, None)
        return 200, {}

    async def on_whois(self, request: Request, user_id: str) -> tuple[int, Any]:
        req = await self.hs.auth.get_user_by_req(request)
        # The spec lets a user look themself up; anyone else needs to be an admin.
        if not req.is_admin and req.user_id != user_id:
            raise forbidden("You are not a server admin")
        await self._existing(user_id)
        devices: dict[str, Any] = {}
        for s in await self.store.sessions(user_id):
            conn = {"ip": s["ip"], "last_seen": s["last_seen"], "user_agent": None}
            devices[s["device_id"]] = {"sessions": [{"connections": [conn]}]}
        return 200, {"user_id": user_id, "devices": devices}

    async def on_joined_rooms(self, request: Request, user_id: str) -> tuple[int, Any]:
        await self.require_admin(request)
        self._local(user_id)
        rooms = sorted(r for r, (m, _) in (await self.hs.events.get_rooms_for_user(user_id)).items() if m == "join")
        return 200, {"joined_rooms": rooms, "total": len(rooms)}

    async def on_pushers(self, request: Request, user_id: str) -> tuple[int, Any]:
        await self.require_admin(request)
        await self._existing(user_id)
        from zhome.client.pushers import render_pusher

        pushers = [dict(render_pusher(p), user_name=user_id) for p in await self.hs.pushers.get_for_user(user_id)]
        return 200, {"pushers": pushers, "total": len(pushers)}

    async def on_get_admin(self, request: Request, user_id: str) -> tuple[int, Any]:
        await self.require_admin(request)
        return 200, {"admin": (await self._existing(user_id))["admin"]}

    async def on_put_admin(self, request: Request, user_id: str) -> tuple[int, Any]:
        req = await self.require_admin(request)
        body = read_json_body(request)
        if not isinstance(body.get("admin"), bool):
            raise invalid_param("admin must be a boolean")
        await self._existing(user_id)
        if user_id == req.user_id and not body["admin"]:
            raise invalid_param("You may not demote yourself")
        await self.store.set_flags(user_id, admin=body["admin"])
        return 200, {}

    # -- devices -----------------------------------------------------------------------
    async def on_devices(self, request: Request, user_id: str) -> tuple[int, Any]:
        await self.require_admin(request)
        await self._existing(user_id)
        devices = [dict(d, user_id=user_id) for d in await self.accounts.get_devices(user_id)]
        return 200, {"devices": devices, "total": len(devices)}

    async def _device(self, user_id: str, device_id: str) -> dict[str, Any]:
        await self._existing(user_id)
        for d in await self.accounts.get_devices(user_id):
            if d["device_id"] == device_id:
                return dict(d, user_id=user_id)
        raise not_found("Device not found")

    async def on_get_device(self, request: Request, user_id: str, device_id: str) -> tuple[int, Any]:
        await self.require_admin(request)
        return 200, await self._device(user_id, device_id)

    async def on_put_device(self, request: Request, user_id: str, device_id: str) -> tuple[int, Any]:
        await self.require_admin(request)
        body = read_json_body(request, allow_empty=True)
        name = body.get("display_name")
        if name is not None and not isinstance(name, str):
            raise bad_json("display_name must be a string")
        await self._device(user_id, device_id)
        await self.accounts.set_device_name(user_id, device_id, name)
        return 200, {}

    async def on_delete_device(self, request: Request, user_id: str, device_id: str) -> tuple[int, Any]:
        await self.require_admin(request)
        await self._existing(user_id)
        # Deleting a device that is already gone succeeds, as on the client API.
        await self.accounts.delete_devices(user_id, [device_id])
        return 200, {}

    async def on_delete_devices(self, request: Request, user_id: str) -> tuple[int, Any]:
        await self.require_admin(request)
        body = read_json_body(request)
        devices = body.get("devices")
        if not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
            raise invalid_param("devices must be a list of device IDs")
        await self._existing(user_id)
        if devices:
            await self.accounts.delete_devices(user_id, devices)
        return 200, {}

    # -- registration tokens ---------------------------------------------------------
    async def on_list_tokens(self, request: Request) -> tuple[int, Any]:
        await self.require_admin(request)
        return 200, {"registration_tokens": await self.store.list_registration_tokens(
            bool_arg(request, "valid", None))}

    async def on_new_token(self, request: Request) -> tuple[int, Any]:
        await self.require_admin(request)
        body = read_json_body(request, allow_empty=True)
        token = body.get("token")
        if token is None:
            length = body.get("length", 16)
            if not isinstance(length, int) or isinstance(length, bool) or not 0 < length <= 64:
                raise invalid_param("length must be an integer from 1 to 64")
            token = random_string(length)
        elif not isinstance(token, str) or not TOKEN_RE.match(token):
            raise invalid_param("token must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_', '~' or '-'")
        uses, expiry = _token_limits(body)
        if not await self.store.create_registration_token(token, uses, expiry):
            raise invalid_param(f"Token already exists: {token}")
        return 200, await self.store.get_registration_token(token)

    async def on_get_token(self, request: Request, token: str) -> tuple[int, Any]:
        await self.require_admin(request)
        got = await self.store.get_registration_token(token)
        if got is None:
            raise not_found("No such registration token")
        return 200, got

    async def on_put_token(self, request: Request, token: str) -> tuple[int, Any]:
        await self.require_admin(request)
        body = read_json_body(request, allow_empty=True)
        uses, expiry = _token_limits(body)
        fields = {}
        if "uses_allowed" in body:
            fields["uses_allowed"] = uses
        if "expiry_time" in body:
            fields["expiry_time"] = expiry
        if not await self.store.update_registration_token(token, **fields):
            raise not_found("No such registration token")
        return 200, await self.store.get_registration_token(token)

    async def on_delete_token(self, request: Request, token: str) -> tuple[int, Any]:
        await self.require_admin(request)
        if not await self.store.delete_registration_token(token):
            raise not_found("No such registration token")
        return 200, {}

    # -- lock and suspend (spec) -----------------------------------------------------
    async def _flag_target(self, request: Request, user_id: str) -> tuple[Requester, dict[str, Any]]:
        req = await self.require_admin(request)
        self._local(user_id)
        user = await self.store.get_user(user_id)
        if user is None or user["deactivated"]:
            raise not_found("User not found")
        return req, user

    async def on_synapse_suspend(self, request: Request, user_id: str) -> tuple[int, Any]:
        """Synapse's own suspension path (what admin tools call)."""
        req, user = await self._flag_target(request, user_id)
        body = read_json_body(request)
        value = body.get("suspend")
        if not isinstance(value, bool):
            raise bad_json("suspend must be a boolean")
        if user["admin"] and user_id != req.user_id:
            raise forbidden("Cannot change this for another server admin")
        await self.store.set_flags(user_id, suspended=value)
        return 200, {f"user_{user_id}_suspended": value}

    def _get_flag_handler(self, flag: str) -> Any:
        key = "locked" if flag == "lock" else "suspended"

        async def handler(request: Request, user_id: str) -> tuple[int, Any]:
            _, user = await self._flag_target(request, user_id)
            return 200, {key: user[key]}
        return handler

    def _put_flag_handler(self, flag: str) -> Any:
        key = "locked" if flag == "lock" else "suspended"

        async def handler(request: Request, user_id: str) -> tuple[int, Any]:
            req, user = await self._flag_target(request, user_id)
            body = read_json_body(request)
            value = body.get(key)
            if not isinstance(value, bool):
                raise bad_json(f"{key} must be a boolean")
            if user["admin"] and user_id != req.user_id:
                raise forbidden("Cannot change this for another server admin")
            await self.store.set_flags(user_id, **{key: value})
            return 200, {key: value}
        return handler
