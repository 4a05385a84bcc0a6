"""The ``zhome`` command: run the server, generate a config, admin tasks.

Subcommands:

* ``generate-config``: write a complete, loadable configuration with a fresh
  signing key and fresh secrets.
* ``run``: load the configuration and start the homeserver.
* ``register-user``: create a local account from the command line.
* ``admin verify-audit`` and ``admin export-audit``: check the audit log's hash
  chain (failing, naming the first bad entry), and write it as JSON lines.
* ``admin erase-user``, ``admin export-user``, ``admin deactivate-user``,
  ``admin rotate-encryption-key``, ``admin encryption-status`` and ``admin call``:
  the admin API of the running server through its operator socket, without a token.

Every failure the operator can fix is reported as one line on stderr with a
non-zero exit code, never as a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import json
import os
import re
import secrets
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from zhome.config import ConfigError, HomeserverConfig, load_config, parse_config

if TYPE_CHECKING:
    import http.client


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be between 1 and 65535, got {port}")
    return port


def _host_port_arg(text: str) -> str:
    from zhome.config import split_host_port

    try:
        host, port = split_host_port(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}") from None
    if not host or not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zhome", description="zhome, a Matrix homeserver.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = commands.add_parser("generate-config", help="write a new configuration file and signing key")
    gen.add_argument("--server-name", required=True, help="the server name in user IDs, e.g. example.org")
    gen.add_argument("--config-path", "-c", required=True, help="where to write the YAML configuration")
    gen.add_argument("--data-dir", help="where the server keeps its data [the config file's directory]")
    gen.add_argument("--port", type=_port, default=8008, help="client listener port on 127.0.0.1 [8008]")
    gen.add_argument("--database-url", help="postgresql://user@host:port/db instead of SQLite")
    gen.add_argument("--enable-registration", action="store_true", help="let anyone register an account")
    gen.add_argument("--force", action="store_true", help="overwrite an existing configuration file")
    gen.add_argument(
        "--federation-port", type=_port,
        help="add a TLS federation listener on this port (on the server name's IP if it is an IP "
        "literal, else 127.0.0.1)",
    )
    gen.add_argument(
        "--self-signed-tls", action="store_true",
        help="make a self-signed certificate for the server name and turn federation on without "
        "certificate checks and with private addresses allowed: for local testing only",
    )
    gen.add_argument(
        "--mail-domain",
        help="turn the email bridge on for this mail domain (room addresses NAME@DOMAIN), with the "
        "identity service for invitations by email; without it the bridge stays off",
    )
    gen.add_argument("--smtp-port", type=_port,
                     help="the bridge's inbound SMTP listener on 127.0.0.1 [2525]; needs --mail-domain")
    gen.add_argument("--smtp-relay", type=_host_port_arg,
                     help="HOST:PORT of the SMTP relay outbound mail goes through [127.0.0.1:25]; "
                     "needs --mail-domain")

    run = commands.add_parser("run", help="start the homeserver")
    run.add_argument("--config-path", "-c", required=True, help="the YAML configuration")

    be = commands.add_parser("bridge-email", help="run the email bridge (email_bridge section) in its own process")
    be.add_argument("--config-path", "-c", required=True, help="the YAML configuration")
    be_cmds = be.add_subparsers(dest="bridge_command", metavar="COMMAND")
    bq = be_cmds.add_parser("quarantine", help="mail held by the sender checks: list, release or delete")
    bq.add_argument("action", choices=("list", "release", "delete"))
    bq.add_argument("mail_id", nargs="?", type=int, metavar="ID", help="the held mail (release, delete)")

    reg = commands.add_parser("register-user", help="create a local user")
    reg.add_argument("--config-path", "-c", required=True, help="the YAML configuration")
    reg.add_argument("username", metavar="USERNAME", help="localpart of the new user")
    reg.add_argument("--admin", action="store_true", help="make the user a server admin")
    reg.add_argument("--password-file", help="read the password from the first line of this file")

    rot = commands.add_parser("rotate-media-key", help="re-wrap every media file key under a new media key")
    rot.add_argument("--config-path", "-c", required=True, help="the YAML configuration")
    rot.add_argument("--new-key-file", required=True, help="the new key (made if it does not exist)")
    sk = commands.add_parser("rotate-signing-key",
                             help="replace the server's signing key, keeping the old one's verify key")
    sk.add_argument("--config-path", "-c", required=True, help="the YAML configuration")

    adm = commands.add_parser("admin", help="operator tasks on the server's data")
    tasks = adm.add_subparsers(dest="task", required=True)
    va = tasks.add_parser("verify-audit", help="check the audit log's hash chain; fails naming the first bad entry")
    va.add_argument("--config-path", "-c", required=True, help="the YAML configuration")
    ea = tasks.add_parser("export-audit", help="write the audit log as JSON lines")
    ea.add_argument("--config-path", "-c", required=True, help="the YAML configuration")
    ea.add_argument("--out", help="file to write (default: standard output)")
    eu = tasks.add_parser("erase-user", help="erase a user (GDPR art. 17) through the running server; "
                                             "prints the erasure report")
    eu.add_argument("--config-path", "-c", required=True, help="the YAML configuration")
    eu.add_argument("user_id", metavar="USER_ID")
    xu = tasks.add_parser("export-user", help="write everything the server holds about a user (GDPR art. 15 "
                                              "and 20) to a ZIP file, through the running server")
    xu.add_argument("--config-path", "-c", required=True, help="the YAML configuration")
    xu.add_argument("user_id", metavar="USER_ID")
    xu.add_argument("--out", required=True, help="the ZIP file to write (replaced only when the export is complete)")
    du = tasks.add_parser("deactivate-user", help="deactivate a user through the running server")
    du.add_argument("--config-path", "-c", required=True, help="the YAML configuration")
    du.add_argument("user_id", metavar="USER_ID")
    rk = tasks.add_parser("rotate-encryption-key",
                          help="a new master key for data at rest, applied by the running server without downtime")
    rk.add_argument("--config-path", "-c", required=True, help="the YAML configuration")
    es = tasks.add_parser("encryption-status", help="the running server's key store: master keys, data keys")
    es.add_argument("--config-path", "-c", required=True, help="the YAML configuration")
    call = tasks.add_parser("call", help="call any admin endpoint of the running server as the operator")
    call.add_argument("--config-path", "-c", required=True, help="the YAML configuration")
    call.add_argument("method", metavar="METHOD", help="GET, PUT, POST or DELETE")
    call.add_argument("path", metavar="PATH", help="e.g. /_synapse/admin/v2/users")
    call.add_argument("--body", help="the JSON request body")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        # argparse exits on --help and on usage errors; callers want a code.
        return e.code if isinstance(e.code, int) else 2
    if args.command == "generate-config":
        return _generate_config(args)
    if args.command == "run":
        return _run(args)
    if args.command == "bridge-email":
        return _bridge_email(args)
    if args.command == "rotate-media-key":
        return _rotate_media_key(args)
    if args.command == "rotate-signing-key":
        return _rotate_signing_key(args)
    if args.command == "admin":
        return _admin(args)
    return _register_user(args)


def _error(command: str, message: str) -> int:
    print(f"zhome {command}: {message}", file=sys.stderr)
    return 1


def _load(path: str) -> HomeserverConfig | None:
    try:
        return load_config(path)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return None


# ---------------------------------------------------------------------------
# generate-config


def _key_file_name(server_name: str) -> str:
    # Server names may hold ":" and "[]" (port, IPv6), which are awkward or
    # invalid in file names.
    return re.sub(r"[^A-Za-z0-9._-]", "_", server_name) + ".signing.key"


def _q(value: object) -> str:
    """A YAML scalar for ``value``: JSON strings are valid YAML and quote safely."""
    return json.dumps(value)


def _render_config(
    *,
    server_name: str,
    data_dir: str,
    key_file: str,
    port: int,
    database_url: str | None,
    enable_registration: bool,
    form_secret: str,
    macaroon_secret_key: str,
    federation_port: int | None = None,
    federation_bind: str = "127.0.0.1",
    tls_files: tuple[str, str] | None = None,
    self_signed_tls: bool = False,
    media_key_file: str = "media_encryption.key",
    mail_domain: str | None = None,
    smtp_port: int = 2525,
    smtp_relay: str = "127.0.0.1:25",
) -> str:
    if database_url:
        database = f"database_url: {_q(database_url)}\n"
    else:
        database = (
            "database:\n"
            "  name: sqlite3\n"
            "  args:\n"
            "    # Relative to data_dir.\n"
            '    database: "homeserver.db"\n'
        )
    federation_listener = ""
    if federation_port is not None:
        federation_listener = f"""
  # Server-Server API over TLS.
  - port: {federation_port}
    bind_addresses: [{_q(federation_bind)}]
    type: http
    resources: [federation]
    tls: true
    x_forwarded: false
