#!/usr/bin/env python3
"""End-to-end encryption workloads, run by scripts/bench against zhome and
Synapse one after the other, like the shared Client-Server benchmark.

    e2ebench.py BASE_URL [--quick] [--json OUT] [--mxbench PATH]

Every user it registers uploads signed device keys (ed25519 and curve25519,
signed with the device's ed25519 key as a client does) and signed one-time
keys right after registering. Workloads:

  keys_query       one request to /keys/query for the devices of U users
  keys_claim       one request to /keys/claim for one key of each of U devices
  to_device        time from PUT /sendToDevice until the receiving device's
                   long-polling /sync returns the message
  keyed_*          the shared benchmark's send_conc, delivery and
                   initial_sync workloads, with every user's keys uploaded

Only loopback addresses; every loop is bounded by a count and a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import sys
import time
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlparse

import aiohttp
import nacl.public
import signedjson.key
import signedjson.sign
from unpaddedbase64 import encode_base64

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import run_workloads, workload_parser  # noqa: E402

DEADLINE_S = 900
PASSWORD = "bench-password-1"
ALGORITHMS = ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"]


def load_mxbench(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("mxbench", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def device_keys_upload(user_id: str, device_id: str, otks: int) -> dict[str, Any]:
    """A /keys/upload body as a client makes it: the device keys signed by the
    device's ed25519 key, and ``otks`` signed curve25519 one-time keys."""
    signing = signedjson.key.generate_signing_key(device_id)
    curve = nacl.public.PrivateKey.generate().public_key
    keys = {"user_id": user_id, "device_id": device_id, "algorithms": ALGORITHMS,
            "keys": {f"ed25519:{device_id}": encode_base64(signing.verify_key.encode()),
                     f"curve25519:{device_id}": encode_base64(curve.encode())}}
    signedjson.sign.sign_json(keys, user_id, signing)
    one_time: dict[str, Any] = {}
    for i in range(otks):
        k = {"key": encode_base64(nacl.public.PrivateKey.generate().public_key.encode())}
        signedjson.sign.sign_json(k, user_id, signing)
        one_time[f"signed_curve25519:{i:06d}"] = k
    return {"device_keys": keys, "one_time_keys": one_time}


class Bench:
    def __init__(self, mx: ModuleType, base: str, session: aiohttp.ClientSession, otks: int) -> None:
        self.hs = mx.HS(base, session)
        self.otks = otks

    async def register(self, name: str) -> dict[str, Any]:
        u: dict[str, Any] = await self.hs.register(name)
        await upload_keys(self.hs, u, self.otks)
        return u


async def upload_keys(hs: Any, u: dict[str, Any], otks: int) -> None:
    body = device_keys_upload(u["user_id"], u["device_id"], otks)
    got = await hs.req("POST", "/_matrix/client/v3/keys/upload", u["access_token"], body)
    if got.get("one_time_key_counts", {}).get("signed_curve25519") != otks:
        raise RuntimeError(f"keys/upload for {u['user_id']} answered {got}")


