"""Helpers shared by the benchmark scripts (``scripts/bench-federation``,
``bench-media``, ``bench-email``, ``csbench.py``, ``e2ebench.py``).

A small asynchronous Matrix client (aiohttp), percentile and table helpers,
a Synapse from the pinned venv (``tests/e2e/synapse_peer.py``) with every
rate limit lifted, and the command line of the workload scripts that
``scripts/bench`` runs against each server. Only loopback addresses are
used; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Optional
from urllib.parse import quote, urlparse

import aiohttp
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.e2e.harness import ZhomeProcess, free_port  # noqa: E402
from tests.e2e.synapse_peer import SynapsePeer  # noqa: E402

__all__ = ["Client", "ZhomeProcess", "SynapsePeer", "free_port", "pct", "ratio", "fmt", "bounded_gather",
           "lift_synapse_limits", "log", "check_loopback", "workload_parser", "run_workloads"]

PASSWORD = "bench-password-1"


def log(msg: str) -> None:
    print(f"[{Path(sys.argv[0]).name} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    if not host.startswith("127.") and host not in ("localhost", "::1"):
        raise SystemExit(f"refusing to talk to {url}: loopback only")


def pct(xs: Iterable[float], p: float) -> Optional[float]:
    s = sorted(xs)
    if not s:
        return None
    k = min(len(s) - 1, max(0, int(round(p / 100 * (len(s) - 1)))))
    return s[k]


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b not in (None, 0) else None


def fmt(v: Optional[float]) -> str:
    if v is None:
        return "–"
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"


async def bounded_gather(n: int, jobs: Iterable[Callable[[], Awaitable[Any]]]) -> list[Any]:
    """Run the jobs at most ``n`` at a time, results in order."""
    sem = asyncio.Semaphore(n)

    async def one(job: Callable[[], Awaitable[Any]]) -> Any:
        async with sem:
            return await job()
    return list(await asyncio.gather(*(one(j) for j in jobs)))


class RequestFailed(RuntimeError):
    pass


class Client:
    """Plain Client-Server API calls against one homeserver."""

    def __init__(self, base_url: str, session: aiohttp.ClientSession) -> None:
        check_loopback(base_url)
        self.base = base_url.rstrip("/")
        self.s = session

    async def req(self, method: str, path: str, token: Optional[str] = None, body: Any = None,
                  expect: Optional[int] = 200, timeout_s: float = 120) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.s.request(method, self.base + path, json=body, headers=headers,
                                  timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
            text = await r.text()
            try:
                js = json.loads(text) if text else None
            except ValueError:
                js = text
            if expect is not None and r.status != expect:
                raise RequestFailed(f"{method} {self.base}{path.split('?')[0]} -> {r.status} {str(js)[:500]}")
            return js

    async def register(self, name: str) -> dict[str, Any]:
        path = "/_matrix/client/v3/register"
        first = await self.req("POST", path, body={"username": name, "password": PASSWORD}, expect=None)
        if isinstance(first, dict) and "access_token" in first:
            return first
        session = first.get("session") if isinstance(first, dict) else None
        return await self.req("POST", path, body={"username": name, "password": PASSWORD,
                                                  "auth": {"type": "m.login.dummy", "session": session}})

    async def create_room(self, token: str, **body: Any) -> str:
        return (await self.req("POST", "/_matrix/client/v3/createRoom", token, body))["room_id"]

    async def join(self, token: str, room: str, via: Optional[str] = None, timeout_s: float = 300) -> Any:
        q = f"?server_name={quote(via)}&via={quote(via)}" if via else ""
        return await self.req("POST", f"/_matrix/client/v3/join/{quote(room)}{q}", token, {}, timeout_s=timeout_s)

    async def send(self, token: str, room: str, body: str) -> str:
        js = await self.req("PUT", f"/_matrix/client/v3/rooms/{quote(room)}/send/m.room.message/{uuid.uuid4().hex}",
                            token, {"msgtype": "m.text", "body": body})
        return js["event_id"]

    async def sync(self, token: str, since: Optional[str] = None, timeout_ms: int = 0,
                   filt: Optional[str] = None) -> dict[str, Any]:
        q = f"?timeout={timeout_ms}" + (f"&since={quote(since)}" if since else "") + \
            (f"&filter={quote(filt)}" if filt else "")
        return await self.req("GET", "/_matrix/client/v3/sync" + q, token, timeout_s=timeout_ms / 1000 + 60)


def lift_synapse_limits(peer: SynapsePeer, extra: Optional[dict[str, Any]] = None) -> None:
    """Lift every rc_* rate limit in a SynapsePeer's config (before start)."""
    cfg = yaml.safe_load(peer.config_path.read_text())
    big = {"per_second": 100000, "burst_count": 100000}
    cfg.update(
        rc_message=big, rc_registration=big, rc_joins={"local": big, "remote": big}, rc_joins_per_room=big,
        rc_login={"address": big, "account": big, "failed_attempts": big},
        rc_invites={"per_room": big, "per_user": big, "per_issuer": big}, rc_3pid_validation=big,
        rc_admin_redaction=big, rc_presence={"per_user": big}, rc_delayed_event_mgmt=big, rc_room_creation=big,
        rc_media_create=big,
        rc_federation={"sleep_limit": 100000, "reject_limit": 100000, "concurrent": 1000, "window_size": 1000,
                       "sleep_delay": 1},
        # Only speeds up setting up the accounts; no measured call hashes a password.
        bcrypt_rounds=4,
    )
    cfg.update(extra or {})
    peer.config_path.write_text(yaml.safe_dump(cfg))


def workload_parser(doc: Optional[str]) -> argparse.ArgumentParser:
    """The options every workload script takes: ``BASE_URL [--quick] [--json OUT]``."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base_url")
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--json", help="also write the JSON result to this file")
    return ap


def run_workloads(run: Callable[[str, argparse.Namespace], Awaitable[dict[str, Any]]], args: argparse.Namespace,
                  deadline_s: float) -> None:
    """Run a script's workloads against ``args.base_url`` within the deadline;
    print the JSON result (and write it to ``--json``), then one line a
    measured workload on stderr."""
    res = asyncio.run(asyncio.wait_for(run(args.base_url, args), deadline_s))
    out = json.dumps(res, indent=2)
    print(out)
    if args.json:
        with open(args.json, "w") as f:
            f.write(out)
    for k, v in res.items():
        if isinstance(v, dict) and "count" in v:
            print(f"{k:18s} n={v['count']:<5} p50 {v['p50_ms']} ms  p95 {v['p95_ms']} ms", file=sys.stderr)
