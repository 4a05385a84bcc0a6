"""Every operation of the spec's Client-Server definitions is routed.

Walks ``shared/matrix-spec/data/api/client-server/*.yaml`` (each path and
method, under its file's base path) against a real zhome with a signed-in
user and a room, with placeholder parameters, and fails on an answer that
means "no such endpoint" (404 or 405 with ``M_UNRECOGNIZED``) for anything
but the operations zhome leaves out on purpose, and on any 5xx. So a new
operation in the spec cannot be forgotten silently. Error answers must be
Matrix errors (``errcode`` and ``error``).

What is left out, and why (the issue's own list): SSO redirects (zhome has
no SSO), ``/auth_metadata`` (OAuth comes later) and the policy server
well-known. msisdn operations are routed and answer that SMS is not offered.
"""

from __future__ import annotations

import re
import urllib.parse
import yaml

from tests.e2e.harness import ClientUser, ZhomeProcess
from tests.e2e.openapi import spec_data_dir

LEFT_OUT = {
    ("GET", "/_matrix/client/v3/login/sso/redirect"),
    ("GET", "/_matrix/client/v3/login/sso/redirect/{idpId}"),
    ("GET", "/_matrix/client/v1/auth_metadata"),
    ("GET", "/.well-known/matrix/policy_server"),
}


def _operations() -> list[tuple[str, str, str]]:
    out = []
    for f in sorted((spec_data_dir() / "api" / "client-server").glob("*.yaml")):
        doc = yaml.safe_load(f.read_text())
        base = "/_matrix/client/v3"
        for server in doc.get("servers") or []:
            default = (server.get("variables") or {}).get("basePath", {}).get("default")
            if default is not None:
                base = default
        for template, item in (doc.get("paths") or {}).items():
            for method, op in item.items():
                if isinstance(op, dict) and "responses" in op:
                    out.append((f.name, method.upper(), base.rstrip("/") + template))
    return out


def test_every_operation_is_routed(zhome: ZhomeProcess) -> None:
    ops = _operations()
    assert len(ops) >= 160, f"only {len(ops)} operations found: is the spec there?"
    user = ClientUser(zhome, "walker")
    room_id = user.ok("POST", "/createRoom", {})["room_id"]
    values = {"roomId": room_id, "roomIdOrAlias": room_id, "userId": user.user_id, "eventId": "$nothing",
              "serverName": zhome.server_name, "mediaId": "nothing", "deviceId": "NODEVICE",
              "keyName": "displayname", "type": "org.example.walk", "eventType": "m.room.message",
              "stateKey": "", "txnId": "walk1", "tag": "u.walk", "roomAlias": "#walk:localhost",
              "filterId": "0", "version": "1", "sessionId": "nothing", "scope": "global", "kind": "override",
              "ruleId": "walk", "relType": "m.thread", "protocol": "walk", "networkId": "walk",
              "appserviceId": "walk", "loginType": "m.login.password", "idpId": "none"}
    unrouted, broken, not_matrix = [], [], []
    for name, method, template in ops:
        path = re.sub(r"\{(\w+)\}", lambda m: urllib.parse.quote(values.get(m.group(1), "x"), safe=""), template)
        body = {} if method in ("POST", "PUT") else None
        status, resp = zhome.request(method, path, body, token=user.token)
        if (method, template) in LEFT_OUT:
            continue
        if status in (404, 405) and isinstance(resp, dict) and resp.get("errcode") == "M_UNRECOGNIZED":
            unrouted.append(f"{method} {template} ({name})")
        elif status >= 500:
            broken.append(f"{method} {template}: {status} {str(resp)[:120]}")
        elif status >= 400 and not (isinstance(resp, dict) and isinstance(resp.get("errcode"), str)
                                    and isinstance(resp.get("error", ""), str)):
            not_matrix.append(f"{method} {template}: {status} {str(resp)[:120]}")
    assert not broken, broken
    assert not unrouted, f"{len(unrouted)} of {len(ops)} operations are not routed: {unrouted}"
    assert not not_matrix, not_matrix
    # The server still serves after the walk.
    assert zhome.request("GET", "/_matrix/client/versions")[0] == 200


def test_left_out_operations_are_still_in_the_spec() -> None:
    """An operation left out that the spec drops (or renames) is taken off the list."""
    ops = {(method, template) for _, method, template in _operations()}
    assert LEFT_OUT <= ops, LEFT_OUT - ops
