"""Application service registrations.

Spec: application-service-api "Registration": a service is described by a
registration file (YAML) holding ``id``, ``url``, ``as_token``,
``hs_token``, ``sender_localpart``, ``namespaces`` (``users``, ``aliases``,
``rooms``: lists of ``{exclusive, regex}``), ``rate_limited``,
``protocols`` and ``receive_ephemeral`` (MSC2409, also under its unstable
name ``de.sorunome.msc2409.push_ephemeral``).

Each regex is matched from the start of the full ID (``@user:server``,
``#alias:server``, ``!room:server``), as registrations in the wild expect
(``@irc_.*`` matches on any server).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

import yaml


class RegistrationError(ValueError):
    """A registration file is unusable; the message is one line naming the file and key."""

    def __init__(self, file: str, key: str, problem: str) -> None:
        self.file = file
        self.key = key
        self.problem = " ".join(problem.split())
        super().__init__(f"{file}: {key}: {self.problem}" if key else f"{file}: {self.problem}")


@dataclass(frozen=True)
class Namespace:
    exclusive: bool
    regex: str
    pattern: re.Pattern[str]


@dataclass(frozen=True)
class ApplicationService:
    id: str
    url: Optional[str]
    as_token: str
    hs_token: str
    sender_localpart: str
    server_name: str
    users: tuple[Namespace, ...] = ()
    aliases: tuple[Namespace, ...] = ()
    rooms: tuple[Namespace, ...] = ()
    rate_limited: bool = True
    protocols: tuple[str, ...] = ()
    receive_ephemeral: bool = False
    file: str = ""
    # One combined pattern per kind, so a check is one regex call.
    _any: dict[str, Optional[re.Pattern[str]]] = field(default_factory=dict, compare=False, repr=False)

    @property
    def sender(self) -> str:
        return f"@{self.sender_localpart}:{self.server_name}"

    def _combined(self, kind: str) -> Optional[re.Pattern[str]]:
        if kind not in self._any:
            spaces: tuple[Namespace, ...] = getattr(self, kind)
            self._any[kind] = re.compile("|".join(f"(?:{n.regex})" for n in spaces)) if spaces else None
        return self._any[kind]

    def is_interested_in_user(self, user_id: str) -> bool:
        """The user is the service's own sender or in its users namespace."""
        if user_id == self.sender:
            return True
        p = self._combined("users")
        return p is not None and p.match(user_id) is not None

    def is_interested_in_alias(self, alias: str) -> bool:
        p = self._combined("aliases")
        return p is not None and p.match(alias) is not None

    def is_interested_in_room(self, room_id: str) -> bool:
        p = self._combined("rooms")
        return p is not None and p.match(room_id) is not None

    def is_exclusive_user(self, user_id: str) -> bool:
        return user_id == self.sender or any(n.exclusive and n.pattern.match(user_id) for n in self.users)

    def is_exclusive_alias(self, alias: str) -> bool:
        return any(n.exclusive and n.pattern.match(alias) for n in self.aliases)


def _namespaces(raw: Any, file: str, kind: str) -> tuple[Namespace, ...]:
    key = f"namespaces.{kind}"
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise RegistrationError(file, key, "expected a list of {exclusive, regex}")
    out = []
    for i, entry in enumerate(raw):
        where = f"{key}[{i}]"
        if not isinstance(entry, Mapping):
            raise RegistrationError(file, where, "expected a mapping with exclusive and regex")
        unknown = set(entry) - {"exclusive", "regex"}
        if unknown:
            raise RegistrationError(file, f"{where}.{sorted(map(str, unknown))[0]}", "unknown key")
        regex = entry.get("regex")
        if not isinstance(regex, str) or not regex:
            raise RegistrationError(file, f"{where}.regex", "expected a non-empty string")
        exclusive = entry.get("exclusive", False)
        if not isinstance(exclusive, bool):
            raise RegistrationError(file, f"{where}.exclusive", "expected true or false")
        try:
            pattern = re.compile(regex)
        except re.error as e:
            raise RegistrationError(file, f"{where}.regex", f"not a valid regular expression: {e}") from None
        out.append(Namespace(exclusive, regex, pattern))
    return tuple(out)


