"""End-to-end encryption with a real crypto stack (matrix-nio's e2e extra,
vodozemac): Olm sessions over to-device messages, Megolm room keys, device
lists; on one server and across two federating servers.

Spec: client-server-api "End-to-End Encryption" (keys upload, query,
claim, device_lists and one-time key counts in /sync) and "Send-to-Device
messaging"; server-server-api "End-to-End Encryption", "Send-to-device
messaging" and "Device Management".
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import nio

from tests.e2e.conftest import ZhomeServers
from tests.e2e.harness import ZhomeProcess

PASSWORD = "correct horse battery staple"
WAIT_S = 30.0

# requirements-test.txt installs matrix-nio with its e2e extra: without it
# these tests must fail, not pass by skipping.
assert nio.crypto.ENCRYPTION_ENABLED, "matrix-nio was installed without its e2e extra (see requirements-test.txt)"


class Homeserver(Protocol):
    """Any server a client can reach: a zhome or a Synapse peer."""

    base_url: str


class Person:
    """One device of a user: a nio client with its own crypto store."""

    def __init__(self, hs: Homeserver, user_id: str, store: Path) -> None:
        store.mkdir(parents=True, exist_ok=True)
        cfg = nio.AsyncClientConfig(encryption_enabled=True, store_sync_tokens=False)
        self.client = nio.AsyncClient(hs.base_url, user_id, store_path=str(store), config=cfg)
        self.plaintexts: dict[str, list[str]] = {}
        self.undecrypted: list[Any] = []

    async def login(self, device_name: str) -> None:
        resp = await self.client.login(PASSWORD, device_name=device_name)
        assert isinstance(resp, nio.LoginResponse), resp
        await self.client.keys_upload()

    async def sync(self) -> nio.SyncResponse:
        c = self.client
        resp = await c.sync(timeout=500, full_state=c.next_batch is None)
        assert isinstance(resp, nio.SyncResponse), resp
        for room_id, room in resp.rooms.join.items():
            for ev in room.timeline.events:
                if isinstance(ev, nio.RoomMessageText):
                    self.plaintexts.setdefault(room_id, []).append(ev.body)
                elif isinstance(ev, nio.MegolmEvent):
                    self.undecrypted.append(ev)
        if c.should_upload_keys:
            await c.keys_upload()
        if c.should_query_keys:
            await c.keys_query()
        if c.should_claim_keys:
            await c.keys_claim(c.get_users_for_key_claiming())
        return resp

    async def sync_until(self, pred: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while not pred():
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.client.user_id}/{self.client.device_id}: {what} not within {WAIT_S}s;"
                                     f" undecrypted: {self.undecrypted}")
            await self.sync()

    async def send(self, room_id: str, body: str) -> None:
        resp = await self.client.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": body},
                                           ignore_unverified_devices=True)
        assert isinstance(resp, nio.RoomSendResponse), resp

    async def close(self) -> None:
        await self.client.close()


async def _encrypted_room(alice: Person, *invitees: Person) -> str:
    resp = await alice.client.room_create(
        name="Secret", invite=[p.client.user_id for p in invitees],
        initial_state=[{"type": "m.room.encryption", "state_key": "",
                        "content": {"algorithm": "m.megolm.v1.aes-sha2"}}])
    assert isinstance(resp, nio.RoomCreateResponse), resp
    room_id = resp.room_id
    for p in invitees:
        await p.sync_until(lambda p=p: room_id in p.client.invited_rooms, "the invite")  # type: ignore[misc]
        joined = await p.client.join(room_id)
        assert isinstance(joined, nio.JoinResponse), joined
    for p in (alice, *invitees):
        await p.sync_until(lambda p=p: room_id in p.client.rooms and all(  # type: ignore[misc]
            q.client.user_id in p.client.rooms[room_id].users for q in (alice, *invitees)), "everyone joined")
        assert p.client.rooms[room_id].encrypted
    return room_id


async def _scenario(alice_hs: ZhomeProcess, bob_hs: ZhomeProcess, root: Path, tag: str) -> None:
    alice_id = alice_hs.register(f"alice{tag}", PASSWORD)["user_id"]
    bob_id = bob_hs.register(f"bob{tag}", PASSWORD)["user_id"]
    alice = Person(alice_hs, alice_id, root / "alice")
    bob = Person(bob_hs, bob_id, root / "bob")
    bob2 = Person(bob_hs, bob_id, root / "bob2")
    try:
        await alice.login("alice laptop")
        await bob.login("bob phone")
        room_id = await _encrypted_room(alice, bob)

        await alice.send(room_id, "the results are in")
        await bob.sync_until(lambda: "the results are in" in bob.plaintexts.get(room_id, []), "alice's message")
        await bob.send(room_id, "thanks, reading now")
        await alice.sync_until(lambda: "thanks, reading now" in alice.plaintexts.get(room_id, []), "bob's reply")

        # What travelled was ciphertext only.
        raw = alice_hs.request("GET", f"/_matrix/client/v3/rooms/{room_id}/messages?dir=b&limit=20",
                               token=alice.client.access_token)[1]
        sent = [e for e in raw["chunk"] if "state_key" not in e]
        assert len(sent) == 2 and all(e["type"] == "m.room.encrypted" for e in sent), sent
        assert all("ciphertext" in e["content"] for e in sent)

        # Bob signs in on a second device: alice learns of it through
        # device_lists, and her next message is readable there too.
        await bob2.login("bob tablet")
        await bob2.sync()
        bob2_device = bob2.client.device_id

        def alice_knows_bob2() -> bool:
            return any(d.device_id == bob2_device for d in alice.client.device_store.active_user_devices(bob_id))

        await alice.sync_until(alice_knows_bob2, "bob's second device in alice's device list")
        await alice.send(room_id, "welcome, second device")
        await bob2.sync_until(lambda: "welcome, second device" in bob2.plaintexts.get(room_id, []),
                              "alice's message on bob's second device")
        await bob.sync_until(lambda: "welcome, second device" in bob.plaintexts.get(room_id, []),
                             "alice's message on bob's first device")
        # Bob's first device never had an undecryptable event.
        assert not [e for e in bob.undecrypted if e.room_id == room_id]
    finally:
        for p in (alice, bob, bob2):
            await p.close()


def test_two_users_one_server_exchange_encrypted_messages(zhome: ZhomeProcess, tmp_path: Path) -> None:
    asyncio.run(_scenario(zhome, zhome, tmp_path, "one"))


def test_encrypted_messages_across_federation(zhome_pair: ZhomeServers, tmp_path: Path) -> None:
    asyncio.run(_scenario(zhome_pair.a, zhome_pair.b, tmp_path, "fed"))


def test_key_query_and_claim_report_unreachable_servers(zhome_pair: ZhomeServers) -> None:
    from tests.e2e.harness import ClientUser, free_port

    alice = ClientUser(zhome_pair.a, "alice_unreachable")
    bob_id = zhome_pair.b.register("bob_unreachable", PASSWORD)["user_id"]
    gone = f"127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    out = alice.ok("POST", "/keys/query", {"timeout": 2000,
                                           "device_keys": {f"@x:{gone}": [], bob_id: []}})
    assert time.monotonic() - started < 15
    assert gone in out["failures"] and zhome_pair.b.server_name not in out["failures"]
    assert bob_id in out["device_keys"]
    out = alice.ok("POST", "/keys/claim", {"timeout": 2000,
                                           "one_time_keys": {f"@x:{gone}": {"D": "signed_curve25519"}}})
    assert gone in out["failures"] and out["one_time_keys"] == {}
