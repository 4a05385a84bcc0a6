"""Our signing keys as other servers see them, and other servers' keys.

Spec: server-server-api "Retrieving server keys" ("Publishing Keys",
"Querying Keys Through Another Server"), "Validating hashes and signatures on
received events"; appendices "Checking for a Signature"; rooms/v5.md (from
v5 a key must be valid at the event's ``origin_server_ts``; servers use the
lesser of ``valid_until_ts`` and 7 days after fetching).

The :class:`Keyring` publishes our key response (``local_keys_json``) and
finds the verify key another server used: from memory, then the database,
then the server's own ``/_matrix/key/v2/server``. Fetches of one server are
shared between concurrent lookups and happen at most once a minute, so a
flood of events naming unknown keys cannot turn into a flood of requests.
Checking the content hash of an event is not done here: a hash mismatch
means "use the redacted copy", which is the caller's decision.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable, Optional

from nacl.signing import VerifyKey
from twisted.internet import defer
from unpaddedbase64 import decode_base64

from zhome.crypto.canonical import encode_canonical_json
from zhome.crypto.keys import SigningKey, key_id as signing_key_id, verify_key_base64
from zhome.crypto.signing import (
    SUPPORTED_ALGORITHMS,
    SignatureError,
    sign_json,
    verify_json_signature,
)
from zhome.rooms.redaction import prune_event_dict
from zhome.rooms.versions import EventIdFormat, RoomVersion
from zhome.storage.database import Database, Txn

logger = logging.getLogger(__name__)

__all__ = ["KeyLookupError", "Keyring", "SignatureError", "KEY_SERVER_PATH"]

KEY_SERVER_PATH = "/_matrix/key/v2/server"

#: rooms/v5.md: a fetched key counts as valid for at most this long after
#: the fetch, whatever valid_until_ts says, so a key published with a
#: far-future validity can still be revoked.
MAX_KEY_VALIDITY_MS = 7 * 24 * 3600 * 1000

#: At most one fetch per server in this many milliseconds, whatever the
#: outcome: after a failure the server is probably down, after a success we
#: already have everything it would tell us.
MIN_FETCH_INTERVAL_MS = 60 * 1000

FetchJson = Callable[[str, str], Awaitable[dict[str, Any]]]


class KeyLookupError(Exception):
    """No usable verify key for ``server_name``/``key_id``.

    Inbound request authentication turns this into 401 (unknown key);
    event checks treat the event as unverifiable.
    """

    def __init__(self, server_name: str, key_id: Optional[str], reason: str) -> None:
        what = f"key {key_id} of {server_name}" if key_id else f"keys of {server_name}"
        super().__init__(f"{what}: {reason}")
        self.server_name = server_name
        self.key_id = key_id
        self.reason = reason


@dataclass(frozen=True)
class _KeyRecord:
    verify_key: VerifyKey
    verify_key_b64: str
    # As published: valid_until_ts for a current key (None for an old one),
    # expired_ts for an old key (None for a current one).
    valid_until_ts: Optional[int]
    expired_ts: Optional[int]
    fetched_ts: int

    def usable_until(self) -> int:
        """Last millisecond at which a signature by this key counts."""
        if self.expired_ts is not None:
            return self.expired_ts
        published = self.valid_until_ts if self.valid_until_ts is not None else 0
        return min(published, self.fetched_ts + MAX_KEY_VALIDITY_MS)

    def usable_at(self, at_ts: Optional[int]) -> bool:
        # Room versions 1-4 ignore validity (at_ts None): a key ever
        # published by the server will do.
        return at_ts is None or self.usable_until() >= at_ts


@dataclass(frozen=True)
class _FetchOutcome:
    ok: bool
    error: Optional[str] = None


def _decode_verify_key(key_id: str, key_b64: Any) -> VerifyKey:
    if not isinstance(key_b64, str):
        raise ValueError(f"key {key_id} is not a string")
    algorithm, _, version = key_id.partition(":")
    if algorithm not in SUPPORTED_ALGORITHMS or not version:
        raise ValueError(f"unsupported key ID {key_id!r}")
    try:
        return VerifyKey(decode_base64(key_b64))
    except Exception as e:  # bad base64, wrong key length
        raise ValueError(f"key {key_id} is not a valid {algorithm} key: {e}") from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _server_of(identifier: Any, sigil: str) -> Optional[str]:
    """The server name of ``@user:server`` / ``$id:server``, or None."""
    if not isinstance(identifier, str) or not identifier.startswith(sigil):
        return None
    _, sep, server = identifier.partition(":")
    return server if sep and server else None


def parse_key_response(
    server_name: str, response: Any, fetched_ts: int
) -> tuple[dict[str, _KeyRecord], str]:
    """Check a ``/_matrix/key/v2/server`` response from ``server_name``.

    Returns the keys it lists and its canonical JSON. Raises ValueError
    saying what is wrong: not for ``server_name``, malformed, or not
    self-signed with the keys it advertises.
    """
    if not isinstance(response, dict):
        raise ValueError("key response is not a JSON object")
    if response.get("server_name") != server_name:
        raise ValueError(f"key response is for {response.get('server_name')!r}, not {server_name!r}")
    valid_until_ts = response.get("valid_until_ts")
    if not _is_int(valid_until_ts):
        raise ValueError("key response has no integer valid_until_ts")

    records: dict[str, _KeyRecord] = {}
    verify_keys = response.get("verify_keys")
    if not isinstance(verify_keys, dict):
        raise ValueError("key response has no verify_keys object")
    for kid, entry in verify_keys.items():
        if kid.partition(":")[0] not in SUPPORTED_ALGORITHMS:
            continue  # an algorithm we cannot use; not an error
        if not isinstance(entry, dict):
            raise ValueError(f"verify_keys.{kid} is not an object")
        key = _decode_verify_key(kid, entry.get("key"))
        records[kid] = _KeyRecord(key, entry["key"], valid_until_ts, None, fetched_ts)

    old_keys = response.get("old_verify_keys", {})
    if not isinstance(old_keys, dict):
        raise ValueError("old_verify_keys is not an object")
    for kid, entry in old_keys.items():
        if kid.partition(":")[0] not in SUPPORTED_ALGORITHMS or kid in records:
            continue
        if not isinstance(entry, dict) or not _is_int(entry.get("expired_ts")):
            raise ValueError(f"old_verify_keys.{kid} has no integer expired_ts")
        key = _decode_verify_key(kid, entry.get("key"))
        records[kid] = _KeyRecord(key, entry["key"], None, entry["expired_ts"], fetched_ts)

    # The response must be signed by the server with the keys it offers:
    # every such signature must hold and there must be at least one.
    # Signatures by keys not in verify_keys prove nothing and are skipped.
    signatures = response.get("signatures")
    own_sigs = signatures.get(server_name) if isinstance(signatures, dict) else None
    if not isinstance(own_sigs, dict):
        raise ValueError("key response is not signed by its server")
    checked = 0
    for kid in own_sigs:
        record = records.get(kid)
        if record is None or record.expired_ts is not None:
            continue
        try:
            verify_json_signature(response, server_name, kid, record.verify_key)
        except SignatureError as e:
            raise ValueError(f"key response self-signature invalid: {e}") from None
        checked += 1
    if checked == 0:
        raise ValueError("key response is not signed with any key in its verify_keys")

    try:
        raw = encode_canonical_json(response).decode("utf-8")
    except (TypeError, ValueError) as e:
        raise ValueError(f"key response is not canonical JSON: {e}") from None
    return records, raw


# -- storage -----------------------------------------------------------------


def _store_keys_txn(txn: Txn, server_name: str, records: dict[str, _KeyRecord], raw: str) -> None:
    for kid, r in records.items():
        txn.execute(
            "INSERT INTO server_signature_keys"
            " (server_name, key_id, verify_key, valid_until_ts, expired_ts, fetched_ts, key_json)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (server_name, key_id) DO UPDATE SET"
            " verify_key = excluded.verify_key, valid_until_ts = excluded.valid_until_ts,"
            " expired_ts = excluded.expired_ts, fetched_ts = excluded.fetched_ts,"
            " key_json = excluded.key_json",
            (server_name, kid, r.verify_key_b64, r.valid_until_ts, r.expired_ts, r.fetched_ts, raw),
        )


_SELECT_KEYS = (
    "SELECT key_id, verify_key, valid_until_ts, expired_ts, fetched_ts, key_json"
    " FROM server_signature_keys WHERE server_name = ?"
)


def _row_to_record(row: tuple[Any, ...]) -> _KeyRecord:
    kid, b64, valid_until_ts, expired_ts, fetched_ts = row[:5]
    return _KeyRecord(
        _decode_verify_key(kid, b64),
        b64,
        None if valid_until_ts is None else int(valid_until_ts),
        None if expired_ts is None else int(expired_ts),
        int(fetched_ts),
    )


class Keyring:
    def __init__(
        self,
        server_name: str,
        signing_keys: list[SigningKey],
        old_verify_keys: dict[str, tuple[str, int]],
        db: Database,
        fetch_json: Optional[FetchJson],
        clock: Callable[[], float] = time.time,
        key_validity_ms: int = 7 * 24 * 3600 * 1000,
    ) -> None:
        if not signing_keys:
            raise ValueError("a keyring needs at least one signing key")
        if key_validity_ms <= 0:
            raise ValueError("key_validity_ms must be positive")
        self.server_name = server_name
        self._signing_keys = list(signing_keys)
        self._db = db
        self.fetch_json = fetch_json
        self._clock = clock
        self._key_validity_ms = key_validity_ms

        self._own_keys: dict[str, VerifyKey] = {signing_key_id(k): k.verify_key for k in self._signing_keys}
        self._own_old_keys: dict[str, tuple[VerifyKey, str, int]] = {}
        for kid, (b64, expired_ts) in old_verify_keys.items():
            if kid in self._own_keys:
                raise ValueError(f"{kid} is both a signing key and an old verify key")
            self._own_old_keys[kid] = (_decode_verify_key(kid, b64), b64, int(expired_ts))

        self._local_json: Optional[dict[str, Any]] = None
        self._local_json_ts = 0

        # A cache of the database table: never the only copy of anything.
        self._cache: dict[tuple[str, str], _KeyRecord] = {}
        # server -> Deferreds of lookups waiting for the fetch in progress.
        self._inflight: dict[str, list[defer.Deferred[_FetchOutcome]]] = {}
        # server -> (time of the last fetch attempt, error if it failed).
        self._last_fetch: dict[str, tuple[int, Optional[str]]] = {}

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    # -- our own keys ------------------------------------------------------

    def local_keys_json(self) -> dict[str, Any]:
        """Our signed ``GET /_matrix/key/v2/server`` response.

        Valid for ``key_validity_ms`` and remade once half of that has
        passed, so what we serve is never close to expiring.
        """
        now = self.now_ms()
        if self._local_json is None or now - self._local_json_ts >= self._key_validity_ms // 2:
            body: dict[str, Any] = {
                "server_name": self.server_name,
                "verify_keys": {signing_key_id(k): {"key": verify_key_base64(k)} for k in self._signing_keys},
                "old_verify_keys": {
                    kid: {"key": b64, "expired_ts": expired_ts}
                    for kid, (_, b64, expired_ts) in self._own_old_keys.items()
                },
                "valid_until_ts": now + self._key_validity_ms,
            }
            for key in self._signing_keys:
                body = sign_json(body, self.server_name, key)
            self._local_json = body
            self._local_json_ts = now
        return copy.deepcopy(self._local_json)

    def sign_as_notary(self, obj: dict[str, Any]) -> dict[str, Any]:
        """A copy of ``obj`` with our signatures added (notary responses)."""
        for key in self._signing_keys:
            obj = sign_json(obj, self.server_name, key)
        return obj

    def _own_verify_key(self, key_id: str, at_ts: Optional[int]) -> VerifyKey:
        current = self._own_keys.get(key_id)
        if current is not None:
            return current
        old = self._own_old_keys.get(key_id)
        if old is None:
            raise KeyLookupError(self.server_name, key_id, "not one of our keys")
        verify_key, _, expired_ts = old
        if at_ts is not None and expired_ts < at_ts:
            raise KeyLookupError(self.server_name, key_id, f"expired at {expired_ts}, needed at {at_ts}")
        return verify_key

    # -- other servers' keys -------------------------------------------------

    async def get_verify_key(self, server_name: str, key_id: str, at_ts: Optional[int]) -> VerifyKey:
        """The verify key ``server_name`` used as ``key_id``, usable at ``at_ts``.

        ``at_ts`` is the time the signature must be valid at (an event's
        origin_server_ts from room version 5, now for request
        authentication), or None to accept any key the server ever
        published (room versions 1-4). Raises KeyLookupError.
        """
        if server_name == self.server_name:
            return self._own_verify_key(key_id, at_ts)
        if key_id.partition(":")[0] not in SUPPORTED_ALGORITHMS:
            raise KeyLookupError(server_name, key_id, "unsupported key algorithm")

        record = self._cache.get((server_name, key_id))
        if record is None or not record.usable_at(at_ts):
            await self._load_from_db(server_name)
            record = self._cache.get((server_name, key_id))
        if record is not None and record.usable_at(at_ts):
            return record.verify_key

        outcome = await self._fetch(server_name)
        record = self._cache.get((server_name, key_id))
        if record is not None and record.usable_at(at_ts):
            return record.verify_key
        if not outcome.ok:
            raise KeyLookupError(server_name, key_id, outcome.error or "could not fetch keys")
        if record is None:
            raise KeyLookupError(server_name, key_id, "the server does not publish this key")
        raise KeyLookupError(
            server_name, key_id, f"valid only until {record.usable_until()}, needed at {at_ts}"
        )

    async def _load_from_db(self, server_name: str) -> list[tuple[Any, ...]]:
        rows = await self._db.execute("keyring_load_keys", _SELECT_KEYS, server_name)
        for row in rows:
            try:
                self._cache[(server_name, row[0])] = _row_to_record(row)
            except ValueError:
                logger.warning("ignoring undecodable stored key %s of %s", row[0], server_name)
        return rows

    async def _fetch(self, server_name: str, min_interval_ms: int = MIN_FETCH_INTERVAL_MS) -> _FetchOutcome:
        """Fetch ``server_name``'s keys into the cache, at most once per
        ``min_interval_ms`` (a minute unless the caller knows better).

        Lookups arriving while a fetch runs wait for it instead of starting
        their own.
        """
        waiters = self._inflight.get(server_name)
        if waiters is not None:
            d: defer.Deferred[_FetchOutcome] = defer.Deferred()
            waiters.append(d)
            return await d

        if self.fetch_json is None:
            return _FetchOutcome(False, "no federation client to fetch keys with")
        now = self.now_ms()
        last = self._last_fetch.get(server_name)
        if last is not None and now - last[0] < min_interval_ms:
            if last[1] is not None:
                return _FetchOutcome(False, f"recent fetch failed ({last[1]}); not retrying yet")
            # What the server publishes is already in the cache.
            return _FetchOutcome(True)

        self._inflight[server_name] = []
        self._last_fetch[server_name] = (now, None)
        try:
            outcome = await self._fetch_and_store(server_name, now)
        except Exception as e:  # never leave the waiters hanging
            logger.exception("fetching keys of %s failed unexpectedly", server_name)
            outcome = _FetchOutcome(False, f"internal error: {type(e).__name__}")
        finally:
            waiting = self._inflight.pop(server_name, [])
        if not outcome.ok:
            self._last_fetch[server_name] = (now, outcome.error)
        for w in waiting:
            w.callback(outcome)
        return outcome

    async def _fetch_and_store(self, server_name: str, now: int) -> _FetchOutcome:
        assert self.fetch_json is not None
        try:
            response = await self.fetch_json(server_name, KEY_SERVER_PATH)
        except Exception as e:
            # Any transport failure; the message is for logs and errors only.
            logger.info("fetching keys of %s failed: %s", server_name, e)
            return _FetchOutcome(False, f"fetch failed: {type(e).__name__}: {e}")
        try:
            records, raw = parse_key_response(server_name, response, now)
        except ValueError as e:
            logger.warning("refusing keys of %s: %s", server_name, e)
            return _FetchOutcome(False, f"bad key response: {e}")
        await self._db.run_interaction("keyring_store_keys", _store_keys_txn, server_name, records, raw)
        for kid, record in records.items():
            self._cache[(server_name, kid)] = record
        return _FetchOutcome(True)

    # -- notary ------------------------------------------------------------

    async def get_key_responses(
        self, server_name: str, key_ids: Iterable[str], minimum_valid_until_ts: Optional[int]
    ) -> list[dict[str, Any]]:
        """Key responses of ``server_name`` for the notary, signed by us.

        Fetches when we have nothing, lack one of ``key_ids``, or our newest
        response expires before ``minimum_valid_until_ts`` (default: now).
        If the fetch fails, what we have is served anyway: that is what lets
        a notary vouch for a server that is down.
        """
        if server_name == self.server_name:
            return [self.local_keys_json()]
        wanted = set(key_ids)
        minimum = self.now_ms() if minimum_valid_until_ts is None else minimum_valid_until_ts

        rows = await self._load_from_db(server_name)
        have = {r[0] for r in rows}
        newest = max((int(r[2]) for r in rows if r[2] is not None), default=None)
        if not rows or (wanted - have) or newest is None or newest < minimum:
            # Only when what we hold does not meet the query: then a fresh
            # fetch (shared with any already running) is what the querying
            # server asked for, even right after another one.
            await self._fetch(server_name, min_interval_ms=0)
            rows = await self._load_from_db(server_name)

        responses: list[dict[str, Any]] = []
        seen: set[str] = set()
        for row in rows:
            kid, raw = row[0], row[5]
            if wanted and kid not in wanted:
                continue
            if raw in seen:
                continue
            seen.add(raw)
            responses.append(self.sign_as_notary(json.loads(raw)))
        return responses

    # -- checking signatures -------------------------------------------------

    async def verify_json(self, server_name: str, obj: dict[str, Any], at_ts: Optional[int]) -> None:
        """Check that ``obj`` carries a valid signature of ``server_name``.

        One valid signature with a key usable at ``at_ts`` suffices.
        Raises SignatureError when no signature holds (or there is none),
        KeyLookupError when none of the keys signed with could be found.
        """
        signatures = obj.get("signatures") if isinstance(obj, dict) else None
        server_sigs = signatures.get(server_name) if isinstance(signatures, dict) else None
        if not isinstance(server_sigs, dict):
            raise SignatureError(f"not signed by {server_name}")
        key_ids = [k for k in server_sigs if k.partition(":")[0] in SUPPORTED_ALGORITHMS]
        if not key_ids:
            raise SignatureError(f"no signature by {server_name} with a supported algorithm")

        lookup_errors: list[KeyLookupError] = []
        bad_signatures: list[SignatureError] = []
        for kid in key_ids:
            try:
                verify_key = await self.get_verify_key(server_name, kid, at_ts)
            except KeyLookupError as e:
                lookup_errors.append(e)
                continue
            try:
                verify_json_signature(obj, server_name, kid, verify_key)
            except SignatureError as e:
                bad_signatures.append(e)
                continue
            return
        if bad_signatures:
            raise bad_signatures[0]
        if len(lookup_errors) == 1:
            raise lookup_errors[0]
        raise KeyLookupError(server_name, None, "; ".join(e.reason for e in lookup_errors))

    async def verify_event(self, room_version: RoomVersion, pdu: dict[str, Any]) -> None:
        """The signature check on a received PDU.

        Every server that must have signed it (the sender's; in v1/v2 the
        event ID's; for a restricted join the authorising user's) must have
        a valid signature on the redacted event. From room version 5 the
        keys must be valid at the event's origin_server_ts.
        """
        if not isinstance(pdu, dict):
            raise SignatureError("event is not a JSON object")
        at_ts: Optional[int] = None
        if room_version.enforce_key_validity:
            ts = pdu.get("origin_server_ts")
            if not _is_int(ts):
                raise SignatureError("event has no integer origin_server_ts")
            at_ts = ts

        required: list[str] = []
        content = pdu.get("content")
        content = content if isinstance(content, dict) else {}
        is_member = pdu.get("type") == "m.room.member"
        membership = content.get("membership")

        signatures = pdu.get("signatures")
        signatures = signatures if isinstance(signatures, dict) else {}
        sender_server = _server_of(pdu.get("sender"), "@")
        if sender_server is None:
            raise SignatureError(f"event sender {pdu.get('sender')!r} is not a user ID")
        # The spec exempts invites made from a third-party invite: they may
        # come from a server other than the sender's, and the auth rules
        # check the identity server's signed block instead. If the sender's
        # server did sign, its signature is still checked.
        third_party_invite = is_member and membership == "invite" and "third_party_invite" in content
        if not third_party_invite or sender_server in signatures:
            required.append(sender_server)

        if room_version.event_id_format is EventIdFormat.SERVER_CHOSEN:
            id_server = _server_of(pdu.get("event_id"), "$")
            if id_server is None:
                raise SignatureError(f"event ID {pdu.get('event_id')!r} names no server")
            required.append(id_server)

        if room_version.restricted_join_rule and is_member and membership == "join":
            via = content.get("join_authorised_via_users_server")
            if via is not None:
                via_server = _server_of(via, "@")
                if via_server is None:
                    raise SignatureError(f"join_authorised_via_users_server {via!r} is not a user ID")
                required.append(via_server)

        redacted = prune_event_dict(room_version, pdu)
        if not required:
            # An exempt third-party invite (v3+): still insist on one valid
            # signature by somebody, so an unsigned event never passes.
            await self._verify_any(redacted, at_ts)
            return
        for server in dict.fromkeys(required):
            await self.verify_json(server, redacted, at_ts)

    async def _verify_any(self, obj: dict[str, Any], at_ts: Optional[int]) -> None:
        signatures = obj.get("signatures")
        servers = [s for s in signatures] if isinstance(signatures, dict) else []
        if not servers:
            raise SignatureError("event is not signed by any server")
        last: Exception = SignatureError("event is not signed by any server")
        for server in servers:
            try:
                await self.verify_json(server, obj, at_ts)
                return
            except (SignatureError, KeyLookupError) as e:
                last = e
        raise last
