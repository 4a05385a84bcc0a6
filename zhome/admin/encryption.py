"""Admin endpoints for encryption at rest (zhome/storage/at_rest.py).

    GET  /_zhome/admin/v1/encryption           key store status: master keys, data keys, sealing backlog
    POST /_zhome/admin/v1/encryption/rotate    a new master key and data-key generation; the stored
                                               data keys are re-wrapped in the background

Rotation keeps the server serving: reads open data keys wrapped by the old
or the new master key while the re-wrap runs in bounded batches; the old
master key leaves the key ring file once no data key needs it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Optional

from twisted.internet import defer, task, threads
from twisted.web.server import Request

from zhome.admin.common import require_admin
from zhome.http.server import JsonResource

if TYPE_CHECKING:
    from zhome.server import HomeServer

logger = logging.getLogger("zhome.admin.encryption")

Z1 = r"/_zhome/admin/v1"
REWRAP_BATCH = 500
REWRAP_PAUSE_S = 0.02


class EncryptionServlets:
    def __init__(self, hs: "HomeServer") -> None:
        self.hs = hs
        self._rewrap: Optional[defer.Deferred[None]] = None
        self.rewrapped = 0

    def register_routes(self, r: JsonResource) -> None:
        r.register("GET", Z1 + r"/encryption", self.on_status, "zadmin_encryption")
        r.register("POST", Z1 + r"/encryption/rotate", self.on_rotate, "zadmin_encryption_rotate")

    def _status(self) -> dict[str, Any]:
        out = dict(self.hs.sealer.status())
        out["rewrap_running"] = self._rewrap is not None
        out["rewrapped"] = self.rewrapped
        backlog = getattr(self.hs, "sealing_backlog", None)
        out["backlog_sealed_rows"] = backlog.sealed if backlog is not None else 0
        out["backlog_done"] = backlog.done if backlog is not None else True
        return out

    async def on_status(self, request: Request) -> tuple[int, Any]:
        await require_admin(self.hs, request)
        return 200, await threads.deferToThread(self._status)

    async def on_rotate(self, request: Request) -> tuple[int, Any]:
        await require_admin(self.hs, request)  # audited with every admin request
        sealer = self.hs.sealer
        new_key = await threads.deferToThread(sealer.rotate)
        logger.info("rotated the master key for data at rest: now %s", new_key)
        if self._rewrap is None:
            self._rewrap = defer.ensureDeferred(self._run_rewrap())
        return 200, {"master_key": new_key, "generation": sealer.generation}

    async def _run_rewrap(self) -> None:
        from zhome.util.reactor import reactor

        sealer = self.hs.sealer
        try:
            # Bounded: each batch moves up to REWRAP_BATCH keys to the
            # current master key; a rotation meanwhile only adds keys to move.
            while True:
                n = await threads.deferToThread(sealer.rewrap_batch, REWRAP_BATCH)
                self.rewrapped += n
                if n == 0:
                    break
                await task.deferLater(reactor, REWRAP_PAUSE_S, lambda: None)
        except Exception:
            logger.exception("re-wrapping data keys failed; POST encryption/rotate again to resume")
        finally:
            self._rewrap = None

    async def wait_idle(self) -> None:
        if self._rewrap is not None:
            await self._rewrap