"""
    tls = ""
    if tls_files is not None:
        note = (
            "# A self-signed certificate from generate-config --self-signed-tls: other servers\n"
            "# only accept it with certificate checks off. Replace it with a CA-signed one\n"
            "# for real federation.\n"
            if self_signed_tls
            else "# Put the certificate (full chain, leaf first) and its key here.\n"
        )
        tls = (
            f"{note}tls_certificate_path: {_q(tls_files[0])}\n"
            f"tls_private_key_path: {_q(tls_files[1])}\n\n"
        )
    if self_signed_tls:
        federation = (
            "federation:\n"
            "  enabled: true\n"
            "  # For local testing only: accept any certificate and reach loopback and\n"
            "  # private addresses. Never use these two settings in production.\n"
            "  verify_certificates: false\n"
            "  allow_private_addresses: true\n"
            "  trusted_ca_files: []\n"
            '  allowed_servers: ["*"]\n'
            "  blocked_servers: []\n"
        )
    else:
        federation = (
            "federation:\n"
            f"  enabled: {'true' if federation_port is not None else 'false'}\n"
            "  verify_certificates: true\n"
            "  allow_private_addresses: false\n"
            "  trusted_ca_files: []\n"
            '  allowed_servers: ["*"]\n'
            "  blocked_servers: []\n"
        )
    mail = ""
    if mail_domain is not None:
        relay_host, _, relay_port = smtp_relay.rpartition(":")
        mail = f"""
