"""Erasure (GDPR art. 17) that erases, on both engines: real redactions
that reach the other servers in the room, the content gone from zhome's
own database files, media store and logs, legal holds and retention
floors keeping what they cover, and the stored erasure report.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
import urllib.parse
from pathlib import Path
from typing import Any

from tests.e2e.conftest import ZhomeServers
from tests.e2e.harness import CS, ClientUser, ZhomeProcess, q
from tests.e2e.test_admin_api import Admin

WAIT_S = 30.0


def _marker() -> str:
    return "MRK" + secrets.token_hex(16)


def _upload(user: ClientUser, data: bytes, name: str) -> str:
    status, out = user.hs.request("POST", f"/_matrix/media/v3/upload?filename={urllib.parse.quote(name)}",
                                  raw=data, token=user.token, headers={"Content-Type": "application/octet-stream"})
    assert status == 200, out
    return str(out["content_uri"])


def _send(user: ClientUser, room: str, content: dict[str, Any], etype: str = "m.room.message") -> str:
    return str(user.ok("PUT", f"/rooms/{q(room)}/send/{etype}/{secrets.token_hex(8)}", content)["event_id"])


def _timeline(user: ClientUser, room: str) -> list[dict[str, Any]]:
    return list(user.ok("GET", f"/rooms/{q(room)}/messages?dir=b&limit=100")["chunk"])


def _bytes_on_disk(hs: ZhomeProcess) -> bytes:
    """Every file under the server's working directory: the SQLite file,
    its WAL and journal, the media store, the log."""
    out = []
    for root, _dirs, files in os.walk(hs.workdir):
        for f in files:
            try:
                out.append(Path(root, f).read_bytes())
            except OSError:
                pass
    return b"\n".join(out)


def _pg_dump(hs: ZhomeProcess) -> bytes:
    url = urllib.parse.urlparse(_database_url(hs))
    got = subprocess.run(["pg_dump", "-h", url.hostname or "127.0.0.1", "-p", str(url.port or 5432),
                          "-U", url.username or "postgres", url.path.lstrip("/")],
                         capture_output=True, check=True, timeout=120)
    return got.stdout


def _database_url(hs: ZhomeProcess) -> str:
    import yaml

    cfg = yaml.safe_load(hs.config_path.read_text())
    return str(cfg.get("database_url") or "")


def _stored_rows(hs: ZhomeProcess, event_ids: list[str]) -> dict[str, tuple[str, Any]]:
    """event_id -> (json, sealed) as the database holds them (server stopped)."""
    url = _database_url(hs)
    qs = ",".join(["%s" if url else "?"] * len(event_ids))
    sql = f"SELECT event_id, json, sealed FROM events WHERE event_id IN ({qs})"
    if url:
        import psycopg2

        conn = psycopg2.connect(url)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, event_ids)
                rows = cur.fetchall()
        finally:
            conn.close()
    else:
        import sqlite3

        conn = sqlite3.connect(str(hs.workdir / "data" / "homeserver.db"))
        try:
            rows = conn.execute(sql, event_ids).fetchall()
        finally:
            conn.close()
    return {r[0]: (r[1], r[2]) for r in rows}


def _open_stored(hs: ZhomeProcess, event_ids: list[str], keystore: Path | None = None) -> dict[str, Any]:
    """The stored events opened with the server's key ring and key store (or
    another key store file): what a reader with the keys gets from the rows."""
    import json

    from zhome.storage.at_rest import Sealer

    data = hs.workdir / "data"
    sealer = Sealer(str(data / "data_encryption.key"), str(keystore or data / "keystore.db"))
    try:
        out = {}
        for eid, (js, sealed) in _stored_rows(hs, event_ids).items():
            pdu = json.loads(js)
            if sealed is not None:
                plain = sealer.open(sealed, eid.encode())
                if plain is not None:
                    pdu.update(json.loads(plain))
            out[eid] = pdu
        return out
    finally:
        sealer.close()


def _where_stored(hs: ZhomeProcess, marker: str) -> list[str]:
    """Which files (and, for a database, which tables) hold ``marker`` in the clear."""
    m = marker.encode()
    found = []
    for root, _dirs, files in os.walk(hs.workdir):
        for f in files:
            try:
                if m in Path(root, f).read_bytes():
                    found.append(str(Path(root, f).relative_to(hs.workdir)))
            except OSError:
                pass
    db = hs.workdir / "data" / "homeserver.db"
    if any(f.startswith("data/homeserver.db") for f in found) and db.exists():
        import sqlite3

        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
                cols = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
                for c in cols:
                    n = conn.execute(f"SELECT COUNT(*) FROM {table} WHERE CAST({c} AS TEXT) LIKE ?",
                                     (f"%{marker}%",)).fetchone()[0]
                    if n:
                        found.append(f"{table}.{c}")
        finally:
            conn.close()
    if _database_url(hs):
        dump = _pg_dump(hs)
        if m in dump:
            # The COPY header above each hit names its table.
            table = ""
            for ln in dump.splitlines():
                if ln.startswith(b"COPY "):
                    table = ln.split(b" ")[1].decode(errors="replace")
                elif m in ln:
                    found.append(f"postgres {table}")
    return found


def _stored(hs: ZhomeProcess) -> bytes:
    data = _bytes_on_disk(hs)
    if _database_url(hs):
        data += _pg_dump(hs)
    return data


def test_erasure_redacts_purges_and_reports(zhome: ZhomeProcess, tmp_path: Path) -> None:
    admin = Admin(zhome, "root", tmp_path)
    alice = ClientUser(zhome, "alice")
    bob = ClientUser(zhome, "bob")
    m_msg, m_name, m_file, m_topic, m_bob = (_marker() for _ in range(5))
    room = alice.ok("POST", "/createRoom", {"preset": "public_chat", "name": "Ward"})["room_id"]
    bob.ok("POST", f"/join/{q(room)}", {})
    alice.ok("PUT", f"/profile/{q(alice.user_id)}/displayname", {"displayname": f"Alice {m_name}"})
    mxc = _upload(alice, f"scan {m_file}".encode(), f"{m_file}.txt")
    sent = [_send(alice, room, {"msgtype": "m.text", "body": f"note {i} {m_msg}"}) for i in range(5)]
    sent.append(_send(alice, room, {"msgtype": "m.file", "body": "scan.txt", "url": mxc}))
    alice.ok("PUT", f"/rooms/{q(room)}/state/m.room.topic", {"topic": f"topic {m_topic}"})
    bob_event = _send(bob, room, {"msgtype": "m.text", "body": f"reply {m_bob}"})
    alice.ok("PUT", f"/user/{q(alice.user_id)}/account_data/org.example.notes", {"secret": m_msg})
    # Encryption at rest: before any erasure no marker is anywhere on disk
    # in the clear, yet the rows hold them for a reader with the keys.
    for m in (m_msg, m_name, m_file, m_topic, m_bob):
        assert not _where_stored(zhome, m), (m, _where_stored(zhome, m))
    zhome.stop()
    backup = _stored_rows(zhome, sent)  # a copy of the rows, as a database backup holds them
    assert all(sealed is not None for _js, sealed in backup.values())
    opened = _open_stored(zhome, [*sent[:1], bob_event])
    assert m_msg in opened[sent[0]]["content"]["body"] and m_bob in opened[bob_event]["content"]["body"]
    zhome.start()

    out = admin.ok("POST", f"/_synapse/admin/v1/deactivate/{q(alice.user_id)}", {"erase": True})
    report = admin.ok("GET", f"/_zhome/admin/v1/erasures/{out['erasure_id']}")
    assert report["user_id"] == alice.user_id and report["requested_by"] == admin.user_id
    assert report["status"] == "complete" and report["kept"] == [] and report["not_redacted_remotely"] == []
    assert report["erased"]["media"] == 1 and report["erased"]["account"] is True
    assert report["erased"]["rooms"][room] == report["erased"]["events"] >= len(sent) + 2
    assert report["redactions_sent"] >= len(sent) + 1
    assert report["federation"] == {}  # no other server in the room
    listed = admin.ok("GET", f"/_zhome/admin/v1/erasures?user_id={q(alice.user_id)}")["erasures"]
    assert [e["id"] for e in listed] == [report["id"]]

    # Bob sees real redactions: alice's events are empty, his own intact.
    timeline = {e["event_id"]: e for e in _timeline(bob, room)}
    for eid in sent:
        assert timeline[eid]["content"] == {}, timeline[eid]
        assert "redacted_because" in timeline[eid]["unsigned"]
    redactions = [e for e in timeline.values() if e["type"] == "m.room.redaction"]
    assert {e.get("redacts") or e["content"].get("redacts") for e in redactions} >= set(sent)
    assert timeline[bob_event]["content"]["body"] == f"reply {m_bob}"
    topic = bob.ok("GET", f"/rooms/{q(room)}/state")
    assert not any(m_topic in str(e["content"]) or m_name in str(e["content"]) for e in topic)
    server, media_id = mxc[len("mxc://"):].split("/", 1)
    status, _ = zhome.request("GET", f"/_matrix/client/v1/media/download/{server}/{media_id}", token=bob.token)
    assert status == 404
    got = admin.ok("GET", f"/_synapse/admin/v2/users/{q(alice.user_id)}")
    assert got["deactivated"] and got["erased"] and got["displayname"] is None

    # No byte of the database files, the media store or the log holds a marker.
    zhome.stop()
    stored = _stored(zhome)
    for m in (m_msg, m_name, m_file, m_topic, m_bob):
        assert m.encode() not in stored, m
    # Bob's message is still there, sealed; alice's data keys are gone, so
    # the copy of her rows taken before the erasure no longer opens.
    opened = _open_stored(zhome, [*sent, bob_event])
    assert opened[bob_event]["content"]["body"] == f"reply {m_bob}"
    assert all(opened[e]["content"] == {} for e in sent)
    assert report["erased"]["data_keys"] >= 1
    from zhome.storage.at_rest import Sealer

    data = zhome.workdir / "data"
    sealer = Sealer(str(data / "data_encryption.key"), str(data / "keystore.db"))
    try:
        for eid, (_js, sealed) in backup.items():
            assert sealer.open(sealed, eid.encode()) is None, eid
    finally:
        sealer.close()


def test_user_erases_themself(zhome: ZhomeProcess, tmp_path: Path) -> None:
    admin = Admin(zhome, "root", tmp_path)
    alice = ClientUser(zhome, "alice")
    room = alice.ok("POST", "/createRoom", {"preset": "public_chat"})["room_id"]
    eid = _send(alice, room, {"msgtype": "m.text", "body": "please forget me"})
    status, first = alice.req("POST", "/account/deactivate", {"erase": True})
    assert status == 401
    alice.ok("POST", "/account/deactivate", {"erase": True, "auth": {
        "type": "m.login.password", "identifier": {"type": "m.id.user", "user": alice.user_id},
        "password": "correct horse battery", "session": first["session"]}})
    erasures = admin.ok("GET", f"/_zhome/admin/v1/erasures?user_id={q(alice.user_id)}")["erasures"]
    assert len(erasures) == 1 and erasures[0]["requested_by"] == alice.user_id
    report = admin.ok("GET", f"/_zhome/admin/v1/erasures/{erasures[0]['id']}")
    assert report["erased"]["rooms"][room] >= 1
    assert admin.ok("GET", f"/_synapse/admin/v1/rooms/{q(room)}")["joined_members"] == 0
    state = admin.ok("GET", f"/_synapse/admin/v1/rooms/{q(room)}/state")["state"]
    assert all("please forget me" not in str(e) for e in state)
    assert eid


def test_holds_and_floors_keep_what_they_cover(zhome: ZhomeProcess, tmp_path: Path) -> None:
    admin = Admin(zhome, "root", tmp_path)
    alice = ClientUser(zhome, "alice")
    bob = ClientUser(zhome, "bob")
    rooms = {}
    for name in ("held", "medical", "chat"):
        rooms[name] = alice.ok("POST", "/createRoom", {"preset": "public_chat", "name": name})["room_id"]
        bob.ok("POST", f"/join/{q(rooms[name])}", {})
    markers = {name: _marker() for name in rooms}
    events = {name: _send(alice, r, {"msgtype": "m.text", "body": markers[name]}) for name, r in rooms.items()}

    hold = admin.ok("POST", "/_zhome/admin/v1/legal_holds",
                    {"kind": "room", "target": rooms["held"], "reason": "complaint 2026-17 under investigation"})
    floor = admin.ok("PUT", f"/_zhome/admin/v1/rooms/{q(rooms['medical'])}/retention_floor",
                     {"days": 20 * 365, "reason": "WGBO: medical file kept 20 years"})
    assert floor["floor_ms"] == 20 * 365 * 24 * 3600 * 1000
    for bad in ({"kind": "device", "target": "x", "reason": "r"}, {"kind": "room", "target": "nope", "reason": "r"},
                {"kind": "user", "target": alice.user_id, "reason": ""}):
        assert admin.req("POST", "/_zhome/admin/v1/legal_holds", bad)[0] == 400, bad
    assert admin.req("PUT", f"/_zhome/admin/v1/rooms/{q(rooms['chat'])}/retention_floor",
                     {"days": 0, "reason": "r"})[0] == 400
    status, out = zhome.request("POST", "/_zhome/admin/v1/legal_holds",
                                {"kind": "user", "target": alice.user_id, "reason": "r"}, token=bob.token)
    assert (status, out["errcode"]) == (403, "M_FORBIDDEN")

    out = admin.ok("POST", f"/_zhome/admin/v1/users/{q(alice.user_id)}/erase")
    assert out["status"] == "partial"
    kept = {k["room_id"]: k for k in out["kept"] if k["what"] == "events"}
    assert kept[rooms["held"]]["why"] == "legal_hold" and kept[rooms["held"]]["hold_id"] == hold["id"]
    assert kept[rooms["held"]]["reason"] == "complaint 2026-17 under investigation"
    assert kept[rooms["medical"]]["why"] == "retention_floor"
    assert kept[rooms["medical"]]["reason"] == "WGBO: medical file kept 20 years"
    assert rooms["chat"] in out["erased"]["rooms"] and rooms["held"] not in out["erased"]["rooms"]

    for name in ("held", "medical"):
        ev = bob.ok("GET", f"/rooms/{q(rooms[name])}/event/{q(events[name])}")
        assert ev["content"]["body"] == markers[name]
    assert bob.ok("GET", f"/rooms/{q(rooms['chat'])}/event/{q(events['chat'])}")["content"] == {}
    zhome.stop()
    stored = _stored(zhome)
    assert markers["chat"].encode() not in stored
    zhome.start()

    # A hold on the user keeps all of their content.
    carol = ClientUser(zhome, "carol")
    room = carol.ok("POST", "/createRoom", {"preset": "public_chat"})["room_id"]
    keep = _marker()
    eid = _send(carol, room, {"msgtype": "m.text", "body": keep})
    admin.ok("POST", "/_zhome/admin/v1/legal_holds", {"kind": "user", "target": carol.user_id,
                                                      "reason": "court order 12/2026"})
    out = admin.ok("POST", f"/_zhome/admin/v1/users/{q(carol.user_id)}/erase")
    assert out["erased"]["events"] == 0 and out["status"] == "partial"
    assert {k["why"] for k in out["kept"]} == {"legal_hold"}
    assert admin.ok("GET", f"/_synapse/admin/v1/rooms/{q(room)}/state")
    assert any(h["target"] == carol.user_id for h in admin.ok("GET", "/_zhome/admin/v1/legal_holds")["legal_holds"])
    assert eid
    admin.ok("DELETE", f"/_zhome/admin/v1/legal_holds/{hold['id']}")
    assert admin.req("DELETE", f"/_zhome/admin/v1/legal_holds/{hold['id']}")[0] == 404
    admin.ok("DELETE", f"/_zhome/admin/v1/rooms/{q(rooms['medical'])}/retention_floor")
    assert admin.req("GET", f"/_zhome/admin/v1/rooms/{q(rooms['medical'])}/retention_floor")[0] == 404


def test_erasure_reaches_the_other_server(zhome_pair: ZhomeServers, tmp_path: Path) -> None:
    a, b = zhome_pair.a, zhome_pair.b
    admin = Admin(a, "root_fed", tmp_path)
    alice = ClientUser(a, "alice_fed")
    bob = ClientUser(b, "bob_fed")
    room = alice.ok("POST", "/createRoom", {"preset": "public_chat"})["room_id"]
    bob.ok("POST", f"/join/{q(room)}?server_name={urllib.parse.quote(a.server_name)}", {})
    marker = _marker()
    eid = _send(alice, room, {"msgtype": "m.text", "body": marker})
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        status, ev = bob.req("GET", f"/rooms/{q(room)}/event/{q(eid)}")
        if status == 200 and ev["content"].get("body") == marker:
            break
        time.sleep(0.3)
    else:
        raise AssertionError("alice's message did not reach the other server")

    out = admin.ok("POST", f"/_zhome/admin/v1/users/{q(alice.user_id)}/erase")
    while time.monotonic() < deadline + WAIT_S:
        status, ev = bob.req("GET", f"/rooms/{q(room)}/event/{q(eid)}")
        if status == 200 and ev["content"] == {}:
            break
        time.sleep(0.3)
    else:
        raise AssertionError("the other server did not apply the redaction")
    for _ in range(100):
        report = admin.ok("GET", f"/_zhome/admin/v1/erasures/{out['id']}")
        delivery = report["federation"].get(b.server_name)
        if delivery and delivery["pending"] == 0:
            break
        time.sleep(0.3)
    assert delivery == {"sent": report["redactions_sent"], "acknowledged": report["redactions_sent"], "pending": 0}
    assert delivery["sent"] >= 1


def test_admin_federation_destinations(zhome_pair: ZhomeServers, tmp_path: Path) -> None:
    """The admin API's view of the other servers (here, since this module already runs two servers)."""
    a, b = zhome_pair.a, zhome_pair.b
    admin = Admin(a, "root_dest", tmp_path)
    alice = ClientUser(a, "alice_dest")
    bob = ClientUser(b, "bob_dest")
    room = alice.ok("POST", "/createRoom", {"preset": "public_chat"})["room_id"]
    bob.ok("POST", f"/join/{q(room)}?server_name={urllib.parse.quote(a.server_name)}", {})
    base = "/_synapse/admin/v1/federation/destinations"
    listed = admin.ok("GET", base)
    assert b.server_name in [d["destination"] for d in listed["destinations"]]
    one = admin.ok("GET", f"{base}/{q(b.server_name)}")
    assert one["destination"] == b.server_name and "retry_interval" in one
    assert room in [r["room_id"] for r in admin.ok("GET", f"{base}/{q(b.server_name)}/rooms")["rooms"]]
    assert admin.ok("POST", f"{base}/{q(b.server_name)}/reset_connection", {}) == {}
    assert admin.req("GET", f"{base}/{q('nowhere.example')}")[0] == 404
    assert admin.req("GET", f"{base}?order_by=secret")[0] == 400
    status, out = a.request("GET", base, token=alice.token)
    assert (status, out["errcode"]) == (403, "M_FORBIDDEN")


