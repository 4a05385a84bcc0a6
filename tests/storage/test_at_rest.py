"""Encryption at rest (zhome/storage/at_rest.py): sealing, scoped data
keys, crypto-shredding, master-key rotation while in use, and the
background sealing of rows stored before."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest

from zhome.storage.at_rest import PREFIX, KeyStoreError, Sealer, event_period, read_key_ring


def _sealer(tmp_path: Path, **kw: object) -> Sealer:
    return Sealer(str(tmp_path / "keys"), str(tmp_path / "keystore.db"), **kw)  # type: ignore[arg-type]


def test_seal_and_open_round_trip_and_bind_to_the_row(tmp_path: Path) -> None:
    s = _sealer(tmp_path)
    kid, token = s.seal("@a:x", "!r:x", "202612", b"secret body", b"$event1")
    assert token.startswith(f"{PREFIX}{kid}:") and b"secret" not in token.encode()
    assert s.open(token, b"$event1") == b"secret body"
    # The same sealed value under another row's identity does not open.
    with pytest.raises(KeyStoreError):
        s.open(token, b"$event2")
    with pytest.raises(KeyStoreError):
        s.open(token[:-4] + "AAAA", b"$event1")
    with pytest.raises(KeyStoreError):
        s.open("zk1:not-a-number:xx", b"$event1")
    # Two seals of the same text differ (fresh nonce), one key per scope.
    kid2, token2 = s.seal("@a:x", "!r:x", "202612", b"secret body", b"$event1")
    assert kid2 == kid and token2 != token
    kid3, _ = s.seal("@b:x", "!r:x", "202612", b"x", b"$e")
    kid4, _ = s.seal("@a:x", "!r:x", "202701", b"x", b"$e")
    assert len({kid, kid3, kid4}) == 3
    s.close()


def test_keys_survive_a_restart_and_need_the_right_master_key(tmp_path: Path) -> None:
    s = _sealer(tmp_path)
    _, token = s.seal("@a:x", "", "", b"profile", b"aad")
    s.close()
    again = _sealer(tmp_path)
    assert again.open(token, b"aad") == b"profile"
    again.close()
    os.rename(tmp_path / "keys", tmp_path / "keys.real")
    # A new key ring is made when the file is missing; the store's keys
    # were wrapped by another master key, so start-up refuses.
    with pytest.raises(KeyStoreError, match="wrong key file"):
        _sealer(tmp_path)


def test_the_key_store_never_holds_a_data_key_in_the_clear(tmp_path: Path) -> None:
    s = _sealer(tmp_path)
    s.seal("@a:x", "!r:x", "202612", b"x", b"e")
    raw = next(iter(s._by_id.values()))
    assert raw is not None
    s.close()
    conn = sqlite3.connect(str(tmp_path / "keystore.db"))
    wrapped = conn.execute("SELECT wrapped FROM data_keys").fetchone()[0]
    conn.close()
    assert len(wrapped) == 12 + 32 + 16  # nonce, sealed key, tag


def test_destroying_a_key_shreds_every_copy(tmp_path: Path) -> None:
    s = _sealer(tmp_path)
    kid, token = s.seal("@a:x", "!r:x", "202612", b"to be erased", b"e1")
    other_kid, other = s.seal("@b:x", "!r:x", "202612", b"stays", b"e2")
    copy = str(token)  # e.g. in a database backup taken before the erasure
    assert s.destroy([kid]) == 1
    assert s.open(copy, b"e1") is None
    assert s.open(other, b"e2") == b"stays"
    # Gone from the file too, and its bytes with it (secure_delete).
    s.close()
    again = _sealer(tmp_path)
    assert again.open(copy, b"e1") is None
    assert again.key_ids(owner="@a:x") == [] and again.key_ids(owner="@b:x") == [other_kid]
    # A new write in the same scope gets a new key: the old data stays shredded.
    kid_new, _ = again.seal("@a:x", "!r:x", "202612", b"new", b"e3")
    assert kid_new != kid
    again.close()


def _keys_on_disk(tmp_path: Path) -> int:
    """Data keys another connection sees: what is committed to the file."""
    conn = sqlite3.connect(str(tmp_path / "keystore.db"), timeout=0)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM data_keys").fetchone()[0])
    except sqlite3.OperationalError:  # locked: the batch's transaction holds it
        return -1
    finally:
        conn.close()


def test_keys_made_in_a_batch_are_committed_together_as_it_ends(tmp_path: Path) -> None:
    s = _sealer(tmp_path)
    s.seal("@first:x", "", "", b"x", b"a")
    assert _keys_on_disk(tmp_path) == 1  # outside a batch: at once
    with s.key_batch():
        tokens = [s.seal(f"@u{i}:x", "!r:x", "202612", f"m{i}".encode(), b"a")[1] for i in range(50)]
        with s.key_batch():  # nested: ends with the outer one
            tokens.append(s.seal("@inner:x", "!r:x", "202612", b"inner", b"a")[1])
        assert _keys_on_disk(tmp_path) in (1, -1)  # not committed yet
        assert s.open(tokens[3], b"a") == b"m3"  # usable meanwhile
    assert _keys_on_disk(tmp_path) == 52
    s.close()
    again = _sealer(tmp_path)
    assert [again.open(t, b"a") for t in tokens] == [f"m{i}".encode() for i in range(50)] + [b"inner"]
    again.close()


def test_a_batch_does_not_hold_back_other_key_store_writes(tmp_path: Path) -> None:
    """Destroying keys, a key made outside any batch, named keys and
    rotation each commit at once, with the batch's keys so far."""
    s = _sealer(tmp_path)
    with s.key_batch():
        kid, token = s.seal("@a:x", "!r:x", "202612", b"erase me", b"a")
        assert s.destroy([kid]) == 1
        assert _keys_on_disk(tmp_path) == 0
        assert s.open(token, b"a") is None
        s.seal("@b:x", "!r:x", "202612", b"x", b"a")
        s.named_key("index")
        assert _keys_on_disk(tmp_path) == 2
        s.seal("@c:x", "!r:x", "202612", b"x", b"a")
        s.rotate()
        assert _keys_on_disk(tmp_path) == 3
        s.seal("@d:x", "!r:x", "202612", b"x", b"a")
    assert _keys_on_disk(tmp_path) == 4
    s.close()


