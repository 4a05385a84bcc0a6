"""Key upload, query and claim, locally and over federation.

Spec: client-server-api "End-to-End Encryption" (POST /keys/upload,
/keys/query, /keys/claim, GET /keys/changes); server-server-api
"End-to-End Encryption" (POST /user/keys/query, /user/keys/claim). Remote
servers are asked in parallel with a bounded timeout; a server that does
not answer is listed in ``failures``.
"""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable, Optional

from twisted.internet import defer

from zhome.e2ee.device_lists import DeviceListService, verified_device_keys
from zhome.e2ee.validation import check_device_keys, check_keys, ed25519_verify_key
from zhome.http.errors import MatrixError, bad_json
from zhome.http.jsonsplice import RawJson, Spliced, dumps
from zhome.storage.accounts import AccountsStore
from zhome.storage.e2e_keys import E2eKeysStore, KeyConflict, KeyUpload
from zhome.storage.lru import LruCache
from zhome.util.ids import server_of

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_MS = 10000
MAX_USERS_PER_REQUEST = 1000
MAX_SUMMARY_CACHE = 20000
#: Local users whose device keys are kept parsed and encoded for /keys/query.
MAX_KEYS_CACHE = 20000


class _UserKeys:
    """A local user's devices as /keys/query gives them out: device ID ->
    keys (with their signatures and ``unsigned.device_display_name``), and
    the same map encoded once."""

    __slots__ = ("devices", "encoded")

    def __init__(self, devices: dict[str, dict[str, Any]]) -> None:
        self.devices = devices
        self.encoded = RawJson(dumps(devices))