def test_retention_purges_expired_messages_on_a_fake_clock(zhome: ZhomeProcess, tmp_path: Path) -> None:
    admin = Admin(zhome, "root", tmp_path)
    alice = ClientUser(zhome, "alice")
    day = 24 * 3600 * 1000
    policy = [{"type": "m.room.retention", "state_key": "", "content": {"max_lifetime": 7 * day}}]
    rooms = {name: alice.ok("POST", "/createRoom", {"preset": "private_chat", "name": name,
                                                    "initial_state": policy})["room_id"]
             for name in ("chat", "medical", "held")}
    forever = alice.ok("POST", "/createRoom", {"preset": "private_chat", "name": "no policy"})["room_id"]
    admin.ok("PUT", f"/_zhome/admin/v1/rooms/{q(rooms['medical'])}/retention_floor",
             {"days": 20 * 365, "reason": "WGBO"})
    admin.ok("POST", "/_zhome/admin/v1/legal_holds", {"kind": "room", "target": rooms["held"], "reason": "case"})
    markers = {name: _marker() for name in (*rooms, "forever")}
    sent = {name: _send(alice, r, {"msgtype": "m.text", "body": markers[name]}) for name, r in rooms.items()}
    sent["forever"] = _send(alice, forever, {"msgtype": "m.text", "body": markers["forever"]})
    now = int(time.time() * 1000)

    # Six days on nothing has expired yet.
    assert admin.ok("POST", "/_zhome/admin/v1/retention/run", {"now": now + 6 * day})["purged"] == {}
    out = admin.ok("POST", "/_zhome/admin/v1/retention/run", {"now": now + 8 * day})
    assert out["purged"] == {rooms["chat"]: 1} and out["skipped"] == {rooms["held"]: "legal_hold"}
    assert alice.ok("GET", f"/rooms/{q(rooms['chat'])}/event/{q(sent['chat'])}")["content"] == {}
    for name in ("medical", "held"):
        assert alice.ok("GET", f"/rooms/{q(rooms[name])}/event/{q(sent[name])}")["content"]["body"] == markers[name]
    assert alice.ok("GET", f"/rooms/{q(forever)}/event/{q(sent['forever'])}")["content"]["body"] == \
        markers["forever"]
    # The room's name (state) stays; a second run finds nothing more.
    assert alice.ok("GET", f"/rooms/{q(rooms['chat'])}/state/m.room.name")["name"] == "chat"
    assert admin.ok("POST", "/_zhome/admin/v1/retention/run", {"now": now + 9 * day})["purged"] == {}
    # Even a clock 30 years on cannot take what the floor keeps.
    far = admin.ok("POST", "/_zhome/admin/v1/retention/run", {"now": now + 30 * 365 * day})
    assert rooms["medical"] not in far["purged"]
    zhome.stop()
    assert not _where_stored(zhome, markers["chat"]) and not _where_stored(zhome, markers["medical"])
    # The medical message is kept (sealed at rest); the expired one is gone.
    opened = _open_stored(zhome, [sent["chat"], sent["medical"]])
    assert opened[sent["medical"]]["content"]["body"] == markers["medical"]
    assert opened[sent["chat"]]["content"] == {}


