"""The key server: our keys, and other servers' keys as a notary.

Spec: server-server-api "Publishing Keys" (``GET /_matrix/key/v2/server``,
and the deprecated ``/_matrix/key/v2/server/{keyId}``, which answers the
same) and "Querying Keys Through Another Server" (``POST
/_matrix/key/v2/query``, ``GET /_matrix/key/v2/query/{serverName}``, and the
deprecated ``.../{serverName}/{keyId}``). None of these endpoints is
authenticated: a server asking for keys may not yet have any of ours.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet import defer
from twisted.web.server import Request

from zhome.federation.keyring import Keyring
from zhome.http.errors import bad_json
from zhome.http.server import JsonResource, query_int, read_json_body

#: A single notary query may name this many servers at most: each may cost
#: an outbound fetch, so an unbounded list would make us a request amplifier.
MAX_SERVERS_PER_QUERY = 200

_SEGMENT = r"[^/]+"


class KeyServlets:
    def __init__(self, keyring: Keyring) -> None:
        self._keyring = keyring

    def register_routes(self, r: JsonResource) -> None:
        r.register("GET", r"/_matrix/key/v2/server/?", self._on_get_server, "key_v2_server")
        r.register(
            "GET", rf"/_matrix/key/v2/server/(?P<key_id>{_SEGMENT})", self._on_get_server, "key_v2_server"
        )
        r.register("POST", r"/_matrix/key/v2/query/?", self._on_post_query, "key_v2_query")
        r.register(
            "GET", rf"/_matrix/key/v2/query/(?P<server_name>{_SEGMENT})", self._on_get_query, "key_v2_query"
        )
        r.register(
            "GET",
            rf"/_matrix/key/v2/query/(?P<server_name>{_SEGMENT})/(?P<key_id>{_SEGMENT})",
            self._on_get_query,
            "key_v2_query",
        )

    async def _on_get_server(self, request: Request, key_id: Optional[str] = None) -> tuple[int, Any]:
        # The key ID in the path is deprecated; every key is always returned.
        return 200, self._keyring.local_keys_json()

    async def _on_get_query(
        self, request: Request, server_name: str, key_id: Optional[str] = None
    ) -> tuple[int, Any]:
        minimum = query_int(request, "minimum_valid_until_ts")
        key_ids = [key_id] if key_id else []
        responses = await self._keyring.get_key_responses(server_name, key_ids, minimum)
        return 200, {"server_keys": responses}

    async def _on_post_query(self, request: Request) -> tuple[int, Any]:
        body = read_json_body(request)
        server_keys = body.get("server_keys")
        if not isinstance(server_keys, dict):
            raise bad_json("server_keys must be an object of server names")
        if len(server_keys) > MAX_SERVERS_PER_QUERY:
            raise bad_json(f"at most {MAX_SERVERS_PER_QUERY} servers per query")

        queries: list[tuple[str, list[str], Optional[int]]] = []
        for server_name, criteria_by_key in server_keys.items():
            if not isinstance(criteria_by_key, dict):
                raise bad_json(f"server_keys.{server_name} must be an object of key IDs")
            minimum: Optional[int] = None
            for kid, criteria in criteria_by_key.items():
                if not isinstance(criteria, dict):
                    raise bad_json(f"server_keys.{server_name}.{kid} must be an object")
                value = criteria.get("minimum_valid_until_ts")
                if value is None:
                    continue
                if not isinstance(value, int) or isinstance(value, bool):
                    raise bad_json(f"server_keys.{server_name}.{kid}.minimum_valid_until_ts must be an integer")
                # One response serves every key ID, so it must satisfy the
                # most demanding of them.
                minimum = value if minimum is None else max(minimum, value)
            queries.append((server_name, list(criteria_by_key), minimum))

        try:
            results = await defer.gatherResults(
                [
                    defer.ensureDeferred(self._keyring.get_key_responses(name, kids, minimum))
                    for name, kids, minimum in queries
                ],
                consumeErrors=True,
            )
        except defer.FirstError as e:
            e.subFailure.raiseException()
        return 200, {"server_keys": [resp for responses in results for resp in responses]}