class E2eKeysService:
    def __init__(self, server_name: str, store: E2eKeysStore, accounts: AccountsStore,
                 device_lists: DeviceListService) -> None:
        self.server_name = server_name
        self.store = store
        self.accounts = accounts
        self.device_lists = device_lists
        #: post_json(destination, path, body, timeout=...) when federating.
        self.post: Optional[Callable[..., Awaitable[Any]]] = None
        # /sync reads counts on every request; they change only through
        # this process's uploads and claims (and device deletions), which
        # drop the entry. A cache: the database stays the truth.
        self._summaries: dict[tuple[str, str], tuple[dict[str, int], list[str]]] = {}
        #: user_id -> None, when a device's key counts changed (an upload,
        #: a claim): /sync answers kept for the user are out of date.
        self.on_counts_changed: list[Callable[[str], None]] = []
        device_lists.on_devices_deleted.append(self._forget_devices)
        # What /keys/query answers for local users. Every change of a
        # user's devices, their keys or their signatures is a device-list
        # change, which drops the user's entry once committed (the same
        # event that tells clients to query again). A read that overlaps
        # a change does not fill the cache: ``_epoch`` counts the drops.
        self._keys_cache: LruCache[str, _UserKeys] = LruCache(MAX_KEYS_CACHE)
        self._epoch = 0
        device_lists.on_local_change.append(self.forget_user_keys)

    def _forget_devices(self, user_id: str, device_ids: list[str]) -> None:
        for d in device_ids:
            self._summaries.pop((user_id, d), None)

    def forget_user_keys(self, user_id: str) -> None:
        self._epoch += 1
        self._keys_cache.pop(user_id)

    # -- upload ---------------------------------------------------------------------
    async def upload(self, user_id: str, device_id: str, body: dict[str, Any]) -> dict[str, Any]:
        upload = KeyUpload()
        verify_key = None
        if body.get("device_keys") is not None:
            upload.device_keys = check_device_keys(body["device_keys"], user_id, device_id)
            verify_key = ed25519_verify_key(upload.device_keys, device_id)
        needs_key = any(isinstance(k, str) and k.startswith("signed_curve25519:")
                        for field in ("one_time_keys", "fallback_keys")
                        for k in (body.get(field) or {} if isinstance(body.get(field), dict) else {}))
        if verify_key is None and needs_key:
            stored = (await self.store.get_device_keys([user_id])).get(user_id, {}).get(device_id)
            if stored is not None:
                verify_key = ed25519_verify_key(stored, device_id)
        upload.one_time_keys = check_keys(body.get("one_time_keys"), "one_time_keys", user_id, device_id, verify_key)
        upload.fallback_keys = check_keys(body.get("fallback_keys"), "fallback_keys", user_id, device_id, verify_key)
        try:
            counts = await self.store.upload(user_id, device_id, upload)
        except KeyConflict as e:
            raise bad_json(str(e))
        finally:
            self._summaries.pop((user_id, device_id), None)
            for hook in self.on_counts_changed:
                hook(user_id)
        return {"one_time_key_counts": counts}

    async def sync_summary(self, user_id: str, device_id: str) -> tuple[dict[str, int], list[str]]:
        key = (user_id, device_id)
        got = self._summaries.get(key)
        if got is None:
            got = await self.store.sync_summary(user_id, device_id)
            if len(self._summaries) >= MAX_SUMMARY_CACHE:
                self._summaries.clear()
            self._summaries[key] = got
        return dict(got[0]), list(got[1])

    # -- query -------------------------------------------------------------------------
    async def _local_keys(self, users: list[str]) -> dict[str, _UserKeys]:
        got, missing = self._keys_cache.get_many(users)
        if not missing:
            return got
        epoch = self._epoch
        stored = await self.store.get_device_keys(missing)
        all_names = await self.accounts.get_device_names([u for u in missing if stored.get(u)])
        fresh = epoch == self._epoch
        for u in missing:
            names: dict[str, Optional[str]] = all_names.get(u, {})
            devices: dict[str, dict[str, Any]] = {}
            for d, keys in stored.get(u, {}).items():
                if d not in names:
                    # Keys outlived their device (a deletion in flight).
                    continue
                name = names[d]
                keys["unsigned"] = {"device_display_name": name} if name is not None else {}
                devices[d] = keys
            e = got[u] = _UserKeys(devices)
            if fresh:
                self._keys_cache.set(u, e)
        return got

    async def query_local(self, wanted: dict[str, list[str]], encoded: bool = False) -> dict[str, Any]:
        """device_keys for local users: user -> device -> keys (every device
        when the list is empty). The values are shared with the cache: not
        to be changed. ``encoded``: a user asked for all devices is given
        as the cached encoded map (a :class:`RawJson`)."""
        users = [u for u in wanted if server_of(u) == self.server_name]
        if not users:
            return {}
        entries = await self._local_keys(users)
        out: dict[str, Any] = {}
        for u in users:
            ask = wanted[u]
            e = entries[u]
            if not ask:
                out[u] = e.encoded if encoded else e.devices
            else:
                out[u] = {d: k for d, k in e.devices.items() if d in ask}
        return out

    async def query(self, wanted: dict[str, list[str]], timeout_ms: int) -> dict[str, Any]:
        """The /keys/query answer for ``wanted`` (what
        parse_device_keys_request read); a :class:`Spliced` object whose
        local users' device maps may be encoded parts (see query_local)."""
        result: dict[str, Any] = Spliced(device_keys=Spliced(await self.query_local(wanted, encoded=True)),
                                         failures={})
        remote = {u: d for u, d in wanted.items() if server_of(u) != self.server_name}
        if remote:
            timeout_s = max(0.5, min(timeout_ms, 60000) / 1000.0)
            unreachable = await self.device_lists.ensure_cached(remote, timeout_s)
            cached = await self.device_lists.cached_remote_keys(remote)
            for u, devices in cached.items():
                ask = remote[u]
                result["device_keys"][u] = {d: k for d, k in devices.items() if not ask or d in ask}
            by_server: dict[str, dict[str, list[str]]] = {}
            for u, d in remote.items():
                if u in cached:
                    continue
                if server_of(u) in unreachable:
                    # Its device list did not come: asking again would only
                    # wait as long a second time.
                    result["failures"][server_of(u)] = {"status": 503, "message": f"{server_of(u)} did not answer"}
                    continue
                by_server.setdefault(server_of(u), {})[u] = d
            await self._fan_out(by_server, "/_matrix/federation/v1/user/keys/query", "device_keys", timeout_ms,
                                result, _merge_query)
        return result

    # -- claim -------------------------------------------------------------------------
    async def claim_local(self, raw: dict[str, dict[str, str]]) -> dict[str, Any]:
        wanted = [(u, d, alg) for u, devices in raw.items() if server_of(u) == self.server_name
                  for d, alg in devices.items()]
        if not wanted:
            return {}
        out = await self.store.claim(wanted)
        for u, d, _ in wanted:
            self._summaries.pop((u, d), None)
        for u in {u for u, _, _ in wanted}:
            for hook in self.on_counts_changed:
                hook(u)
        return out

    async def claim(self, raw: Any, timeout_ms: int) -> dict[str, Any]:
        wanted = parse_claim_request(raw)
        result: dict[str, Any] = {"one_time_keys": await self.claim_local(wanted), "failures": {}}
        by_server: dict[str, dict[str, dict[str, str]]] = {}
        for u, devices in wanted.items():
            if server_of(u) != self.server_name:
                by_server.setdefault(server_of(u), {})[u] = devices
        await self._fan_out(by_server, "/_matrix/federation/v1/user/keys/claim", "one_time_keys", timeout_ms,
                            result, _merge_claim)
        await self._drop_unsigned_remote_keys(result["one_time_keys"])
        return result

    async def _drop_unsigned_remote_keys(self, claimed: dict[str, dict[str, dict[str, Any]]]) -> None:
        """Remote one-time keys whose device's identity key is known must
        carry its signature, like local uploads; the others are passed on
        for the client to check."""
        remote = [u for u in claimed if server_of(u) != self.server_name]
        if not remote:
            return
        known = await self.device_lists.cached_remote_keys(remote)
        for u in remote:
            for d, keys in list(claimed[u].items()):
                device_keys = known.get(u, {}).get(d)
                if device_keys is None:
                    continue
                kept = {}
                for key_id, key in keys.items():
                    try:
                        check_keys({key_id: key}, "one_time_keys", u, d, ed25519_verify_key(device_keys, d))
                    except Exception as e:  # a MatrixError, or what a hostile shape makes the checks raise
                        logger.info("dropping a one-time key of %s's device %s: %s", u, d, type(e).__name__)
                        continue
                    kept[key_id] = key
                if kept:
                    claimed[u][d] = kept
                else:
                    del claimed[u][d]

    async def _fan_out(self, by_server: dict[str, Any], path: str, field: str, timeout_ms: int,
                       result: dict[str, Any], merge: Callable[[dict[str, Any], Any, Any], None]) -> None:
        if not by_server:
            return
        post = self.post
        if post is None:
            for server in by_server:
                result["failures"][server] = {"status": 503, "message": "Federation is disabled"}
            return
        timeout_s = max(0.5, min(timeout_ms, 60000) / 1000.0)

        async def ask(server: str, body: Any) -> None:
            try:
                resp = await post(server, path, {field: body}, timeout=timeout_s)
            except Exception as e:
                logger.info("%s to %s failed: %s", path, server, type(e).__name__)
                result["failures"][server] = {"status": 503, "message": f"{server} did not answer"}
                return
            if not isinstance(resp, dict):
                result["failures"][server] = {"status": 502, "message": f"{server} sent a malformed answer"}
                return
            merge(result, resp, body)

        await defer.gatherResults([defer.ensureDeferred(ask(s, b)) for s, b in sorted(by_server.items())],
                                  consumeErrors=True)