# Outbound mail: invitations, validation codes and the email bridge's mail
# go through this relay (STARTTLS when it offers it). See the sample config
# for AUTH and implicit TLS.
email:
  smtp_host: {_q(relay_host.strip("[]"))}
  smtp_port: {int(relay_port)}
  notif_from: {_q(f"{server_name} <noreply@{mail_domain}>")}

# Invitations by email (an Identity Service of zhome's own).
identity_service:
  enabled: true

# The email bridge: mail to a room's address (NAME@{mail_domain}) is posted
# into the room, and room messages are mailed to people taking part by mail.
# Point the MX of {mail_domain} (or a local MTA over LMTP) at smtp_listen.
email_bridge:
  enabled: true
  mail_domain: {_q(mail_domain)}
  smtp_listen: {_q(f"127.0.0.1:{smtp_port}")}
  # Room messages wait this long for more before one mail goes out.
  quiet_period_ms: 120000
"""
    return f"""\
# zhome configuration, written by `zhome generate-config`.
# config/homeserver.sample.yaml in the zhome source documents every option.
# This file holds secrets: keep it readable by the server's user only.

# The name in user IDs (@alice:NAME) and room aliases. Cannot change later.
server_name: {_q(server_name)}

# Relative to this file's directory. The key is the server's identity to
# other servers: back it up, never share it.
signing_key_path: {_q(key_file)}

data_dir: {_q(data_dir)}

log_level: INFO

listeners:
  - port: {port}
    bind_addresses: ["127.0.0.1"]
    type: http
    resources: [client]
    tls: false
    x_forwarded: false
{federation_listener}
{tls}{database}
registration:
  enable_registration: {"true" if enable_registration else "false"}
  registration_requires_token: false
  # Guest accounts (POST /register?kind=guest); see the sample config.
  allow_guest_access: false

password_hashing:
  scheme: argon2

access_tokens:
  # null: access tokens do not expire.
  lifetime_ms: null
  refresh_tokens: true

rate_limits:
  enabled: true
  message: {{per_second: 0.2, burst_count: 10}}
  registration: {{per_second: 0.17, burst_count: 3}}
  login: {{per_second: 0.17, burst_count: 3}}
  joins: {{per_second: 0.1, burst_count: 10}}

limits:
  max_upload_size: 52428800
  max_request_body_size: 1048576

rooms:
  default_room_version: "12"

media:
  # Encrypted media files; relative to data_dir.
  store_path: "media"
  # Total bytes of uploads per user; null: no quota.
  per_user_quota_bytes: null
  max_image_pixels: 32000000
  # AES-256 key (base64) that wraps every media file's own key. Without it
  # no stored media can be read: back it up, apart from the media store.
  encryption_key_file: {_q(media_key_file)}
  old_encryption_key_files: []

# Random per server; changing them invalidates issued tokens.
secrets:
  form_secret: {_q(form_secret)}
  macaroon_secret_key: {_q(macaroon_secret_key)}