_KNOWN = frozenset({"id", "url", "as_token", "hs_token", "sender_localpart", "namespaces", "rate_limited",
                    "protocols", "receive_ephemeral", "de.sorunome.msc2409.push_ephemeral",
                    # Accepted and ignored: other servers' extensions found in the wild.
                    "org.matrix.msc3202", "push_ephemeral", "ip_range_whitelist"})


def _string(raw: Mapping[str, Any], key: str, file: str, required: bool = True) -> Optional[str]:
    value = raw.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        what = "required but missing" if key not in raw else "expected a non-empty string"
        raise RegistrationError(file, key, what)
    return value


def _flag(raw: Mapping[str, Any], key: str, file: str, default: bool) -> bool:
    value = raw.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RegistrationError(file, key, "expected true or false")
    return value


def parse_registration(raw: Any, file: str, server_name: str) -> ApplicationService:
    """One registration from its parsed YAML ``raw``."""
    if not isinstance(raw, Mapping):
        raise RegistrationError(file, "", "expected a mapping of registration keys")
    for key in raw:
        if key not in _KNOWN:
            raise RegistrationError(file, str(key), "unknown key")
    as_id = _string(raw, "id", file)
    url = _string(raw, "url", file, required=False)
    if url is not None and not re.match(r"^https?://[^/]+", url):
        raise RegistrationError(file, "url", "expected an http:// or https:// URL, or null")
    as_token = _string(raw, "as_token", file)
    hs_token = _string(raw, "hs_token", file)
    localpart = _string(raw, "sender_localpart", file)
    assert as_id and as_token and hs_token and localpart
    if "url" not in raw:
        raise RegistrationError(file, "url", "required (null for a service that receives nothing)")
    spaces = raw.get("namespaces") or {}
    if not isinstance(spaces, Mapping):
        raise RegistrationError(file, "namespaces", "expected a mapping with users, aliases and rooms")
    for key in spaces:
        if key not in ("users", "aliases", "rooms"):
            raise RegistrationError(file, f"namespaces.{key}", "unknown key")
    protocols = raw.get("protocols") or []
    if not isinstance(protocols, list) or not all(isinstance(p, str) and p for p in protocols):
        raise RegistrationError(file, "protocols", "expected a list of protocol names")
    ephemeral = _flag(raw, "receive_ephemeral", file, False) or _flag(
        raw, "de.sorunome.msc2409.push_ephemeral", file, False)
    return ApplicationService(
        id=as_id, url=url.rstrip("/") if url else None, as_token=as_token, hs_token=hs_token,
        sender_localpart=localpart, server_name=server_name,
        users=_namespaces(spaces.get("users"), file, "users"),
        aliases=_namespaces(spaces.get("aliases"), file, "aliases"),
        rooms=_namespaces(spaces.get("rooms"), file, "rooms"),
        rate_limited=_flag(raw, "rate_limited", file, True), protocols=tuple(protocols),
        receive_ephemeral=ephemeral, file=file,
    )


def load_registrations(paths: Iterable[str], server_name: str) -> list[ApplicationService]:
    """Every registration file in ``paths``; RegistrationError on the first problem,
    including two services sharing an ``id``, ``as_token`` or ``sender_localpart``."""
    services: list[ApplicationService] = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                raw = yaml.safe_load(f)
        except OSError as e:
            raise RegistrationError(path, "", f"cannot read: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise RegistrationError(path, "", f"invalid YAML{where}: {getattr(e, 'problem', None) or e}") from None
        service = parse_registration(raw, path, server_name)
        for other in services:
            for key in ("id", "as_token", "sender_localpart"):
                if getattr(other, key) == getattr(service, key):
                    raise RegistrationError(path, key, f"the same as in {other.file}; each service needs its own")
        services.append(service)
    return services