def test_retention_deletes_the_files_only_expired_events_showed(zhome: ZhomeProcess, tmp_path: Path) -> None:
    admin = Admin(zhome, "root", tmp_path)
    alice = ClientUser(zhome, "alice")
    day = 24 * 3600 * 1000
    policy = [{"type": "m.room.retention", "state_key": "", "content": {"max_lifetime": 7 * day}}]
    chat = alice.ok("POST", "/createRoom", {"preset": "private_chat", "initial_state": policy})["room_id"]
    forever = alice.ok("POST", "/createRoom", {"preset": "private_chat"})["room_id"]
    only, shared, protected, thumb = (_upload(alice, secrets.token_bytes(64), f"{n}.bin")
                                      for n in ("only", "shared", "protected", "thumb"))
    _send(alice, chat, {"msgtype": "m.file", "body": "only.bin", "url": only})
    _send(alice, chat, {"msgtype": "m.image", "body": "shared.png", "url": shared,
                        "info": {"thumbnail_url": thumb}})
    _send(alice, forever, {"msgtype": "m.file", "body": "shared.bin", "url": shared})
    _send(alice, chat, {"msgtype": "m.file", "body": "protected.bin", "url": protected})
    admin.ok("POST", f"/_synapse/admin/v1/media/protect/{protected.rsplit('/', 1)[1]}", {})
    listed = admin.ok("GET", f"/_synapse/admin/v1/room/{q(chat)}/media")
    assert sorted(listed["local"]) == sorted([only, shared, protected, thumb]) and listed["remote"] == []
    assert admin.req("GET", "/_synapse/admin/v1/room/!nowhere:localhost/media")[0] == 404

    def served(mxc: str) -> bool:
        status, _ = zhome.request("GET", "/_matrix/client/v1/media/download/" + mxc[len("mxc://"):],
                                  token=alice.token)
        return status == 200

    now = int(time.time() * 1000)
    out = admin.ok("POST", "/_zhome/admin/v1/retention/run", {"now": now + 8 * day})
    assert out["purged"] == {chat: 3}
    # Shown only by expired events: gone. Still shown elsewhere, or protected: kept.
    assert sorted(out["media_deleted"]) == sorted([only, thumb])
    assert not served(only) and not served(thumb)
    assert served(shared) and served(protected)
    assert admin.ok("GET", f"/_synapse/admin/v1/room/{q(chat)}/media") == {"local": [], "remote": []}
    assert admin.ok("POST", f"/_synapse/admin/v1/room/{q(forever)}/media/quarantine", {}) == {"num_quarantined": 1}
    assert not served(shared)