def test_a_key_made_outside_a_batch_while_another_thread_batches(tmp_path: Path) -> None:
    """A thread not batching gets its key committed before it goes on,
    even while another thread's batch is open (one key store for both)."""
    import threading

    s = _sealer(tmp_path)
    in_batch, done = threading.Event(), threading.Event()

    def batcher() -> None:
        with s.key_batch():
            s.seal("@batch:x", "!r:x", "202612", b"x", b"a")
            in_batch.set()
            assert done.wait(10)

    t = threading.Thread(target=batcher)
    t.start()
    assert in_batch.wait(10)
    s.seal("@alone:x", "!r:x", "202612", b"x", b"a")
    assert _keys_on_disk(tmp_path) == 2
    done.set()
    t.join(10)
    assert _keys_on_disk(tmp_path) == 2
    s.close()


def test_rotation_rewraps_while_in_use_and_drops_the_old_master_key(tmp_path: Path) -> None:
    s = _sealer(tmp_path)
    tokens = [s.seal(f"@u{i}:x", "!r:x", "202612", f"m{i}".encode(), b"a") for i in range(7)]
    old_master = read_key_ring(str(tmp_path / "keys"))[0].key_id
    new_master = s.rotate()
    assert new_master != old_master
    assert [k.key_id for k in read_key_ring(str(tmp_path / "keys"))] == [new_master, old_master]
    # New writes get new data keys (a new generation) under the new master.
    kid_after, t_after = s.seal("@u0:x", "!r:x", "202612", b"after", b"a")
    assert kid_after not in {k for k, _ in tokens}
    # Re-wrap in small batches, reading all the while.
    rounds = 0
    while s.rewrap_batch(limit=3):
        rounds += 1
        assert rounds < 10
        assert all(s.open(t, b"a") == f"m{i}".encode() for i, (_, t) in enumerate(tokens))
    assert rounds == 3
    assert [k.key_id for k in read_key_ring(str(tmp_path / "keys"))] == [new_master]
    status = s.status()
    assert status["data_keys_by_master_key"] == {new_master: 8}
    s.close()
    # After a restart with only the new master key, everything opens.
    again = _sealer(tmp_path)
    assert all(again.open(t, b"a") == f"m{i}".encode() for i, (_, t) in enumerate(tokens))
    assert again.open(t_after, b"after"[:0] + b"a") == b"after"
    again.close()


