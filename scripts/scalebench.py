#!/usr/bin/env python3
"""Scale workloads for any Matrix homeserver, over the Client-Server API.

    scalebench.py BASE_URL --json OUT [--members 10,1000,10000]
                  [--rooms 10,300,1000] [--deep-events 1000,100000] [--only w1,w2]

How costs grow with the sizes organisations reach, measured as curves:

  big_room      one room grown to each size in --members: a member sends 30
                messages (send p50) while another long-polls /sync (delivery
                p50: from the send until that /sync returns it)
  many_rooms    one user in each number of rooms in --rooms (one message in
                each): initial /sync p50 with a different filter each time
                (nothing can be reused), and p50 of the same request repeated
                (what clients that time out and retry send)
  deep_history  a room grown to each size in --deep-events messages:
                /messages pages of 100 from the newest, and from 90% of the
                way back (``from`` a token taken while sending)

Needs open registration with m.login.dummy and no rate limits (as
scripts/bench-scale configures both servers). Users are registered
concurrently; their password hashing is the server's business (the bench
lowers it on both). Only loopback addresses are accepted and every loop is
bounded by a count and a deadline. Needs aiohttp.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from typing import Any, Optional
from urllib.parse import quote, urlparse

import aiohttp

DEADLINE_S = 7200
SENDS = 30
SYNC_SAMPLES = 7
CONCURRENCY = 16


def p50_ms(xs: list[float]) -> Optional[float]:
    return round(statistics.median(xs) * 1000, 2) if xs else None


class HS:
    def __init__(self, base: str, session: aiohttp.ClientSession, deadline: float) -> None:
        self.base = base.rstrip("/")
        self.s = session
        self.deadline = deadline

    def check_deadline(self) -> None:
        if time.monotonic() > self.deadline:
            raise RuntimeError("deadline passed")

    async def req(self, method: str, path: str, token: Optional[str] = None, body: Any = None,
                  timeout: float = 120) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        for attempt in range(5):
            async with self.s.request(method, self.base + path, json=body, headers=headers,
                                      timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                js = await r.json(content_type=None)
                if r.status == 200:
                    return js
                if r.status == 429 and attempt < 4:
                    await asyncio.sleep(min(5.0, (js or {}).get("retry_after_ms", 500) / 1000))
                    continue
                raise RuntimeError(f"{method} {path} -> {r.status} {js}")
        raise RuntimeError("unreachable")

    async def register(self, name: str) -> str:
        body: dict[str, Any] = {"username": name, "password": "scale-bench-pw-1", "inhibit_login": False}
        async with self.s.post(self.base + "/_matrix/client/v3/register", json=body) as r:
            js = await r.json(content_type=None)
            if r.status == 401:  # user-interactive auth: finish the dummy stage
                body["auth"] = {"type": "m.login.dummy", "session": js.get("session")}
                async with self.s.post(self.base + "/_matrix/client/v3/register", json=body) as r2:
                    js = await r2.json(content_type=None)
                    if r2.status != 200:
                        raise RuntimeError(f"register {name}: {r2.status} {js}")
            elif r.status != 200:
                raise RuntimeError(f"register {name}: {r.status} {js}")
        return str(js["access_token"])

    async def send(self, token: str, room: str, body: str) -> Any:
        txn = uuid.uuid4().hex
        return await self.req("PUT", f"/_matrix/client/v3/rooms/{quote(room)}/send/m.room.message/{txn}", token,
                              {"msgtype": "m.text", "body": body})


async def bounded(n: int, limit: int, fn: Any) -> list[Any]:
    sem = asyncio.Semaphore(limit)

    async def one(i: int) -> Any:
        async with sem:
            return await fn(i)
    return await asyncio.gather(*[one(i) for i in range(n)])


class Users:
    """Users registered on demand, kept for every workload."""

    def __init__(self, hs: HS, prefix: str) -> None:
        self.hs = hs
        self.prefix = prefix
        self.tokens: list[str] = []
        self.seconds = 0.0

    async def at_least(self, n: int) -> list[str]:
        have = len(self.tokens)
        if n > have:
            t0 = time.monotonic()
            more = await bounded(n - have, CONCURRENCY, lambda i: self.hs.register(f"{self.prefix}{have + i}"))
            self.tokens += more
            self.seconds += time.monotonic() - t0
            self.hs.check_deadline()
        return self.tokens[:n]


async def measure_sends(hs: HS, sender: str, reader: str, room: str) -> tuple[list[float], list[float]]:
    since = (await hs.req("GET", "/_matrix/client/v3/sync?timeout=0&filter=" + quote(
        json.dumps({"room": {"timeline": {"limit": 1}}, "presence": {"types": []}})), reader))["next_batch"]
    sends: list[float] = []
    deliveries: list[float] = []
    for _ in range(SENDS):
        hs.check_deadline()
        # A body no earlier message has: only this send's event ends the wait.
        body = f"scale {uuid.uuid4().hex}"

        async def poll(since: str = since, body: str = body) -> tuple[float, str]:
            # Bounded: a /sync that never sees the message fails the run.
            for _ in range(20):
                js = await hs.req("GET", f"/_matrix/client/v3/sync?timeout=30000&since={quote(since)}", reader,
                                  timeout=60)
                got = js.get("rooms", {}).get("join", {}).get(room, {}).get("timeline", {}).get("events", [])
                if any(e.get("content", {}).get("body") == body for e in got):
                    return time.monotonic(), js["next_batch"]
                since = js["next_batch"]
            raise RuntimeError("message never reached /sync")
        p = asyncio.ensure_future(poll())
        await asyncio.sleep(0.02)
        t = time.monotonic()
        await hs.send(sender, room, body)
        sends.append(time.monotonic() - t)
        arrived, since = await p
        deliveries.append(arrived - t)
    return sends, deliveries


async def big_room(hs: HS, users: Users, sizes: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    tokens = await users.at_least(max(sizes))
    creator = tokens[0]
    room = (await hs.req("POST", "/_matrix/client/v3/createRoom", creator,
                         {"preset": "public_chat", "name": "all staff"}))["room_id"]
    members = 1
    for size in sorted(sizes):
        t0 = time.monotonic()
        start = members

        async def join(i: int) -> None:
            await hs.req("POST", f"/_matrix/client/v3/join/{quote(room)}", tokens[start + i], {})
        # Joins into one room are ordered by the server anyway; a few at a
        # time keep it busy without piling up requests.
        await bounded(size - members, 4, join)
        members = size
        joined_s = time.monotonic() - t0
        sends, deliveries = await measure_sends(hs, creator, tokens[1], room)
        out[str(size)] = {"send_p50_ms": p50_ms(sends), "delivery_p50_ms": p50_ms(deliveries),
                          "join_seconds": round(joined_s, 1)}
        print(f"big_room {size}: {out[str(size)]}", file=sys.stderr, flush=True)
    return out


async def many_rooms(hs: HS, users: Users, counts: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    token = (await users.at_least(1))[0]
    rooms = 0
    filter_n = 0
    for count in sorted(counts):
        t0 = time.monotonic()
        start = rooms

        async def make(i: int) -> None:
            r = (await hs.req("POST", "/_matrix/client/v3/createRoom", token,
                              {"preset": "private_chat", "name": f"room {start + i}"}))["room_id"]
            await hs.send(token, r, f"first message in room {start + i}")
        await bounded(count - rooms, 4, make)
        rooms = count
        made_s = time.monotonic() - t0
        distinct: list[float] = []
        for _ in range(SYNC_SAMPLES):
            hs.check_deadline()
            filter_n += 1
            f = quote(json.dumps({"room": {"timeline": {"limit": 10 + filter_n % 40},
                                           "state": {"lazy_load_members": True}}, "event_fields": [],
                                  "account_data": {"not_types": [f"bench.{filter_n}"]}}))
            t = time.monotonic()
            await hs.req("GET", f"/_matrix/client/v3/sync?filter={f}", token, timeout=300)
            distinct.append(time.monotonic() - t)
        same = quote(json.dumps({"room": {"timeline": {"limit": 10}, "state": {"lazy_load_members": True}}}))
        repeated: list[float] = []
        for _ in range(SYNC_SAMPLES):
            hs.check_deadline()
            t = time.monotonic()
            await hs.req("GET", f"/_matrix/client/v3/sync?filter={same}", token, timeout=300)
            repeated.append(time.monotonic() - t)
        out[str(count)] = {"distinct_p50_ms": p50_ms(distinct), "repeated_p50_ms": p50_ms(repeated[1:]),
                           "setup_seconds": round(made_s, 1)}
        print(f"many_rooms {count}: {out[str(count)]}", file=sys.stderr, flush=True)
    return out


async def deep_history(hs: HS, users: Users, counts: list[int]) -> dict[str, Any]:
    token = (await users.at_least(1))[0]
    room = (await hs.req("POST", "/_matrix/client/v3/createRoom", token, {"preset": "private_chat"}))["room_id"]
    out: dict[str, Any] = {}
    # For each size, a token taken when a tenth of it was sent: paging back
    # from it reads history 90% of the way back from that size's newest.
    marks = {max(1, n // 10): n for n in counts}
    deep_tokens: dict[int, str] = {}
    sent = 0
    t0 = time.monotonic()

    async def pages(start: Optional[str], n: int = 10) -> list[float]:
        lat: list[float] = []
        frm = start
        for _ in range(n):
            q = "dir=b&limit=100" + (f"&from={quote(frm)}" if frm else "")
            t = time.monotonic()
            js = await hs.req("GET", f"/_matrix/client/v3/rooms/{quote(room)}/messages?{q}", token)
            lat.append(time.monotonic() - t)
            frm = js.get("end")
            if not frm:
                break
        return lat
    for count in sorted(counts):
        while sent < count:
            if sent % 1000 == 0:
                hs.check_deadline()
            await hs.send(token, room, f"history {sent}")
            sent += 1
            if sent in marks:
                js = await hs.req("GET", "/_matrix/client/v3/sync?timeout=0&filter=" + quote(
                    json.dumps({"room": {"timeline": {"limit": 1}}})), token)
                prev = js["rooms"]["join"][room]["timeline"].get("prev_batch")
                if prev:
                    deep_tokens[marks[sent]] = prev
        newest = await pages(None)
        deep = await pages(deep_tokens[count]) if count in deep_tokens else []
        out[str(count)] = {"newest_page_p50_ms": p50_ms(newest), "deep_page_p50_ms": p50_ms(deep),
                           "send_seconds": round(time.monotonic() - t0, 1)}
        print(f"deep_history {count}: {out[str(count)]}", file=sys.stderr, flush=True)
    return out


def sizes(text: str) -> list[int]:
    try:
        vals = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of sizes: {text}")
    if not vals or vals[0] < 2:
        raise argparse.ArgumentTypeError("sizes must be at least 2")
    return vals


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base_url")
    ap.add_argument("--json", required=True)
    ap.add_argument("--members", type=sizes, default=[10, 1000, 10000])
    ap.add_argument("--rooms", type=sizes, default=[10, 300, 1000])
    ap.add_argument("--deep-events", type=sizes, default=[1000, 100_000])
    ap.add_argument("--only", default="big_room,many_rooms,deep_history")
    args = ap.parse_args()
    host = urlparse(args.base_url).hostname or ""
    if not (host.startswith("127.") or host in ("localhost", "::1")):
        print("scalebench: only loopback addresses", file=sys.stderr)
        return 2
    only = set(args.only.split(","))
    result: dict[str, Any] = {"base_url": args.base_url, "workloads": {}}
    connector = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(connector=connector) as s:
        hs = HS(args.base_url, s, time.monotonic() + DEADLINE_S)
        tag = uuid.uuid4().hex[:6]
        users = Users(hs, f"scale{tag}u")
        if "big_room" in only:
            result["workloads"]["big_room"] = await big_room(hs, users, args.members)
        if "many_rooms" in only:
            result["workloads"]["many_rooms"] = await many_rooms(hs, Users(hs, f"scale{tag}r"), args.rooms)
        if "deep_history" in only:
            result["workloads"]["deep_history"] = await deep_history(hs, Users(hs, f"scale{tag}d"),
                                                                     args.deep_events)
        result["register_seconds"] = round(users.seconds, 1)
        result["registered"] = len(users.tokens)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