def _run_sql(hs: ZhomeProcess, statements: list[str]) -> None:
    url = _database_url(hs)
    if url:
        import psycopg2

        conn = psycopg2.connect(url)
        try:
            with conn.cursor() as cur:
                for sql in statements:
                    cur.execute(sql)
            conn.commit()
        finally:
            conn.close()
    else:
        import sqlite3

        lite = sqlite3.connect(str(hs.workdir / "data" / "homeserver.db"))
        try:
            for sql in statements:
                lite.execute(sql)
            lite.commit()
        finally:
            lite.close()


def test_events_from_before_the_file_index_are_indexed_and_nothing_goes_meanwhile(
        zhome: ZhomeProcess, tmp_path: Path) -> None:
    admin = Admin(zhome, "root", tmp_path)
    alice = ClientUser(zhome, "alice")
    day = 24 * 3600 * 1000
    policy = [{"type": "m.room.retention", "state_key": "", "content": {"max_lifetime": 7 * day}}]
    chat = alice.ok("POST", "/createRoom", {"preset": "private_chat", "initial_state": policy})["room_id"]
    forever = alice.ok("POST", "/createRoom", {"preset": "private_chat"})["room_id"]
    mxc = _upload(alice, secrets.token_bytes(64), "old.bin")
    _send(alice, chat, {"msgtype": "m.file", "body": "old.bin", "url": mxc})
    _send(alice, forever, {"msgtype": "m.file", "body": "old.bin", "url": mxc})
    zhome.stop()
    # As a database from before the index: no rows, the pass not begun.
    _run_sql(zhome, ["DELETE FROM event_media", "DELETE FROM at_rest_progress WHERE name LIKE 'event_media%'"])
    zhome.start()
    deadline = time.monotonic() + WAIT_S
    while admin.ok("GET", f"/_synapse/admin/v1/room/{q(forever)}/media")["local"] != [mxc]:
        assert time.monotonic() < deadline, "the background pass did not index the old event"
        time.sleep(0.2)
    out = admin.ok("POST", "/_zhome/admin/v1/retention/run", {"now": int(time.time() * 1000) + 8 * day})
    # The event in the other room still shows the file: it stays.
    assert out["purged"] == {chat: 1} and "media_deleted" not in out
    status, _ = zhome.request("GET", "/_matrix/client/v1/media/download/" + mxc[len("mxc://"):],
                              token=alice.token)
    assert status == 200


