"""Builds the media repository for a HomeServer and registers its routes.

Spec: client-server-api "Content repository"; server-server-api "Content
Repository". Start-up fails with one line (MediaKeyError) when the media
encryption key is missing or is not the key the database was set up with.
Starts the housekeeping loop (``cleanup``). URL previews (``preview``)
are registered whether enabled or not: off, they answer 404 M_NOT_FOUND.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from zhome.media.backend import FileSystemBackend
from zhome.media.cleanup import MediaCleaner
from zhome.media.repository import MediaRepository, load_keys
from zhome.media.servlets import MediaServlets
from zhome.media.store import MediaStore

if TYPE_CHECKING:
    from zhome.server import HomeServer


async def setup_media(hs: "HomeServer") -> None:
    cfg = hs.config
    store = MediaStore(hs.db, local_origin=hs.server_name, sealer=hs.sealer)
    keys = await load_keys(cfg.media, store, cfg.data_dir)
    backend = FileSystemBackend(cfg.media.store_path)
    hs.media_repository = MediaRepository(hs.server_name, cfg.media, store, backend, keys,
                                          federation_client=hs.federation_client)
    servlets = MediaServlets(hs)
    servlets.register_routes(hs.client_resource)
    if hs.federation_resource is not None:
        servlets.register_federation_routes(hs.federation_resource)
    _setup_url_previews(hs)
    # Stopped by HomeServer.stop() and the reactor's shutdown trigger.
    hs.media_cleaner = MediaCleaner(hs.media_repository)
    hs.media_cleaner.start()


def _setup_url_previews(hs: "HomeServer") -> None:
    from zhome import __version__
    from zhome.http.ratelimit import RateLimiter
    from zhome.media.preview import PreviewServlet, UrlPreviewer
    from zhome.media.safe_fetch import SafeFetcher
    from zhome.util.reactor import reactor

    cfg = hs.config.media.url_previews
    previewer = None
    if cfg.enabled:
        fetcher = SafeFetcher(reactor, cfg.allow_private_addresses, f"zhome/{__version__} (URL preview)",
                              blocked_hosts=cfg.blocked_hosts)
        previewer = UrlPreviewer(cfg, hs.media_repository, fetcher)
    rl = hs.config.rate_limits
    limiter = RateLimiter(rl.url_previews.per_second, rl.url_previews.burst_count, rl.enabled)
    PreviewServlet(hs.auth, cfg, previewer, limiter).register_routes(hs.client_resource)