async def key_workloads(mx: ModuleType, base: str, quick: bool) -> dict[str, Any]:
    U, Q, T = (20, 5, 10) if quick else (100, 20, 30)
    tag = uuid.uuid4().hex[:6]
    res: dict[str, Any] = {"params": {"U": U, "Q": Q, "T": T}}
    conn = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as session:
        b = Bench(mx, base, session, otks=Q + 5)
        hs = b.hs
        us = [await b.register(f"k{tag}u{i}") for i in range(U)]
        asker = us[0]["access_token"]

        want = {u["user_id"]: [] for u in us}
        lat: list[float] = []
        t0 = time.perf_counter()
        for _ in range(Q):
            a = time.perf_counter()
            got = await hs.req("POST", "/_matrix/client/v3/keys/query", asker, {"device_keys": want})
            lat.append(time.perf_counter() - a)
            found = sum(1 for u in us if u["device_id"] in got.get("device_keys", {}).get(u["user_id"], {}))
            if found != U:
                raise RuntimeError(f"keys/query returned the keys of {found} of {U} devices")
        res["keys_query"] = mx.summary(lat, time.perf_counter() - t0, Q)

        claim = {"one_time_keys": {u["user_id"]: {u["device_id"]: "signed_curve25519"} for u in us}}
        lat = []
        t0 = time.perf_counter()
        for _ in range(Q):
            a = time.perf_counter()
            got = await hs.req("POST", "/_matrix/client/v3/keys/claim", asker, claim)
            lat.append(time.perf_counter() - a)
            found = sum(1 for u in us if got.get("one_time_keys", {}).get(u["user_id"], {}).get(u["device_id"]))
            if found != U:
                raise RuntimeError(f"keys/claim returned keys for {found} of {U} devices")
        res["keys_claim"] = mx.summary(lat, time.perf_counter() - t0, Q)

        sender, receiver = us[1], us[2]
        filt = json.dumps({"room": {"rooms": []}, "presence": {"types": []}, "account_data": {"types": []}})
        since = (await hs.sync(receiver["access_token"], filt=filt))["next_batch"]
        lat = []
        t0 = time.perf_counter()
        for i in range(T):
            marker = f"{tag}-{i}"
            poll = asyncio.ensure_future(hs.sync(receiver["access_token"], since, timeout=10000, filt=filt))
            await asyncio.sleep(0.05)  # let the long-poll reach the server first
            a = time.perf_counter()
            await hs.req("PUT", f"/_matrix/client/v3/sendToDevice/m.zhome.bench/{uuid.uuid4().hex}",
                         sender["access_token"],
                         {"messages": {receiver["user_id"]: {receiver["device_id"]: {"marker": marker}}}})
            found = False
            for _ in range(20):
                r = await poll
                since = r["next_batch"]
                found = any(e.get("content", {}).get("marker") == marker
                            for e in r.get("to_device", {}).get("events", []))
                if found or time.perf_counter() - a > 15:
                    break
                poll = asyncio.ensure_future(hs.sync(receiver["access_token"], since, timeout=10000, filt=filt))
            if not found:
                raise RuntimeError(f"to-device message {marker} did not arrive within 15 s")
            lat.append(time.perf_counter() - a)
        res["to_device"] = mx.summary(lat, time.perf_counter() - t0, T)
    return res


async def keyed_workloads(mx: ModuleType, base: str, quick: bool) -> dict[str, Any]:
    """The shared benchmark's own workloads, with every user it registers
    uploading device keys and one-time keys first."""
    original = mx.HS.register

    async def register_with_keys(self: Any, name: str, pw: str = PASSWORD) -> Any:
        u = await original(self, name, pw)
        await upload_keys(self, u, 10)
        return u

    mx.HS.register = register_with_keys
    try:
        args = argparse.Namespace(quick=quick, only="send_conc,delivery,initial_sync")
        got: dict[str, Any] = await mx.run(base, args)
    finally:
        mx.HS.register = original
    return {f"keyed_{k}": v for k, v in got.items() if k in ("send_conc", "delivery", "initial_sync")}


async def run(base: str, args: argparse.Namespace) -> dict[str, Any]:
    mx = load_mxbench(args.mxbench)
    res: dict[str, Any] = {"base_url": base}
    res.update(await key_workloads(mx, base, args.quick))
    res.update(await keyed_workloads(mx, base, args.quick))
    return res


def main() -> None:
    here = Path(__file__).resolve().parent
    default_mx = os.path.realpath(here / ".." / ".." / "shared" / "bench" / "mxbench.py")
    ap = workload_parser(__doc__)
    ap.add_argument("--mxbench", default=default_mx, help="path of the shared benchmark's mxbench.py")
    args = ap.parse_args()
    host = urlparse(args.base_url).hostname
    if host not in ("localhost", "::1") and not (host or "").startswith("127."):
        sys.exit("e2ebench only talks to loopback addresses")
    run_workloads(run, args, DEADLINE_S)


if __name__ == "__main__":
    main()