{federation}{mail}"""


def _generate_config(args: argparse.Namespace) -> int:
    from zhome.crypto.keys import new_signing_key, write_signing_key_file

    config_path = os.path.abspath(args.config_path)
    config_dir = os.path.dirname(config_path)
    if os.path.exists(config_path) and not args.force:
        return _error("generate-config", f"{args.config_path} already exists; use --force to overwrite it")
    # Written out absolute: a relative --data-dir means relative to where the
    # command ran, while relative paths in the file mean relative to the file.
    data_dir = os.path.abspath(args.data_dir) if args.data_dir else config_dir
    if args.mail_domain is None and (args.smtp_port is not None or args.smtp_relay is not None):
        return _error("generate-config", "--smtp-port and --smtp-relay need --mail-domain")
    key_file = _key_file_name(args.server_name)
    tls_files: tuple[str, str] | None = None
    if args.federation_port is not None or args.self_signed_tls:
        base = key_file[: -len(".signing.key")]
        tls_files = (base + ".tls.crt", base + ".tls.key")
    text = _render_config(
        server_name=args.server_name,
        data_dir=data_dir,
        key_file=key_file,
        port=args.port,
        database_url=args.database_url,
        enable_registration=args.enable_registration,
        form_secret=secrets.token_urlsafe(32),
        macaroon_secret_key=secrets.token_urlsafe(32),
        federation_port=args.federation_port,
        federation_bind=_federation_bind_address(args.server_name),
        tls_files=tls_files,
        self_signed_tls=args.self_signed_tls,
        media_key_file=key_file[: -len(".signing.key")] + ".media.key",
        mail_domain=args.mail_domain,
        smtp_port=args.smtp_port if args.smtp_port is not None else 2525,
        smtp_relay=args.smtp_relay or "127.0.0.1:25",
    )
    # Validate before touching the disk, so a bad --server-name or
    # --database-url leaves nothing half-written behind.
    try:
        config = parse_config(text, args.config_path)
    except ConfigError as e:
        return _error("generate-config", e.problem if not e.key_path else f"{e.key_path}: {e.problem}")

    try:
        os.makedirs(config_dir, exist_ok=True)
        os.makedirs(data_dir, exist_ok=True)
        key_path = config.signing_key_path
        if os.path.exists(key_path):
            # The key is the server's identity to other servers; replacing it
            # would break federation, so an existing one is always kept.
            print(f"Kept the existing signing key {key_path}")
        else:
            write_signing_key_file(key_path, new_signing_key())
            print(f"Wrote a new signing key to {key_path}")
        if args.self_signed_tls:
            _write_self_signed_tls(config)
        media_key = config.media.encryption_key_file
        assert media_key is not None
        if os.path.exists(media_key):
            print(f"Kept the existing media encryption key {media_key}")
        else:
            from zhome.media.crypto import write_key_file

            write_key_file(media_key)
            print(f"Wrote a new media encryption key to {media_key}")
        if config.email_bridge.enabled:
            from zhome.bridges.email.registration import ensure_registration

            # The bridge's application service registration (its tokens are
            # kept when the file exists); zhome run loads it.
            registration = ensure_registration(config.email_bridge, config.server_name)
            print(f"Wrote the email bridge's registration to {registration.path}")
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if args.force else os.O_EXCL)
        # 0600: the file holds secrets.
        fd = os.open(config_path, flags, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
    except FileExistsError:
        return _error("generate-config", f"{args.config_path} already exists; use --force to overwrite it")
    except OSError as e:
        return _error("generate-config", f"{e.filename or config_path}: {e.strerror or e}")
    print(f"Wrote the configuration to {config_path}")
    return 0


def _federation_bind_address(server_name: str) -> str:
    """The server name's host when it is an IP literal (what peers connect to)."""
    import ipaddress

    host = server_name
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return "127.0.0.1"


def _write_self_signed_tls(config: HomeserverConfig) -> None:
    from zhome.federation.tls import generate_self_signed_certificate

    cert_path, key_path = config.tls_certificate_path, config.tls_private_key_path
    assert cert_path is not None and key_path is not None
    if os.path.exists(cert_path) and os.path.exists(key_path):
        print(f"Kept the existing TLS certificate {cert_path}")
        return
    cert_pem, key_pem = generate_self_signed_certificate(config.server_name)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    with open(cert_path, "wb") as f:
        f.write(cert_pem)
    print(f"Wrote a self-signed TLS certificate to {cert_path} (for local testing only)")


# ---------------------------------------------------------------------------
# run