def _merge_query(result: dict[str, Any], resp: dict[str, Any], asked: dict[str, list[str]]) -> None:
    got = resp.get("device_keys")
    if isinstance(got, dict):
        for u, devices in got.items():
            if u in asked and isinstance(devices, dict):
                checked = {d: (verified_device_keys(u, d, k), k) for d, k in devices.items() if isinstance(d, str)}
                result["device_keys"][u] = {d: _with_unsigned(v, k) for d, (v, k) in checked.items()
                                            if v is not None}
    for extra in ("master_keys", "self_signing_keys"):
        got = resp.get(extra)
        if isinstance(got, dict):
            for u, k in got.items():
                if u in asked and isinstance(k, dict):
                    result.setdefault(extra, {})[u] = k


def _with_unsigned(verified: dict[str, Any], raw: dict[str, Any]) -> dict[str, Any]:
    # ``unsigned`` is outside the signature; the device's display name in it
    # is still worth passing on, nothing else there is.
    unsigned = raw.get("unsigned")
    name = unsigned.get("device_display_name") if isinstance(unsigned, dict) else None
    return {**verified, "unsigned": {"device_display_name": name}} if isinstance(name, str) else verified


def _merge_claim(result: dict[str, Any], resp: dict[str, Any], asked: dict[str, dict[str, str]]) -> None:
    got = resp.get("one_time_keys")
    if isinstance(got, dict):
        for u, devices in got.items():
            if u in asked and isinstance(devices, dict):
                result["one_time_keys"][u] = {d: k for d, k in devices.items() if isinstance(k, dict)}


def parse_device_keys_request(raw: Any) -> dict[str, list[str]]:
    if not isinstance(raw, dict):
        raise bad_json("device_keys must be an object of user IDs to device ID lists")
    if len(raw) > MAX_USERS_PER_REQUEST:
        raise MatrixError(400, "M_LIMIT_EXCEEDED", f"At most {MAX_USERS_PER_REQUEST} users per query")
    out: dict[str, list[str]] = {}
    for u, devices in raw.items():
        if not isinstance(u, str) or not u.startswith("@") or ":" not in u:
            raise bad_json(f"{u!r} is not a user ID")
        if devices is None:
            devices = []
        if not isinstance(devices, list) or (devices and not all(isinstance(d, str) for d in devices)):
            raise bad_json(f"device_keys.{u} must be a list of device IDs")
        out[u] = devices
    return out


def parse_claim_request(raw: Any) -> dict[str, dict[str, str]]:
    if not isinstance(raw, dict):
        raise bad_json("one_time_keys must be an object of user IDs to devices and algorithms")
    if len(raw) > MAX_USERS_PER_REQUEST:
        raise MatrixError(400, "M_LIMIT_EXCEEDED", f"At most {MAX_USERS_PER_REQUEST} users per claim")
    out: dict[str, dict[str, str]] = {}
    for u, devices in raw.items():
        if not isinstance(u, str) or not u.startswith("@") or ":" not in u:
            raise bad_json(f"{u!r} is not a user ID")
        if not isinstance(devices, dict) or not all(isinstance(d, str) and isinstance(a, str)
                                                    for d, a in devices.items()):
            raise bad_json(f"one_time_keys.{u} must map device IDs to algorithms")
        out[u] = devices
    return out
