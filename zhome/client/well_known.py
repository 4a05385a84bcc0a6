"""GET /.well-known/matrix/client and /.well-known/matrix/support.

Spec: client-server-api "Well-known URIs" (server discovery) and "Getting
the support information for a server" (MSC1929). Both are open to anyone
without an access token, and both answer from configuration only:

* ``client``: ``m.homeserver`` is ``public_baseurl``; ``m.identity_server``
  is zhome itself when it serves the Identity Service API; the operator may
  add keys of their own (``well_known.client_extra``).
* ``support``: the configured contacts and support page; with neither, 404
  ``M_NOT_FOUND``, which the spec gives for a server that publishes none.
"""

from __future__ import annotations

from typing import Any

from twisted.web.server import Request

from zhome.config import WellKnownConfig
from zhome.http.errors import not_found
from zhome.http.server import JsonResource


class WellKnownServlets:
    def __init__(self, config: WellKnownConfig, public_baseurl: str, serves_identity: bool) -> None:
        self.config = config
        base = public_baseurl.rstrip("/")
        client: dict[str, Any] = dict(config.client_extra)
        client["m.homeserver"] = {"base_url": base}
        if serves_identity:
            client["m.identity_server"] = {"base_url": base}
        self._client = client
        support: dict[str, Any] = {}
        if config.support_contacts:
            support["contacts"] = [
                {k: v for k, v in (("role", c.role), ("matrix_id", c.matrix_id),
                                   ("email_address", c.email_address)) if v is not None}
                for c in config.support_contacts
            ]
        if config.support_page is not None:
            support["support_page"] = config.support_page
        self._support = support

    def register_routes(self, r: JsonResource) -> None:
        r.register("GET", r"/\.well-known/matrix/client", self.on_client, "well_known_client")
        r.register("GET", r"/\.well-known/matrix/support", self.on_support, "well_known_support")

    async def on_client(self, request: Request) -> tuple[int, Any]:
        return 200, self._client

    async def on_support(self, request: Request) -> tuple[int, Any]:
        if not self._support:
            raise not_found("This server publishes no support contacts")
        return 200, self._support
