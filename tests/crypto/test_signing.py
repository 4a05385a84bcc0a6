"""Tests for zhome.crypto.signing (spec: appendices "Signing JSON" and
"Cryptographic Test Vectors")."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, strategies as st
from signedjson.key import decode_signing_key_base64, generate_signing_key, get_verify_key

from zhome.crypto.signing import SignatureError, sign_json, verify_json_signature

# appendices.md "Signing Key": the seed every test vector uses.
SPEC_SEED = "YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1"
SPEC_KEY = decode_signing_key_base64("ed25519", "1", SPEC_SEED)
SPEC_VERIFY = get_verify_key(SPEC_KEY)


def test_spec_vector_empty_object() -> None:
    assert sign_json({}, "domain", SPEC_KEY) == {
        "signatures": {
            "domain": {
                "ed25519:1": "K8280/U9SSy9IVtjBuVeLr+HpOB4BQFWbg+UZaADMtTdGYI7Geitb76LTrr5QV/7Xg4ahLwYGYZzuHGZKM5ZAQ"
            }
        }
    }


def test_spec_vector_with_data() -> None:
    assert sign_json({"one": 1, "two": "Two"}, "domain", SPEC_KEY) == {
        "one": 1,
        "signatures": {
            "domain": {
                "ed25519:1": "KqmLSbO39/Bzb0QIYE82zqLwsA+PDzYIpIRA2sRQ4sL53+sN6/fpNSoqE7BP7vBZhG6kYdD13EIMJpvhJI+6Bw"
            }
        },
        "two": "Two",
    }


def test_spec_vectors_verify() -> None:
    verify_json_signature(
        {"signatures": {"domain": {"ed25519:1": "K8280/U9SSy9IVtjBuVeLr+HpOB4BQFWbg+UZaADMtTdGYI7Geitb76LTrr5QV/7Xg4ahLwYGYZzuHGZKM5ZAQ"}}},
        "domain",
        "ed25519:1",
        SPEC_VERIFY,
    )


def test_unsigned_not_covered_and_kept() -> None:
    signed = sign_json({"one": 1, "unsigned": {"age_ts": 5}}, "domain", SPEC_KEY)
    assert signed["unsigned"] == {"age_ts": 5}
    # Same signature as without unsigned (spec vector for {"one": 1} is not
    # given, so compare with signing the object minus unsigned).
    assert signed["signatures"] == sign_json({"one": 1}, "domain", SPEC_KEY)["signatures"]
    signed["unsigned"] = {"age_ts": 999, "other": True}
    verify_json_signature(signed, "domain", "ed25519:1", SPEC_VERIFY)


def test_existing_signatures_kept_and_not_covered() -> None:
    other = generate_signing_key("x")
    first = sign_json({"a": 1}, "other.example", other)
    both = sign_json(first, "domain", SPEC_KEY)
    assert set(both["signatures"]) == {"other.example", "domain"}
    assert both["signatures"]["other.example"] == first["signatures"]["other.example"]
    verify_json_signature(both, "other.example", "ed25519:x", get_verify_key(other))
    verify_json_signature(both, "domain", "ed25519:1", SPEC_VERIFY)


def test_second_key_of_same_server_added() -> None:
    k2 = generate_signing_key("2")
    signed = sign_json(sign_json({"a": 1}, "domain", SPEC_KEY), "domain", k2)
    assert set(signed["signatures"]["domain"]) == {"ed25519:1", "ed25519:2"}


def test_input_not_mutated() -> None:
    obj = {"a": {"b": [1]}, "signatures": {"x": {"ed25519:1": "abc"}}, "unsigned": {"u": 1}}
    before = copy.deepcopy(obj)
    signed = sign_json(obj, "domain", SPEC_KEY)
    assert obj == before
    signed["a"]["b"].append(2)
    signed["signatures"]["x"]["ed25519:1"] = "changed"
    assert obj == before


def _signed() -> dict[str, Any]:
    return sign_json({"one": 1, "two": "Two"}, "domain", SPEC_KEY)


def test_tampered_field_fails() -> None:
    s = _signed()
    s["two"] = "Three"
    with pytest.raises(SignatureError, match="bad signature by domain"):
        verify_json_signature(s, "domain", "ed25519:1", SPEC_VERIFY)


def test_added_field_fails() -> None:
    s = _signed()
    s["three"] = 3
    with pytest.raises(SignatureError):
        verify_json_signature(s, "domain", "ed25519:1", SPEC_VERIFY)


def test_wrong_key_fails() -> None:
    with pytest.raises(SignatureError, match="bad signature"):
        verify_json_signature(_signed(), "domain", "ed25519:1", get_verify_key(generate_signing_key("1")))


def test_missing_server_fails() -> None:
    with pytest.raises(SignatureError, match="not signed by elsewhere"):
        verify_json_signature(_signed(), "elsewhere", "ed25519:1", SPEC_VERIFY)


def test_missing_key_id_fails() -> None:
    with pytest.raises(SignatureError, match="no signature by domain with key ed25519:2"):
        verify_json_signature(_signed(), "domain", "ed25519:2", SPEC_VERIFY)


def test_no_signatures_fails() -> None:
    with pytest.raises(SignatureError, match="no signatures"):
        verify_json_signature({"one": 1}, "domain", "ed25519:1", SPEC_VERIFY)


def test_unknown_algorithm_fails() -> None:
    s = _signed()
    s["signatures"]["domain"]["rsa:1"] = s["signatures"]["domain"]["ed25519:1"]
    with pytest.raises(SignatureError, match="unsupported signing algorithm"):
        verify_json_signature(s, "domain", "rsa:1", SPEC_VERIFY)


def test_bad_base64_fails() -> None:
    s = _signed()
    s["signatures"]["domain"]["ed25519:1"] = "!!!not base64!!!"
    with pytest.raises(SignatureError, match="not valid base64"):
        verify_json_signature(s, "domain", "ed25519:1", SPEC_VERIFY)


def test_truncated_signature_fails() -> None:
    s = _signed()
    s["signatures"]["domain"]["ed25519:1"] = s["signatures"]["domain"]["ed25519:1"][:40]
    with pytest.raises(SignatureError):
        verify_json_signature(s, "domain", "ed25519:1", SPEC_VERIFY)


def test_padded_signature_accepted() -> None:
    # appendices "Unpadded Base64": decoders SHOULD accept padding.
    s = _signed()
    s["signatures"]["domain"]["ed25519:1"] += "=="
    verify_json_signature(s, "domain", "ed25519:1", SPEC_VERIFY)


def test_non_dict_signature_entry_fails() -> None:
    with pytest.raises(SignatureError):
        verify_json_signature({"signatures": {"domain": "x"}}, "domain", "ed25519:1", SPEC_VERIFY)
    with pytest.raises(SignatureError):
        verify_json_signature({"signatures": []}, "domain", "ed25519:1", SPEC_VERIFY)


# -- properties ----------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1) | st.text()
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=20,
)
signable = st.dictionaries(st.text().filter(lambda k: k not in ("signatures", "unsigned")), json_values, max_size=6)


@given(signable)
def test_sign_then_verify(obj: dict[str, Any]) -> None:
    verify_json_signature(sign_json(obj, "domain", SPEC_KEY), "domain", "ed25519:1", SPEC_VERIFY)


@given(signable.filter(bool), st.data())
def test_tampering_any_field_fails(obj: dict[str, Any], data: st.DataObject) -> None:
    signed = sign_json(obj, "domain", SPEC_KEY)
    key = data.draw(st.sampled_from(sorted(obj)))
    signed[key] = {"tampered": signed[key]}
    with pytest.raises(SignatureError):
        verify_json_signature(signed, "domain", "ed25519:1", SPEC_VERIFY)
