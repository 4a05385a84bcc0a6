"""Event hashes, event IDs and event signatures.

Spec: server-server-api "Signing Events" ("Adding hashes and signatures to
outgoing events", "Validating hashes and signatures on received events",
"Calculating the reference hash for an event", "Calculating the content hash
for an event"); rooms/v1.md "Event IDs" (v1, v2: chosen by the server),
rooms/v3.md (standard unpadded base64 of the reference hash), rooms/v4.md
onwards (URL-safe unpadded base64); rooms/v12.md (the room ID is the create
event's ID with the sigil ``!``, and the create event has no ``room_id``).

The content hash covers the whole event; the signature and the reference
hash cover only the redacted form (which includes the content hash). That
is what lets a server check the signature of an event it only has in
redacted form. All functions are pure: inputs are never changed.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import string
from typing import Any, Optional

from nacl.signing import VerifyKey
from unpaddedbase64 import decode_base64, encode_base64

from zhome.crypto.canonical import encode_canonical_json
from zhome.crypto.keys import SigningKey
from zhome.crypto.signing import SignatureError, sign_json, verify_json_signature
from zhome.rooms.redaction import prune_event_dict
from zhome.rooms.versions import EventIdFormat, RoomVersion
from zhome.util.fastjson import copy_json

__all__ = [
    "SignatureError",
    "compute_content_hash",
    "verify_content_hash",
    "compute_reference_hash",
    "compute_event_id",
    "hash_and_sign_event",
    "room_id_for_create_event",
    "verify_event_signature",
]

# v1/v2 event IDs: long enough (24 chars of 62 symbols, ~143 bits) that a
# collision with another event of this server is not a concern.
_LOCAL_ID_LENGTH = 24
_LOCAL_ID_ALPHABET = string.ascii_letters + string.digits


def compute_content_hash(pdu: dict[str, Any]) -> bytes:
    """SHA-256 of the canonical JSON of ``pdu`` without unsigned, signatures, hashes."""
    # unsigned changes in transit, signatures depend on the hash, and an
    # existing hash must not feed into itself.
    stripped = {k: v for k, v in pdu.items() if k not in ("unsigned", "signatures", "hashes")}
    return hashlib.sha256(encode_canonical_json(stripped)).digest()


def verify_content_hash(pdu: dict[str, Any]) -> bool:
    """Whether ``hashes.sha256`` of ``pdu`` matches its content.

    False (never an exception) for a missing or malformed hash: the caller
    then treats the event as redacted, as the spec says.
    """
    hashes = pdu.get("hashes")
    if not isinstance(hashes, dict):
        return False
    claimed = hashes.get("sha256")
    if not isinstance(claimed, str):
        return False
    try:
        claimed_bytes = decode_base64(claimed)
    except Exception:  # any base64 decoding error
        return False
    return secrets.compare_digest(claimed_bytes, compute_content_hash(pdu))


def compute_reference_hash(room_version: RoomVersion, pdu: dict[str, Any]) -> bytes:
    """SHA-256 of the canonical JSON of the redacted ``pdu`` without signatures/unsigned."""
    redacted = prune_event_dict(room_version, pdu)
    # The redaction already drops unsigned and a legacy top-level age_ts;
    # the spec lists them again, so say so explicitly in case the redaction
    # rules ever change.
    for key in ("signatures", "age_ts", "unsigned"):
        redacted.pop(key, None)
    return hashlib.sha256(encode_canonical_json(redacted)).digest()


def _new_local_event_id(server_name: str) -> str:
    local = "".join(secrets.choice(_LOCAL_ID_ALPHABET) for _ in range(_LOCAL_ID_LENGTH))
    return f"${local}:{server_name}"


def compute_event_id(room_version: RoomVersion, pdu: dict[str, Any], server_name: Optional[str] = None) -> str:
    """The event ID of ``pdu`` in a room of ``room_version``.

    v3: ``$`` + standard unpadded base64 of the reference hash; v4 and later:
    URL-safe unpadded base64. In v1/v2 the ID is chosen by the origin server
    and carried in the PDU's ``event_id``: if the PDU has one it is returned,
    otherwise a new random ID on ``server_name`` is made (so two calls give
    two IDs: use ``hash_and_sign_event`` to fix one in the PDU).
    """
    fmt = room_version.event_id_format
    if fmt is EventIdFormat.SERVER_CHOSEN:
        existing = pdu.get("event_id")
        if isinstance(existing, str):
            return existing
        if not server_name:
            raise ValueError(f"room version {room_version.identifier} needs a server name to make an event ID")
        return _new_local_event_id(server_name)
    digest = compute_reference_hash(room_version, pdu)
    if fmt is EventIdFormat.REFERENCE_HASH_STD:
        return "$" + encode_base64(digest)
    # URL-safe alphabet (- and _ for + and /), so IDs fit in URL paths.
    return "$" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def hash_and_sign_event(
    room_version: RoomVersion, pdu: dict[str, Any], server_name: str, signing_key: SigningKey
) -> tuple[str, dict[str, Any]]:
    """Add the content hash and ``server_name``'s signature to a copy of ``pdu``.

    Returns ``(event_id, signed_pdu)``. In v1/v2 the event ID is written
    into the PDU (a new one is made unless the PDU already has one), since
    there it is part of what is hashed and signed. Signatures already on
    the PDU are kept, as are other hash algorithms in ``hashes``.
    """
    event = copy_json(pdu)
    if room_version.event_id_format is EventIdFormat.SERVER_CHOSEN and not isinstance(event.get("event_id"), str):
        event["event_id"] = _new_local_event_id(server_name)

    hashes = event.get("hashes")
    hashes = dict(hashes) if isinstance(hashes, dict) else {}
    hashes["sha256"] = encode_base64(compute_content_hash(event))
    event["hashes"] = hashes

    # The signature covers only the redacted form (which includes the
    # content hash), so it still verifies after the event is redacted.
    signed_redacted = sign_json(prune_event_dict(room_version, event), server_name, signing_key)
    event["signatures"] = signed_redacted["signatures"]

    return compute_event_id(room_version, event), event


def room_id_for_create_event(room_version: RoomVersion, create_pdu: dict[str, Any]) -> str:
    """The room ID a hashed ``m.room.create`` PDU defines or belongs to.

    v12: ``!`` + the event ID without its ``$`` (the URL-safe reference
    hash); the PDU must carry no ``room_id`` and must already be hashed, or
    the ID would not match what other servers compute. Earlier versions: the
    PDU's own ``room_id``.
    """
    if create_pdu.get("type") != "m.room.create":
        raise ValueError("not an m.room.create event")
    if room_version.hydra:
        if "room_id" in create_pdu:
            raise ValueError(f"an m.room.create event of room version {room_version.identifier} has no room_id")
        hashes = create_pdu.get("hashes")
        if not isinstance(hashes, dict) or "sha256" not in hashes:
            raise ValueError("the create event must be hashed before its room ID is known")
        return "!" + compute_event_id(room_version, create_pdu)[1:]
    room_id = create_pdu.get("room_id")
    if not isinstance(room_id, str):
        raise ValueError("m.room.create event has no room_id")
    return room_id


def verify_event_signature(
    room_version: RoomVersion, pdu: dict[str, Any], server_name: str, key_id: str, verify_key: VerifyKey
) -> None:
    """Check ``server_name``'s signature (key ``key_id``) on the redacted ``pdu``.

    Succeeds for the full event and for a redacted copy alike. Raises
    ``SignatureError``.
    """
    verify_json_signature(prune_event_dict(room_version, pdu), server_name, key_id, verify_key)
