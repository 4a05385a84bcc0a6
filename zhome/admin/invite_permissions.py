"""Invite permissions: whom a user accepts invites from.

Healthcare messengers built on Matrix (gematik's TI-Messenger among them)
require that a user can refuse invites from people and organisations they
do not know. A user sets, for themself:

    GET|PUT /_zhome/client/v1/invite_permissions

and an admin for any local user:

    GET|PUT /_zhome/admin/v1/users/{userId}/invite_permissions

The document (every key optional in a PUT, which replaces the whole
setting)::

    {"default": "allow" | "block",
     "allowed_users": ["@alice:clinic.example", "@*:partner.example"],
     "blocked_users": [...],
     "allowed_servers": ["*.hospital.example"],
     "blocked_servers": [...]}

User patterns are globs (``*``, ``?``, ``[...]``) on the whole user ID,
server patterns on the server name (with or without its port); both are
compared case-insensitively. An invite from ``inviter`` is decided by the
first of these that matches, the specific before the general:
``blocked_users``, ``allowed_users``, ``blocked_servers``,
``allowed_servers``; else ``default``. So "block everyone but my
colleagues" is ``{"default": "block", "allowed_servers": ["clinic.example"]}``
and "everyone from that server but one" puts the one in ``blocked_users``.

A refused invite is refused before anything is stored: a local inviter
(``/invite``, ``/createRoom`` with ``invite``, a member state event) gets
403 ``M_FORBIDDEN``, and so does a remote server on
``PUT /_matrix/federation/v1|v2/invite``. Server notices are never
refused. The setting is part of the user's export (``privacy.json``) and
goes with the account when it is deactivated or erased.
"""

from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING, Any

from twisted.web.server import Request

from zhome.admin.common import require_admin, require_local_user
from zhome.admin.transfer import matches_server
from zhome.http.errors import MatrixError, bad_json, invalid_param
from zhome.http.server import JsonResource, read_json_body
from zhome.storage.invite_permissions import InvitePermissionsStore
from zhome.util.ids import server_of

if TYPE_CHECKING:
    from zhome.server import HomeServer

MAX_PATTERNS = 1000
MAX_PATTERN_LENGTH = 255
USER_LISTS = ("blocked_users", "allowed_users")
SERVER_LISTS = ("blocked_servers", "allowed_servers")
LISTS = USER_LISTS + SERVER_LISTS
#: Keys a GET answers that a client may send back unchanged in a PUT.
READ_ONLY = ("set_by", "set_ts")
DEFAULTS: dict[str, Any] = {"default": "allow", **{k: [] for k in LISTS}}


def parse_settings(body: dict[str, Any]) -> dict[str, Any]:
    """The settings a PUT body asks for. Wrong JSON types are 400
    ``M_BAD_JSON``; well-typed but unusable values ``M_INVALID_PARAM``."""
    unknown = sorted(set(body) - set(DEFAULTS) - set(READ_ONLY))
    if unknown:
        raise bad_json("Unknown keys in invite permissions: " + ", ".join(unknown))
    out: dict[str, Any] = {}
    default = body.get("default", "allow")
    if not isinstance(default, str):
        raise bad_json("default must be a string: allow or block")
    if default not in ("allow", "block"):
        raise invalid_param("default must be allow or block")
    out["default"] = default
    for key in LISTS:
        patterns = body.get(key, [])
        if not isinstance(patterns, list):
            raise bad_json(f"{key} must be a list of patterns")
        if len(patterns) > MAX_PATTERNS:
            raise invalid_param(f"{key} may hold at most {MAX_PATTERNS} patterns")
        for p in patterns:
            if not isinstance(p, str):
                raise bad_json(f"{key} must be a list of strings")
            _check_pattern(key, p)
        out[key] = list(dict.fromkeys(patterns))
    return out


