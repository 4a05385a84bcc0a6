"""A hostile remote server's device keys against a real zhome.

Server "E" (the fake server of test_federation_hostile) has @mallory in a
room with A's alice. Whichever way E's device keys reach A (a device-list
resync, an m.device_list_update EDU, an answer to /user/keys/query), A
caches and serves only keys that are about the user and device they are
listed under and carry that device's valid ed25519 self-signature: else a
server could make A's clients encrypt to keys its user never had.

Spec: client-server-api "End-to-End Encryption" → "Device keys" (signed
by the device's ed25519 key; clients must check user_id and device_id);
server-server-api "Device Management" and "End-to-End Encryption".
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Any

from signedjson.key import encode_verify_key_base64, generate_signing_key, get_verify_key
from signedjson.sign import sign_json
from unpaddedbase64 import encode_base64

from tests.e2e.test_federation_hostile import FED, World
from tests.e2e.test_federation_hostile import world  # noqa: F401  (A with alice's room, E with mallory in it)

WAIT_S = 20.0
_STREAM = itertools.count(100)


def _keys(user_id: str, device_id: str) -> dict[str, Any]:
    """Device keys as a real client makes them: signed by the device."""
    return _device(user_id, device_id)[0]


def _device(user_id: str, device_id: str) -> tuple[dict[str, Any], Any]:
    """A device's signed keys and its signing key."""
    key = generate_signing_key(device_id)
    body = {"user_id": user_id, "device_id": device_id,
            "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
            "keys": {f"ed25519:{device_id}": encode_verify_key_base64(get_verify_key(key)),
                     f"curve25519:{device_id}": encode_base64(os.urandom(32))}}
    return sign_json(body, user_id, key), key


def _tampered(keys: dict[str, Any]) -> dict[str, Any]:
    """Signed keys whose curve25519 key was swapped afterwards."""
    out = {**keys, "keys": dict(keys["keys"])}
    curve = next(k for k in out["keys"] if k.startswith("curve25519:"))
    out["keys"][curve] = encode_base64(os.urandom(32))
    return out


def _bad_devices(user_id: str, tag: str) -> dict[str, dict[str, Any]]:
    """device ID -> keys that must not be served under it."""
    other = _keys(user_id, f"OTHER{tag}")
    unsigned = {k: v for k, v in _keys(user_id, f"NOSIG{tag}").items() if k != "signatures"}
    return {
        f"TAMPERED{tag}": _tampered(_keys(user_id, f"TAMPERED{tag}")),
        f"NOSIG{tag}": unsigned,
        f"WRONGDEV{tag}": other,  # validly signed, but for another device
        f"WRONGUSER{tag}": _keys("@someone:elsewhere.example", f"WRONGUSER{tag}"),
        f"NOTJSON{tag}": {**_keys(user_id, f"NOTJSON{tag}"), "keys": "not an object"},
    }


def _query(world: World, user_id: str) -> dict[str, Any]:
    status, resp = world.client("POST", "/keys/query", {"device_keys": {user_id: []}, "timeout": 5000})
    assert status == 200, (status, resp)
    assert resp["failures"] == {}, resp
    return dict(resp["device_keys"].get(user_id, {}))


def _wait_query(world: World, user_id: str, want: set[str]) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    got: dict[str, Any] = {}
    while time.monotonic() < deadline:
        got = _query(world, user_id)
        if set(got) == want:
            return got
        time.sleep(0.2)
    raise AssertionError(f"/keys/query for {user_id} gave {sorted(got)}, wanted {sorted(want)}")


def _edu(user_id: str, device_id: str, stream_id: int, prev: list[int], keys: Any = None) -> dict[str, Any]:
    content: dict[str, Any] = {"user_id": user_id, "device_id": device_id, "stream_id": stream_id, "prev_id": prev}
    if keys is not None:
        content["keys"] = keys
    return {"edu_type": "m.device_list_update", "content": content}


def _resyncs(world: World) -> int:
    return sum(1 for _, p in world.e.requests_seen if p.startswith(f"{FED}/v1/user/devices/"))


