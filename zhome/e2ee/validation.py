"""Checks of uploaded keys: shapes and self-signatures.

Spec: client-server-api "End-to-End Encryption" → "Device keys" and
"One-time and fallback keys" (POST /keys/upload): device keys are signed by
the device's own ed25519 key; ``signed_curve25519`` one-time and fallback
keys carry a signature by that same key. Pure functions; every failure is a
400 with a message naming the key.
"""

from __future__ import annotations

from typing import Any, Optional

from signedjson.key import decode_verify_key_bytes
from signedjson.sign import SignatureVerifyException, verify_signed_json
from unpaddedbase64 import decode_base64

from zhome.http.errors import MatrixError, bad_json

MAX_KEY_ID_LEN = 255
MAX_KEYS_PER_UPLOAD = 1000


def invalid_signature(msg: str) -> MatrixError:
    return MatrixError(400, "M_INVALID_SIGNATURE", msg)


def ed25519_verify_key(device_keys: dict[str, Any], device_id: str) -> Any:
    """The verify key of ``ed25519:<device_id>`` in a device's keys."""
    keys = device_keys.get("keys")
    raw = keys.get(f"ed25519:{device_id}") if isinstance(keys, dict) else None
    if not isinstance(raw, str):
        raise bad_json(f"device_keys.keys has no ed25519:{device_id} key")
    try:
        return decode_verify_key_bytes(f"ed25519:{device_id}", decode_base64(raw))
    except Exception:
        raise bad_json(f"ed25519:{device_id} is not an unpadded base64 ed25519 public key")


def _check_signature(obj: dict[str, Any], user_id: str, device_id: str, verify_key: Any, what: str) -> None:
    sigs = obj.get("signatures")
    if not isinstance(sigs, dict) or not isinstance(sigs.get(user_id), dict) \
            or not isinstance(sigs[user_id].get(f"ed25519:{device_id}"), str):
        raise invalid_signature(f"{what} is not signed by ed25519:{device_id} of {user_id}")
    try:
        verify_signed_json(obj, user_id, verify_key)
    except (SignatureVerifyException, ValueError, TypeError) as e:
        raise invalid_signature(f"{what} has a bad signature by ed25519:{device_id}: {e}")


def check_device_keys(device_keys: Any, user_id: str, device_id: str) -> dict[str, Any]:
    """Validate uploaded ``device_keys`` for the requester's device."""
    if not isinstance(device_keys, dict):
        raise bad_json("device_keys must be an object")
    if device_keys.get("user_id") != user_id:
        raise bad_json("device_keys.user_id must be the user who uploads them")
    if device_keys.get("device_id") != device_id:
        raise bad_json("device_keys.device_id must be the uploading device")
    algorithms = device_keys.get("algorithms")
    if not isinstance(algorithms, list) or not all(isinstance(a, str) for a in algorithms):
        raise bad_json("device_keys.algorithms must be a list of strings")
    keys = device_keys.get("keys")
    if not isinstance(keys, dict) or not keys or not all(
            isinstance(k, str) and ":" in k and isinstance(v, str) for k, v in keys.items()):
        raise bad_json("device_keys.keys must map algorithm:device_id to key strings")
    if not isinstance(device_keys.get("signatures"), dict):
        raise bad_json("device_keys.signatures is required")
    verify_key = ed25519_verify_key(device_keys, device_id)
    _check_signature(device_keys, user_id, device_id, verify_key, "device_keys")
    # What other servers and clients are given: never the uploader's
    # unsigned extras (they are local to its device).
    return {k: v for k, v in device_keys.items() if k != "unsigned"}


def check_keys(raw: Any, name: str, user_id: str, device_id: str, verify_key: Optional[Any]
               ) -> dict[tuple[str, str], dict[str, Any] | str]:
    """Validate ``one_time_keys`` or ``fallback_keys``: ``algorithm:key_id`` to
    a key string or a signed key object. ``signed_curve25519`` keys must be
    signed by the device (``verify_key``, None when the device has no
    identity keys)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise bad_json(f"{name} must be an object")
    if len(raw) > MAX_KEYS_PER_UPLOAD:
        raise bad_json(f"At most {MAX_KEYS_PER_UPLOAD} {name} per upload")
    out: dict[tuple[str, str], dict[str, Any] | str] = {}
    for full_id, key in raw.items():
        algorithm, sep, key_id = full_id.partition(":")
        if not sep or not algorithm or not key_id or len(full_id) > MAX_KEY_ID_LEN:
            raise bad_json(f"{name}: key ID {full_id!r} is not algorithm:key_id")
        if isinstance(key, dict):
            if not isinstance(key.get("key"), str):
                raise bad_json(f"{name}.{full_id}.key must be a string")
            if name == "fallback_keys" and "fallback" in key and not isinstance(key["fallback"], bool):
                raise bad_json(f"{name}.{full_id}.fallback must be a boolean")
        elif not isinstance(key, str):
            raise bad_json(f"{name}.{full_id} must be a key string or object")
        if algorithm == "signed_curve25519":
            if not isinstance(key, dict):
                raise bad_json(f"{name}.{full_id}: a signed_curve25519 key must be a signed object")
            if verify_key is None:
                raise invalid_signature(f"{name}.{full_id}: upload the device's keys before signed keys")
            _check_signature(key, user_id, device_id, verify_key, f"{name}.{full_id}")
        out[(algorithm, key_id)] = key
    return out
