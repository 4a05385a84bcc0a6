"""Structured logs and the Prometheus listener."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

from tests.e2e.harness import free_port


def test_json_logs_and_metrics(zhome_factory: Any) -> None:
    metrics_port = free_port()
    hs = zhome_factory(overrides={"log_format": "json"})
    import yaml

    cfg = yaml.safe_load(hs.config_path.read_text())
    cfg["listeners"].append({"port": metrics_port, "type": "metrics", "bind_addresses": ["127.0.0.1"]})
    hs.config_path.write_text(yaml.safe_dump(cfg))
    hs.start()
    alice = hs.register("alice")
    token = alice["access_token"]
    status, room = hs.request("POST", "/_matrix/client/v3/createRoom", {}, token)
    assert status == 200
    status, _ = hs.request("PUT", f"/_matrix/client/v3/rooms/{room['room_id']}/send/m.room.message/t1",
                           {"msgtype": "m.text", "body": "secret-body-marker"}, token)
    assert status == 200
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert 'zhome_http_requests_total{code="200",endpoint="send",method="PUT"} 1.0' in text
    assert "zhome_http_request_seconds_bucket" in text
    persisted = [line for line in text.splitlines() if line.startswith('zhome_events_persisted_total{origin="local"}')]
    assert persisted and float(persisted[0].split()[-1]) >= 7  # createRoom events plus the message
    assert "zhome_sync_waiters" in text
    hs.stop()

    log = hs.log_path.read_text()
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert records, log[-2000:]
    sends = [r for r in records if r.get("endpoint") == "send"]
    assert sends and sends[0]["status"] == 200 and sends[0]["method"] == "PUT"
    assert token not in log
    assert "secret-body-marker" not in log


def test_access_log_names_the_path_of_unknown_requests(zhome_factory: Any) -> None:
    hs = zhome_factory().start()
    token = hs.register("alice")["access_token"]
    status, body = hs.request("GET", "/_matrix/client/v3/no/such/endpoint?access_token=" + token)
    assert status == 404 and body["errcode"] == "M_UNRECOGNIZED"
    status, _ = hs.request("GET", "/_matrix/client/v3/account/whoami", token=token)
    assert status == 200
    status, _ = hs.request("GET", "/_matrix/client/v3/profile/@nobody:localhost", token=token)
    assert status == 404
    hs.stop()
    log = hs.log_path.read_text()
    lines = [line for line in log.splitlines() if "zhome.access" in line]
    assert any("GET /_matrix/client/v3/no/such/endpoint 404" in line for line in lines), lines[-5:]
    # Known routes keep their endpoint name, errors included; no query string (and so no token) is logged.
    assert any("GET whoami 200" in line for line in lines), lines[-5:]
    assert any("GET profile 404" in line for line in lines), lines[-5:]
    assert not any("@nobody" in line for line in lines)
    assert token not in log