def test_remote_device_keys_are_checked_before_caching(world: World) -> None:
    mallory = world.mallory
    good = _keys(mallory, "GOOD")
    bad = _bad_devices(mallory, "1")
    first = next(_STREAM)
    devices = [{"device_id": "GOOD", "keys": good, "device_display_name": "laptop"}] + \
        [{"device_id": d, "keys": k} for d, k in bad.items()]
    world.e.handlers.append(("GET", f"{FED}/v1/user/devices/{mallory}",
                             lambda path, body: (200, {"user_id": mallory, "stream_id": first, "devices": devices})))
    try:
        # An update A cannot chain: A fetches mallory's whole list from E.
        status, resp = world.send_txn([], [_edu(mallory, "GOOD", first, [])])
        assert status == 200, (status, resp)
        got = _wait_query(world, mallory, {"GOOD"})
        assert got["GOOD"]["keys"] == good["keys"] and got["GOOD"]["signatures"] == good["signatures"], got
        assert got["GOOD"]["unsigned"] == {"device_display_name": "laptop"}, got
        assert any(p.startswith(f"{FED}/v1/user/devices/") for _, p in world.e.requests_seen)
    finally:
        world.e.handlers.clear()

    # Updates that chain onto the cached list: bad keys are not taken in,
    # the good one that follows is (so the chain itself was applied).
    resyncs = _resyncs(world)
    prev = first
    for device_id, keys in _bad_devices(mallory, "2").items():
        sid = next(_STREAM)
        status, resp = world.send_txn([], [_edu(mallory, device_id, sid, [prev], keys)])
        assert status == 200, (status, resp)
        prev = sid
    late = _keys(mallory, "LATE")
    sid = next(_STREAM)
    status, resp = world.send_txn([], [_edu(mallory, "LATE", sid, [prev], late)])
    assert status == 200, (status, resp)
    prev = sid
    got = _wait_query(world, mallory, {"GOOD", "LATE"})
    assert got["LATE"]["keys"] == late["keys"], got
    assert _resyncs(world) == resyncs, "the chained updates were not applied as such"

    # A known device's keys replaced by tampered ones: the old keys are
    # gone (the device has changed) and the new ones are not served.
    sid = next(_STREAM)
    status, resp = world.send_txn([], [_edu(mallory, "GOOD", sid, [prev], _tampered(good))])
    assert status == 200, (status, resp)
    _wait_query(world, mallory, {"LATE"})
    prev = sid

    # One-time keys claimed from E for devices whose keys A knows must be
    # signed by those devices; keys of devices A does not know are passed on
    # (the client checks them against the keys it queries).
    devs = {d: _device(mallory, d) for d in ("OTKA", "OTKB")}
    for d, (keys, _) in devs.items():
        sid = next(_STREAM)
        status, resp = world.send_txn([], [_edu(mallory, d, sid, [prev], keys)])
        assert status == 200, (status, resp)
        prev = sid
    _wait_query(world, mallory, {"LATE", "OTKA", "OTKB"})
    stranger = generate_signing_key("OTKB")
    claimed = {mallory: {
        "OTKA": {"signed_curve25519:AAAA": sign_json({"key": encode_base64(os.urandom(32))}, mallory, devs["OTKA"][1])},
        "OTKB": {"signed_curve25519:BBBB": sign_json({"key": encode_base64(os.urandom(32))}, mallory, stranger)},
        "LATE": {"signed_curve25519:CCCC": {"key": encode_base64(os.urandom(32))}},
        "UNKNOWN": {"signed_curve25519:DDDD": {"key": "x", "signatures": {}}}}}
    world.e.handlers.append(("POST", f"{FED}/v1/user/keys/claim", lambda path, body: (200, {"one_time_keys": claimed})))
    try:
        status, resp = world.client("POST", "/keys/claim", {"timeout": 5000, "one_time_keys": {
            mallory: {d: "signed_curve25519" for d in ("OTKA", "OTKB", "LATE", "UNKNOWN")}}})
    finally:
        world.e.handlers.clear()
    assert status == 200 and resp["failures"] == {}, (status, resp)
    assert resp["one_time_keys"] == {mallory: {"OTKA": claimed[mallory]["OTKA"],
                                               "UNKNOWN": claimed[mallory]["UNKNOWN"]}}, resp
    world.assert_serving()


def test_remote_key_query_answers_are_checked(world: World) -> None:
    # A user who shares no room with A's users: A asks E on every query.
    eve = f"@eve:{world.e.server_name}"
    good = _keys(eve, "EVEGOOD")
    answer = {eve: {"EVEGOOD": {**good, "unsigned": {"device_display_name": "phone", "extra": "dropped"}},
                    **_bad_devices(eve, "Q")},
              # A user A did not ask about is left out.
              f"@other:{world.e.server_name}": {"X": _keys(f"@other:{world.e.server_name}", "X")}}
    world.e.handlers.append(("POST", f"{FED}/v1/user/keys/query", lambda path, body: (200, {"device_keys": answer})))
    try:
        status, resp = world.client("POST", "/keys/query", {"device_keys": {eve: []}, "timeout": 5000})
        assert status == 200, (status, resp)
        assert resp["failures"] == {}, resp
        assert set(resp["device_keys"]) == {eve}, resp
        assert set(resp["device_keys"][eve]) == {"EVEGOOD"}, resp
        served = resp["device_keys"][eve]["EVEGOOD"]
        assert served["keys"] == good["keys"] and served["unsigned"] == {"device_display_name": "phone"}, served
    finally:
        world.e.handlers.clear()
    world.assert_serving()
