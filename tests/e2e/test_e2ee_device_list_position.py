"""A device change is in the very next /sync.

Spec: client-server-api "Tracking the device list for a user": a user's
device_lists.changed names the users sharing a room whose devices changed
since the since token. Once the request that changed a device (here a
login, which adds one) has been answered, a /sync (timeout 0) made after it
must include the change; the stream position may not wait for later work.
"""

from __future__ import annotations

from tests.e2e.harness import CS, ClientUser, ZhomeProcess, q

ROUNDS = 40


def test_a_new_device_is_in_the_next_sync(zhome: ZhomeProcess) -> None:
    alice = ClientUser(zhome, "alice")
    bob = ClientUser(zhome, "bob")
    room = alice.ok("POST", "/createRoom", {"preset": "public_chat"})["room_id"]
    bob.ok("POST", f"/join/{q(room)}", {})
    since = alice.ok("GET", "/sync?timeout=0")["next_batch"]
    missed = []
    for i in range(ROUNDS):
        status, resp = zhome.request("POST", CS + "/login", {
            "type": "m.login.password", "identifier": {"type": "m.id.user", "user": bob.user_id},
            "password": "correct horse battery"})
        assert status == 200, resp
        got = alice.ok("GET", f"/sync?timeout=0&since={q(since)}")
        if bob.user_id not in got["device_lists"]["changed"]:
            missed.append(i)
            got = alice.ok("GET", f"/sync?timeout=5000&since={q(since)}")
        assert bob.user_id in got["device_lists"]["changed"], got["device_lists"]
        since = got["next_batch"]
    assert missed == [], f"device changes missing from the next /sync in rounds {missed} of {ROUNDS}"