def test_do_not_transfer_and_residency_reports(zhome_pair: ZhomeServers, tmp_path: Path) -> None:
    a, b = zhome_pair.a, zhome_pair.b
    admin = Admin(a, "root_dnt", tmp_path)
    alice = ClientUser(a, "alice_dnt")
    carol = ClientUser(a, "carol_dnt")
    bob = ClientUser(b, "bob_dnt")
    shared = carol.ok("POST", "/createRoom", {"preset": "public_chat"})["room_id"]
    alice.ok("POST", f"/join/{q(shared)}", {})
    bob.ok("POST", f"/join/{q(shared)}?server_name={urllib.parse.quote(a.server_name)}", {})
    eid = _send(alice, shared, {"msgtype": "m.text", "body": "before the setting"})
    _send(carol, shared, {"msgtype": "m.text", "body": "carol's"})
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline and bob.req("GET", f"/rooms/{q(shared)}/event/{q(eid)}")[0] != 200:
        time.sleep(0.3)

    settings = alice.hs.request("PUT", "/_zhome/client/v1/privacy", {"do_not_transfer": True},
                                token=alice.token)
    assert settings == (200, {"do_not_transfer": True, "allowed_servers": [], "set_by": alice.user_id,
                              "set_ts": settings[1]["set_ts"]})
    status, out = alice.req("PUT", f"/rooms/{q(shared)}/send/m.room.message/x1", {"msgtype": "m.text",
                                                                                   "body": "secret"})
    assert (status, out["errcode"]) == (403, "M_FORBIDDEN") and b.server_name in out["error"]
    assert out["servers"] == [b.server_name]
    remote_room = bob.ok("POST", "/createRoom", {"preset": "public_chat"})["room_id"]
    status, out = alice.req("POST", f"/join/{q(remote_room)}?server_name={urllib.parse.quote(b.server_name)}", {})
    assert (status, out["errcode"]) == (403, "M_FORBIDDEN") and b.server_name in out["error"]
    _send(carol, shared, {"msgtype": "m.text", "body": "carol is not affected"})
    local_only = alice.ok("POST", "/createRoom", {"preset": "private_chat"})["room_id"]
    _send(alice, local_only, {"msgtype": "m.text", "body": "no other server here"})
    assert a.request("PUT", "/_zhome/client/v1/privacy", {"do_not_transfer": "yes"}, token=alice.token)[0] == 400

    # An admin allows the other server for her; then she may send there.
    got = admin.ok("PUT", f"/_zhome/admin/v1/users/{q(alice.user_id)}/privacy",
                   {"do_not_transfer": True, "allowed_servers": [b.server_name]})
    assert got["allowed_servers"] == [b.server_name] and got["set_by"] == admin.user_id
    _send(alice, shared, {"msgtype": "m.text", "body": "allowed now"})

    report = {}
    for _ in range(100):
        report = admin.ok("GET", f"/_zhome/admin/v1/users/{q(alice.user_id)}/residency")
        if report["servers"] and report["servers"][0]["events"] >= 2:
            break
        time.sleep(0.3)
    server = report["servers"][0]
    assert server["server"] == b.server_name and server["rooms"][shared] >= 2  # the two messages B was sent
    assert server["first_ts"] <= server["last_ts"] and report["transfer"]["do_not_transfer"] is True
    room_report = admin.ok("GET", f"/_zhome/admin/v1/rooms/{q(shared)}/residency")
    assert [s["server"] for s in room_report["servers"]] == [b.server_name]
    assert set(room_report["servers"][0]["senders"]) >= {alice.user_id, carol.user_id}
    assert admin.ok("GET", f"/_zhome/admin/v1/rooms/{q(local_only)}/residency")["servers"] == []
    status, out = a.request("GET", f"/_zhome/admin/v1/users/{q(alice.user_id)}/residency", token=carol.token)
    assert (status, out["errcode"]) == (403, "M_FORBIDDEN")


