"""What every admin endpoint shares: the admin check and the query
parameters of paged lists (Synapse's admin API conventions)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from twisted.web.server import Request

from zhome.http.auth import Requester
from zhome.http.errors import forbidden, invalid_param, not_found
from zhome.http.server import query_arg
from zhome.util.ids import is_valid_user_id, server_of

if TYPE_CHECKING:
    from zhome.server import HomeServer


async def require_admin(hs: "HomeServer", request: Request) -> Requester:
    """The requester, a server admin; anyone else gets 403 before any lookup."""
    req = await hs.auth.get_user_by_req(request)
    if not req.is_admin:
        raise forbidden("You are not a server admin")
    return req


async def require_local_user(hs: "HomeServer", user_id: str) -> None:
    """400 unless ``user_id`` is a valid user ID of this server; 404 unless the account exists."""
    if not is_valid_user_id(user_id) or server_of(user_id) != hs.server_name:
        raise invalid_param("Can only look up local users")
    if await hs.accounts.get_user(user_id) is None:
        raise not_found("User not found")


def int_arg(request: Request, name: str, default: int, maximum: Optional[int] = None) -> int:
    """A non-negative integer query parameter."""
    raw = query_arg(request, name)
    if raw is None:
        return default
    if not raw.isdigit():
        raise invalid_param(f"{name} must be a non-negative integer")
    return min(int(raw), maximum) if maximum is not None else int(raw)


def bool_arg(request: Request, name: str, default: Optional[bool]) -> Optional[bool]:
    raw = query_arg(request, name)
    if raw is None:
        return default
    if raw.lower() in ("true", "1"):
        return True
    if raw.lower() in ("false", "0"):
        return False
    raise invalid_param(f"{name} must be true or false")


def backwards_arg(request: Request, default: str = "f") -> bool:
    """``dir``: f (forwards) or b (backwards); True for b."""
    direction = query_arg(request, "dir") or default
    if direction not in ("f", "b"):
        raise invalid_param("dir must be f or b")
    return direction == "b"
