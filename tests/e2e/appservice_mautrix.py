"""A real application service for the end-to-end tests: mautrix-python's
``AppService`` on a loopback port, run on its own asyncio loop in a thread.

It records every transaction as it arrives on the wire (ID and body, also
the attempts it was told to refuse), the events and ephemeral events
mautrix handed to it, and the user and alias queries it answered.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any, Awaitable, Callable, Optional

from aiohttp import web
from mautrix.appservice import AppService
from mautrix.appservice.state_store import ASStateStore
from mautrix.client.state_store import MemoryStateStore


class _StateStore(MemoryStateStore, ASStateStore):
    def __init__(self) -> None:
        MemoryStateStore.__init__(self)
        ASStateStore.__init__(self)


class MautrixService:
    def __init__(self, hs_url: str, domain: str, port: int, as_token: str, hs_token: str,
                 bot_localpart: str, as_id: str, ghost_prefix: str) -> None:
        self.port = port
        self.ghost_prefix = ghost_prefix
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        #: (txn_id, body) of every PUT /transactions, in arrival order, refused ones too.
        self.wire: list[tuple[str, dict[str, Any], int]] = []
        self.events: list[dict[str, Any]] = []
        self.ephemeral: list[dict[str, Any]] = []
        self.user_queries: list[str] = []
        self.refuse_transactions = False
        self._lock = threading.Lock()
        svc = self

        async def query_user(user_id: str) -> Optional[dict[str, Any]]:
            svc.user_queries.append(user_id)
            if not user_id.startswith(svc.ghost_prefix):
                return None
            await svc.az.intent.user(user_id).ensure_registered()
            # mautrix answers 404 to an empty (falsy) result.
            return {"registered": True}

        async def make() -> AppService:
            az = AppService(server=hs_url, domain=domain, as_token=as_token, hs_token=hs_token,
                            bot_localpart=bot_localpart, id=as_id, state_store=_StateStore(),
                            query_user=query_user, ephemeral_events=True)

            @web.middleware
            async def record(request: web.Request, handler: Callable[[web.Request], Awaitable[Any]]) -> Any:
                if request.method == "PUT" and "/transactions/" in request.path:
                    body = json.loads(await request.read())
                    txn_id = request.path.rsplit("/", 1)[1]
                    status = 500 if svc.refuse_transactions else 200
                    with svc._lock:
                        svc.wire.append((txn_id, body, status))
                    if status != 200:
                        return web.json_response({"errcode": "M_UNKNOWN", "error": "refused by the test"},
                                                 status=500)
                return await handler(request)

            az.app.middlewares.append(record)

            async def on_event(evt: Any) -> None:
                d = evt.serialize()
                if str(evt.type.t) in ("m.typing", "m.receipt", "m.presence"):
                    svc.ephemeral.append(d)
                else:
                    svc.events.append(d)

            az.matrix_event_handler(on_event)
            await az.start(host="127.0.0.1", port=port)
            return az

        self.az: AppService = self.run(make())

    def run(self, coro: Awaitable[Any], timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def stop(self) -> None:
        try:
            self.run(self.az.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)

    def accepted(self) -> list[tuple[str, dict[str, Any]]]:
        with self._lock:
            return [(t, b) for t, b, status in self.wire if status == 200]

    def wait_for(self, what: Callable[[], Any], timeout: float = 30, message: str = "") -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = what()
            if got:
                return got
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {message or what}")
