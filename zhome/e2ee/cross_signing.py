"""Cross-signing: master, self-signing and user-signing keys, the
signatures made with them, and their travel over federation.

Spec: client-server-api "End-to-End Encryption" → "Cross-signing"
(POST /keys/device_signing/upload, POST /keys/signatures/upload, the
``master_keys``, ``self_signing_keys`` and ``user_signing_keys`` of
/keys/query); server-server-api "End-to-End Encryption" (the
``master_keys`` and ``self_signing_keys`` of /user/keys/query,
m.signing_key_update) and "Device Management" (``master_key`` and
``self_signing_key`` of GET /user/devices/{userId}).

Visibility: a user's master and self-signing keys are public, their
user-signing key only for themself; a signature of another user's master
key by one's user-signing key is seen only by its signer.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Optional

from signedjson.key import decode_verify_key_bytes
from twisted.internet import defer
from signedjson.sign import SignatureVerifyException, verify_signed_json
from unpaddedbase64 import decode_base64

from zhome.http.errors import MatrixError, bad_json, forbidden, missing_param
from zhome.storage.accounts import AccountsStore
from zhome.storage.cross_signing import CrossSigningStore, MasterKeyChanged, Signature, public_key_of
from zhome.storage.e2e_keys import E2eKeysStore
from zhome.storage.lru import LruCache
from zhome.util.ids import server_of

if TYPE_CHECKING:
    from zhome.e2ee.device_lists import DeviceListService

logger = logging.getLogger(__name__)

#: Request field -> key type (the key's ``usage``).
UPLOAD_FIELDS = {"master_key": "master", "self_signing_key": "self_signing", "user_signing_key": "user_signing"}
#: Federation answers: /user/keys/query field -> key type.
QUERY_FIELDS = {"master_keys": "master", "self_signing_keys": "self_signing", "user_signing_keys": "user_signing"}
MAX_SIGNATURE_OBJECTS = 1000
REMOTE_TIMEOUT_S = 10.0


def invalid_param(msg: str) -> MatrixError:
    return MatrixError(400, "M_INVALID_PARAM", msg)


def invalid_signature(msg: str) -> MatrixError:
    return MatrixError(400, "M_INVALID_SIGNATURE", msg)


def _signed_part(obj: dict[str, Any]) -> dict[str, Any]:
    """What a signature covers (signedjson's rule)."""
    return {k: v for k, v in obj.items() if k not in ("signatures", "unsigned")}


# -- pure checks ---------------------------------------------------------------------
def check_cross_signing_key(key: Any, user_id: str, usage: str, what: str) -> tuple[str, Any]:
    """Check a cross-signing key's shape: ``user_id``, ``usage`` and exactly
    one ed25519 key whose ID is ``ed25519:<public key>``. Returns the public
    key and its signedjson verify key."""
    if not isinstance(key, dict):
        raise bad_json(f"{what} must be an object")
    if key.get("user_id") != user_id:
        raise invalid_param(f"{what}.user_id must be {user_id}")
    usages = key.get("usage")
    if not isinstance(usages, list) or not all(isinstance(u, str) for u in usages) or usage not in usages:
        raise invalid_param(f"{what}.usage must contain {usage!r}")
    if any(u != usage and u in UPLOAD_FIELDS.values() for u in usages):
        raise invalid_param(f"{what}.usage may hold only one of master, self_signing, user_signing")
    keys = key.get("keys")
    if not isinstance(keys, dict) or len(keys) != 1:
        raise invalid_param(f"{what}.keys must hold exactly one key")
    ((key_id, pub),) = keys.items()
    algorithm, _, version = str(key_id).partition(":")
    if algorithm != "ed25519" or not isinstance(pub, str) or version != pub:
        raise invalid_param(f"{what}.keys must be one ed25519:<public key> mapped to that public key")
    try:
        raw = decode_base64(pub)
        if len(raw) != 32:
            raise ValueError("not 32 bytes")
        verify_key = decode_verify_key_bytes(f"ed25519:{pub}", raw)
    except Exception:
        raise invalid_param(f"{what}: {pub!r} is not an unpadded base64 ed25519 public key")
    sigs = key.get("signatures")
    if sigs is not None and not (isinstance(sigs, dict) and all(
            isinstance(u, str) and isinstance(by, dict) and all(isinstance(s, str) for s in by.values())
            for u, by in sigs.items())):
        raise bad_json(f"{what}.signatures must map user IDs to key IDs to signatures")
    return pub, verify_key


def verify_key_for(key: dict[str, Any]) -> Any:
    """The verify key of a checked cross-signing key."""
    pub = public_key_of(key)
    return decode_verify_key_bytes(f"ed25519:{pub}", decode_base64(pub))


def check_signed_by(obj: dict[str, Any], user_id: str, signer_version: str, signer_key: Any, what: str) -> str:
    """``obj`` must carry a good signature by ``user_id``'s key
    ``ed25519:<signer_version>`` (a public key, or a device ID for a
    device's key); returns that signature."""
    key_id = f"ed25519:{signer_version}"
    sigs = obj.get("signatures")
    by_user = sigs.get(user_id) if isinstance(sigs, dict) else None
    sig = by_user.get(key_id) if isinstance(by_user, dict) else None
    if not isinstance(sig, str):
        raise invalid_signature(f"{what} is not signed by {key_id}")
    try:
        # Only this signature is checked: others in the object are not ours to judge.
        verify_signed_json({**obj, "signatures": {user_id: {key_id: sig}}}, user_id, signer_key)
    except (SignatureVerifyException, ValueError, TypeError, KeyError):
        raise invalid_signature(f"{what} has a bad signature by {key_id}")
    return sig


def parse_remote_keys(user_id: str, master: Any, self_signing: Any,
                      cached_master: Optional[dict[str, Any]] = None) -> dict[str, dict[str, Any]]:
    """A remote server's master and self-signing keys of ``user_id``, kept
    only when well formed (and the self-signing key signed by the master
    key given, else by ``cached_master``)."""
    out: dict[str, dict[str, Any]] = {}
    if master is not None:
        try:
            check_cross_signing_key(master, user_id, "master", "master_key")
            out["master"] = master
        except MatrixError:
            logger.info("ignoring a malformed master key of %s", user_id)
    if self_signing is not None:
        signer = out.get("master") or cached_master
        try:
            check_cross_signing_key(self_signing, user_id, "self_signing", "self_signing_key")
            if signer is None:
                raise invalid_signature("no master key")
            check_signed_by(self_signing, user_id, public_key_of(signer), verify_key_for(signer), "self_signing_key")
            out["self_signing"] = self_signing
        except MatrixError:
            logger.info("ignoring a self-signing key of %s not signed by its master key", user_id)
    return out


#: Local users whose cross-signing keys are kept for /keys/query.
MAX_KEYS_CACHE = 20000


class _LocalKeys:
    """A local user's stored cross-signing keys (key type -> key) and the
    signatures made of their master key (by their devices and by other
    users' user-signing keys)."""

    __slots__ = ("keys", "master_signatures")

    def __init__(self, keys: dict[str, dict[str, Any]], master_signatures: list[Signature]) -> None:
        self.keys = keys
        self.master_signatures = master_signatures


class CrossSigningService:
    def __init__(self, server_name: str, store: CrossSigningStore, keys: E2eKeysStore, accounts: AccountsStore,
                 device_lists: DeviceListService,
                 require_uia: Callable[[dict[str, Any], str, str], Awaitable[None]]) -> None:
        self.server_name = server_name
        self.store = store
        self.keys = keys
        self.accounts = accounts
        self.device_lists = device_lists
        self.require_uia = require_uia
        #: post_json(destination, path, body, timeout=...) when federating.
        self.post: Optional[Callable[..., Awaitable[Any]]] = None
        store.on_device_signed_txn = lambda txn, u, d: device_lists.devices_changed_txn(txn, u, [d], False)
        # Local users' keys as /keys/query reads them on every request.
        # Each change of them is a device-list change of the user, which
        # drops the entry once committed; a signature of another user's
        # master key drops that user's entry (see upload_signatures). A
        # read that overlaps a change does not fill the cache.
        self._cache: LruCache[str, _LocalKeys] = LruCache(MAX_KEYS_CACHE)
        self._epoch = 0
        device_lists.on_local_change.append(self._forget)

    def _forget(self, user_id: str) -> None:
        self._epoch += 1
        self._cache.pop(user_id)

    async def delete_for_user(self, user_id: str) -> None:
        """A deactivated account's keys and the signatures made by or of them."""
        await self.store.delete_for_user(user_id)
        # Its signatures of other users' master keys went too.
        self._epoch += 1
        self._cache.clear()

    async def _local(self, user_ids: list[str]) -> dict[str, _LocalKeys]:
        got, missing = self._cache.get_many(user_ids)
        if missing:
            epoch = self._epoch
            keys = await self.store.get_keys(missing)
            sigs: dict[str, list[Signature]] = {}
            if keys:
                for sig in await self.store.get_signatures(keys):
                    master = keys[sig.target_user_id].get("master")
                    if master is not None and sig.target_key_id == public_key_of(master):
                        sigs.setdefault(sig.target_user_id, []).append(sig)
            fresh = epoch == self._epoch
            for u in missing:
                e = got[u] = _LocalKeys(keys.get(u, {}), sigs.get(u, []))
                if fresh:
                    self._cache.set(u, e)
        return got

    async def _stored_keys(self, user_ids: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
        """user -> key type -> stored key (local users' from the cache)."""
        local = [u for u in user_ids if server_of(u) == self.server_name]
        remote = [u for u in user_ids if server_of(u) != self.server_name]
        out = {u: e.keys for u, e in (await self._local(local)).items() if e.keys}
        if remote:
            out.update(await self.store.get_keys(remote))
        return out

    # -- POST /keys/device_signing/upload --------------------------------------------------
    async def upload_keys(self, user_id: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self._upload_keys(user_id, body)
        except MasterKeyChanged:
            # A concurrent upload stored a master key after this one looked:
            # judge again against it (it may now need authentication).
            try:
                return await self._upload_keys(user_id, body)
            except MasterKeyChanged:
                raise MatrixError(409, "M_UNKNOWN", "The cross-signing keys changed meanwhile; try again")

    async def _upload_keys(self, user_id: str, body: dict[str, Any]) -> dict[str, Any]:
        given: dict[str, dict[str, Any]] = {}
        pubs: dict[str, str] = {}
        for field, key_type in UPLOAD_FIELDS.items():
            if body.get(field) is None:
                continue
            pubs[key_type], _ = check_cross_signing_key(body[field], user_id, key_type, field)
            given[key_type] = body[field]
        stored = (await self.store.get_keys([user_id])).get(user_id, {})
        master = given.get("master") or stored.get("master")
        for key_type in ("self_signing", "user_signing"):
            if key_type not in given:
                continue
            if master is None:
                raise missing_param("No master key is available: upload one first or with this key")
            check_signed_by(given[key_type], user_id, public_key_of(master), verify_key_for(master),
                            f"{key_type}_key")
        if len(set(pubs.values())) != len(pubs):
            raise invalid_param("Each cross-signing key must be a different key")
        new = {t: k for t, k in given.items() if stored.get(t) != k}
        if not new:
            # Nothing new (a client's retry): no authentication needed.
            return {}
        device_ids = {d["device_id"] for d in await self.accounts.get_devices(user_id)}
        if device_ids & set(pubs.values()):
            raise forbidden("A cross-signing public key is the ID of one of your devices")
        if "master" in stored:
            await self.require_uia(body, user_id, "POST /keys/device_signing/upload")
        pos, removed = await self.store.upload_keys(user_id, new, stored.get("master"))
        await self.device_lists.notify_change(user_id, pos)
        if {"master", "self_signing"} & (set(new) | set(removed)):
            await self._send_signing_key_update(user_id)
        return {}

    async def _public_keys(self, user_ids: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
        """Master and self-signing keys of users, the master keys with the
        signatures their own devices uploaded (which everyone may see)."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        local = [u for u in user_ids if server_of(u) == self.server_name]
        for u, e in (await self._local(local)).items():
            if not e.keys:
                continue
            out[u] = {t: k for t, k in e.keys.items() if t in ("master", "self_signing")}
            own = [s for s in e.master_signatures if s.user_id == u]
            if own and "master" in out[u]:
                out[u]["master"] = m = _copy_signatures(out[u]["master"])
                for sig in own:
                    _add_signature(m, sig)
        remote = [u for u in user_ids if server_of(u) != self.server_name]
        keys = await self.store.get_keys(remote) if remote else {}
        if not keys:
            return out
        sigs = await self.store.get_signatures(keys)
        for u, by_type in keys.items():
            out[u] = {t: k for t, k in by_type.items() if t in ("master", "self_signing")}
        for s in sigs:
            if s.user_id == s.target_user_id:
                _add_signature(out.get(s.target_user_id, {}).get("master"), s)
        return out

    async def _send_signing_key_update(self, user_id: str) -> None:
        queue = self.device_lists.queue_edu
        if queue is None:
            return
        try:
            servers = sorted({server_of(u) for u in await self.device_lists.store.users_sharing_room(user_id)}
                             - {self.server_name})
            if not servers:
                return
            keys = (await self._public_keys([user_id])).get(user_id, {})
            content: dict[str, Any] = {"user_id": user_id}
            if "master" in keys:
                content["master_key"] = keys["master"]
            if "self_signing" in keys:
                content["self_signing_key"] = keys["self_signing"]
            await queue(servers, "m.signing_key_update", content)
        except Exception:
            logger.exception("sending m.signing_key_update of %s", user_id)

    # -- POST /keys/signatures/upload ---------------------------------------------------------
    async def upload_signatures(self, user_id: str, body: dict[str, Any]) -> dict[str, Any]:
        if sum(len(v) if isinstance(v, dict) else 1 for v in body.values()) > MAX_SIGNATURE_OBJECTS:
            raise MatrixError(400, "M_LIMIT_EXCEEDED", f"At most {MAX_SIGNATURE_OBJECTS} signed keys per upload")
        for target, objs in body.items():
            if not isinstance(target, str) or not target.startswith("@") or ":" not in target:
                raise bad_json(f"{target!r} is not a user ID")
            if not isinstance(objs, dict):
                raise bad_json(f"{target} must map key IDs to signed keys")
        own = (await self.store.get_keys([user_id])).get(user_id, {})
        failures: dict[str, dict[str, Any]] = {}
        accepted: list[Signature] = []
        signed_devices: list[tuple[str, str]] = []
        # (user, the one reader told or None for everyone).
        changed_users: set[tuple[str, Optional[str]]] = set()
        own_devices: Optional[dict[str, dict[str, Any]]] = None
        # Other users' master keys, fetched in parallel (remote ones not
        # cached are asked of their servers, each bounded by a timeout).
        others = sorted(t for t in body if t != user_id)
        masters = dict(zip(others, await defer.gatherResults(
            [defer.ensureDeferred(self._master_key_of(t)) for t in others], consumeErrors=True)))
        for target, objs in sorted(body.items()):
            others_master = masters.get(target)
            for key_id, obj in objs.items():
                try:
                    if not isinstance(obj, dict):
                        raise bad_json("A signed key must be an object")
                    if target == user_id:
                        if own_devices is None:
                            own_devices = (await self.keys.get_device_keys([user_id])).get(user_id, {})
                        got, device = self._check_own(user_id, str(key_id), obj, own, own_devices)
                        if device is not None:
                            signed_devices.append((user_id, device))
                        else:
                            changed_users.add((user_id, None))
                    else:
                        got = self._check_other(user_id, target, str(key_id), obj, own, others_master)
                        # Only the signer sees it: their clients re-query the target.
                        changed_users.add((target, user_id))
                    accepted.extend(got)
                except MatrixError as e:
                    failures.setdefault(target, {})[key_id] = {"errcode": e.errcode, "error": e.msg}
        if accepted:
            changes = sorted(changed_users, key=lambda c: (c[0], c[1] or ""))
            positions = await self.store.add_signatures(accepted, signed_devices, changes)
            for target in {s.target_user_id for s in accepted}:
                if server_of(target) == self.server_name:
                    # Only the signer is told, but the target's cached
                    # master key now has one more signature.
                    self._forget(target)
            for (u, reader), pos in zip(changes, positions):
                await self.device_lists.notify_change(reader or u, pos)
            own_master = public_key_of(own["master"]) if "master" in own else None
            if any(s.target_user_id == user_id and s.target_key_id == own_master for s in accepted):
                # Other servers give out the master key with its signatures.
                await self._send_signing_key_update(user_id)
        return {"failures": failures}

    @staticmethod
    def _check_own(user_id: str, key_id: str, obj: dict[str, Any], own: dict[str, dict[str, Any]],
                   devices: dict[str, dict[str, Any]]) -> tuple[list[Signature], Optional[str]]:
        """A signature of one's own master key by one's devices, or of one
        of one's devices by one's self-signing key. Returns the signatures
        and the device signed (None for the master key)."""
        bare = key_id[len("ed25519:"):] if key_id.startswith("ed25519:") else key_id
        master = own.get("master")
        if master is not None and bare == public_key_of(master):
            if _signed_part(obj) != _signed_part(master):
                raise invalid_signature("The signed object is not your master key")
            sigs = obj.get("signatures")
            by_user = sigs.get(user_id) if isinstance(sigs, dict) else None
            out: list[Signature] = []
            for signer_id, sig in (by_user.items() if isinstance(by_user, dict) else ()):
                device_id = signer_id[len("ed25519:"):] if signer_id.startswith("ed25519:") else None
                if device_id is None or device_id == bare:
                    continue
                if device_id not in devices:
                    raise invalid_signature(f"{signer_id} is not a key of one of your devices")
                dev_pub = devices[device_id].get("keys", {}).get(signer_id)
                try:
                    dev_key = decode_verify_key_bytes(signer_id, decode_base64(dev_pub))
                except Exception:
                    raise invalid_signature(f"Device {device_id} has no usable ed25519 key")
                check_signed_by(obj, user_id, device_id, dev_key, "master key")
                out.append(Signature(user_id, bare, user_id, signer_id, str(sig)))
            if not out:
                raise invalid_signature("The master key carries no signature by one of your devices")
            return out, None
        if key_id in devices:
            ssk = own.get("self_signing")
            if ssk is None:
                raise invalid_signature("Upload a self-signing key before signing your devices")
            if _signed_part(obj) != _signed_part(devices[key_id]):
                raise invalid_signature(f"The signed object is not the keys of device {key_id}")
            pub = public_key_of(ssk)
            sig = check_signed_by(obj, user_id, pub, verify_key_for(ssk), f"device {key_id}")
            return [Signature(user_id, key_id, user_id, f"ed25519:{pub}", sig)], key_id
        raise MatrixError(404, "M_NOT_FOUND", f"{key_id} is neither one of your devices nor your master key")

    @staticmethod
    def _check_other(user_id: str, target: str, key_id: str, obj: dict[str, Any], own: dict[str, dict[str, Any]],
                     master: Optional[dict[str, Any]]) -> list[Signature]:
        """A signature of another user's master key by one's user-signing key."""
        usk = own.get("user_signing")
        if usk is None:
            raise invalid_signature("Upload a user-signing key before signing other users")
        bare = key_id[len("ed25519:"):] if key_id.startswith("ed25519:") else key_id
        if master is None:
            raise MatrixError(404, "M_NOT_FOUND", f"{target} has no master key")
        if bare != public_key_of(master):
            raise MatrixError(404, "M_NOT_FOUND", f"{key_id} is not the master key of {target}")
        if _signed_part(obj) != _signed_part(master):
            raise invalid_signature(f"The signed object is not the master key of {target}")
        pub = public_key_of(usk)
        sig = check_signed_by(obj, user_id, pub, verify_key_for(usk), f"master key of {target}")
        return [Signature(target, bare, user_id, f"ed25519:{pub}", sig)]

    async def _master_key_of(self, user_id: str) -> Optional[dict[str, Any]]:
        """A user's master key: local, cached, else from their server."""
        got = (await self.store.get_keys([user_id])).get(user_id, {}).get("master")
        if got is not None or server_of(user_id) == self.server_name or self.post is None:
            return got
        try:
            resp = await self.post(server_of(user_id), "/_matrix/federation/v1/user/keys/query",
                                   {"device_keys": {user_id: []}}, timeout=REMOTE_TIMEOUT_S)
        except Exception as e:
            logger.info("master key of %s not fetched: %s", user_id, type(e).__name__)
            return None
        masters = resp.get("master_keys") if isinstance(resp, dict) else None
        key = masters.get(user_id) if isinstance(masters, dict) else None
        return parse_remote_keys(user_id, key, None).get("master")

    # -- /keys/query ----------------------------------------------------------------------------
    async def add_to_query(self, requester: str, wanted: list[str], result: dict[str, Any]) -> None:
        """Add ``master_keys``, ``self_signing_keys`` and (the requester's
        own) ``user_signing_keys`` to a /keys/query answer: local users'
        from the store, remote users' as their server answered or else from
        the cache kept with their device list."""
        masters: dict[str, Any] = {}
        ssks: dict[str, Any] = {}
        fetched_m, fetched_s = result.get("master_keys") or {}, result.get("self_signing_keys") or {}
        answered = {u for u in (*fetched_m, *fetched_s) if server_of(u) != self.server_name}
        for u in answered:
            # Remote servers' answers are kept only when well formed.
            got = parse_remote_keys(u, fetched_m.get(u), fetched_s.get(u))
            if "master" in got:
                masters[u] = got["master"]
            if "self_signing" in got:
                ssks[u] = got["self_signing"]
        from_store = [u for u in wanted if u not in answered]
        public = await self._public_keys(from_store)
        for u, by_type in public.items():
            if "master" in by_type:
                masters[u] = by_type["master"]
            if "self_signing" in by_type:
                ssks[u] = by_type["self_signing"]
        # What the requester signed with their user-signing key.
        targets = [u for u in masters if u != requester]
        if targets:
            local = [u for u in targets if server_of(u) == self.server_name]
            remote = [u for u in targets if server_of(u) != self.server_name]
            made = [s for e in (await self._local(local)).values() for s in e.master_signatures]
            if remote:
                made.extend(await self.store.get_signatures(remote))
            for s in made:
                m = masters.get(s.target_user_id)
                if s.user_id == requester and m is not None and s.target_key_id == public_key_of(m):
                    masters[s.target_user_id] = m = _copy_signatures(m)
                    _add_signature(m, s)
        result["master_keys"] = masters
        result["self_signing_keys"] = ssks
        result["user_signing_keys"] = {}
        if requester in wanted:
            usk = (await self._stored_keys([requester])).get(requester, {}).get("user_signing")
            if usk is not None:
                result["user_signing_keys"][requester] = usk

    async def query_for_federation(self, user_ids: list[str]) -> dict[str, Any]:
        """``master_keys`` and ``self_signing_keys`` of local users for
        another server's /user/keys/query."""
        local = [u for u in user_ids if server_of(u) == self.server_name]
        public = await self._public_keys(local)
        return {"master_keys": {u: k["master"] for u, k in public.items() if "master" in k},
                "self_signing_keys": {u: k["self_signing"] for u, k in public.items() if "self_signing" in k}}

    async def keys_for_user_devices(self, user_id: str) -> dict[str, Any]:
        """``master_key`` and ``self_signing_key`` of GET /user/devices."""
        public = (await self._public_keys([user_id])).get(user_id, {})
        out: dict[str, Any] = {}
        if "master" in public:
            out["master_key"] = public["master"]
        if "self_signing" in public:
            out["self_signing_key"] = public["self_signing"]
        return out

    # -- m.signing_key_update -------------------------------------------------------------------
    async def on_remote_update(self, origin: str, content: dict[str, Any]) -> None:
        user_id = content.get("user_id")
        if not isinstance(user_id, str) or server_of(user_id) != origin or origin == self.server_name:
            return
        # Under the user's device-list lock: a resync running meanwhile
        # must not write an older set over this one.
        lock = self.device_lists.lock_for(user_id)
        await lock.acquire()
        try:
            if not any(server_of(u) == self.server_name
                       for u in await self.device_lists.store.users_sharing_room(user_id)):
                return
            if not await self.device_lists.store.get_remote_stream_ids([user_id]):
                # Not cached: queries ask their server, which has the new
                # keys; readers are only told to ask again.
                pos = await self.store.record_change(user_id)
            else:
                cached = (await self.store.get_keys([user_id])).get(user_id, {})
                keys = parse_remote_keys(user_id, content.get("master_key"), content.get("self_signing_key"),
                                         cached.get("master"))
                if not keys:
                    return
                drop = []
                if "master" in keys and "self_signing" not in keys and cached.get("master") is not None \
                        and public_key_of(keys["master"]) != public_key_of(cached["master"]):
                    # The cached self-signing key was signed by the old master key.
                    drop.append("self_signing")
                pos = await self.store.apply_remote_update(user_id, keys, drop)
        finally:
            lock.release()
        await self.device_lists.notify_change(user_id, pos)


def _copy_signatures(key: dict[str, Any]) -> dict[str, Any]:
    """A copy of a key whose signatures can be added to (the key may be shared)."""
    sigs = key.get("signatures")
    if not isinstance(sigs, dict):
        return dict(key)
    return {**key, "signatures": {u: dict(v) if isinstance(v, dict) else v for u, v in sigs.items()}}


def _add_signature(key: Optional[dict[str, Any]], s: Signature) -> None:
    if key is None or s.target_key_id != public_key_of(key):
        return
    sigs = key.get("signatures")
    if not isinstance(sigs, dict):
        sigs = key["signatures"] = {}
    sigs[s.user_id] = {**(sigs.get(s.user_id) or {}), s.key_id: s.signature}
