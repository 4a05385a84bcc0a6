"""Oversized request bodies are refused while they arrive, not after."""

from __future__ import annotations

import http.client
import json
import socket

from tests.e2e.harness import ZhomeProcess


def test_declared_oversized_body_refused_before_it_is_sent(zhome: ZhomeProcess) -> None:
    token = zhome.register("alice")["access_token"]
    conn = http.client.HTTPConnection("127.0.0.1", zhome.port, timeout=10)
    # Declare 200 MB but send only the headers: the answer must come anyway.
    conn.putrequest("POST", "/_matrix/client/v3/createRoom")
    conn.putheader("Authorization", f"Bearer {token}")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(200 * 1024 * 1024))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413
    assert json.loads(resp.read())["errcode"] == "M_TOO_LARGE"
    conn.close()
    # The server is fine afterwards.
    assert zhome.request("GET", "/_matrix/client/versions")[0] == 200


def test_chunked_oversized_body_refused(zhome: ZhomeProcess) -> None:
    token = zhome.register("bob")["access_token"]
    sock = socket.create_connection(("127.0.0.1", zhome.port), timeout=10)
    sock.sendall(
        b"POST /_matrix/client/v3/createRoom HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + token.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"x" * 65536
    answer = b""
    try:
        for _ in range(40):  # 2.5 MB, over the 1 MiB default, bounded
            sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    try:
        sock.settimeout(5)
        while True:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    except (ConnectionResetError, socket.timeout):
        pass
    sock.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"M_TOO_LARGE" in answer
    assert zhome.request("GET", "/_matrix/client/versions")[0] == 200
