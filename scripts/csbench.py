#!/usr/bin/env python3
"""Search, relations and threads workloads, run by scripts/bench against zhome
and Synapse one after the other, like the shared Client-Server benchmark.

    csbench.py BASE_URL [--quick] [--json OUT]

Workloads (sizes in brackets are --quick's):

  search_rank      POST /search for a word in 1% of the messages of a room of
                   10,000 [1,000] messages, ordered by rank
  search_recent    the same, ordered by recent
  search_phrase    two words that occur together in 0.5% of them
  threads          GET /rooms/{id}/threads?limit=50 in a room with 200 [50]
                   threads of 3 replies and a reaction each
  relations        GET /rooms/{id}/relations/{root} of a thread root
  relations_thread GET /rooms/{id}/relations/{root}/m.thread

Each measured request is repeated (the p50 of 30 [10]); the messages are sent
8 at a time before anything is measured. Only loopback addresses; every loop
is bounded by a count and the overall deadline.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import quote

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import Client, bounded_gather, check_loopback, log, pct, run_workloads, workload_parser  # noqa: E402

DEADLINE_S = 3600
CS = "/_matrix/client/v3"
V1 = "/_matrix/client/v1"
WORDS = ("ward bed shift night morning patient nurse doctor round chart dose pain fever rest visit family call "
         "note plan care team meds check blood scan xray consult follow discharge admit transfer room clinic "
         "lunch break change handover report allergy diet water sleep walk test result lab order").split()


def summary(lat_ms: list[float]) -> dict[str, Any]:
    return {"count": len(lat_ms), "p50_ms": round(pct(lat_ms, 50) or 0, 2),
            "p95_ms": round(pct(lat_ms, 95) or 0, 2)}


async def timed(n: int, call: Callable[[int], Awaitable[Any]]) -> dict[str, Any]:
    lat = []
    for i in range(n):
        t0 = time.perf_counter()
        await call(i)
        lat.append((time.perf_counter() - t0) * 1000)
    return summary(lat)


async def send(c: Client, token: str, room: str, content: dict[str, Any]) -> str:
    path = f"{CS}/rooms/{quote(room)}/send/{quote(content.pop('_type', 'm.room.message'))}/{uuid.uuid4().hex}"
    return str((await c.req("PUT", path, token, content))["event_id"])


async def search_workloads(c: Client, alice: dict[str, Any], quick: bool) -> dict[str, Any]:
    n = 1000 if quick else 10_000
    room = await c.create_room(alice["access_token"], name="search bench")
    rnd = random.Random(7)

    def body(i: int) -> str:
        words = [rnd.choice(WORDS) for _ in range(8)]
        if i % 100 == 0:
            words.insert(3, "cardiology")
        if i % 200 == 0:
            words[5:5] = ["pressure", "ulcer"]
        return f"message {i}: " + " ".join(words)

    bodies = [body(i) for i in range(n)]
    log(f"search: sending {n} messages")
    t0 = time.perf_counter()
    await bounded_gather(8, [lambda b=b: send(c, alice["access_token"], room, {"msgtype": "m.text", "body": b})
                             for b in bodies])
    log(f"search: sent in {time.perf_counter() - t0:.0f}s")
    token = alice["access_token"]
    reps = 10 if quick else 30
    flt = {"rooms": [room]}

    def query(term: str, order: str) -> Callable[[int], Awaitable[Any]]:
        async def call(_: int) -> None:
            body = {"search_categories": {"room_events": {"search_term": term, "order_by": order, "filter": flt}}}
            got = await c.req("POST", f"{CS}/search", token, body)
            results = got["search_categories"]["room_events"]["results"]
            if not results:
                raise RuntimeError(f"no results for {term!r}")
        return call

    return {"search_rank": await timed(reps, query("cardiology", "rank")),
            "search_recent": await timed(reps, query("cardiology", "recent")),
            "search_phrase": await timed(reps, query("pressure ulcer", "rank"))}


async def thread_workloads(c: Client, alice: dict[str, Any], bob: dict[str, Any], quick: bool) -> dict[str, Any]:
    threads = 50 if quick else 200
    a, b = alice["access_token"], bob["access_token"]
    room = await c.create_room(a, preset="public_chat", name="threads bench")
    await c.join(b, room)
    log(f"threads: {threads} threads of 3 replies and a reaction")

    async def thread(i: int) -> str:
        root = await send(c, a, room, {"msgtype": "m.text", "body": f"thread {i}: handover for bed {i}"})
        for j in range(3):
            await send(c, b if j % 2 == 0 else a, room, {
                "msgtype": "m.text", "body": f"reply {j} in thread {i}",
                "m.relates_to": {"rel_type": "m.thread", "event_id": root, "is_falling_back": True,
                                 "m.in_reply_to": {"event_id": root}}})
        await send(c, b, room, {"_type": "m.reaction",
                                "m.relates_to": {"rel_type": "m.annotation", "event_id": root, "key": "👍"}})
        return root

    roots = await bounded_gather(8, [lambda i=i: thread(i) for i in range(threads)])
    reps = 10 if quick else 30
    rnd = random.Random(11)

    async def list_threads(_: int) -> None:
        got = await c.req("GET", f"{V1}/rooms/{quote(room)}/threads?limit=50", a)
        if not got.get("chunk"):
            raise RuntimeError("no threads listed")

    def relations(suffix: str) -> Callable[[int], Awaitable[Any]]:
        async def call(_: int) -> None:
            root = rnd.choice(roots)
            got = await c.req("GET", f"{V1}/rooms/{quote(room)}/relations/{quote(root)}{suffix}?limit=50", a)
            if not got.get("chunk"):
                raise RuntimeError("no relations")
        return call

    return {"threads": await timed(reps, list_threads),
            "relations": await timed(reps, relations("")),
            "relations_thread": await timed(reps, relations("/m.thread"))}


async def run(base: str, args: argparse.Namespace) -> dict[str, Any]:
    check_loopback(base)
    res: dict[str, Any] = {"base_url": base}
    async with aiohttp.ClientSession() as s:
        c = Client(base, s)
        tag = uuid.uuid4().hex[:8]
        alice = await c.register(f"csalice{tag}")
        bob = await c.register(f"csbob{tag}")
        res.update(await search_workloads(c, alice, args.quick))
        res.update(await thread_workloads(c, alice, bob, args.quick))
    return res


def main() -> None:
    run_workloads(run, workload_parser(__doc__).parse_args(), DEADLINE_S)


if __name__ == "__main__":
    main()