def test_a_server_that_joins_later_gets_a_do_not_transfer_users_history_redacted(
        zhome_pair: ZhomeServers, tmp_path: Path) -> None:
    a, b = zhome_pair.a, zhome_pair.b
    alice = ClientUser(a, "alice_dnt_late")
    carol = ClientUser(a, "carol_dnt_late")
    bob = ClientUser(b, "bob_dnt_late")
    assert a.request("PUT", "/_zhome/client/v1/privacy", {"do_not_transfer": True}, token=alice.token)[0] == 200
    room = carol.ok("POST", "/createRoom", {"preset": "public_chat"})["room_id"]
    alice.ok("POST", f"/join/{q(room)}", {})
    secret, public = _marker(), _marker()
    eid = _send(alice, room, {"msgtype": "m.text", "body": secret})  # no other server in the room yet
    cid = _send(carol, room, {"msgtype": "m.text", "body": public})
    bob.ok("POST", f"/join/{q(room)}?server_name={urllib.parse.quote(a.server_name)}", {})

    # Bob's server fetches the history (backfill, the event itself):
    # carol's message in full, alice's only in its redacted form.
    got: dict[str, Any] = {}
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline and not {eid, cid} <= set(got):
        got = {e["event_id"]: e for e in _timeline(bob, room)}
        time.sleep(0.3)
    assert got[cid]["content"]["body"] == public
    assert got[eid]["content"] == {}
    status, one = bob.req("GET", f"/rooms/{q(room)}/event/{q(eid)}")
    assert status == 200 and one["content"] == {}
    # Alice's own server still has it; B never stored it.
    assert alice.ok("GET", f"/rooms/{q(room)}/event/{q(eid)}")["content"]["body"] == secret
    b.stop()
    assert not _where_stored(b, secret), _where_stored(b, secret)
    b.start()


