"""Tests for zhome.config (loading, validation) and the config-related CLI."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest
import yaml

from zhome.cli import main
from zhome.config import ConfigError, HomeserverConfig, load_config

SAMPLE = Path(__file__).resolve().parent.parent / "config" / "homeserver.sample.yaml"

MINIMAL = {
    "server_name": "example.org",
    "signing_key_path": "example.org.signing.key",
    "listeners": [{"port": 8008, "type": "http"}],
    "secrets": {"form_secret": "f" * 20, "macaroon_secret_key": "m" * 20},
}


def write(tmp_path: Path, raw: dict, name: str = "homeserver.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def load_raw(tmp_path: Path, **changes: object) -> HomeserverConfig:
    raw = dict(MINIMAL)
    raw.update(changes)
    return load_config(write(tmp_path, raw))


def error_for(tmp_path: Path, raw: dict) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, raw))
    text = str(info.value)
    assert "\n" not in text
    return text


def with_changes(**changes: object) -> dict:
    raw = dict(MINIMAL)
    raw.update(changes)
    return raw


def generate(tmp_path: Path, *extra: str) -> tuple[int, str]:
    path = str(tmp_path / "conf" / "homeserver.yaml")
    rc = main(["generate-config", "--server-name", "example.org", "--config-path", path, *extra])
    return rc, path


# ---------------------------------------------------------------------------
# generate-config


def test_generate_config_writes_loadable_config_and_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, path = generate(tmp_path, "--port", "9008")
    assert rc == 0
    config = load_config(path)
    conf_dir = str(tmp_path / "conf")
    assert config.server_name == "example.org"
    assert config.listeners[0].port == 9008
    assert config.listeners[0].bind_addresses == ("127.0.0.1",)
    assert config.listeners[0].resources == ("client",)
    assert config.public_baseurl == "http://127.0.0.1:9008/"
    assert config.signing_key_path == os.path.join(conf_dir, "example.org.signing.key")
    assert os.path.exists(config.signing_key_path)
    assert config.database.engine == "sqlite3"
    assert config.database.args == {"database": os.path.join(conf_dir, "homeserver.db")}
    assert len(config.secrets.macaroon_secret_key) >= 32
    assert config.secrets.form_secret != config.secrets.macaroon_secret_key
    # Secrets: owner-only.
    assert os.stat(path).st_mode & 0o077 == 0
    out = capsys.readouterr().out
    assert f"Wrote the configuration to {path}" in out


def test_generate_config_key_file_name_is_sanitised(tmp_path: Path) -> None:
    path = str(tmp_path / "hs.yaml")
    assert main(["generate-config", "--server-name", "example.org:8448", "-c", path]) == 0
    assert load_config(path).signing_key_path == str(tmp_path / "example.org_8448.signing.key")


def test_generate_config_data_dir(tmp_path: Path) -> None:
    data = tmp_path / "data"
    rc, path = generate(tmp_path, "--data-dir", str(data))
    assert rc == 0
    config = load_config(path)
    assert config.data_dir == str(data)
    assert config.database.args["database"] == str(data / "homeserver.db")
    assert data.is_dir()


def test_generate_config_with_database_url(tmp_path: Path) -> None:
    rc, path = generate(tmp_path, "--database-url", "postgresql://zhome@db.internal:5433/zhome")
    assert rc == 0
    config = load_config(path)
    assert config.database.engine == "psycopg2"
    assert config.database.args == {
        "database": "zhome",
        "host": "db.internal",
        "port": 5433,
        "user": "zhome",
        "cp_min": 5,
        "cp_max": 10,
    }


def test_generate_config_mail_flags_turn_the_email_bridge_on(tmp_path: Path) -> None:
    rc, path = generate(tmp_path, "--mail-domain", "mail.example.org", "--smtp-port", "2626",
                        "--smtp-relay", "relay.example.org:587")
    assert rc == 0
    config = load_config(path)
    bridge = config.email_bridge
    assert bridge.enabled and bridge.mail_domain == "mail.example.org"
    assert bridge.smtp_listen == "127.0.0.1:2626"
    assert config.email is not None
    assert (config.email.smtp_host, config.email.smtp_port) == ("relay.example.org", 587)
    assert config.email.notif_from == "example.org <noreply@mail.example.org>"
    assert config.identity_service.enabled
    # The registration zhome run loads is written, tokens owner-only.
    assert bridge.registration_file is not None
    reg = yaml.safe_load(Path(bridge.registration_file).read_text())
    assert reg["id"] == "zhome-email-bridge" and len(reg["as_token"]) >= 32
    assert os.stat(bridge.registration_file).st_mode & 0o077 == 0
    # Written again: the tokens stay (the server already trusts them).
    assert main(["generate-config", "--server-name", "example.org", "--config-path", path, "--force",
                 "--mail-domain", "mail.example.org"]) == 0
    assert yaml.safe_load(Path(bridge.registration_file).read_text())["as_token"] == reg["as_token"]
    assert load_config(path).email_bridge.smtp_listen == "127.0.0.1:2525"


def test_generate_config_without_mail_flags_leaves_the_bridge_off(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    rc, path = generate(tmp_path)
    assert rc == 0
    config = load_config(path)
    assert not config.email_bridge.enabled and config.email is None and not config.identity_service.enabled
    assert not (tmp_path / "conf" / "email_bridge_registration.yaml").exists()
    rc2 = main(["generate-config", "--server-name", "example.org", "-c", str(tmp_path / "b.yaml"),
                "--smtp-relay", "127.0.0.1:25"])
    assert rc2 == 1
    assert "--smtp-port and --smtp-relay need --mail-domain" in capsys.readouterr().err
    assert not (tmp_path / "b.yaml").exists()


def test_generate_config_rejects_bad_server_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "hs.yaml"
    assert main(["generate-config", "--server-name", "not a name", "-c", str(path)]) == 1
    err = capsys.readouterr().err
    assert "server_name: 'not a name' is not a valid server name" in err
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_generate_config_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, path = generate(tmp_path)
    assert rc == 0
    before = Path(path).read_text()
    capsys.readouterr()
    rc, _ = generate(tmp_path)
    assert rc == 1
    err = capsys.readouterr().err
    assert err.strip() == f"zhome generate-config: {path} already exists; use --force to overwrite it"
    assert Path(path).read_text() == before


def test_generate_config_force_overwrites_but_keeps_key(tmp_path: Path) -> None:
    rc, path = generate(tmp_path)
    key_path = load_config(path).signing_key_path
    key_before = Path(key_path).read_text()
    secret_before = load_config(path).secrets.macaroon_secret_key
    rc, _ = generate(tmp_path, "--force", "--enable-registration")
    assert rc == 0
    config = load_config(path)
    assert config.registration.enable_registration is True
    assert config.secrets.macaroon_secret_key != secret_before
    assert Path(key_path).read_text() == key_before


def test_registration_off_by_default_and_on_with_flag(tmp_path: Path) -> None:
    rc, path = generate(tmp_path / "a")
    assert rc == 0
    assert load_config(path).registration.enable_registration is False
    rc, path = generate(tmp_path / "b", "--enable-registration")
    assert rc == 0
    assert load_config(path).registration.enable_registration is True
    # And off when the key is left out of a hand-written file.
    assert load_raw(tmp_path).registration.enable_registration is False


# ---------------------------------------------------------------------------
# Loading


def test_sample_config_loads() -> None:
    config = load_config(str(SAMPLE))
    assert config.server_name == "example.org"
    assert config.database.engine == "sqlite3"
    assert config.rooms.default_room_version == "12"
    # Documented with its default: off.
    assert config.registration.allow_guest_access is False
    assert config.presence.enabled is True


def test_defaults(tmp_path: Path) -> None:
    config = load_raw(tmp_path)
    assert config.log_level == "INFO"
    assert config.log_file is None
    assert config.data_dir == str(tmp_path)
    assert config.listeners[0].tls is False
    assert config.listeners[0].x_forwarded is False
    assert config.registration.registration_shared_secret is None
    assert config.registration.registration_requires_token is False
    assert config.registration.allow_guest_access is False
    assert config.password_hashing.scheme == "argon2"
    assert config.access_tokens.lifetime_ms is None
    assert config.access_tokens.refresh_tokens is True
    assert config.rate_limits.enabled is True
    assert (config.rate_limits.message.per_second, config.rate_limits.message.burst_count) == (0.2, 10)
    assert (config.rate_limits.registration.per_second, config.rate_limits.registration.burst_count) == (0.17, 3)
    assert (config.rate_limits.login.per_second, config.rate_limits.login.burst_count) == (0.17, 3)
    assert (config.rate_limits.joins.per_second, config.rate_limits.joins.burst_count) == (0.1, 10)
    assert config.limits.max_upload_size == 50 * 1024 * 1024
    assert config.limits.max_request_body_size == 1024 * 1024
    assert config.limits.max_event_size == 65536
    assert config.rooms.default_room_version == "12"
    assert config.federation.enabled is False
    assert config.presence.enabled is True


def test_partial_rate_limit_keeps_other_default(tmp_path: Path) -> None:
    config = load_raw(tmp_path, rate_limits={"login": {"burst_count": 7}})
    assert config.rate_limits.login.burst_count == 7
    assert config.rate_limits.login.per_second == 0.17
    assert config.rate_limits.message.burst_count == 10


def test_relative_paths_resolve_against_config_dir(tmp_path: Path) -> None:
    sub = tmp_path / "etc"
    sub.mkdir()
    raw = with_changes(
        signing_key_path="keys/server.key",
        data_dir="../var",
        log_file="logs/hs.log",
        database={"name": "sqlite3", "args": {"database": "db/hs.db"}},
    )
    config = load_config(write(sub, raw))
    assert config.signing_key_path == str(sub / "keys" / "server.key")
    assert config.data_dir == str(tmp_path / "var")
    assert config.log_file == str(sub / "logs" / "hs.log")
    # The database is relative to data_dir, not to the config file.
    assert config.database.args["database"] == str(tmp_path / "var" / "db" / "hs.db")


def test_absolute_paths_kept(tmp_path: Path) -> None:
    config = load_raw(tmp_path, signing_key_path="/etc/zhome/key", data_dir="/srv/zhome")
    assert config.signing_key_path == "/etc/zhome/key"
    assert config.database.args["database"] == "/srv/zhome/homeserver.db"


def test_sqlite_memory_database_not_resolved(tmp_path: Path) -> None:
    config = load_raw(tmp_path, database={"name": "sqlite3", "args": {"database": ":memory:"}})
    assert config.database.args == {"database": ":memory:"}


def test_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    raw = with_changes(registration={"enable_registraton": True})
    text = error_for(tmp_path, raw)
    assert text == (
        f"{tmp_path / 'homeserver.yaml'}: registration.enable_registraton: "
        "unknown key (did you mean 'enable_registration'?)"
    )


def test_unknown_top_level_key(tmp_path: Path) -> None:
    text = error_for(tmp_path, with_changes(colour="blue"))
    assert text.endswith("homeserver.yaml: colour: unknown key")


def test_wrong_type(tmp_path: Path) -> None:
    raw = with_changes(listeners=[{"port": "abc", "type": "http"}])
    assert error_for(tmp_path, raw).endswith("homeserver.yaml: listeners[0].port: expected an integer, got 'abc'")
    raw = with_changes(registration={"enable_registration": "yes please"})
    assert error_for(tmp_path, raw).endswith(
        "registration.enable_registration: expected true or false, got 'yes please'"
    )
    raw = with_changes(rate_limits={"message": {"per_second": "fast"}})
    assert error_for(tmp_path, raw).endswith("rate_limits.message.per_second: expected a number, got 'fast'")
    raw = with_changes(rooms=["12"])
    assert error_for(tmp_path, raw).endswith("rooms: expected a mapping, got a list")


def test_bool_is_not_an_integer(tmp_path: Path) -> None:
    raw = with_changes(listeners=[{"port": True, "type": "http"}])
    assert error_for(tmp_path, raw).endswith("listeners[0].port: expected an integer, got true")


def test_missing_server_name(tmp_path: Path) -> None:
    raw = dict(MINIMAL)
    del raw["server_name"]
    assert error_for(tmp_path, raw).endswith("homeserver.yaml: server_name: required but missing")


def test_missing_nested_required(tmp_path: Path) -> None:
    raw = with_changes(listeners=[{"port": 8008}])
    assert error_for(tmp_path, raw).endswith("listeners[0].type: required but missing")
    raw = with_changes(secrets={"form_secret": "f" * 20})
    assert error_for(tmp_path, raw).endswith("secrets.macaroon_secret_key: required but missing")


@pytest.mark.parametrize(
    "name",
    ["example.org", "example.org:8448", "1.2.3.4", "1.2.3.4:80", "[::1]", "[1234:5678::abcd]:8448", "localhost"],
)
def test_valid_server_names(tmp_path: Path, name: str) -> None:
    assert load_raw(tmp_path, server_name=name).server_name == name


@pytest.mark.parametrize(
    "name", ["", "exa mple.org", "example.org:", "example.org:99999", "::1", "[::1", "[nothost]:80", "1.2.3.999", "ex_ample.org"]
)
def test_invalid_server_names(tmp_path: Path, name: str) -> None:
    text = error_for(tmp_path, with_changes(server_name=name))
    assert f"server_name: {name!r} is not a valid server name" in text


def test_bad_port(tmp_path: Path) -> None:
    raw = with_changes(listeners=[{"port": 70000, "type": "http"}])
    assert error_for(tmp_path, raw).endswith("listeners[0].port: must be between 1 and 65535, got 70000")
    raw = with_changes(listeners=[{"port": 0, "type": "http"}])
    assert error_for(tmp_path, raw).endswith("listeners[0].port: must be between 1 and 65535, got 0")


def test_listener_rules(tmp_path: Path) -> None:
    raw = with_changes(listeners=[{"port": 9090, "type": "metrics"}])
    assert error_for(tmp_path, raw).endswith(
        "listeners: needs at least one http listener with the 'client' resource"
    )
    raw = with_changes(listeners=[{"port": 8008, "type": "http", "resources": ["federation"]}])
    assert error_for(tmp_path, raw).endswith(
        "listeners: needs at least one http listener with the 'client' resource"
    )
    raw = with_changes(listeners=[])
    assert error_for(tmp_path, raw).endswith("listeners: needs at least 1 item(s)")
    raw = with_changes(listeners=[{"port": 8008, "type": "http", "resources": ["client", "telepathy"]}])
    assert error_for(tmp_path, raw).endswith(
        "listeners[0].resources[1]: expected one of 'client', 'federation', 'media', got 'telepathy'"
    )
    raw = with_changes(listeners=[{"port": 8008, "type": "http", "bind_addresses": ["localhost"]}])
    assert "listeners[0].bind_addresses[0]: expected an IP address" in error_for(tmp_path, raw)
    raw = with_changes(listeners=[{"port": 8008, "type": "http"}, {"port": 8008, "type": "metrics"}])
    assert error_for(tmp_path, raw).endswith(
        "listeners[1].port: 127.0.0.1:8008 is already used by listeners[0]"
    )


def test_public_baseurl_from_first_client_listener(tmp_path: Path) -> None:
    config = load_raw(
        tmp_path,
        listeners=[
            {"port": 9090, "type": "metrics"},
            {"port": 8448, "type": "http", "resources": ["federation"]},
            {"port": 8009, "type": "http", "resources": ["client", "media"]},
        ],
    )
    assert config.public_baseurl == "http://127.0.0.1:8009/"
    config = load_raw(tmp_path, public_baseurl="https://matrix.example.org")
    assert config.public_baseurl == "https://matrix.example.org/"
    raw = with_changes(public_baseurl="matrix.example.org")
    assert "public_baseurl: expected an http:// or https:// URL" in error_for(tmp_path, raw)


def test_database_url_parsed_into_psycopg2_args(tmp_path: Path) -> None:
    config = load_raw(tmp_path, database_url="postgresql://alice:s%40cret@db.example.org:5432/synapse_db")
    assert config.database.engine == "psycopg2"
    assert config.database.args == {
        "database": "synapse_db",
        "host": "db.example.org",
        "port": 5432,
        "user": "alice",
        "password": "s@cret",
        "cp_min": 5,
        "cp_max": 10,
    }
    assert "s@cret" not in repr(config)
    config = load_raw(tmp_path, database_url="postgres:///zhome?sslmode=require&cp_min=2&cp_max=4")
    assert config.database.args == {"database": "zhome", "sslmode": "require", "cp_min": 2, "cp_max": 4}


def test_database_url_errors(tmp_path: Path) -> None:
    raw = with_changes(database_url="mysql://u:p@h/db")
    assert error_for(tmp_path, raw).endswith("database_url: expected a postgresql:// URL")
    raw = with_changes(database_url="postgresql://u:hunter2@h:notaport/db")
    text = error_for(tmp_path, raw)
    assert text.endswith("database_url: the port is not a number between 1 and 65535")
    assert "hunter2" not in text
    raw = with_changes(database_url="postgresql://h/")
    assert "database_url: expected the database name after the host" in error_for(tmp_path, raw)
    raw = with_changes(database_url="postgresql://h/db", database={"name": "sqlite3"})
    assert error_for(tmp_path, raw).endswith("database_url: give either database or database_url, not both")


def test_psycopg2_section(tmp_path: Path) -> None:
    config = load_raw(
        tmp_path,
        database={"name": "psycopg2", "args": {"dbname": "zhome", "user": "zhome", "cp_max": 20}},
    )
    assert config.database.engine == "psycopg2"
    assert config.database.args == {"database": "zhome", "user": "zhome", "cp_min": 5, "cp_max": 20}
    raw = with_changes(database={"name": "psycopg2", "args": {"host": "h"}})
    assert error_for(tmp_path, raw).endswith("database.args.database: required but missing")
    raw = with_changes(database={"name": "psycopg2", "args": {"database": "d", "cp_min": 8, "cp_max": 4}})
    assert error_for(tmp_path, raw).endswith("database.args.cp_max: must be at least cp_min (8), got 4")
    raw = with_changes(database={"name": "psycopg2", "args": {"database": "d", "password": 12345}})
    text = error_for(tmp_path, raw)
    assert text.endswith("database.args.password: expected a string (value hidden)")
    assert "12345" not in text
    raw = with_changes(database={"name": "sqlite3", "args": {"host": "h"}})
    assert error_for(tmp_path, raw).endswith("database.args.host: unknown key")
    raw = with_changes(database={"name": "mysql"})
    assert error_for(tmp_path, raw).endswith("database.name: expected one of 'sqlite3', 'psycopg2', got 'mysql'")


def test_value_checks(tmp_path: Path) -> None:
    raw = with_changes(log_level="LOUD")
    assert "log_level: expected one of 'DEBUG', 'INFO', 'WARNING', 'ERROR', got 'LOUD'" in error_for(tmp_path, raw)
    assert load_raw(tmp_path, log_level="debug").log_level == "DEBUG"
    raw = with_changes(rooms={"default_room_version": "13"})
    assert error_for(tmp_path, raw).endswith("rooms.default_room_version: expected a room version from 1 to 12, got '13'")
    # Unquoted YAML numbers are accepted as version strings.
    assert load_raw(tmp_path, rooms={"default_room_version": 10}).rooms.default_room_version == "10"
    raw = with_changes(limits={"max_request_body_size": 1000})
    assert error_for(tmp_path, raw).endswith("limits.max_request_body_size: must be at least 65536, got 1000")
    raw = with_changes(rate_limits={"joins": {"per_second": 0}})
    assert error_for(tmp_path, raw).endswith("rate_limits.joins.per_second: must be greater than 0, got 0")
    raw = with_changes(secrets={"form_secret": "short", "macaroon_secret_key": "m" * 20})
    assert error_for(tmp_path, raw).endswith(
        "secrets.form_secret: must be at least 16 characters (generate-config makes good ones)"
    )
    raw = with_changes(password_hashing={"scheme": "md5"})
    assert "password_hashing.scheme: expected one of 'argon2', 'bcrypt'" in error_for(tmp_path, raw)
    raw = with_changes(password_hashing={"argon2_time_cost": 0})
    assert "password_hashing.argon2_time_cost" in error_for(tmp_path, raw)
    raw = with_changes(password_hashing={"argon2_memory_kib": 4})
    assert "password_hashing.argon2_memory_kib" in error_for(tmp_path, raw)


def test_empty_section_takes_defaults(tmp_path: Path) -> None:
    path = tmp_path / "homeserver.yaml"
    path.write_text(yaml.safe_dump(MINIMAL) + "registration:\nrate_limits:\n")
    config = load_config(str(path))
    assert config.registration.enable_registration is False
    assert config.rate_limits.message.burst_count == 10


def test_file_level_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(str(missing))
    assert str(info.value) == f"{missing}: cannot read: No such file or directory"

    bad = tmp_path / "bad.yaml"
    bad.write_text("server_name: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(bad))
    assert str(info.value).startswith(f"{bad}: invalid YAML at line 2")

    dup = tmp_path / "dup.yaml"
    dup.write_text(yaml.safe_dump(MINIMAL) + "server_name: other.org\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(dup))
    assert "duplicate key 'server_name'" in str(info.value)

    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(scalar))
    assert str(info.value) == f"{scalar}: expected a mapping of options at the top level, got 'just a string'"


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load_raw(tmp_path)
    with pytest.raises(AttributeError):
        config.server_name = "other.org"  # type: ignore[misc]
    assert "m" * 20 not in repr(config)


# ---------------------------------------------------------------------------
# run and register-user


def test_run_reports_config_error_on_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, with_changes(listeners=[{"port": "abc", "type": "http"}]))
    assert main(["run", "-c", path]) == 1
    err = capsys.readouterr().err
    assert err == f"{path}: listeners[0].port: expected an integer, got 'abc'\n"


def test_run_calls_server_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[HomeserverConfig] = []
    fake = types.ModuleType("zhome.server")
    fake.run = lambda config: seen.append(config)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "zhome.server", fake)
    monkeypatch.setattr("zhome.server", fake, raising=False)
    path = write(tmp_path, MINIMAL)
    assert main(["run", "--config-path", path]) == 0
    assert seen and seen[0].server_name == "example.org"


def _fake_admin_tasks(monkeypatch: pytest.MonkeyPatch, calls: list[tuple[str, str, bool]]) -> None:
    def register_user(config: HomeserverConfig, username: str, password: str, admin: bool) -> str:
        calls.append((username, password, admin))
        return f"@{username}:{config.server_name}"

    fake = types.ModuleType("zhome.admin_tasks")
    fake.register_user = register_user  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "zhome.admin_tasks", fake)
    monkeypatch.setattr("zhome.admin_tasks", fake, raising=False)


def test_register_user_with_password_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[tuple[str, str, bool]] = []
    _fake_admin_tasks(monkeypatch, calls)
    pw = tmp_path / "pw"
    pw.write_text("correct horse\nignored\n")
    path = write(tmp_path, MINIMAL)
    assert main(["register-user", "-c", path, "alice", "--admin", "--password-file", str(pw)]) == 0
    assert calls == [("alice", "correct horse", True)]
    assert capsys.readouterr().out == "@alice:example.org\n"


def test_register_user_prompts_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[tuple[str, str, bool]] = []
    _fake_admin_tasks(monkeypatch, calls)
    answers = iter(["pw1", "pw2"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    path = write(tmp_path, MINIMAL)
    assert main(["register-user", "-c", path, "bob"]) == 1
    assert capsys.readouterr().err == "zhome register-user: the passwords do not match\n"
    assert calls == []
    answers = iter(["same", "same"])
    assert main(["register-user", "-c", path, "bob"]) == 0
    assert calls == [("bob", "same", False)]


# ---------------------------------------------------------------------------
# Federation and TLS


def test_federation_defaults(tmp_path: Path) -> None:
    fed = load_raw(tmp_path).federation
    assert fed.enabled is False
    assert fed.verify_certificates is True
    assert fed.trusted_ca_files == ()
    assert fed.allowed_servers == ("*",)
    assert fed.blocked_servers == ()
    assert fed.allow_private_addresses is False
    config = load_raw(tmp_path)
    assert config.tls_certificate_path is None and config.tls_private_key_path is None


def test_federation_options(tmp_path: Path) -> None:
    config = load_raw(
        tmp_path,
        federation={
            "enabled": True, "verify_certificates": False, "trusted_ca_files": ["ca/extra.pem", "/etc/ca.pem"],
            "allowed_servers": ["*.example.org", "[::1]:8448"], "blocked_servers": ["bad.example.org"],
            "allow_private_addresses": True,
        },
    )
    fed = config.federation
    assert fed.trusted_ca_files == (str(tmp_path / "ca" / "extra.pem"), "/etc/ca.pem")
    assert fed.allowed_servers == ("*.example.org", "[::1]:8448")
    assert fed.blocked_servers == ("bad.example.org",)
    assert fed.verify_certificates is False and fed.allow_private_addresses is True
    raw = with_changes(federation={"blocked_servers": ["bad server"]})
    assert "federation.blocked_servers[0]: expected a server name pattern" in error_for(tmp_path, raw)
    raw = with_changes(federation={"verify_certificates": "no"})
    assert error_for(tmp_path, raw).endswith("federation.verify_certificates: expected true or false, got 'no'")
    raw = with_changes(federation={"allow_loopback": True})
    assert "federation.allow_loopback: unknown key" in error_for(tmp_path, raw)


def test_tls_listener_needs_certificate_and_key(tmp_path: Path) -> None:
    listeners = [{"port": 8008, "type": "http"},
                 {"port": 8448, "type": "http", "resources": ["federation"], "tls": True}]
    raw = with_changes(listeners=listeners)
    assert error_for(tmp_path, raw).endswith("tls_certificate_path: required because listeners[1] has tls: true")
    raw = with_changes(listeners=listeners, tls_certificate_path="tls.crt")
    assert error_for(tmp_path, raw).endswith("tls_private_key_path: required because listeners[1] has tls: true")
    config = load_raw(tmp_path, listeners=listeners, tls_certificate_path="tls.crt",
                      tls_private_key_path="/etc/tls.key")
    assert config.tls_certificate_path == str(tmp_path / "tls.crt")
    assert config.tls_private_key_path == "/etc/tls.key"
    assert config.listeners[1].tls is True


def test_generate_config_self_signed_federation(tmp_path: Path) -> None:
    from cryptography import x509
    import ipaddress

    path = str(tmp_path / "hs.yaml")
    rc = main(["generate-config", "--server-name", "127.0.0.5:28448", "-c", path, "--port", "28008",
               "--federation-port", "28448", "--self-signed-tls"])
    assert rc == 0
    config = load_config(path)
    fed_listener = config.listeners[1]
    assert (fed_listener.port, fed_listener.bind_addresses, fed_listener.resources, fed_listener.tls) == (
        28448, ("127.0.0.5",), ("federation",), True)
    assert config.federation.enabled is True
    assert config.federation.verify_certificates is False
    assert config.federation.allow_private_addresses is True
    assert config.tls_certificate_path == str(tmp_path / "127.0.0.5_28448.tls.crt")
    assert os.stat(config.tls_private_key_path).st_mode & 0o077 == 0
    cert = x509.load_pem_x509_certificate(Path(config.tls_certificate_path).read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.5")]


def test_generate_config_self_signed_dns_name(tmp_path: Path) -> None:
    from cryptography import x509

    rc, path = generate(tmp_path, "--federation-port", "8448", "--self-signed-tls")
    assert rc == 0
    config = load_config(path)
    assert config.listeners[1].bind_addresses == ("127.0.0.1",)
    cert = x509.load_pem_x509_certificate(Path(config.tls_certificate_path).read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["example.org"]


def test_generate_config_federation_port_without_certificate(tmp_path: Path) -> None:
    rc, path = generate(tmp_path, "--federation-port", "8448")
    assert rc == 0
    config = load_config(path)
    # Certificate checks stay on; the operator supplies the certificate.
    assert config.federation.enabled is True
    assert config.federation.verify_certificates is True
    assert config.federation.allow_private_addresses is False
    assert config.listeners[1].tls is True
    assert config.tls_certificate_path is not None and not os.path.exists(config.tls_certificate_path)
    # Without either flag, no federation listener and federation off.
    rc, path = generate(tmp_path / "plain")
    config = load_config(path)
    assert len(config.listeners) == 1 and config.federation.enabled is False
    assert config.tls_certificate_path is None


def test_media_section(tmp_path: Path) -> None:
    config = load_raw(tmp_path)
    media = config.media
    assert media.store_path == str(tmp_path / "media")
    assert media.max_upload_size == config.limits.max_upload_size
    assert media.per_user_quota_bytes is None
    assert [(s.width, s.height, s.method) for s in media.thumbnail_sizes][:2] == [(32, 32, "crop"), (96, 96, "crop")]
    assert media.encryption_key_file == str(tmp_path / "media_encryption.key")

    config = load_raw(tmp_path, media={
        "store_path": "/srv/media", "max_upload_size": 1000, "encryption_key_file": "keys/m.key",
        "old_encryption_key_files": ["old.key"], "thumbnail_sizes": [{"width": 10, "height": 20, "method": "scale"}],
    })
    assert config.media.store_path == "/srv/media"
    assert config.media.max_upload_size == 1000
    assert config.media.encryption_key_file == str(tmp_path / "keys" / "m.key")
    assert config.media.old_encryption_key_files == (str(tmp_path / "old.key"),)
    assert "media.thumbnail_sizes[0].method" in error_for(
        tmp_path, with_changes(media={"thumbnail_sizes": [{"width": 1, "height": 1, "method": "zoom"}]}))
    assert "media.max_image_pixels" in error_for(tmp_path, with_changes(media={"max_image_pixels": 0}))


def test_media_cleanup_settings(tmp_path: Path) -> None:
    media = load_raw(tmp_path).media
    assert media.remote_cache_max_age_ms == 90 * 24 * 3600 * 1000
    assert media.cleanup_interval_ms == 3600 * 1000
    media = load_raw(tmp_path, media={"remote_cache_max_age_ms": None, "cleanup_interval_ms": 1000}).media
    assert (media.remote_cache_max_age_ms, media.cleanup_interval_ms) == (None, 1000)
    assert load_raw(tmp_path, media={"remote_cache_max_age_ms": 60_000}).media.remote_cache_max_age_ms == 60_000
    text = error_for(tmp_path, with_changes(media={"remote_cache_max_age_ms": 59_999}))
    assert "media.remote_cache_max_age_ms" in text and "at least 60000" in text
    assert "media.cleanup_interval_ms" in error_for(tmp_path, with_changes(media={"cleanup_interval_ms": 999}))
    assert "media.cleanup_interval_ms" in error_for(tmp_path, with_changes(media={"cleanup_interval_ms": None}))
    # The sample documents them with their defaults.
    sample = load_config(str(SAMPLE)).media
    assert (sample.remote_cache_max_age_ms, sample.cleanup_interval_ms) == (
        media.__class__().remote_cache_max_age_ms, media.__class__().cleanup_interval_ms)


def test_generate_config_writes_media_key(tmp_path: Path) -> None:
    code, _ = generate(tmp_path)
    assert code == 0
    config = load_config(str(tmp_path / "conf" / "homeserver.yaml"))
    key = config.media.encryption_key_file
    assert key is not None and os.path.exists(key)
    assert oct(os.stat(key).st_mode & 0o777) == "0o600"


def test_voip_section(tmp_path: Path) -> None:
    assert load_raw(tmp_path).voip.turn_uris == ()
    config = load_raw(tmp_path, voip={
        "turn_uris": ["turn:turn.example.org:3478?transport=udp", "turns:turn.example.org:5349"],
        "turn_shared_secret": "s3cret-shared-with-coturn", "turn_user_lifetime_ms": 600_000})
    assert config.voip.turn_uris == ("turn:turn.example.org:3478?transport=udp", "turns:turn.example.org:5349")
    assert config.voip.turn_user_lifetime_ms == 600_000
    assert "s3cret" not in repr(config.voip)
    fixed = load_raw(tmp_path, voip={"turn_uris": ["turn:10.0.0.1"], "turn_username": "u", "turn_password": "p"})
    assert (fixed.voip.turn_username, fixed.voip.turn_password) == ("u", "p")

    def err(voip: dict) -> str:
        return error_for(tmp_path, {**MINIMAL, "voip": voip})

    assert "voip.turn_uris[0]" in err({"turn_uris": ["https://turn.example.org"], "turn_shared_secret": "x"})
    assert "expected a TURN URI" in err({"turn_uris": ["turn:"], "turn_shared_secret": "x"})
    assert "voip.turn_uris: needs turn_shared_secret" in err({"turn_uris": ["turn:t.example.org"]})
    both = err({"turn_uris": ["turn:t"], "turn_shared_secret": "x", "turn_username": "u", "turn_password": "p"})
    assert "voip.turn_shared_secret: give either" in both and "'x'" not in both
    assert "turn_username and turn_password go together" in err({"turn_uris": ["turn:t"], "turn_username": "u"})
    assert "voip.turn_user_lifetime_ms" in err({"turn_user_lifetime_ms": 5})


def test_app_service_config_files(tmp_path: Path) -> None:
    assert load_raw(tmp_path).app_service_config_files == ()
    config = load_raw(tmp_path, app_service_config_files=["bridges/irc.yaml", "/etc/zhome/mail.yaml"])
    assert config.app_service_config_files == (str(tmp_path / "bridges" / "irc.yaml"), "/etc/zhome/mail.yaml")
    assert "app_service_config_files" in error_for(tmp_path, with_changes(app_service_config_files="irc.yaml"))
    assert "app_service_config_files[0]" in error_for(tmp_path, with_changes(app_service_config_files=[""]))
    text = error_for(tmp_path, with_changes(app_service_config_file=["irc.yaml"]))
    assert "app_service_config_file: unknown key" in text and "app_service_config_files" in text
    # Documented in the sample (the sytest driver looks for it there).
    assert "app_service_config_files:" in SAMPLE.read_text()


def test_email_and_identity_service_sections(tmp_path: Path) -> None:
    plain = load_raw(tmp_path)
    assert plain.email is None and plain.identity_service.enabled is False
    config = load_raw(tmp_path, email={"smtp_host": "smtp.example.org", "smtp_port": 587, "smtp_user": "zhome",
                                       "smtp_pass": "relay-s3cret", "require_transport_security": True,
                                       "notif_from": "Example <noreply@example.org>"},
                      identity_service={"enabled": True, "lookup_pepper": "pepper-s3cret"})
    email = config.email
    assert email is not None and (email.smtp_host, email.smtp_port, email.smtp_user) == ("smtp.example.org", 587,
                                                                                          "zhome")
    assert email.require_transport_security and not email.force_tls and email.verify_certificate
    assert email.validation_token_lifetime_ms == 3600 * 1000 and email.enable_3pid_changes
    assert "relay-s3cret" not in repr(config) and "pepper-s3cret" not in repr(config)
    assert config.identity_service.enabled and config.identity_service.lookup_pepper == "pepper-s3cret"

    def err(section: dict) -> str:
        return error_for(tmp_path, {**MINIMAL, "email": section})

    assert "email.smtp_host: required but missing" in err({"notif_from": "a@example.org"})
    assert "email.notif_from: required but missing" in err({"smtp_host": "h"})
    assert "email.notif_from: expected a mail address" in err({"smtp_host": "h", "notif_from": "nobody"})
    assert "email.smtp_port" in err({"smtp_host": "h", "notif_from": "a@example.org", "smtp_port": 0})
    assert "email.smtp_pass" in err({"smtp_host": "h", "notif_from": "a@example.org", "smtp_pass": 12345})
    assert "12345" not in err({"smtp_host": "h", "notif_from": "a@example.org", "smtp_pass": 12345})
    assert "did you mean 'smtp_host'" in err({"smtp_hots": "h", "notif_from": "a@example.org"})
    assert "identity_service.enabled" in error_for(tmp_path, {**MINIMAL, "identity_service": {"enabled": "yes"}})


# ---------------------------------------------------------------------------
# The email bridge


def test_email_bridge_defaults_off(tmp_path: Path) -> None:
    bridge = load_raw(tmp_path).email_bridge
    assert bridge.enabled is False
    assert (bridge.smtp_listen, bridge.lmtp_listen, bridge.max_mail_size, bridge.quiet_period_ms) == (
        "127.0.0.1:2525", None, 25 * 1024 * 1024, 120_000)
    # Its own files in data_dir, never the homeserver's database.
    assert bridge.database_path == str(tmp_path / "email_bridge.db")
    assert bridge.registration_file == str(tmp_path / "email_bridge_registration.yaml")
    assert bridge.homeserver_url is not None and bridge.homeserver_url.startswith("http://127.0.0.1:")
    assert load_config(str(SAMPLE)).email_bridge.enabled is False


def test_email_bridge_errors_name_the_key(tmp_path: Path) -> None:
    raw = dict(MINIMAL, email_bridge={"enabled": True, "mail_domian": "m.example.org"})
    assert error_for(tmp_path, raw).endswith(
        "email_bridge.mail_domian: unknown key (did you mean 'mail_domain'?)")
    raw = dict(MINIMAL, email_bridge={"enabled": True})
    assert error_for(tmp_path, raw).endswith("email_bridge.mail_domain: required when enabled is true")
    raw = dict(MINIMAL, email_bridge={"smtp_listen": "127.0.0.1"})
    assert "email_bridge.smtp_listen: expected host:port" in error_for(tmp_path, raw)
    raw = dict(MINIMAL, email_bridge={"dns_servers": ["[::1]:53", "nope:99999"]})
    assert "email_bridge.dns_servers[1]: expected host:port" in error_for(tmp_path, raw)
    raw = dict(MINIMAL, email_bridge={"max_mail_size": 10})
    assert "email_bridge.max_mail_size: must be at least 1024" in error_for(tmp_path, raw)
    ok = load_raw(tmp_path, email_bridge={"enabled": True, "mail_domain": "Mail.Example.org",
                                          "lmtp_listen": "[::1]:2526"}).email_bridge
    assert (ok.mail_domain, ok.lmtp_listen) == ("mail.example.org", "[::1]:2526")


def test_argon2_cost_applies_to_new_hashes_and_old_ones_still_check() -> None:
    from zhome.util import passwords

    old = passwords.hash_password("correct horse")
    try:
        passwords.configure(1, 64)
        cheap = passwords.hash_password("correct horse")
        assert "m=64,t=1" in cheap and "m=7168,t=5" in old
        assert passwords.check_password("correct horse", cheap)
        assert passwords.check_password("correct horse", old)
        assert not passwords.check_password("wrong", cheap)
    finally:
        passwords.configure(5, 7168)
    assert "m=7168,t=5" in passwords.hash_password("x")


def test_well_known_section(tmp_path: Path) -> None:
    config = load_raw(tmp_path)
    assert config.well_known.support_contacts == () and config.well_known.support_page is None
    config = load_raw(tmp_path, well_known={
        "client_extra": {"org.example.x": 1},
        "support_contacts": [{"role": "m.role.admin", "matrix_id": "@a:example.org"}],
        "support_page": "https://example.org/help"})
    assert config.well_known.support_contacts[0].matrix_id == "@a:example.org"
    assert config.well_known.support_page == "https://example.org/help"

    def err(section: dict) -> str:
        return error_for(tmp_path, {**MINIMAL, "well_known": section})

    assert "well_known.support_contacts[0]: give matrix_id" in err({"support_contacts": [{"role": "m.role.admin"}]})
    assert "support_contacts[0].role" in err({"support_contacts": [{"role": "boss", "email_address": "a@b.c"}]})
    assert "support_contacts[0].matrix_id" in err({"support_contacts": [{"role": "m.role.admin",
                                                                         "matrix_id": "alice"}]})
    assert "well_known.support_page" in err({"support_page": "ftp://example.org"})
    assert "client_extra.m.homeserver: is set by zhome" in err({"client_extra": {"m.homeserver": {}}})


def test_login_token_settings(tmp_path: Path) -> None:
    assert load_raw(tmp_path).access_tokens.login_token_lifetime_ms == 120_000
    assert "access_tokens.login_token_lifetime_ms" in error_for(
        tmp_path, {**MINIMAL, "access_tokens": {"login_token_lifetime_ms": 5}})


def test_bcrypt_scheme_makes_bcrypt_hashes_and_both_kinds_check(tmp_path: Path) -> None:
    import bcrypt

    from zhome.util import passwords

    argon = passwords.hash_password("correct horse")
    # A hash as another server made it (full-length password, library default cost).
    imported = bcrypt.hashpw(b"battery staple", bcrypt.gensalt(rounds=4)).decode()
    assert passwords.check_password("battery staple", imported)
    assert not passwords.check_password("battery stapler", imported)
    assert not passwords.check_password("x", "$2b$04$not-a-real-hash")
    try:
        passwords.configure(5, 7168, "bcrypt", 4)
        made = passwords.hash_password("correct horse")
        assert made.startswith("$2b$04$"), made
        assert passwords.check_password("correct horse", made)
        assert passwords.check_password("correct horse", argon)
        assert not passwords.check_password("correct hors", made)
        # Past bcrypt's 72 bytes: cut the same way both ways, never an error.
        long_pw = "é" * 50
        assert passwords.check_password(long_pw, passwords.hash_password(long_pw))
    finally:
        passwords.configure(5, 7168)
    assert passwords.hash_password("x").startswith("$argon2id$")
    assert "password_hashing.bcrypt_rounds" in error_for(tmp_path, with_changes(
        password_hashing={"bcrypt_rounds": 3}))


def test_email_bridge_database_url(tmp_path: Path) -> None:
    base = {"enabled": True, "mail_domain": "mail.example.org"}
    cfg = load_raw(tmp_path, email_bridge={**base, "database_url": "postgresql://zhome@127.0.0.1:5432/bridge"})
    assert cfg.email_bridge.database_url == "postgresql://zhome@127.0.0.1:5432/bridge"
    assert "email_bridge.database_url" in error_for(tmp_path, with_changes(
        email_bridge={**base, "database_url": "mysql://nope"}))
    assert "give either database_path or database_url" in error_for(tmp_path, with_changes(
        email_bridge={**base, "database_url": "postgresql://a@b/c", "database_path": "x.db"}))
    # It may hold a password: never shown.
    secret = load_raw(tmp_path, email_bridge={**base, "database_url": "postgresql://u:hunter2@127.0.0.1/b"})
    assert "hunter2" not in repr(secret.email_bridge)


def test_url_previews_section(tmp_path: Path) -> None:
    previews = load_raw(tmp_path).media.url_previews
    # Off, and never to private addresses, unless asked for.
    assert previews.enabled is False
    assert previews.allow_private_addresses is False
    assert (previews.max_page_bytes, previews.timeout_ms, previews.cache_ms) == (2 * 1024 * 1024, 10_000, 3_600_000)
    changed = load_raw(tmp_path, media={"url_previews": {
        "enabled": True, "allow_private_addresses": True, "max_page_bytes": 4096, "timeout_ms": 500,
        "cache_ms": 0}}).media.url_previews
    assert (changed.enabled, changed.allow_private_addresses, changed.max_page_bytes, changed.timeout_ms,
            changed.cache_ms) == (True, True, 4096, 500, 0)
    # A partial section keeps the other defaults.
    assert load_raw(tmp_path, media={"url_previews": {"enabled": True}}).media.url_previews.cache_ms == 3_600_000
    assert "media.url_previews.enabled" in error_for(tmp_path, with_changes(media={"url_previews": {"enabled": "yes"}}))
    assert "media.url_previews.max_page_bytes" in error_for(
        tmp_path, with_changes(media={"url_previews": {"max_page_bytes": 10}}))
    assert "media.url_previews.timeout_ms" in error_for(
        tmp_path, with_changes(media={"url_previews": {"timeout_ms": 0}}))
    assert "media.url_previews.cache_ms" in error_for(tmp_path, with_changes(media={"url_previews": {"cache_ms": -1}}))
    assert "media.url_previews.enable" in error_for(tmp_path, with_changes(media={"url_previews": {"enable": True}}))
    assert previews.blocked_hosts == ()
    assert load_raw(tmp_path, media={"url_previews": {"blocked_hosts": ["*.Example.org", "10.*", "::1"]}}).media \
        .url_previews.blocked_hosts == ("*.example.org", "10.*", "::1")
    assert "media.url_previews.blocked_hosts[1]" in error_for(
        tmp_path, with_changes(media={"url_previews": {"blocked_hosts": ["ok.example", "http://x/"]}}))
    limit = load_raw(tmp_path).rate_limits.url_previews
    assert (limit.per_second, limit.burst_count) == (0.5, 10)
    # The sample documents them with their defaults.
    sample = load_config(str(SAMPLE))
    assert sample.media.url_previews == previews.__class__()
    assert sample.rate_limits.url_previews == limit
