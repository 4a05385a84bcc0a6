"""The inbound processor on its own database (both engines) against a fake
homeserver client: mails from several senders to one room are made ready
and posted side by side, each sender's in the order they were accepted and
a reply after the mail it answers, and a batch writes its results in one
transaction."""

from __future__ import annotations

import email.policy
import email.utils
import random
from email.message import EmailMessage
from typing import Any, Optional

import pytest_twisted
from twisted.internet import task

from zhome.bridges.email.hsclient import HomeserverUnreachable
from zhome.bridges.email.processor import InboundProcessor, ProcessorSettings
from zhome.bridges.email.store import POSTED, BridgeStore
from zhome.storage.database import Database
from zhome.util.reactor import reactor

ROOM = "!room:example.org"
ACCEPTED = {"dkim": "none", "spf": "pass", "dmarc": "pass", "dmarc_policy": "reject", "verdict": "accept"}


def _raw(sender: str, text: str, **headers: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = "team@mail.test"
    msg["Subject"] = "Hello"
    msg["Date"] = email.utils.formatdate()
    msg["Message-ID"] = headers.pop("message_id", email.utils.make_msgid(domain="example.net"))
    for k, v in headers.items():
        msg[k.replace("_", "-")] = v
    msg.set_content(text)
    return msg.as_bytes(policy=email.policy.SMTP)


class FakeHomeserver:
    """Answers after a short random wait, like a busy homeserver; records
    the events sent and how many ghost set-ups ran at once."""

    def __init__(self, fail_txn: Optional[str] = None) -> None:
        self.sent: list[tuple[str, str, str, dict[str, Any]]] = []
        self.in_setup = 0
        self.most_in_setup = 0
        self.in_send = 0
        self.most_in_send = 0
        self.fail_txn = fail_txn
        self.rng = random.Random(7)

    async def _wait(self) -> None:
        await task.deferLater(reactor, self.rng.uniform(0.0, 0.02), lambda: None)

    async def _setup(self) -> None:
        self.in_setup += 1
        self.most_in_setup = max(self.most_in_setup, self.in_setup)
        try:
            await self._wait()
        finally:
            self.in_setup -= 1

    async def ensure_registered(self, localpart: str) -> None:
        await self._setup()

    async def set_displayname(self, user_id: str, name: str) -> None:
        await self._setup()

    async def join(self, room_id: str, user_id: Optional[str] = None) -> None:
        await self._setup()

    async def invite(self, room_id: str, target: str) -> None:
        await self._wait()

    async def upload(self, user_id: str, data: bytes, content_type: str, filename: str) -> str:
        await self._wait()
        return f"mxc://example.org/{len(self.sent)}"

    async def send(self, room_id: str, user_id: str, event_type: str, content: dict[str, Any], txn_id: str) -> str:
        self.in_send += 1
        self.most_in_send = max(self.most_in_send, self.in_send)
        try:
            await self._wait()
        finally:
            self.in_send -= 1
        if txn_id == self.fail_txn:
            self.fail_txn = None
            raise HomeserverUnreachable("ConnectionLost")
        self.sent.append((room_id, user_id, txn_id, content))
        return f"$event-{txn_id}"


async def _store(db_config: tuple[str, dict[str, Any]]) -> BridgeStore:
    engine, args = db_config
    store = BridgeStore(Database(engine, args), None)
    await store.setup()
    return store


def _processor(store: BridgeStore, hs: FakeHomeserver) -> InboundProcessor:
    return InboundProcessor(store, hs, ProcessorSettings("example.org", "mail.test", "email_",  # type: ignore[arg-type]
                                                         bot="@emailbot:example.org"))


@pytest_twisted.ensureDeferred
async def test_mails_to_one_room_keep_each_senders_order_and_replies_follow(
        db_config: tuple[str, dict[str, Any]]) -> None:
    store = await _store(db_config)
    hs = FakeHomeserver()
    processor = _processor(store, hs)
    try:
        # 40 mails from 8 senders, interleaved; the 5th replies to the 2nd
        # (another sender's), the 30th to the 29th (another sender's, just
        # before it), the 17th repeats the 3rd's Message-ID.
        replies = {5: 2, 30: 29}
        ids = []
        for i in range(40):
            headers = {"message_id": "<m3@example.net>" if i == 17 else f"<m{i}@example.net>"}
            if i in replies:
                headers["in_reply_to"] = f"<m{replies[i]}@example.net>"
            ids.append(await store.add_inbound(ROOM, None, None, _raw(f"Sender {i % 8} <s{i % 8}@example.net>",
                                                                      f"mail number {i}", **headers),
                                               auth=ACCEPTED))
        writes: list[str] = []
        store.db.on_interaction = lambda desc, _s: writes.append(desc)
        processor._stopped = False
        await processor._round()
        bodies = [c["body"] for _r, _u, _t, c in hs.sent]
        assert sorted(bodies) == sorted(f"mail number {i}" for i in range(40))
        # Each sender's mails in the order they were accepted.
        for n in range(8):
            assert [b for b in bodies if int(b.split()[-1]) % 8 == n] == [f"mail number {i}" for i in range(n, 40, 8)]
        # A reply after the mail it answers, and replying to its event; the
        # first mail of a Message-ID keeps it.
        at = {int(b.split()[-1]): k for k, b in enumerate(bodies)}
        for reply, parent in replies.items():
            assert at[reply] > at[parent]
            assert hs.sent[at[reply]][3]["m.relates_to"] == {
                "m.in_reply_to": {"event_id": f"$event-zhome-mail-{ids[parent]}-0"}}
        assert at[17] > at[3]
        assert await store.event_for_message_ids(ROOM, ["<m3@example.net>"]) == f"$event-zhome-mail-{ids[3]}-0"
        assert [t for _r, _u, t, _c in hs.sent] == [f"zhome-mail-{ids[int(b.split()[-1])]}-0" for b in bodies]
        # Different senders' mails were sent side by side.
        assert hs.most_in_send > 1
        # Each ghost is named by its own sender.
        assert {u for _r, u, _t, _c in hs.sent} == {f"@email_s{n}=40example.net:example.org" for n in range(8)}
        # The eight senders' ghosts were set up side by side, not one by one.
        assert hs.most_in_setup > 1
        # One transaction for the results of the batch, not several a mail
        # (and one membership record for each ghost that joined).
        assert writes.count("email_bridge_finish_batch") == 1
        assert not {"email_bridge_finish", "email_bridge_remember_event"} & set(writes)
        assert writes.count("email_bridge_membership") == 8
        assert len(writes) < 20, writes
        assert {s for _i, s, _o in await store.inbound_states()} == {POSTED}
        assert await store.event_for_message_ids(ROOM, ["<m39@example.net>"]) == f"$event-zhome-mail-{ids[39]}-0"
    finally:
        await processor.stop()
        await store.db.close()


@pytest_twisted.ensureDeferred
async def test_a_failed_post_is_retried_and_the_others_go_on(db_config: tuple[str, dict[str, Any]]) -> None:
    store = await _store(db_config)
    ids = [await store.add_inbound(ROOM, None, None, _raw(f"s{i % 3}@example.net", f"mail number {i}"),
                                   auth=ACCEPTED) for i in range(6)]
    hs = FakeHomeserver(fail_txn=f"zhome-mail-{ids[3]}-0")
    processor = _processor(store, hs)
    try:
        processor._stopped = False
        await processor._round()
        assert sorted(c["body"] for *_x, c in hs.sent) == [f"mail number {i}" for i in (0, 1, 2, 4, 5)]
        states = {row_id: (state, outcome) for row_id, state, outcome in await store.inbound_states()}
        assert states[ids[3]] == ("pending", "homeserver: ConnectionLost")
        assert all(states[ids[i]][0] == POSTED for i in (0, 1, 2, 4, 5))
        rows = await store.db.execute("t", "SELECT attempts, next_attempt_ts FROM inbound_mail WHERE id = ?", ids[3])
        assert int(rows[0][0]) == 1
    finally:
        await processor.stop()
        await store.db.close()