def _run(args: argparse.Namespace) -> int:
    config = _load(args.config_path)
    if config is None:
        return 1
    if config.email_bridge.enabled:
        # The bridge's registration exists before the server loads its
        # application services (it is one of them).
        from zhome.bridges.email.registration import ensure_registration

        reg = ensure_registration(config.email_bridge, config.server_name)
        if reg.path not in config.app_service_config_files:
            config = dataclasses.replace(
                config, app_service_config_files=(*config.app_service_config_files, reg.path))
    # Imported late: loading the whole server (reactor, storage, handlers) is
    # not needed to generate a config or to report a config error.
    from zhome import server

    result = server.run(config)
    return result if isinstance(result, int) else 0


def _bridge_email(args: argparse.Namespace) -> int:
    config = _load(args.config_path)
    if config is None:
        return 1
    if not config.email_bridge.enabled:
        return _error("bridge-email", "email_bridge.enabled is false in the configuration")
    if getattr(args, "bridge_command", None) == "quarantine":
        from zhome.bridges.email.quarantine import run_quarantine

        return run_quarantine(config.email_bridge, config.data_dir, config.encryption.enabled, args.action,
                              args.mail_id)
    from zhome.bridges.email.bridge import relay_settings, run_standalone
    from zhome.logging_setup import setup_logging

    setup_logging(config.log_level, config.log_file, config.log_format)
    return run_standalone(config.email_bridge, config.server_name, config.data_dir, config.encryption.enabled,
                          **relay_settings(config.email), public_baseurl=config.public_baseurl)


# ---------------------------------------------------------------------------
# rotate-media-key


def _rotate_media_key(args: argparse.Namespace) -> int:
    config = _load(args.config_path)
    if config is None:
        return 1
    from zhome.media.rotate import rotate_media_key

    new_key = os.path.abspath(args.new_key_file)
    try:
        count = rotate_media_key(config, new_key)
    except ValueError as e:
        return _error("rotate-media-key", str(e))
    except OSError as e:
        return _error("rotate-media-key", f"{e.filename or new_key}: {e.strerror or e}")
    print(f"Re-wrapped {count} media file keys under {new_key}.")
    print(f"Now set media.encryption_key_file to {new_key!r} in {config.config_path} and restart.")
    return 0


# ---------------------------------------------------------------------------
# rotate-signing-key


def _rotate_signing_key(args: argparse.Namespace) -> int:
    config = _load(args.config_path)
    if config is None:
        return 1
    import time

    from zhome.crypto.keys import old_keys_path, rotate_signing_key

    try:
        old_id, new_id = rotate_signing_key(config.signing_key_path, int(time.time() * 1000))
    except (OSError, ValueError) as e:
        return _error("rotate-signing-key", str(e))
    print(f"New signing key {new_id} in {config.signing_key_path}; {old_id} is kept as an old verify key in "
          f"{old_keys_path(config.signing_key_path)}. Restart the server to use it.")
    return 0


# ---------------------------------------------------------------------------
# register-user


def _read_password(args: argparse.Namespace) -> str:
    """The new user's password; ValueError with a one-line reason."""
    if args.password_file:
        try:
            with open(args.password_file, encoding="utf-8") as f:
                password = f.readline().rstrip("\r\n")
        except OSError as e:
            raise ValueError(f"{args.password_file}: {e.strerror or e}") from None
        if not password:
            raise ValueError(f"{args.password_file}: the first line is empty")
        return password
    password = getpass.getpass("Password: ")
    if not password:
        raise ValueError("the password must not be empty")
    if getpass.getpass("Confirm password: ") != password:
        raise ValueError("the passwords do not match")
    return password


def _register_user(args: argparse.Namespace) -> int:
    config = _load(args.config_path)
    if config is None:
        return 1
    try:
        password = _read_password(args)
    except ValueError as e:
        return _error("register-user", str(e))
    from zhome import admin_tasks

    try:
        user_id = admin_tasks.register_user(config, args.username, password, args.admin)
    except ValueError as e:
        # admin_tasks reports operator mistakes (taken or invalid username)
        # as ValueError.
        return _error("register-user", str(e))
    print(user_id)
    return 0


def _operator_connection(sock_path: str) -> "http.client.HTTPConnection":
    """An HTTP connection to the running server's operator admin socket."""
    import http.client
    import socket

    class UnixConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(self.timeout)
            s.connect(sock_path)
            self.sock = s

    return UnixConnection("localhost", timeout=3600)


EXPORT_CHUNK = 256 * 1024
MAX_ERROR_BODY = 64 * 1024


