"""Server-side key backups: backup versions and the session keys in them.

Spec: client-server-api "End-to-End Encryption" → "Server-side key backups"
and its API (``/room_keys/version``, ``/room_keys/keys``), the backup
algorithm ``m.megolm_backup.v1.curve25519-aes-sha2`` (its ``auth_data``
carries the backup's curve25519 ``public_key``), and the rule for which of
two keys of one session is kept (verified first, then the lower
``first_message_index``, then the lower ``forwarded_count``).

The server cannot read what it stores: ``session_data`` is encrypted by the
client. It checks shapes, so that what it hands back is what the spec
promises, and keeps keys only in the user's current backup.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Optional

from zhome.http.errors import MatrixError, bad_json, invalid_param, not_found
from zhome.storage.key_backup import BackupVersion, KeyBackupStore, NoSuchVersion, RoomKey, WrongVersion
from zhome.util.ids import is_valid_room_id

#: The backup algorithms the spec defines (and this server accepts).
MEGOLM_BACKUP_V1 = "m.megolm_backup.v1.curve25519-aes-sha2"
ALGORITHMS = frozenset({MEGOLM_BACKUP_V1})

#: Canonical JSON's integer range, which is also what both engines' BIGINT hold.
MAX_INT = 2 ** 53 - 1
#: Megolm session IDs are 43 characters; this leaves room for other forms.
MAX_SESSION_ID_BYTES = 255
#: Versions are decimal counters; anything longer is not one of ours.
MAX_VERSION_DIGITS = 18


def wrong_version(current: int) -> MatrixError:
    return MatrixError(403, "M_WRONG_ROOM_KEYS_VERSION", "Wrong backup version", current_version=str(current))


def no_backup() -> MatrixError:
    return not_found("No current backup version")


def unknown_version() -> MatrixError:
    return not_found("Unknown backup version")


def should_replace(stored: RoomKey, new: RoomKey) -> bool:
    """Whether ``new`` takes the place of the ``stored`` key of its session."""
    if stored.is_verified != new.is_verified:
        return new.is_verified
    if stored.first_message_index != new.first_message_index:
        return new.first_message_index < stored.first_message_index
    return new.forwarded_count < stored.forwarded_count


# -- validation (pure) --------------------------------------------------------
def parse_version(raw: str) -> Optional[int]:
    """A version string as this server hands them out, else None."""
    if not raw.isascii() or not raw.isdigit() or len(raw) > MAX_VERSION_DIGITS:
        return None
    v = int(raw)
    # Exactly the string handed out: "01" names no version.
    return v if v >= 1 and str(v) == raw else None


def check_algorithm(body: dict[str, Any]) -> str:
    algorithm = body.get("algorithm")
    if algorithm is None:
        raise bad_json("algorithm is required")
    if not isinstance(algorithm, str):
        raise bad_json("algorithm must be a string")
    if algorithm not in ALGORITHMS:
        raise invalid_param(f"Unsupported backup algorithm {algorithm!r}; supported: {', '.join(sorted(ALGORITHMS))}")
    return algorithm


def check_auth_data(algorithm: str, auth_data: Any) -> dict[str, Any]:
    """``auth_data`` of ``m.megolm_backup.v1.curve25519-aes-sha2``: an object
    with the backup's curve25519 ``public_key`` (unpadded base64 of 32
    bytes) and optional ``signatures``."""
    if auth_data is None:
        raise bad_json("auth_data is required")
    if not isinstance(auth_data, dict):
        raise bad_json("auth_data must be an object")
    public_key = auth_data.get("public_key")
    if not isinstance(public_key, str):
        raise bad_json("auth_data.public_key must be a string")
    raw = _strict_base64(public_key)
    if raw is None:
        raise bad_json("auth_data.public_key is not base64")
    if len(raw) != 32:
        raise bad_json("auth_data.public_key is not a 32-byte curve25519 key")
    sigs = auth_data.get("signatures")
    if sigs is not None and not (isinstance(sigs, dict) and all(
            isinstance(by_key, dict) and all(isinstance(s, str) for s in by_key.values())
            for by_key in sigs.values())):
        raise bad_json("auth_data.signatures must map user IDs to key IDs to signatures")
    return auth_data


def _strict_base64(s: str) -> Optional[bytes]:
    # Unpadded per the spec; padded tolerated. Unlike a plain decode, any
    # character outside the alphabet is an error rather than skipped.
    body = s.rstrip("=")
    try:
        return base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None


def _check_int(data: dict[str, Any], name: str, where: str) -> int:
    v = data.get(name)
    if v is None:
        raise bad_json(f"{where}.{name} is required")
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_INT:
        raise bad_json(f"{where}.{name} must be a non-negative integer")
    return v


def check_room_id(room_id: str, where: str, in_path: bool) -> str:
    if not is_valid_room_id(room_id):
        msg = f"{where}: {room_id!r} is not a room ID"
        raise invalid_param(msg) if in_path else bad_json(msg)
    return room_id


def check_session_id(session_id: str, where: str, in_path: bool) -> str:
    if not session_id or len(session_id.encode("utf-8")) > MAX_SESSION_ID_BYTES:
        msg = f"{where}: session ID must have 1 to {MAX_SESSION_ID_BYTES} bytes"
        raise invalid_param(msg) if in_path else bad_json(msg)
    return session_id


def check_key_data(room_id: str, session_id: str, data: Any, where: str) -> RoomKey:
    """One ``KeyBackupData`` object."""
    if not isinstance(data, dict):
        raise bad_json(f"{where} must be an object")
    first = _check_int(data, "first_message_index", where)
    forwarded = _check_int(data, "forwarded_count", where)
    verified = data.get("is_verified")
    if verified is None:
        raise bad_json(f"{where}.is_verified is required")
    if not isinstance(verified, bool):
        raise bad_json(f"{where}.is_verified must be a boolean")
    session_data = data.get("session_data")
    if session_data is None:
        raise bad_json(f"{where}.session_data is required")
    if not isinstance(session_data, dict):
        raise bad_json(f"{where}.session_data must be an object")
    return RoomKey(room_id, session_id, first, forwarded, verified, session_data)


def check_sessions(room_id: str, body: Any, where: str) -> list[RoomKey]:
    """A ``RoomKeyBackup`` object: ``{"sessions": {session_id: KeyBackupData}}``."""
    if not isinstance(body, dict):
        raise bad_json(f"{where} must be an object")
    sessions = body.get("sessions")
    if sessions is None:
        raise bad_json(f"{where}.sessions is required")
    if not isinstance(sessions, dict):
        raise bad_json(f"{where}.sessions must be an object")
    return [check_key_data(room_id, check_session_id(sid, f"{where}.sessions", False), data,
                           f"{where}.sessions.{sid}") for sid, data in sessions.items()]


def check_rooms(body: dict[str, Any]) -> list[RoomKey]:
    rooms = body.get("rooms")
    if rooms is None:
        raise bad_json("rooms is required")
    if not isinstance(rooms, dict):
        raise bad_json("rooms must be an object")
    out: list[RoomKey] = []
    for room_id, room in rooms.items():
        out.extend(check_sessions(check_room_id(room_id, "rooms", False), room, f"rooms.{room_id}"))
    return out


def render_keys(keys: list[RoomKey]) -> dict[str, Any]:
    rooms: dict[str, Any] = {}
    for k in keys:
        rooms.setdefault(k.room_id, {"sessions": {}})["sessions"][k.session_id] = k.to_json()
    return rooms


def render_version(v: BackupVersion) -> dict[str, Any]:
    return {"version": str(v.version), "algorithm": v.algorithm, "auth_data": v.auth_data,
            "count": v.count, "etag": str(v.etag)}


# -- the service ---------------------------------------------------------------------
class KeyBackupService:
    def __init__(self, store: KeyBackupStore) -> None:
        self.store = store

    # versions
    async def create_version(self, user_id: str, body: dict[str, Any]) -> dict[str, Any]:
        algorithm = check_algorithm(body)
        auth_data = check_auth_data(algorithm, body.get("auth_data"))
        version = await self.store.create_version(user_id, algorithm, auth_data)
        return {"version": str(version)}

    async def get_version(self, user_id: str, raw_version: Optional[str]) -> dict[str, Any]:
        if raw_version is None:
            found = await self.store.get_version(user_id)
            if found is None:
                raise no_backup()
            return render_version(found)
        version = parse_version(raw_version)
        found = await self.store.get_version(user_id, version) if version is not None else None
        if found is None:
            raise unknown_version()
        return render_version(found)

    async def update_version(self, user_id: str, raw_version: str, body: dict[str, Any]) -> dict[str, Any]:
        algorithm = check_algorithm(body)
        auth_data = check_auth_data(algorithm, body.get("auth_data"))
        if "version" in body and body["version"] != raw_version:
            raise invalid_param("version in the body does not match the version in the path")
        version = parse_version(raw_version)
        found = await self.store.get_version(user_id, version) if version is not None else None
        if found is None or version is None:
            raise unknown_version()
        if found.algorithm != algorithm:
            raise invalid_param("Algorithm does not match the backup's algorithm")
        try:
            await self.store.update_version(user_id, version, auth_data)
        except NoSuchVersion:
            raise unknown_version()
        return {}

    async def delete_version(self, user_id: str, raw_version: str) -> dict[str, Any]:
        version = parse_version(raw_version)
        if version is None or not await self.store.delete_version(user_id, version):
            raise unknown_version()
        return {}

    # keys
    async def put_keys(self, user_id: str, raw_version: str, keys: list[RoomKey]) -> dict[str, Any]:
        # A version string this server never gave out is 0, which is never
        # current: the store answers with the current version, or none.
        version = parse_version(raw_version) or 0
        try:
            etag, count = await self.store.put_keys(user_id, version, keys, should_replace)
        except NoSuchVersion:
            raise no_backup()
        except WrongVersion as e:
            raise wrong_version(e.current)
        return {"etag": str(etag), "count": count}

    async def get_keys(self, user_id: str, raw_version: str, room_id: Optional[str] = None,
                       session_id: Optional[str] = None) -> dict[str, Any]:
        version = parse_version(raw_version)
        if version is None:
            raise unknown_version()
        try:
            keys = await self.store.get_keys(user_id, version, room_id, session_id)
        except NoSuchVersion:
            raise unknown_version()
        rooms = render_keys(keys)
        if session_id is not None and room_id is not None:
            if not keys:
                raise not_found("No key backed up for this session")
            return keys[0].to_json()
        if room_id is not None:
            return rooms.get(room_id, {"sessions": {}})
        return {"rooms": rooms}

    async def delete_keys(self, user_id: str, raw_version: str, room_id: Optional[str] = None,
                          session_id: Optional[str] = None) -> dict[str, Any]:
        version = parse_version(raw_version)
        if version is None:
            raise unknown_version()
        try:
            etag, count = await self.store.delete_keys(user_id, version, room_id, session_id)
        except NoSuchVersion:
            raise unknown_version()
        return {"etag": str(etag), "count": count}

    async def delete_for_user(self, user_id: str) -> None:
        await self.store.delete_for_user(user_id)
