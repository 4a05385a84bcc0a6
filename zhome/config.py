"""Homeserver configuration: typed, validated, read from YAML.

The file is checked in full when it is loaded, so a mistake stops the server
before it starts rather than surfacing as a misbehaviour hours later. Unknown
keys (usually typos), values of the wrong type and missing required values are
all errors; each becomes a ``ConfigError`` whose text is one line naming the
file, the key path and the problem, e.g.::

    homeserver.yaml: listeners[0].port: expected an integer, got 'abc'

The schema is declared once, on the frozen dataclasses below: every loadable
field carries a converter (see ``setting``), and ``_build`` walks a YAML
mapping against those declarations. Adding an option is one line on the
right dataclass. ``config/homeserver.sample.yaml`` documents every option.

Paths: ``signing_key_path``, ``data_dir``, ``log_file``, the TLS certificate
and key and ``federation.trusted_ca_files`` are resolved
against the directory holding the config file, an SQLite database path
against ``data_dir``. Nothing here checks that files exist; start-up does.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

import yaml

from zhome.rooms.versions import DEFAULT_ROOM_VERSION, KNOWN_ROOM_VERSIONS

# The spec fixes the maximum size of a PDU (65536 bytes of canonical JSON);
# it is a protocol rule, not a tuning knob, so it cannot be configured.
MAX_EVENT_SIZE = 65536

MiB = 1024 * 1024


class ConfigError(Exception):
    """A problem in the configuration file, reported as one line."""

    def __init__(self, file: str, key_path: str, problem: str) -> None:
        self.file = file
        self.key_path = key_path
        # A multi-line message would be cut up by log collectors and terminals
        # alike; the brief promise is one line.
        self.problem = " ".join(problem.split())
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = [self.file]
        if self.key_path:
            parts.append(self.key_path)
        parts.append(self.problem)
        return ": ".join(parts)


class _Invalid(Exception):
    """Raised by converters; ``load_config`` adds the file name."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(path, problem)
        self.path = path
        self.problem = problem


# ---------------------------------------------------------------------------
# Converters: (value, key path) -> typed value, raising _Invalid.

