"""Ghost user IDs for mail addresses and signed reply addresses.

A ghost's localpart is the bridge's prefix and the address, lower-cased,
with every character outside ``[a-z0-9._-]`` written as ``=xx`` (its
UTF-8 bytes in hex), so the mapping is reversible and the result is a valid
user ID localpart (client-server-api "User Identifiers").

A reply address is ``reply+N.MAC@mail_domain``: N numbers an event the
bridge knows (its room and event ID are in the bridge's database) and MAC
is an HMAC-SHA256, with the bridge's secret, over the room ID, the event ID
and the one address allowed to use it. A token moved to another room or
event, or used from another address, does not verify.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from typing import Optional

REPLY_PREFIX = "reply+"
_SAFE = re.compile(r"[a-z0-9._-]")
_TOKEN = re.compile(r"([0-9]{1,18})\.([a-z2-7]{20})")


def normalise_address(address: str) -> str:
    return address.strip().lower()


def ghost_localpart(prefix: str, address: str) -> str:
    out = []
    for ch in normalise_address(address):
        if _SAFE.fullmatch(ch):
            out.append(ch)
        else:
            out.extend(f"={b:02x}" for b in ch.encode("utf-8"))
    return prefix + "".join(out)


def address_of_ghost(prefix: str, user_id: str) -> Optional[str]:
    """The address of a ghost's user ID, or None when it is not one."""
    if not user_id.startswith("@" + prefix) or ":" not in user_id:
        return None
    local = user_id[1 + len(prefix):].split(":", 1)[0]
    raw = bytearray()
    i = 0
    try:
        while i < len(local):
            if local[i] == "=":
                raw.append(int(local[i + 1:i + 3], 16))
                i += 3
            else:
                raw.extend(local[i].encode("ascii"))
                i += 1
        return raw.decode("utf-8")
    except (ValueError, UnicodeError):
        return None


def _mac(secret: bytes, room_id: str, event_id: str, address: str) -> str:
    msg = "\x00".join((room_id, event_id, normalise_address(address))).encode("utf-8")
    digest = hmac.new(secret, msg, hashlib.sha256).digest()
    return base64.b32encode(digest).decode("ascii").lower()[:20]


def reply_localpart(secret: bytes, n: int, room_id: str, event_id: str, address: str) -> str:
    return f"{REPLY_PREFIX}{n}.{_mac(secret, room_id, event_id, address)}"


def parse_reply_localpart(localpart: str) -> Optional[tuple[int, str]]:
    """(N, MAC) of a reply address's localpart, or None when it is not one."""
    if not localpart.startswith(REPLY_PREFIX):
        return None
    m = _TOKEN.fullmatch(localpart[len(REPLY_PREFIX):])
    return (int(m.group(1)), m.group(2)) if m else None


def verify_reply(secret: bytes, mac: str, room_id: str, event_id: str, address: str) -> bool:
    return hmac.compare_digest(mac, _mac(secret, room_id, event_id, address))


# -- invitation reply addresses --------------------------------------------------------------
#
# ``invite+TOKEN.MAC@mail_domain`` is the Reply-To of an invitation mail
# (zhome/identity/invite_mail.py). TOKEN is the invitation's token (its
# m.room.third_party_invite state key, 32 lower-case hex digits) and MAC an
# HMAC-SHA256 over the token and the one address invited, keyed by
# invite_key(as_token): the homeserver and the bridge both know the
# bridge's as_token, so both derive the key without sharing a table.

INVITE_PREFIX = "invite+"
INVITE_KEY_LABEL = b"zhome email invites v1"
_INVITE_TOKEN = re.compile(r"([0-9a-f]{32})\.([a-z2-7]{20})")


def invite_key(as_token: str) -> bytes:
    return hmac.new(as_token.encode("utf-8"), INVITE_KEY_LABEL, hashlib.sha256).digest()


def _invite_mac(key: bytes, invite_token: str, address: str) -> str:
    msg = "\x00".join(("invite", invite_token, normalise_address(address))).encode("utf-8")
    return base64.b32encode(hmac.new(key, msg, hashlib.sha256).digest()).decode("ascii").lower()[:20]


def invite_localpart(key: bytes, invite_token: str, address: str) -> Optional[str]:
    """The reply address's localpart, or None for a token of another shape."""
    if not re.fullmatch(r"[0-9a-f]{32}", invite_token):
        return None
    return f"{INVITE_PREFIX}{invite_token}.{_invite_mac(key, invite_token, address)}"


def parse_invite_localpart(localpart: str) -> Optional[tuple[str, str]]:
    """(invite token, MAC) of an invitation reply address, or None."""
    if not localpart.lower().startswith(INVITE_PREFIX):
        return None
    m = _INVITE_TOKEN.fullmatch(localpart[len(INVITE_PREFIX):].lower())
    return (m.group(1), m.group(2)) if m else None


def verify_invite(key: bytes, invite_token: str, mac: str, address: str) -> bool:
    return hmac.compare_digest(mac, _invite_mac(key, invite_token, address))