def test_text_values_and_plain_values_from_before(tmp_path: Path) -> None:
    s = _sealer(tmp_path)
    sealed = s.seal_text("@a:x", "Dr. Jansen", "profiles.displayname\x00@a:x")
    assert sealed is not None and sealed.startswith(PREFIX) and "Jansen" not in sealed
    assert s.open_text(sealed, "profiles.displayname\x00@a:x") == "Dr. Jansen"
    assert s.open_text("plain from before", "whatever") == "plain from before"
    assert s.seal_text("@a:x", None, "x") is None
    assert s.destroy_user_key("@a:x") == 1
    assert s.open_text(sealed, "profiles.displayname\x00@a:x") is None
    off = Sealer(str(tmp_path / "keys"), str(tmp_path / "keystore.db"), enabled=False)
    assert off.seal_text("@a:x", "clear", "x") == "clear"
    s.close()
    off.close()


def test_event_period() -> None:
    assert event_period(1764633600000) == "202512"
    assert event_period(-5) == "000000" and event_period("x") == "000000" and event_period(True) == "000000"
    assert event_period(10 ** 20) == "000000"


def test_bad_key_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_text("not base64!!\n")
    with pytest.raises(KeyStoreError, match="line 1 is not base64"):
        read_key_ring(str(bad))
    bad.write_text("# only a comment\n")
    with pytest.raises(KeyStoreError, match="holds no key"):
        read_key_ring(str(bad))
    bad.write_text("AAAA\n")
    with pytest.raises(KeyStoreError, match="must hold 32 bytes"):
        read_key_ring(str(bad))


def test_event_rows_hold_only_the_redacted_form_in_the_clear() -> None:
    from zhome.rooms.versions import get_room_version
    from zhome.storage.events import EventsStore
    from zhome.storage.ids import IdGenerator

    import tempfile

    with tempfile.TemporaryDirectory() as d:
        sealer = Sealer(os.path.join(d, "k"), os.path.join(d, "ks.db"))
        store = EventsStore(None, IdGenerator(0), IdGenerator(0), sealer=sealer)  # type: ignore[arg-type]
        rv = get_room_version("10")
        pdu = {"type": "m.room.member", "state_key": "@a:x", "sender": "@a:x", "room_id": "!r:x",
               "origin_server_ts": 1764633600000, "depth": 3, "auth_events": [], "prev_events": [],
               "hashes": {"sha256": "h"}, "signatures": {}, "unsigned": {"age_ts": 1},
               "content": {"membership": "join", "displayname": "Secret Name"}}
        stored, sealed, key = store.seal_pdu("$e", rv, pdu)
        assert key and sealed and "Secret" not in stored and "age_ts" not in stored
        assert json.loads(stored)["content"] == {"membership": "join"}
        assert store.open_pdu("$e", stored, sealed) == pdu
        # An event that is its own redacted form needs no key.
        bare = dict(pdu, content={"membership": "leave"}, unsigned=None)
        del bare["unsigned"]
        stored2, sealed2, key2 = store.seal_pdu("$f", rv, bare)
        assert sealed2 is None and key2 == 0 and json.loads(stored2) == bare
        # Shredded: the redacted form is what is left.
        sealer.destroy([key])
        assert store.open_pdu("$e", stored, sealed)["content"] == {"membership": "join"}
        sealer.close()