def test_erasure_chains_its_redactions_in_every_room_version_format(zhome: ZhomeProcess, tmp_path: Path) -> None:
    """Redactions go out chained, a batch per transaction: in a v1 room
    (event IDs chosen by the server, references with hashes) and a v11 one
    (redacts in content), across a batch boundary, the graph stays one
    line and every message reads as redacted."""
    from zhome.admin.erasure import REDACTION_BATCH

    admin = Admin(zhome, "root", tmp_path)
    alice = ClientUser(zhome, "alice")
    bob = ClientUser(zhome, "bob")
    rooms = {}
    for version in ("1", "11"):
        rooms[version] = alice.ok("POST", "/createRoom", {"preset": "public_chat", "room_version": version})["room_id"]
        bob.ok("POST", f"/join/{q(rooms[version])}", {})
    sent = {v: [_send(alice, r, {"msgtype": "m.text", "body": f"m{i}"}) for i in range(REDACTION_BATCH + 5)]
            for v, r in rooms.items()}
    out = admin.ok("POST", f"/_synapse/admin/v1/deactivate/{q(alice.user_id)}", {"erase": True})
    report = admin.ok("GET", f"/_zhome/admin/v1/erasures/{out['erasure_id']}")
    assert report["status"] == "complete" and report["redactions_sent"] >= 2 * (REDACTION_BATCH + 5)
    for version, room in rooms.items():
        chunk = bob.ok("GET", f"/rooms/{q(room)}/messages?dir=b&limit=1000")["chunk"]
        by_id = {e["event_id"]: e for e in chunk}
        assert all(by_id[e]["content"] == {} for e in sent[version]), version
        redacted = {e.get("redacts") or e["content"].get("redacts") for e in chunk if e["type"] == "m.room.redaction"}
        assert redacted >= set(sent[version]), version
        # Bob can still talk in the room: the chain left one forward extremity.
        _send(bob, room, {"msgtype": "m.text", "body": "still here"})