def _check_pattern(key: str, p: str) -> None:
    if not p or len(p) > MAX_PATTERN_LENGTH or any(c.isspace() for c in p):
        raise invalid_param(f"{key}: {p!r} is not a pattern (1 to {MAX_PATTERN_LENGTH} characters, no spaces)")
    if key in USER_LISTS:
        if not p.startswith("@") or ":" not in p[1:]:
            raise invalid_param(f"{key}: {p!r} is not a user ID pattern (@localpart:server, globs allowed)")
    elif "@" in p or "/" in p:
        raise invalid_param(f"{key}: {p!r} is not a server name pattern")


def invite_allowed(settings: dict[str, Any], inviter: str) -> bool:
    """Whether ``settings`` accept an invite from ``inviter``."""
    uid = inviter.lower()

    def user_match(key: str) -> bool:
        return any(fnmatch.fnmatchcase(uid, p.lower()) for p in settings.get(key, []))

    if user_match("blocked_users"):
        return False
    if user_match("allowed_users"):
        return True
    server = server_of(inviter)
    if matches_server(settings.get("blocked_servers", []), server):
        return False
    if matches_server(settings.get("allowed_servers", []), server):
        return True
    return bool(settings.get("default", "allow") == "allow")


class InvitePolicy:
    """Answers, for each invite of a local user, whether they accept it."""

    def __init__(self, store: InvitePermissionsStore, server_name: str) -> None:
        self.store = store
        self.server_name = server_name
        #: Inviters every user accepts (the server notices system user).
        self.exempt: set[str] = set()

    async def get(self, user_id: str) -> dict[str, Any]:
        got = await self.store.get(user_id)
        if got is None:
            return {k: (list(v) if isinstance(v, list) else v) for k, v in DEFAULTS.items()}
        settings, by, ts = got
        return {**DEFAULTS, **settings, "set_by": by, "set_ts": ts}

    async def check(self, inviter: str, invitee: str) -> None:
        """403 ``M_FORBIDDEN`` unless local ``invitee`` accepts invites from ``inviter``."""
        if inviter == invitee or inviter in self.exempt or server_of(invitee) != self.server_name:
            return
        got = await self.store.get(invitee)
        if got is not None and not invite_allowed(got[0], inviter):
            raise MatrixError(403, "M_FORBIDDEN",
                              f"{invitee} does not accept invites from {inviter} (their invite permissions)")


class InvitePermissionServlets:
    def __init__(self, hs: "HomeServer") -> None:
        self.hs = hs
        self.policy: InvitePolicy = hs.invite_policy

    def register_routes(self, r: JsonResource) -> None:
        own = r"/_zhome/client/v1/invite_permissions"
        r.register("GET", own, self.on_get_own, "invite_permissions")
        r.register("PUT", own, self.on_put_own, "invite_permissions")
        user = r"/_zhome/admin/v1/users/(?P<user_id>[^/]+)/invite_permissions"
        r.register("GET", user, self.on_get_user, "zadmin_invite_permissions")
        r.register("PUT", user, self.on_put_user, "zadmin_invite_permissions")

    async def on_get_own(self, request: Request) -> tuple[int, Any]:
        req = await self.hs.auth.get_user_by_req(request)
        return 200, await self.policy.get(req.user_id)

    async def on_put_own(self, request: Request) -> tuple[int, Any]:
        req = await self.hs.auth.get_user_by_req(request)
        settings = parse_settings(read_json_body(request))
        await self.policy.store.set(req.user_id, settings, req.user_id)
        return 200, await self.policy.get(req.user_id)

    async def on_get_user(self, request: Request, user_id: str) -> tuple[int, Any]:
        await require_admin(self.hs, request)
        await require_local_user(self.hs, user_id)
        return 200, await self.policy.get(user_id)

    async def on_put_user(self, request: Request, user_id: str) -> tuple[int, Any]:
        admin = (await require_admin(self.hs, request)).user_id
        await require_local_user(self.hs, user_id)
        settings = parse_settings(read_json_body(request))
        await self.policy.store.set(user_id, settings, admin)
        return 200, await self.policy.get(user_id)

