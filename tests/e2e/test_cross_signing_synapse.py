"""Cross-signing between zhome and a real Synapse: each side's users see
the other side's master and self-signing keys, replacements travel as
m.signing_key_update, a device's self-signing signature as
m.device_list_update.

Spec: server-server-api "End-to-End Encryption" (m.signing_key_update,
POST /user/keys/query) and "Device Management" (GET /user/devices/{userId});
client-server-api "Cross-signing".
"""

from __future__ import annotations

from typing import Any

import signedjson.key

from tests.e2e.test_cross_signing import Key, sign_json
from tests.e2e.test_synapse_federation import (  # noqa: F401 - the module's Synapse and zhome fixtures
    Client, _zhome_room_with, s, synapse, z, zhome_fed)
from unpaddedbase64 import encode_base64

PASSWORD = "correct horse battery staple"  # test_synapse_federation.register's
CS = "/_matrix/client/v3"


class Side:
    """A user with a device and cross-signing keys, on either server."""

    def __init__(self, c: Client) -> None:
        self.c = c
        self.user_id = c.user_id
        self.device_id: str = c.ok("GET", CS + "/account/whoami")["device_id"]
        self.sk = signedjson.key.generate_signing_key(self.device_id)
        ed = encode_base64(signedjson.key.get_verify_key(self.sk).encode())
        self.keys = sign_json({"user_id": self.user_id, "device_id": self.device_id,
                               "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
                               "keys": {f"ed25519:{self.device_id}": ed, f"curve25519:{self.device_id}": "c" * 43}},
                              self.user_id, self.sk)
        c.ok("POST", CS + "/keys/upload", {"device_keys": self.keys})
        self.master, self.ssk = Key(), Key()
        self.upload(auth=False)

    def upload(self, auth: bool = True) -> None:
        body: dict[str, Any] = {
            "master_key": self.master.public(self.user_id, "master"),
            "self_signing_key": self.ssk.public(self.user_id, "self_signing", self.master),
            "user_signing_key": Key().public(self.user_id, "user_signing", self.master)}
        if not auth:
            self.c.ok("POST", CS + "/keys/device_signing/upload", body)
            return
        status, resp = self.c.request("POST", CS + "/keys/device_signing/upload", body)
        assert status == 401 and "session" in resp, (status, resp)
        body["auth"] = {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": self.user_id},
                        "password": PASSWORD, "session": resp["session"]}
        self.c.ok("POST", CS + "/keys/device_signing/upload", body)

    def query(self, user_id: str) -> dict[str, Any]:
        return dict(self.c.ok("POST", CS + "/keys/query", {"device_keys": {user_id: []}}))


def _has_keys(viewer: Side, owner: Side) -> bool:
    got = viewer.query(owner.user_id)
    return (got.get("master_keys", {}).get(owner.user_id, {}).get("keys") == {
        f"ed25519:{owner.master.pub}": owner.master.pub}
        and got.get("self_signing_keys", {}).get(owner.user_id, {}).get("keys") == {
            f"ed25519:{owner.ssk.pub}": owner.ssk.pub})


def test_cross_signing_keys_between_zhome_and_synapse(z: Client, s: Client) -> None:
    _zhome_room_with(z, s)
    zu, su = Side(z), Side(s)
    z.wait_for(lambda: _has_keys(su, zu), "zhome user's keys on Synapse")
    z.wait_for(lambda: _has_keys(zu, su), "Synapse user's keys on zhome")

    # Replacements travel both ways.
    zu.master, zu.ssk = Key(), Key()
    zu.upload()
    z.wait_for(lambda: _has_keys(su, zu), "zhome user's new keys on Synapse")
    su.master, su.ssk = Key(), Key()
    su.upload()
    z.wait_for(lambda: _has_keys(zu, su), "Synapse user's new keys on zhome")

    # zhome user's self-signing key signs their device: Synapse sees it.
    ssk_id = f"ed25519:{zu.ssk.pub}"
    out = z.ok("POST", CS + "/keys/signatures/upload",
               {zu.user_id: {zu.device_id: sign_json(zu.keys, zu.user_id, zu.ssk.sk)}})
    assert out["failures"] == {}, out
    z.wait_for(lambda: ssk_id in su.query(zu.user_id)["device_keys"][zu.user_id][zu.device_id]
               .get("signatures", {}).get(zu.user_id, {}), "the device signature on Synapse")
    # And the other way round.
    s_ssk_id = f"ed25519:{su.ssk.pub}"
    out = s.ok("POST", CS + "/keys/signatures/upload",
               {su.user_id: {su.device_id: sign_json(su.keys, su.user_id, su.ssk.sk)}})
    assert out.get("failures", {}) == {}, out
    z.wait_for(lambda: s_ssk_id in zu.query(su.user_id)["device_keys"][su.user_id][su.device_id]
               .get("signatures", {}).get(su.user_id, {}), "the Synapse device signature on zhome")