Converter = Callable[[Any, str], Any]
T = TypeVar("T")


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _expected(what: str, value: Any, path: str) -> NoReturn:
    raise _Invalid(path, f"expected {what}, got {_describe(value)}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def string(value: Any, path: str) -> str:
    if not isinstance(value, str):
        _expected("a string", value, path)
    return value


def non_empty_string(value: Any, path: str) -> str:
    if string(value, path) == "":
        raise _Invalid(path, "must not be empty")
    return value


def boolean(value: Any, path: str) -> bool:
    # Only YAML booleans: a string "false" being truthy is a classic trap.
    if not isinstance(value, bool):
        _expected("true or false", value, path)
    return value


def integer(minimum: int | None = None, maximum: int | None = None) -> Converter:
    def convert(value: Any, path: str) -> int:
        # bool is an int subclass in Python; "port: true" is not a port.
        if not isinstance(value, int) or isinstance(value, bool):
            _expected("an integer", value, path)
        if minimum is not None and value < minimum:
            raise _Invalid(path, _range_text(minimum, maximum, value))
        if maximum is not None and value > maximum:
            raise _Invalid(path, _range_text(minimum, maximum, value))
        return value

    return convert


def _range_text(minimum: int | None, maximum: int | None, value: int) -> str:
    if maximum is None:
        return f"must be at least {minimum}, got {value}"
    if minimum is None:
        return f"must be at most {maximum}, got {value}"
    return f"must be between {minimum} and {maximum}, got {value}"


def positive_number(value: Any, path: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        _expected("a number", value, path)
    if not value > 0:
        raise _Invalid(path, f"must be greater than 0, got {value!r}")
    return float(value)


def one_of(*choices: str, ignore_case: bool = False) -> Converter:
    listed = ", ".join(repr(c) for c in choices)

    def convert(value: Any, path: str) -> str:
        if not isinstance(value, str):
            _expected(f"one of {listed}", value, path)
        candidate = value.upper() if ignore_case else value
        if candidate not in choices:
            _expected(f"one of {listed}", value, path)
        return candidate

    return convert


def optional(convert: Converter) -> Converter:
    def convert_optional(value: Any, path: str) -> Any:
        return None if value is None else convert(value, path)

    return convert_optional


def redacted(convert: Converter) -> Converter:
    """Never echo a secret's value in an error message (it would be logged)."""

    def convert_secret(value: Any, path: str) -> Any:
        try:
            return convert(value, path)
        except _Invalid as e:
            if ", got " not in e.problem:
                raise
            problem = e.problem.split(", got ")[0]
            raise _Invalid(e.path, f"{problem} (value hidden)") from None

    return convert_secret


def list_of(convert: Converter, *, min_items: int = 0, unique: bool = False) -> Converter:
    def convert_list(value: Any, path: str) -> tuple[Any, ...]:
        if not isinstance(value, list):
            _expected("a list", value, path)
        if len(value) < min_items:
            raise _Invalid(path, f"needs at least {min_items} item(s)")
        items = tuple(convert(item, f"{path}[{i}]") for i, item in enumerate(value))
        if unique:
            for i, item in enumerate(items):
                if item in items[:i]:
                    raise _Invalid(f"{path}[{i}]", f"duplicate entry {item!r}")
        return items

    return convert_list


def mapping(value: Any, path: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        _expected("a mapping", value, path)
    return dict(value)


def ip_literal(value: Any, path: str) -> str:
    try:
        ipaddress.ip_address(string(value, path))
    except ValueError:
        raise _Invalid(path, f"expected an IP address such as '127.0.0.1' or '::', got {value!r}") from None
    return value


_DNS_NAME = re.compile(r"[A-Za-z0-9.-]{1,255}")
_PORT = re.compile(r"[0-9]{1,5}")


def server_name(value: Any, path: str) -> str:
    """A server name per the spec's appendix "Server Name".

    ``hostname [":" port]`` where hostname is an IPv4 literal, a bracketed
    IPv6 literal or a DNS name of [A-Za-z0-9.-].
    """
    text = string(value, path)
    bad = _Invalid(
        path,
        f"{text!r} is not a valid server name "
        "(expected a hostname or IP literal with an optional :port)",
    )
    port: str | None = None
    if text.startswith("["):
        end = text.find("]")
        if end == -1:
            raise bad
        host, rest = text[1:end], text[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad from None
        if rest:
            if not rest.startswith(":"):
                raise bad
            port = rest[1:]
    else:
        host = text
        if ":" in text:
            host, port = text.rsplit(":", 1)
        if not _DNS_NAME.fullmatch(host):
            raise bad
        # All digits and dots can only be meant as an IPv4 literal.
        if re.fullmatch(r"[0-9.]+", host):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise bad from None
    if port is not None and not (_PORT.fullmatch(port) and 1 <= int(port) <= 65535):
        raise bad
    return text


def base_url(value: Any, path: str) -> str:
    text = non_empty_string(value, path)
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise _Invalid(path, f"expected an http:// or https:// URL, got {text!r}")
    if parts.query or parts.fragment:
        raise _Invalid(path, "must not have a query or fragment")
    # Clients append paths such as "_matrix/client/..." to it.
    return text if text.endswith("/") else text + "/"


# ---------------------------------------------------------------------------
# Declarative sections.

_REQUIRED: Any = object()


def setting(
    convert: Converter,
    default: Any = _REQUIRED,
    *,
    factory: Callable[[], Any] | None = None,
    secret: bool = False,
) -> Any:
    """Declare a loadable field: its converter and, when optional, its default.

    ``secret`` keeps the value out of error messages and out of repr(), so
    logging a config object never logs a secret.
    """
    metadata = {"convert": redacted(convert) if secret else convert}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata, repr=not secret)
    if default is _REQUIRED:
        return field(metadata=metadata, repr=not secret)
    return field(default=default, metadata=metadata, repr=not secret)


class section:
    """Converter for a nested mapping described by a dataclass."""

    def __init__(self, cls: type[Any]) -> None:
        self.cls = cls

    def __call__(self, value: Any, path: str, base: Any = None) -> Any:
        return _build(self.cls, value, path, base)


def _build(cls: type[T], value: Any, path: str, base: T | None = None) -> T:
    """Build ``cls`` from a YAML mapping, field by declared field.

    Keys missing from ``value`` take their value from ``base`` when given
    (so a partial override keeps the other defaults of that section), else
    the dataclass default; a field without either is required.
    """
    # "registration:" with every key commented out reads as null.
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        _expected("a mapping", value, path)
    specs = {f.name: f for f in dataclasses.fields(cls) if "convert" in f.metadata}  # type: ignore[arg-type]
    # Unknown keys first: a typo should be reported as the typo, not as the
    # required key it failed to spell.
    for key in value:
        if key not in specs:
            problem = "unknown key"
            close = difflib.get_close_matches(str(key), list(specs), n=1)
            if close:
                problem += f" (did you mean {close[0]!r}?)"
            raise _Invalid(_join(path, str(key)), problem)
    kwargs: dict[str, Any] = {}
    for name, f in specs.items():
        sub = _join(path, name)
        convert = f.metadata["convert"]
        if name in value:
            if isinstance(convert, section):
                inner_base = getattr(base, name) if base is not None else f.default
                if not dataclasses.is_dataclass(inner_base):
                    inner_base = None
                kwargs[name] = convert(value[name], sub, inner_base)
            else:
                kwargs[name] = convert(value[name], sub)
        elif base is not None:
            kwargs[name] = getattr(base, name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _Invalid(sub, "required but missing")
    built = cls(**kwargs)
    check = getattr(built, "_check", None)
    if check is not None:
        check(path)
    return built


# ---------------------------------------------------------------------------
# The schema.


@dataclass(frozen=True, kw_only=True)
class ListenerConfig:
    port: int = setting(integer(1, 65535))
    bind_addresses: tuple[str, ...] = setting(list_of(ip_literal, min_items=1), default=("127.0.0.1",))
    type: str = setting(one_of("http", "metrics"))
    resources: tuple[str, ...] = setting(
        list_of(one_of("client", "federation", "media"), unique=True), default=("client",)
    )
    tls: bool = setting(boolean, default=False)
    # Trust X-Forwarded-For / -Proto: only behind a reverse proxy, otherwise
    # any client could claim any address and dodge IP rate limits.
    x_forwarded: bool = setting(boolean, default=False)

    def _check(self, path: str) -> None:
        if self.type == "http" and not self.resources:
            raise _Invalid(_join(path, "resources"), "an http listener needs at least one resource")


def _listeners(value: Any, path: str) -> tuple[ListenerConfig, ...]:
    listeners: tuple[ListenerConfig, ...] = list_of(section(ListenerConfig), min_items=1)(value, path)
    seen: dict[tuple[str, int], int] = {}
    for i, listener in enumerate(listeners):
        for address in listener.bind_addresses:
            if (address, listener.port) in seen:
                raise _Invalid(
                    f"{path}[{i}].port",
                    f"{address}:{listener.port} is already used by {path}[{seen[(address, listener.port)]}]",
                )
            seen[(address, listener.port)] = i
    if not any(lst.type == "http" and "client" in lst.resources for lst in listeners):
        raise _Invalid(path, "needs at least one http listener with the 'client' resource")
    return listeners


@dataclass(frozen=True)
class DatabaseConfig:
    """``engine`` is "sqlite3" or "psycopg2"; ``args`` go to the storage layer.

    sqlite3 args: ``{"database": absolute path or ":memory:"}``.
    psycopg2 args: ``database`` plus any of host, port, user, password,
    sslmode, and always ``cp_min``/``cp_max`` (connection pool bounds).
    """

    engine: str
    args: dict[str, Any]

    def __repr__(self) -> str:
        shown = {k: ("<hidden>" if k == "password" else v) for k, v in self.args.items()}
        return f"DatabaseConfig(engine={self.engine!r}, args={shown!r})"


@dataclass(frozen=True, kw_only=True)
class _DatabaseSection:
    name: str = setting(one_of("sqlite3", "psycopg2"))
    args: dict[str, Any] = setting(mapping, factory=dict)


@dataclass(frozen=True, kw_only=True)
class _SqliteArgs:
    database: str = setting(non_empty_string, default="homeserver.db")


@dataclass(frozen=True, kw_only=True)
class _PostgresArgs:
    host: str | None = setting(optional(non_empty_string), default=None)
    port: int | None = setting(optional(integer(1, 65535)), default=None)
    user: str | None = setting(optional(non_empty_string), default=None)
    password: str | None = setting(optional(string), default=None, secret=True)
    database: str | None = setting(optional(non_empty_string), default=None)
    # libpq's own name for the database; accepted so DSN habits work.
    dbname: str | None = setting(optional(non_empty_string), default=None)
    sslmode: str | None = setting(
        optional(one_of("disable", "allow", "prefer", "require", "verify-ca", "verify-full")), default=None
    )
    cp_min: int = setting(integer(1), default=5)
    cp_max: int = setting(integer(1), default=10)

    def _check(self, path: str) -> None:
        if self.database is not None and self.dbname is not None:
            raise _Invalid(_join(path, "dbname"), "give either database or dbname, not both")
        if self.database is None and self.dbname is None:
            raise _Invalid(_join(path, "database"), "required but missing")
        if self.cp_max < self.cp_min:
            raise _Invalid(
                _join(path, "cp_max"), f"must be at least cp_min ({self.cp_min}), got {self.cp_max}"
            )

    def to_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {"database": self.database or self.dbname}
        for key in ("host", "port", "user", "password", "sslmode"):
            if getattr(self, key) is not None:
                args[key] = getattr(self, key)
        args["cp_min"] = self.cp_min
        args["cp_max"] = self.cp_max
        return args


def _database(value: Any, path: str) -> DatabaseConfig:
    raw = _build(_DatabaseSection, value, path)
    args_path = _join(path, "args")
    if raw.name == "sqlite3":
        return DatabaseConfig("sqlite3", {"database": _build(_SqliteArgs, raw.args, args_path).database})
    return DatabaseConfig("psycopg2", _build(_PostgresArgs, raw.args, args_path).to_args())


def parse_database_url(value: Any, path: str = "database_url") -> DatabaseConfig:
    """``postgresql://user:password@host:port/database?sslmode=…&cp_min=…``.

    Error messages never repeat the URL: it may hold a password.
    """
    text = non_empty_string(value, path)
    parts = urlsplit(text)
    if parts.scheme not in ("postgresql", "postgres"):
        raise _Invalid(path, "expected a postgresql:// URL")
    try:
        port = parts.port
    except ValueError:
        raise _Invalid(path, "the port is not a number between 1 and 65535") from None
    database = unquote(parts.path[1:]) if parts.path.startswith("/") else ""
    if not database or "/" in database:
        raise _Invalid(path, "expected the database name after the host, as in postgresql://host/dbname")
    raw: dict[str, Any] = {"database": database}
    if parts.username:
        raw["user"] = unquote(parts.username)
    if parts.password is not None:
        raw["password"] = unquote(parts.password)
    if parts.hostname:
        raw["host"] = parts.hostname
    if port is not None:
        raw["port"] = port
    for key, val in parse_qsl(parts.query, keep_blank_values=True):
        if key in ("cp_min", "cp_max"):
            if not _PORT.fullmatch(val):
                raise _Invalid(f"{path}.{key}", f"expected an integer, got {val!r}")
            raw[key] = int(val)
        elif key == "sslmode":
            raw[key] = val
        else:
            raise _Invalid(path, f"unknown query parameter {key!r} (known: sslmode, cp_min, cp_max)")
    return DatabaseConfig("psycopg2", _build(_PostgresArgs, raw, path).to_args())


@dataclass(frozen=True, kw_only=True)
class RegistrationConfig:
    enable_registration: bool = setting(boolean, default=False)
    # Lets admin tools register users through the shared-secret admin API.
    registration_shared_secret: str | None = setting(optional(non_empty_string), default=None, secret=True)
    registration_requires_token: bool = setting(boolean, default=False)
    # Spec: client-server-api "Guest Access": POST /register?kind=guest.
    allow_guest_access: bool = setting(boolean, default=False)


@dataclass(frozen=True, kw_only=True)
class PasswordHashingConfig:
    scheme: str = setting(one_of("argon2", "bcrypt"), default="argon2")
    # argon2id cost of newly set passwords. Lower only for load tests (as
    # Synapse's bcrypt_rounds is lowered for them); existing hashes keep
    # the parameters they record.
    argon2_time_cost: int = setting(integer(1, 100), default=5)
    argon2_memory_kib: int = setting(integer(8, 4 * 1024 * 1024), default=7168)
    # bcrypt cost (log2 of its rounds) when scheme is bcrypt.
    bcrypt_rounds: int = setting(integer(4, 31), default=12)


@dataclass(frozen=True, kw_only=True)
class AccessTokensConfig:
    # None: access tokens do not expire.
    lifetime_ms: int | None = setting(optional(integer(1)), default=None)
    refresh_tokens: bool = setting(boolean, default=True)
    # POST /_matrix/client/v1/login/get_token: a signed-in device gets a
    # one-use token that logs another device in (m.login.token), after the
    # user re-enters their password. false: the capability says disabled.
    login_token_enabled: bool = setting(boolean, default=True)
    login_token_lifetime_ms: int = setting(integer(1000, 3_600_000), default=120_000)


@dataclass(frozen=True, kw_only=True)
class RateLimit:
    """A token bucket: ``burst_count`` actions at once, refilled at ``per_second``."""

    per_second: float = setting(positive_number)
    burst_count: int = setting(integer(1))


@dataclass(frozen=True, kw_only=True)
class RateLimitsConfig:
    enabled: bool = setting(boolean, default=True)
    # Per user for message and joins, per client IP for registration and login.
    message: RateLimit = setting(section(RateLimit), default=RateLimit(per_second=0.2, burst_count=10))
    registration: RateLimit = setting(section(RateLimit), default=RateLimit(per_second=0.17, burst_count=3))
    login: RateLimit = setting(section(RateLimit), default=RateLimit(per_second=0.17, burst_count=3))
    joins: RateLimit = setting(section(RateLimit), default=RateLimit(per_second=0.1, burst_count=10))
    # Per user: URL previews that fetch (answers from the cache are free).
    url_previews: RateLimit = setting(section(RateLimit), default=RateLimit(per_second=0.5, burst_count=10))
    # Per client IP: the email bridge's download and unsubscribe pages
    # (links in mail, opened without an account).
    email_links: RateLimit = setting(section(RateLimit), default=RateLimit(per_second=1.0, burst_count=30))


@dataclass(frozen=True, kw_only=True)
class LimitsConfig:
    max_upload_size: int = setting(integer(1), default=50 * MiB)
    # Bodies of non-upload requests. Below MAX_EVENT_SIZE some valid events
    # could never be sent, so that is the floor.
    max_request_body_size: int = setting(integer(MAX_EVENT_SIZE), default=1 * MiB)

    @property
    def max_event_size(self) -> int:
        return MAX_EVENT_SIZE


def _room_version(value: Any, path: str) -> str:
    # Unquoted "default_room_version: 10" reads as an int in YAML.
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or value not in KNOWN_ROOM_VERSIONS:
        _expected(f"a room version from 1 to {len(KNOWN_ROOM_VERSIONS)}", value, path)
    return value


@dataclass(frozen=True, kw_only=True)
class RoomsConfig:
    default_room_version: str = setting(_room_version, default=DEFAULT_ROOM_VERSION)


@dataclass(frozen=True, kw_only=True)
class UserDirectoryConfig:
    # False: users who share a room with the searcher or are in a public
    # room. True: every active local user as well.
    search_all_users: bool = setting(boolean, default=False)


@dataclass(frozen=True, kw_only=True)
class PresenceConfig:
    # False: presence is neither tracked, served nor sent over federation;
    # every user reads as offline.
    enabled: bool = setting(boolean, default=True)


@dataclass(frozen=True, kw_only=True)
class SyncConfig:
    # A /sync answer is kept this long and answers the same request again
    # (same user, device, since, filter, full_state and timeout: a client
    # that timed out and retries); identical requests in flight share one
    # answer. 0: no cache. Empty answers are never kept.
    response_cache_ms: int = setting(integer(0), default=120_000)
    # The cache's size in bytes of encoded answers (the oldest go first).
    response_cache_max_bytes: int = setting(integer(0), default=32 * MiB)


@dataclass(frozen=True, kw_only=True)
class RetentionConfig:
    # Message retention: message events older than a room's m.room.retention
    # max_lifetime (else default_max_lifetime_ms) lose their content, never
    # below the room's retention floor or under a legal hold.
    enabled: bool = setting(boolean, default=True)
    # None: rooms without an m.room.retention event keep their messages.
    default_max_lifetime_ms: int | None = setting(optional(integer(60_000)), default=None)
    # The shortest max_lifetime a room may ask for.
    min_allowed_lifetime_ms: int = setting(integer(60_000), default=24 * 3600 * 1000)
    purge_interval_ms: int = setting(integer(1000), default=3600 * 1000)
    # Events purged per transaction.
    batch_size: int = setting(integer(1), default=500)


def turn_uri(value: Any, path: str) -> str:
    """A TURN server URI (RFC 7065): "turn:" or "turns:", then host[:port][?transport=...]."""
    text = non_empty_string(value, path)
    if not re.fullmatch(r"turns?:[^\s/?#]+(\?transport=(udp|tcp))?", text):
        raise _Invalid(path, 'expected a TURN URI such as "turn:turn.example.org:3478?transport=udp"')
    return text


@dataclass(frozen=True, kw_only=True)
class VoipConfig:
    # The TURN servers clients are told of (GET /voip/turnServer). None
    # listed: the endpoint answers 404 M_NOT_FOUND, and calls go without
    # relaying.
    turn_uris: tuple[str, ...] = setting(list_of(turn_uri, unique=True), default=())
    # The secret shared with the TURN server (coturn's static-auth-secret):
    # each user gets a username "EXPIRY:USER_ID" and its HMAC-SHA1 as the
    # password, good for turn_user_lifetime_ms. Or a fixed username and
    # password given to every user, when the TURN server has only those.
    turn_shared_secret: str | None = setting(optional(non_empty_string), default=None, secret=True)
    turn_username: str | None = setting(optional(non_empty_string), default=None)
    turn_password: str | None = setting(optional(non_empty_string), default=None, secret=True)
    turn_user_lifetime_ms: int = setting(integer(60_000), default=3600 * 1000)
    # false: guest accounts get no TURN credentials.
    turn_allow_guests: bool = setting(boolean, default=True)

    def _check(self, path: str) -> None:
        if self.turn_shared_secret is not None and (self.turn_username or self.turn_password):
            raise _Invalid(_join(path, "turn_shared_secret"), "give either it or turn_username and turn_password")
        if (self.turn_username is None) != (self.turn_password is None):
            raise _Invalid(_join(path, "turn_password" if self.turn_username else "turn_username"),
                           "turn_username and turn_password go together")
        if self.turn_uris and self.turn_shared_secret is None and self.turn_username is None:
            raise _Invalid(_join(path, "turn_uris"),
                           "needs turn_shared_secret, or turn_username and turn_password")


def _http_url(value: Any, path: str) -> str:
    text = non_empty_string(value, path)
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise _Invalid(path, f"expected an http:// or https:// URL, got {text!r}")
    return text


_SUPPORT_ROLE = re.compile(r"^(m\.role\.(admin|security)|[a-z0-9]+(\.[a-z0-9_-]+)+)$")


@dataclass(frozen=True, kw_only=True)
class SupportContact:
    # m.role.admin or m.role.security, or a namespaced role of your own
    # (e.g. org.example.role.helpdesk).
    role: str = setting(non_empty_string)
    matrix_id: str | None = setting(optional(non_empty_string), default=None)
    email_address: str | None = setting(optional(non_empty_string), default=None)

    def _check(self, path: str) -> None:
        if not _SUPPORT_ROLE.match(self.role):
            raise _Invalid(_join(path, "role"), "expected m.role.admin, m.role.security or a namespaced role")
        if self.matrix_id is None and self.email_address is None:
            raise _Invalid(path, "give matrix_id, email_address or both")
        if self.matrix_id is not None and not re.match(r"^@[^:]+:.+$", self.matrix_id):
            raise _Invalid(_join(path, "matrix_id"), f"not a user ID: {self.matrix_id!r}")
        if self.email_address is not None and "@" not in self.email_address:
            raise _Invalid(_join(path, "email_address"), f"not an email address: {self.email_address!r}")


@dataclass(frozen=True, kw_only=True)
class WellKnownConfig:
    # Keys added to GET /.well-known/matrix/client beside m.homeserver
    # (always public_baseurl) and m.identity_server (when zhome serves one),
    # e.g. {"org.example.client_config": {...}}. They cannot replace those two.
    client_extra: dict[str, Any] = setting(mapping, factory=dict)
    # GET /.well-known/matrix/support: who to contact about this server.
    # Neither set: that endpoint answers 404, as the spec asks.
    support_contacts: tuple[SupportContact, ...] = setting(list_of(section(SupportContact)), default=())
    support_page: str | None = setting(optional(_http_url), default=None)

    def _check(self, path: str) -> None:
        for key in ("m.homeserver", "m.identity_server"):
            if key in self.client_extra:
                raise _Invalid(_join(_join(path, "client_extra"), key), "is set by zhome itself")


def _secret(value: Any, path: str) -> str:
    text = non_empty_string(value, path)
    # These key HMACs over tokens; a short one can be guessed offline.
    if len(text) < 16:
        raise _Invalid(path, "must be at least 16 characters (generate-config makes good ones)")
    return text


@dataclass(frozen=True, kw_only=True)
class SecretsConfig:
    form_secret: str = setting(_secret, secret=True)
    macaroon_secret_key: str = setting(_secret, secret=True)


def region_map(value: Any, path: str) -> dict[str, str]:
    """Server-name globs to region names (for the residency reports)."""
    raw = mapping(value, path)
    out: dict[str, str] = {}
    for k, v in raw.items():
        out[server_glob(k, _join(path, str(k)))] = non_empty_string(v, _join(path, str(k)))
    return out


def server_glob(value: Any, path: str) -> str:
    """A glob over server names ("*.example.org", "matrix.example.com:8448")."""
    text = non_empty_string(value, path)
    if not re.fullmatch(r"[A-Za-z0-9.\-:\[\]*?]+", text):
        raise _Invalid(path, f"expected a server name pattern such as '*.example.org', got {text!r}")
    return text


@dataclass(frozen=True, kw_only=True)
class FederationConfig:
    enabled: bool = setting(boolean, default=False)
    # Check other servers' TLS certificates (against the system CAs plus
    # trusted_ca_files). Turning this off is for local testing only.
    verify_certificates: bool = setting(boolean, default=True)
    # PEM files of extra certificate authorities to trust; relative paths
    # resolve against the config file's directory.
    trusted_ca_files: tuple[str, ...] = setting(list_of(non_empty_string), default=())
    # Server names we talk to (both directions): allowed unless blocked.
    allowed_servers: tuple[str, ...] = setting(list_of(server_glob), default=("*",))
    blocked_servers: tuple[str, ...] = setting(list_of(server_glob), default=())
    # Server-name globs to regions ("*.nl": "EU/NL"), first match wins; the
    # residency reports name each server's region with it.
    regions: dict[str, str] = setting(region_map, factory=dict)
    # Let outbound requests reach loopback, private and other non-global
    # addresses. Off in production: a remote server name must not be a way
    # to reach the internal network (SSRF).
    allow_private_addresses: bool = setting(boolean, default=False)
    # The outbound queue retries a failing server with exponential backoff
    # up to this interval (milliseconds).
    max_retry_interval_ms: int = setting(integer(100, 24 * 3600 * 1000), default=10 * 60 * 1000)


@dataclass(frozen=True, kw_only=True)
class ThumbnailSize:
    width: int = setting(integer(1, 10000))
    height: int = setting(integer(1, 10000))
    method: str = setting(one_of("crop", "scale"))


# The sizes the spec's "Thumbnails" section asks servers to produce.
DEFAULT_THUMBNAIL_SIZES = (
    ThumbnailSize(width=32, height=32, method="crop"),
    ThumbnailSize(width=96, height=96, method="crop"),
    ThumbnailSize(width=320, height=240, method="scale"),
    ThumbnailSize(width=640, height=480, method="scale"),
    ThumbnailSize(width=800, height=600, method="scale"),
)


def host_glob(value: Any, path: str) -> str:
    """A glob over host names or IP literals ("*.example.org", "10.*"), lower-cased."""
    text = non_empty_string(value, path)
    if not re.fullmatch(r"[A-Za-z0-9.\-:*?]+", text):
        raise _Invalid(path, f"expected a host name pattern such as '*.example.org', got {text!r}")
    return text.lower()


@dataclass(frozen=True, kw_only=True)
class UrlPreviewConfig:
    """URL previews (GET /_matrix/client/v1/media/preview_url, zhome/media/preview.py)."""

    # Off by default: a preview makes the server fetch whatever URL a user
    # names.
    enabled: bool = setting(boolean, default=False)
    # Let previews reach loopback, private, link-local, multicast and other
    # non-global addresses (checked on the resolved address of every hop).
    # Off in production: a URL must not be a way into the internal network.
    allow_private_addresses: bool = setting(boolean, default=False)
    # Largest page read (bytes); a longer page is not previewed.
    max_page_bytes: int = setting(integer(1024), default=2 * MiB)
    # The longest one preview may take, page, redirects and image together.
    timeout_ms: int = setting(integer(100, 120_000), default=10_000)
    # How long a preview is answered from memory before the URL is fetched
    # again; 0: never cached.
    cache_ms: int = setting(integer(0), default=3600 * 1000)
    # Hosts never previewed (globs over the URL's host, checked on every hop).
    blocked_hosts: tuple[str, ...] = setting(list_of(host_glob), default=())


@dataclass(frozen=True, kw_only=True)
class MediaConfig:
    # Where encrypted media files live; relative to data_dir. "": data_dir/media.
    store_path: str = setting(string, default="")
    # None: limits.max_upload_size.
    max_upload_size: int | None = setting(optional(integer(1)), default=None)
    # Total bytes of media one local user may upload; None: no quota.
    per_user_quota_bytes: int | None = setting(optional(integer(1)), default=None)
    thumbnail_sizes: tuple[ThumbnailSize, ...] = setting(
        list_of(section(ThumbnailSize), min_items=1), default=DEFAULT_THUMBNAIL_SIZES
    )
    # Make the configured thumbnails of an uploaded image right after the
    # upload, in the background, so a first request reads a ready file.
    thumbnails_on_upload: bool = setting(boolean, default=True)
    # Images with more pixels than this are never decoded (decompression bombs).
    max_image_pixels: int = setting(integer(1), default=32_000_000)
    # Base64 of 32 random bytes; relative to the config file's directory.
    # None: data_dir/media_encryption.key, made on first start of a new database.
    encryption_key_file: str | None = setting(optional(non_empty_string), default=None)
    # Keys from before a rotation that may still wrap some file keys.
    old_encryption_key_files: tuple[str, ...] = setting(list_of(non_empty_string), default=())
    # Asynchronous uploads (POST /media/v1/create) a user may have pending,
    # and how long a created media ID waits for its content.
    max_pending_uploads: int = setting(integer(1), default=10)
    unused_expires_after_ms: int = setting(integer(1000), default=24 * 3600 * 1000)
    # Cached remote media (and thumbnails) not fetched or served for this
    # long is removed; the origin still has it. None: keep it forever.
    remote_cache_max_age_ms: int | None = setting(optional(integer(60_000)), default=90 * 24 * 3600 * 1000)
    # How often expired pending uploads and stale remote media are removed.
    cleanup_interval_ms: int = setting(integer(1000), default=3600 * 1000)
    url_previews: UrlPreviewConfig = setting(section(UrlPreviewConfig), default=UrlPreviewConfig())

    @property
    def effective_max_upload_size(self) -> int:
        assert self.max_upload_size is not None
        return self.max_upload_size


@dataclass(frozen=True, kw_only=True)
class EncryptionConfig:
    # Encryption at rest of event content and user information in the
    # database (AES-256-GCM, zhome/storage/at_rest.py). Off only for
    # comparisons; what was sealed stays readable with it off.
    enabled: bool = setting(boolean, default=True)
    # The master keys (base64, one per line, the first is current); made on
    # first start. Relative to the config file's directory. None:
    # data_dir/data_encryption.key.
    key_file: str | None = setting(optional(non_empty_string), default=None)
    # The key store: a SQLite file holding the data keys, wrapped by the
    # master key. Erasure destroys keys here, so back it up apart from the
    # database and keep those backups briefly. Relative to data_dir. None:
    # data_dir/keystore.db.
    keystore_path: str | None = setting(optional(non_empty_string), default=None)


def _mail_address(value: Any, path: str) -> str:
    """An RFC 5322 mailbox such as "zhome <noreply@example.org>"."""
    import email.utils

    text = non_empty_string(value, path)
    addr = email.utils.parseaddr(text)[1]
    if "@" not in addr or any(c in addr for c in " \r\n"):
        raise _Invalid(path, f"expected a mail address such as 'zhome <noreply@example.org>', got {text!r}")
    return text


@dataclass(frozen=True, kw_only=True)
class EmailConfig:
    """Outbound mail (zhome/mail) and the email 3PID features built on it."""

    # The SMTP relay every mail goes through.
    smtp_host: str = setting(non_empty_string)
    smtp_port: int = setting(integer(1, 65535), default=25)
    # AUTH credentials; none: no AUTH.
    smtp_user: str | None = setting(optional(non_empty_string), default=None)
    smtp_pass: str | None = setting(optional(string), default=None, secret=True)
    # Refuse to send over a connection that is not TLS (STARTTLS or force_tls).
    require_transport_security: bool = setting(boolean, default=False)
    # Implicit TLS from the first byte (port 465) instead of STARTTLS.
    force_tls: bool = setting(boolean, default=False)
    # Check the relay's TLS certificate. false is for test set-ups only.
    verify_certificate: bool = setting(boolean, default=True)
    # PEM file of the CA certificates the relay's certificate is checked
    # against; none: the system's trust store.
    smtp_ca_file: str | None = setting(optional(non_empty_string), default=None)
    timeout_ms: int = setting(integer(1000, 600_000), default=60_000)
    # The From of every mail zhome sends.
    notif_from: str = setting(_mail_address)
    # Named in the mails ("Your %(app_name)s validation code").
    app_name: str = setting(non_empty_string, default="Matrix")
    # How long a mailed validation token stays valid.
    validation_token_lifetime_ms: int = setting(integer(60_000), default=3600 * 1000)
    # Registration asks for a validated email address (m.login.email.identity).
    registration_requires_email: bool = setting(boolean, default=False)
    # Users may add and remove email addresses themselves.
    enable_3pid_changes: bool = setting(boolean, default=True)
    # /account/password/email/requestToken for an address no account has:
    # false answers M_THREEPID_NOT_FOUND (the spec's answer), true answers
    # as if a mail was sent, so the endpoint does not tell which addresses
    # have accounts.
    hide_unknown_password_reset_addresses: bool = setting(boolean, default=False)
    # The outbox retries a failed mail after this delay, doubling each time
    # up to outbox_max_backoff_ms.
    outbox_min_backoff_ms: int = setting(integer(100), default=5000)
    outbox_max_backoff_ms: int = setting(integer(1000), default=3600 * 1000)
    # Email notifications of missed messages (zhome/push/email_notify.py): a
    # notification still unread this long after it came is mailed, in one
    # mail per user at most every notif_min_interval_ms.
    notif_delay_ms: int = setting(integer(0), default=10 * 60 * 1000)
    notif_min_interval_ms: int = setting(integer(0), default=3600 * 1000)


@dataclass(frozen=True, kw_only=True)
class IdentityServiceConfig:
    """The Identity Service API zhome serves itself (zhome/identity)."""

    enabled: bool = setting(boolean, default=False)
    # The pepper of hashed lookups; none: one is made on first start and kept
    # in the database.
    lookup_pepper: str | None = setting(optional(non_empty_string), default=None, secret=True)
    # Where invitation mails send the invitee to (a web client).
    invite_client_location: str = setting(base_url, default="https://app.element.io/")


def host_port(value: Any, path: str) -> str:
    """``host:port`` of a listening socket or a server, e.g. 127.0.0.1:2525
    or [::1]:2525 (the host an IP literal or a DNS name)."""
    text = non_empty_string(value, path)
    bad = _Invalid(path, f"expected host:port such as '127.0.0.1:2525', got {text!r}")
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad from None
    else:
        host, sep, port = text.rpartition(":")
        if not _DNS_NAME.fullmatch(host or "-"):
            raise bad
    if not sep or not host or not (_PORT.fullmatch(port) and 1 <= int(port) <= 65535):
        raise bad
    return text


def split_host_port(text: str) -> tuple[str, int]:
    """The host (without IPv6 brackets) and port of a checked ``host:port``."""
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


_MAIL_DOMAIN = re.compile(r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                          r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")
_LOCALPART = re.compile(r"[a-z0-9._=/+-]+")


def mail_domain(value: Any, path: str) -> str:
    text = non_empty_string(value, path)
    if not _MAIL_DOMAIN.fullmatch(text):
        raise _Invalid(path, f"expected a domain name such as 'mail.example.org', got {text!r}")
    return text.lower()


def user_localpart(value: Any, path: str) -> str:
    text = non_empty_string(value, path)
    if not _LOCALPART.fullmatch(text):
        raise _Invalid(path, f"expected a user ID localpart (a-z, 0-9, ._=/+-), got {text!r}")
    return text


def _bridge_database_url(value: Any, path: str) -> str:
    text = non_empty_string(value, path)
    parse_database_url(text, path)  # checked now: a typo stops start-up, not the bridge later
    return text


@dataclass(frozen=True, kw_only=True)
class EmailBridgeConfig:
    """The email bridge (zhome/bridges/email): an application service that
    posts mail into rooms. It talks to the homeserver only over HTTP."""

    enabled: bool = setting(boolean, default=False)
    # The domain of room addresses (LOCALPART@mail_domain) and reply
    # addresses (reply+TOKEN@mail_domain). Required when enabled.
    mail_domain: str | None = setting(optional(mail_domain), default=None)
    smtp_listen: str = setting(host_port, default="127.0.0.1:2525")
    # LMTP (RFC 2033) for a local MTA to hand mail over; none: no LMTP.
    lmtp_listen: str | None = setting(optional(host_port), default=None)
    # STARTTLS on the SMTP listener with this certificate (PEM, full chain)
    # and key; relative to data_dir. None: no STARTTLS offered.
    tls_certificate_path: str | None = setting(optional(non_empty_string), default=None)
    tls_private_key_path: str | None = setting(optional(non_empty_string), default=None)
    # Mail larger than this is refused (552), announced with SIZE.
    max_mail_size: int = setting(integer(1024), default=25 * MiB)
    # Resolvers for sender checks (host:port); empty: the system's.
    dns_servers: tuple[str, ...] = setting(list_of(host_port), default=())
    # Per-sender rate limit of inbound mail (token bucket per envelope
    # sender, per accepted RCPT TO): over it, 451 4.7.1 and the sender retries.
    sender_rate_per_minute: int = setting(integer(1), default=30)
    sender_burst: int = setting(integer(1), default=20)
    # The same per connecting client IP (an MTA in front shares one IP).
    client_ip_rate_per_minute: int = setting(integer(1), default=300)
    client_ip_burst: int = setting(integer(1), default=100)
    # Outbound: mail to email participants waits this long for more messages.
    quiet_period_ms: int = setting(integer(0), default=120_000)
    # The bridge's own listener for the homeserver's AS transactions; keep
    # it on loopback.
    appservice_listen: str = setting(host_port, default="127.0.0.1:9025")
    # Where the bridge reaches the homeserver's client API. None: the first
    # client listener on loopback.
    homeserver_url: str | None = setting(optional(base_url), default=None)
    # The bridge's own SQLite database (never the homeserver's tables);
    # relative to data_dir. None: data_dir/email_bridge.db.
    database_path: str | None = setting(optional(non_empty_string), default=None)
    # Or a PostgreSQL database of the bridge's own (postgresql://user@host/db,
    # as the top-level database_url; never the homeserver's database).
    database_url: str | None = setting(optional(_bridge_database_url), default=None, secret=True)
    # The bridge's registration, written on first start and loaded by the
    # homeserver like any app_service_config_files entry; relative to
    # data_dir. None: data_dir/email_bridge_registration.yaml.
    registration_file: str | None = setting(optional(non_empty_string), default=None)
    sender_localpart: str = setting(user_localpart, default="emailbot")
    # Ghost users are @<ghost_prefix>...:server_name (exclusive namespace).
    ghost_prefix: str = setting(user_localpart, default="email_")
    # zhome run starts the bridge in its own process; false: run it with
    # zhome bridge-email.
    in_process: bool = setting(boolean, default=True)
    # Outbound: files up to this size (bytes) are attached to the mail;
    # larger ones (and any beyond max_attachments_total per mail) are sent
    # as a signed download link served by zhome.
    max_attachment_size: int = setting(integer(0), default=10 * MiB)
    max_attachments_total: int = setting(integer(0), default=20 * MiB)
    # How long such a download link stays valid.
    download_link_lifetime_ms: int = setting(integer(60_000), default=7 * 24 * 3600 * 1000)
    # DKIM signing of outbound mail (RFC 6376): a PEM private key (RSA or
    # Ed25519) and its selector; the signing domain is the From address's.
    # None: mail goes out unsigned.
    dkim_key_path: str | None = setting(optional(non_empty_string), default=None)
    dkim_selector: str = setting(non_empty_string, default="zhome")

    def _check(self, path: str) -> None:
        if self.enabled and self.mail_domain is None:
            raise _Invalid(_join(path, "mail_domain"), "required when enabled is true")
        if (self.tls_certificate_path is None) != (self.tls_private_key_path is None):
            raise _Invalid(_join(path, "tls_private_key_path" if self.tls_certificate_path else "tls_certificate_path"),
                           "tls_certificate_path and tls_private_key_path go together")
        if self.database_url is not None and self.database_path is not None:
            raise _Invalid(_join(path, "database_url"), "give either database_path or database_url, not both")


@dataclass(frozen=True, kw_only=True)
class HomeserverConfig:
    server_name: str = setting(server_name)
    # Always set after loading: derived from the first client listener when
    # the file leaves it out. Ends with "/".
    public_baseurl: str = setting(base_url, default="")
    signing_key_path: str = setting(non_empty_string)
    data_dir: str = setting(non_empty_string, default=".")
    # The operator's admin socket (mode 0600; ``zhome admin`` connects to it
    # and acts as a server admin without a token); relative to data_dir;
    # "" turns it off. A UNIX socket path must stay under 100 bytes.
    admin_socket_path: str = setting(string, default="admin.sock")
    log_level: str = setting(one_of("DEBUG", "INFO", "WARNING", "ERROR", ignore_case=True), default="INFO")
    log_file: str | None = setting(optional(non_empty_string), default=None)
    log_format: str = setting(one_of("text", "json"), default="text")
    listeners: tuple[ListenerConfig, ...] = setting(_listeners)
    # The default is made absolute against data_dir after loading.
    database: DatabaseConfig = setting(
        _database, factory=lambda: DatabaseConfig("sqlite3", {"database": "homeserver.db"})
    )
    registration: RegistrationConfig = setting(section(RegistrationConfig), default=RegistrationConfig())
    password_hashing: PasswordHashingConfig = setting(
        section(PasswordHashingConfig), default=PasswordHashingConfig()
    )
    access_tokens: AccessTokensConfig = setting(section(AccessTokensConfig), default=AccessTokensConfig())
    rate_limits: RateLimitsConfig = setting(section(RateLimitsConfig), default=RateLimitsConfig())
    limits: LimitsConfig = setting(section(LimitsConfig), default=LimitsConfig())
    rooms: RoomsConfig = setting(section(RoomsConfig), default=RoomsConfig())
    user_directory: UserDirectoryConfig = setting(section(UserDirectoryConfig), default=UserDirectoryConfig())
    presence: PresenceConfig = setting(section(PresenceConfig), default=PresenceConfig())
    sync: SyncConfig = setting(section(SyncConfig), default=SyncConfig())
    retention: RetentionConfig = setting(section(RetentionConfig), default=RetentionConfig())
    voip: VoipConfig = setting(section(VoipConfig), default=VoipConfig())
    well_known: WellKnownConfig = setting(section(WellKnownConfig), default=WellKnownConfig())
    secrets: SecretsConfig = setting(section(SecretsConfig))
    federation: FederationConfig = setting(section(FederationConfig), default=FederationConfig())
    media: MediaConfig = setting(section(MediaConfig), default=MediaConfig())
    encryption: EncryptionConfig = setting(section(EncryptionConfig), default=EncryptionConfig())
    # Outbound mail; absent: no mail (and no email 3PIDs).
    email: EmailConfig | None = setting(optional(section(EmailConfig)), default=None)
    identity_service: IdentityServiceConfig = setting(section(IdentityServiceConfig),
                                                      default=IdentityServiceConfig())
    email_bridge: EmailBridgeConfig = setting(section(EmailBridgeConfig), default=EmailBridgeConfig())
    # PEM certificate (chain) and private key for listeners with tls: true.
    tls_certificate_path: str | None = setting(optional(non_empty_string), default=None)
    tls_private_key_path: str | None = setting(optional(non_empty_string), default=None)
    # Application service registration files (Synapse's YAML format, see
    # zhome/appservice/registration.py); relative to the config file's
    # directory. A broken file stops start-up.
    app_service_config_files: tuple[str, ...] = setting(list_of(non_empty_string), default=())
    # Not a YAML key: the absolute path of the file this came from.
    config_path: str = ""


# ---------------------------------------------------------------------------
# Loading.


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (PyYAML keeps the last silently)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} at line {mark.line + 1}", mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _resolve(path: str, base: str) -> str:
    return os.path.abspath(os.path.join(base, os.path.expanduser(path)))


def parse_config(text: str, path: str) -> HomeserverConfig:
    """Parse and validate YAML ``text`` as if read from the file ``path``."""
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(path, "", f"invalid YAML{where}: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(path, "", f"expected a mapping of options at the top level, got {_describe(raw)}")
    raw = dict(raw)
    try:
        database_url = raw.pop("database_url", None)
        if database_url is not None and "database" in raw:
            raise _Invalid("database_url", "give either database or database_url, not both")
        config = _build(HomeserverConfig, raw, "")
        _check_tls(config)
        if database_url is not None:
            config = dataclasses.replace(config, database=parse_database_url(database_url))
    except _Invalid as e:
        raise ConfigError(path, e.path, e.problem) from None
    return _finish(config, os.path.abspath(path))


def _check_tls(config: HomeserverConfig) -> None:
    tls_listeners = [i for i, lst in enumerate(config.listeners) if lst.tls]
    if not tls_listeners:
        return
    for key in ("tls_certificate_path", "tls_private_key_path"):
        if getattr(config, key) is None:
            raise _Invalid(key, f"required because listeners[{tls_listeners[0]}] has tls: true")


def _finish(config: HomeserverConfig, config_path: str) -> HomeserverConfig:
    """Resolve relative paths and derive the defaults that depend on others."""
    config_dir = os.path.dirname(config_path)
    data_dir = _resolve(config.data_dir, config_dir)
    database = config.database
    if database.engine == "sqlite3" and database.args["database"] != ":memory:":
        database = DatabaseConfig("sqlite3", {"database": _resolve(database.args["database"], data_dir)})
    public_baseurl = config.public_baseurl
    if not public_baseurl:
        client = next(lst for lst in config.listeners if lst.type == "http" and "client" in lst.resources)
        public_baseurl = f"http://127.0.0.1:{client.port}/"
    return dataclasses.replace(
        config,
        public_baseurl=public_baseurl,
        signing_key_path=_resolve(config.signing_key_path, config_dir),
        data_dir=data_dir,
        admin_socket_path=_resolve(config.admin_socket_path, data_dir) if config.admin_socket_path else "",
        log_file=_resolve(config.log_file, config_dir) if config.log_file else None,
        tls_certificate_path=(
            _resolve(config.tls_certificate_path, config_dir) if config.tls_certificate_path else None
        ),
        tls_private_key_path=(
            _resolve(config.tls_private_key_path, config_dir) if config.tls_private_key_path else None
        ),
        federation=dataclasses.replace(
            config.federation,
            trusted_ca_files=tuple(_resolve(p, config_dir) for p in config.federation.trusted_ca_files),
        ),
        database=database,
        app_service_config_files=tuple(_resolve(p, config_dir) for p in config.app_service_config_files),
        media=_finish_media(config, config_dir, data_dir),
        email_bridge=dataclasses.replace(
            config.email_bridge,
            database_path=_resolve(config.email_bridge.database_path or "email_bridge.db", data_dir),
            registration_file=_resolve(config.email_bridge.registration_file or "email_bridge_registration.yaml",
                                       data_dir),
            homeserver_url=config.email_bridge.homeserver_url or _loopback_client_url(config),
            tls_certificate_path=(_resolve(config.email_bridge.tls_certificate_path, data_dir)
                                  if config.email_bridge.tls_certificate_path else None),
            tls_private_key_path=(_resolve(config.email_bridge.tls_private_key_path, data_dir)
                                  if config.email_bridge.tls_private_key_path else None),
        ),
        encryption=dataclasses.replace(
            config.encryption,
            key_file=(_resolve(config.encryption.key_file, config_dir) if config.encryption.key_file
                      else os.path.join(data_dir, "data_encryption.key")),
            keystore_path=_resolve(config.encryption.keystore_path or "keystore.db", data_dir),
        ),
        config_path=config_path,
    )


def _loopback_client_url(config: HomeserverConfig) -> str:
    client = next(lst for lst in config.listeners if lst.type == "http" and "client" in lst.resources)
    return f"{'https' if client.tls else 'http'}://127.0.0.1:{client.port}/"


def _finish_media(config: HomeserverConfig, config_dir: str, data_dir: str) -> MediaConfig:
    media = config.media
    return dataclasses.replace(
        media,
        store_path=_resolve(media.store_path or "media", data_dir),
        max_upload_size=media.max_upload_size or config.limits.max_upload_size,
        encryption_key_file=(
            _resolve(media.encryption_key_file, config_dir) if media.encryption_key_file
            else os.path.join(data_dir, "media_encryption.key")
        ),
        old_encryption_key_files=tuple(_resolve(p, config_dir) for p in media.old_encryption_key_files),
    )


def load_config(path: str) -> HomeserverConfig:
    """Read and validate the YAML file at ``path``; ConfigError when invalid."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(path, "", f"cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(path, "", "not UTF-8 text") from None
    return parse_config(text, path)
