"""Identifier grammar: user IDs, room IDs, aliases, server names.

Spec: appendices "Identifier Grammar".
"""

from __future__ import annotations

import re
import secrets
import string

_USER_LOCALPART = re.compile(r"^[a-z0-9._=/+-]+\Z")
# Historical user IDs (from other servers) may use any printable ASCII.
_HISTORICAL_LOCALPART = re.compile(r"^[\x21-\x39\x3b-\x7e]+\Z")
_SERVER_NAME = re.compile(
    r"^(?:\[[0-9A-Fa-f:.]{2,45}\]|[0-9]{1,3}(?:\.[0-9]{1,3}){3}|[A-Za-z0-9.-]{1,255})(?::[0-9]{1,5})?\Z"
)
_ALPHABET = string.ascii_letters


def random_string(n: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(n))


def is_valid_server_name(s: str) -> bool:
    return bool(_SERVER_NAME.match(s))


def split_id(s: str, sigil: str) -> tuple[str, str]:
    """(localpart, server_name) of an ID with ``sigil``; ValueError if malformed."""
    if not s.startswith(sigil) or ":" not in s:
        raise ValueError(f"not a {sigil} identifier")
    local, server = s[1:].split(":", 1)
    if not server or not is_valid_server_name(server):
        raise ValueError("bad server name")
    return local, server


def is_valid_user_localpart(local: str) -> bool:
    return bool(_USER_LOCALPART.match(local))


def is_valid_user_id(s: str) -> bool:
    if len(s.encode("utf-8")) > 255:
        return False
    try:
        local, _ = split_id(s, "@")
    except ValueError:
        return False
    return bool(local) and bool(_HISTORICAL_LOCALPART.match(local))


def is_valid_room_alias(s: str) -> bool:
    if len(s.encode("utf-8")) > 255:
        return False
    try:
        local, _ = split_id(s, "#")
    except ValueError:
        return False
    return bool(local)


def is_valid_room_id(s: str) -> bool:
    """``!opaque:server`` (room versions 1 to 11) or ``!`` and the create
    event's hash (version 12, no server part)."""
    if not s.startswith("!") or len(s) < 2 or len(s.encode("utf-8")) > 255 or any(c.isspace() for c in s):
        return False
    if ":" not in s:
        return True
    try:
        local, _ = split_id(s, "!")
    except ValueError:
        return False
    return bool(local)


#: Spec: "PUT /profile/{userId}/{keyName}": a profile field is displayname,
#: avatar_url, m.tz or a key in the Common Namespaced Identifier Grammar.
PROFILE_KEY = re.compile(r"^(avatar_url|displayname|m\.tz|[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+)$")


def server_of(s: str) -> str:
    return s.split(":", 1)[1] if ":" in s else ""