def _export_user(config: HomeserverConfig, args: argparse.Namespace) -> int:
    """Stream the user's export ZIP from the operator socket into ``--out``:
    chunk by chunk (memory stays bounded), into a temporary file beside it
    that replaces ``--out`` only once the whole archive arrived."""
    import http.client
    import zipfile
    from urllib.parse import quote

    command = "admin export-user"
    sock_path = config.admin_socket_path
    if not sock_path:
        return _error(command, "the admin socket is turned off (admin_socket_path is empty)")
    out = os.path.abspath(args.out)
    if os.path.isdir(out):
        return _error(command, f"{args.out} is a directory")
    part = f"{out}.part-{os.getpid()}"
    conn = _operator_connection(sock_path)
    size = 0
    try:
        try:
            conn.request("GET", f"/_zhome/admin/v1/users/{quote(args.user_id, safe='')}/export")
            resp = conn.getresponse()
        except OSError as e:
            return _error(command, f"cannot reach the server at {sock_path} (is it running?): {e}")
        if resp.status != 200 or resp.getheader("Content-Type") != "application/zip":
            print(resp.read(MAX_ERROR_BODY).decode("utf-8", "replace"))
            return _error(command, f"the server answered {resp.status}")
        try:
            f = open(part, "wb")
        except OSError as e:
            return _error(command, f"cannot write {args.out}: {e.strerror or e}")
        try:
            with f:
                for _ in range(10 ** 9):
                    chunk = resp.read(EXPORT_CHUNK)
                    if not chunk:
                        break
                    f.write(chunk)
                    size += len(chunk)
                f.flush()
                os.fsync(f.fileno())
            if not zipfile.is_zipfile(part):
                return _error(command, "the export did not complete: what arrived is not a whole ZIP archive")
            os.replace(part, out)
        except (OSError, http.client.HTTPException) as e:
            # A cut-off stream (the server stopped, or the export failed
            # there) leaves no file that looks like an export.
            return _error(command, f"the export did not complete: {e}")
    finally:
        conn.close()
        if os.path.exists(part):
            os.unlink(part)
    print(f"{args.user_id}: {size} bytes written to {args.out}")
    return 0


def _admin_call(config: HomeserverConfig, args: argparse.Namespace) -> int:
    """One request to the running server's operator admin socket."""
    from urllib.parse import quote

    command = f"admin {args.task}"
    if args.task == "erase-user":
        method, path, body = "POST", f"/_zhome/admin/v1/users/{quote(args.user_id, safe='')}/erase", "{}"
    elif args.task == "deactivate-user":
        method, path, body = "POST", f"/_synapse/admin/v1/deactivate/{quote(args.user_id, safe='')}", "{}"
    elif args.task == "rotate-encryption-key":
        method, path, body = "POST", "/_zhome/admin/v1/encryption/rotate", "{}"
    elif args.task == "encryption-status":
        method, path, body = "GET", "/_zhome/admin/v1/encryption", None
    else:
        method, path, body = args.method.upper(), args.path, args.body
        if body is not None:
            try:
                json.loads(body)
            except ValueError as e:
                return _error(command, f"--body is not JSON: {e}")
    sock_path = config.admin_socket_path
    if not sock_path:
        return _error(command, "the admin socket is turned off (admin_socket_path is empty)")
    conn = _operator_connection(sock_path)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body.encode() if body is not None else None, headers=headers)
        resp = conn.getresponse()
        payload = resp.read().decode("utf-8", "replace")
    except OSError as e:
        return _error(command, f"cannot reach the server at {sock_path} (is it running?): {e}")
    finally:
        conn.close()
    print(payload)
    return 0 if 200 <= resp.status < 300 else _error(command, f"the server answered {resp.status}")


def _admin(args: argparse.Namespace) -> int:
    config = _load(args.config_path)
    if config is None:
        return 1
    from zhome import admin_tasks

    if args.task == "export-user":
        return _export_user(config, args)
    if args.task in ("erase-user", "deactivate-user", "call", "rotate-encryption-key", "encryption-status"):
        return _admin_call(config, args)
    if args.task == "verify-audit":
        count, bad = admin_tasks.verify_audit(config)
        if bad is not None:
            return _error("admin verify-audit", f"entry {bad[0]}: {bad[1]}")
        print(f"audit log valid: {count} entries")
        return 0
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            n = admin_tasks.export_audit(config, f)
    else:
        n = admin_tasks.export_audit(config, sys.stdout)
    print(f"{n} entries", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
