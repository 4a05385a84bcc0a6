"""Signing JSON and checking for a signature.

Spec: appendices "Signing JSON" ("Signing Details", "Checking for a
Signature"). The signed bytes are the canonical JSON of the object without
its ``signatures`` and ``unsigned`` members, so other servers may add their
own signatures and unsigned data (such as ``age_ts``) in transit.

Both functions are pure: ``sign_json`` returns a new object and never
changes its argument.
"""

from __future__ import annotations

from typing import Any

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey
from unpaddedbase64 import decode_base64, encode_base64

from zhome.crypto.canonical import encode_canonical_json
from zhome.crypto.keys import SigningKey, key_id as signing_key_id
from zhome.util.fastjson import copy_json

# The only signing algorithm the spec defines.
SUPPORTED_ALGORITHMS = frozenset({"ed25519"})


class SignatureError(Exception):
    """A JSON object does not carry a valid signature from the expected key."""


def _signable(obj: dict[str, Any]) -> dict[str, Any]:
    # "signatures" and "unsigned" are not covered: intermediate servers may
    # change them without invalidating anything.
    return {k: v for k, v in obj.items() if k not in ("signatures", "unsigned")}


def sign_json(obj: dict[str, Any], server_name: str, key: SigningKey) -> dict[str, Any]:
    """A copy of ``obj`` signed by ``server_name`` with ``key``.

    Signatures already on ``obj`` (from this or other servers) are kept; a
    signature by the same key ID is replaced. ``unsigned`` is carried over
    unchanged.
    """
    if not isinstance(obj, dict):
        raise TypeError("only JSON objects can be signed")
    signature = key.sign(encode_canonical_json(_signable(obj))).signature
    result = copy_json(obj)
    signatures = result.get("signatures")
    if not isinstance(signatures, dict):
        signatures = {}
    server_sigs = signatures.get(server_name)
    if not isinstance(server_sigs, dict):
        server_sigs = {}
    server_sigs[signing_key_id(key)] = encode_base64(signature)
    signatures[server_name] = server_sigs
    result["signatures"] = signatures
    return result


def verify_json_signature(obj: dict[str, Any], server_name: str, key_id: str, verify_key: VerifyKey) -> None:
    """Check that ``obj`` is signed by ``server_name`` with ``key_id``.

    ``verify_key`` is the public key the caller has for that key ID (from its
    cache or a notary: step 3 of the spec's algorithm is the caller's job).
    Raises ``SignatureError`` saying what is wrong.
    """
    if not isinstance(obj, dict):
        raise SignatureError("signed value is not a JSON object")
    algorithm = key_id.split(":", 1)[0]
    if algorithm not in SUPPORTED_ALGORITHMS:
        raise SignatureError(f"unsupported signing algorithm in key ID {key_id!r}")
    signatures = obj.get("signatures")
    if not isinstance(signatures, dict):
        raise SignatureError("object has no signatures")
    server_sigs = signatures.get(server_name)
    if not isinstance(server_sigs, dict):
        raise SignatureError(f"object is not signed by {server_name}")
    sig_b64 = server_sigs.get(key_id)
    if not isinstance(sig_b64, str):
        raise SignatureError(f"object has no signature by {server_name} with key {key_id}")
    try:
        sig = decode_base64(sig_b64)
    except Exception:  # binascii.Error and friends: any bad base64
        raise SignatureError(f"signature by {server_name} with key {key_id} is not valid base64") from None
    try:
        message = encode_canonical_json(_signable(obj))
    except (TypeError, ValueError) as e:
        raise SignatureError(f"object cannot be encoded as canonical JSON: {e}") from None
    try:
        verify_key.verify(message, sig)
    except (BadSignatureError, ValueError) as e:
        # ValueError: nacl refuses signatures of the wrong length.
        raise SignatureError(f"bad signature by {server_name} with key {key_id}: {e}") from None
