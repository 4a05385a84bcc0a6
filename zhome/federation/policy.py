"""The data residency policy: which servers may receive a room's events and
join it.

Spec: client-server-api "Server Access Control Lists" (m.room.server_acl)
for the per-room rule. On top of it come the operator's
``federation.allowed_servers`` / ``blocked_servers`` (``DestinationPolicy``)
and zhome's own per-room state event ``zhome.residency`` with content
``{"allow": [globs], "deny": [globs]}``. A server must pass all three. A
refused server never receives an event or any room state, and every refusal
is counted.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from typing import Any, Iterable, Mapping, Optional

from prometheus_client import Counter

from zhome.federation.destinations import DestinationPolicy

RESIDENCY_EVENT_TYPE = "zhome.residency"

REFUSED = Counter("zhome_federation_residency_refused_total", "Federation refused by the residency policy",
                  ["action"])


def _glob(pattern: str) -> re.Pattern[str]:
    # Server ACL globs: '*' any run of characters, '?' one character,
    # case-insensitive like server names.
    return re.compile(fnmatch.translate(pattern), re.IGNORECASE)


def host_of(server_name: str) -> str:
    """The host part of a server name (no port)."""
    if server_name.startswith("["):
        end = server_name.find("]")
        return server_name[: end + 1] if end >= 0 else server_name
    return server_name.rsplit(":", 1)[0] if server_name.count(":") == 1 else server_name


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


def _any_match(patterns: Iterable[Any], *names: str) -> bool:
    pats = [_glob(p) for p in patterns if isinstance(p, str)]
    return any(p.fullmatch(n) for p in pats for n in names)


def server_acl_allows(acl_content: Optional[Mapping[str, Any]], server_name: str) -> bool:
    """The m.room.server_acl rules of the spec for one server name."""
    if not acl_content:
        return True
    host = host_of(server_name)
    if acl_content.get("allow_ip_literals", True) is not True and _is_ip_literal(host):
        return False
    if _any_match(acl_content.get("deny", []) or [], host):
        return False
    return _any_match(acl_content.get("allow", []) or [], host)


class ResidencyPolicy:
    def __init__(self, our_server_name: str, destinations: DestinationPolicy) -> None:
        self.our_server_name = our_server_name
        self.destinations = destinations

    def server_allowed(self, server_name: str) -> bool:
        """The operator's rule for whole servers."""
        if server_name == self.our_server_name:
            return True
        names = (server_name, host_of(server_name))
        if _any_match(self.destinations.blocked, *names):
            return False
        return _any_match(self.destinations.allowed, *names)

    def room_allows(self, server_name: str, room_state: Mapping[tuple[str, str], Any]) -> bool:
        """Operator rule plus the room's server ACL and residency event.

        ``room_state`` maps (type, state_key) to an event's content.
        """
        if server_name == self.our_server_name:
            return True
        if not self.server_allowed(server_name):
            return False
        if not server_acl_allows(room_state.get(("m.room.server_acl", "")), server_name):
            return False
        residency = room_state.get((RESIDENCY_EVENT_TYPE, ""))
        if isinstance(residency, Mapping):
            host = host_of(server_name)
            if _any_match(residency.get("deny", []) or [], host, server_name):
                return False
            allow = residency.get("allow")
            if isinstance(allow, list) and not _any_match(allow, host, server_name):
                return False
        return True

    @staticmethod
    def count_refusal(action: str) -> None:
        REFUSED.labels(action).inc()
