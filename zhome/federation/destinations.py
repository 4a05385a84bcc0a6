"""Which servers we federate with: ``federation.allowed_servers`` and ``blocked_servers``.

A server name is allowed when it matches one of the allowed globs and none of
the blocked ones (case-insensitive, ``*`` and ``?`` as in shell globs). This
is an operator's policy for whole servers, separate from the per-room
``m.room.server_acl`` events of the spec.
"""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase


class DestinationPolicy:
    def __init__(self, allowed: Iterable[str] = ("*",), blocked: Iterable[str] = ()) -> None:
        self.allowed = tuple(p.lower() for p in allowed)
        self.blocked = tuple(p.lower() for p in blocked)

    def is_allowed(self, server_name: str) -> bool:
        name = server_name.lower()
        if any(fnmatchcase(name, p) for p in self.blocked):
            return False
        return any(fnmatchcase(name, p) for p in self.allowed)

    @classmethod
    def from_config(cls, federation_config: object) -> "DestinationPolicy":
        return cls(
            getattr(federation_config, "allowed_servers", ("*",)),
            getattr(federation_config, "blocked_servers", ()),
        )
