"""Start ``zhome run`` as a real process on a free loopback port.

Each server gets its own config from ``zhome generate-config``, its own
SQLite file or PostgreSQL database, and is stopped (and its database
dropped) when the test ends.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

STARTUP_TIMEOUT_S = 30
REPO = Path(__file__).resolve().parents[2]


def _server_env() -> dict[str, str]:
    """The environment of a zhome process: it imports the checkout these
    tests belong to, whatever the venv's editable install points at."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


CS = "/_matrix/client/v3"


def q(s: str) -> str:
    """Quote ``s`` as one path segment (room IDs, user IDs, aliases)."""
    return urllib.parse.quote(s, safe="")


def _port_block() -> Optional[range]:
    """The ports this test process hands out: a share, by xdist worker, of
    the ports below the kernel's ephemeral range. The kernel gives none of
    them to ``bind(0)`` or to outgoing connections, and no two workers share
    one, so a port chosen here and released until its server binds it is not
    taken meanwhile by another test's server (two ``bind(0)`` calls can
    return the same port once the first is closed). None: no room below
    that range; ``bind(0)`` then."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral_low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    low, high = 10000, min(ephemeral_low, 65536)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    count = max(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1), index + 1)
    size = (high - low) // count
    if size < 500:
        return None
    return range(low + index * size, low + (index + 1) * size)


_PORTS = _port_block()
# Each process walks its block from a place of its own: processes outside
# pytest-xdist (benchmarks, a second run) share one block.
_port_turn = [random.randrange(len(_PORTS)) if _PORTS else 0]


def _bindable(ip: str, port: int, kind: int) -> bool:
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind((ip, port))
        except OSError:
            return False
    return True


def free_port(ip: str = "127.0.0.1", udp: bool = False) -> int:
    """A loopback port no listener holds, not handed out before by this
    process (while its block lasts). ``udp``: free for UDP as well."""
    if _PORTS is None:
        for _ in range(50):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((ip, 0))
                port = int(s.getsockname()[1])
            if not udp or _bindable(ip, port, socket.SOCK_DGRAM):
                return port
        raise RuntimeError("no free port")
    for _ in range(len(_PORTS)):
        port = _PORTS[_port_turn[0] % len(_PORTS)]
        _port_turn[0] += 1
        if _bindable(ip, port, socket.SOCK_STREAM) and (not udp or _bindable(ip, port, socket.SOCK_DGRAM)):
            return port
    raise RuntimeError(f"no free port in {_PORTS}")


class ZhomeProcess:
    def __init__(self, workdir: Path, database_url: Optional[str] = None, server_name: str = "localhost",
                 rate_limits: bool = False, overrides: Optional[dict[str, Any]] = None,
                 federation_ip: Optional[str] = None, generate_args: Sequence[str] = ()) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.config_path = workdir / "homeserver.yaml"
        self.log_path = workdir / "zhome.log"
        self.server_name = server_name
        self.proc: Optional[subprocess.Popen[bytes]] = None
        args = [
            sys.executable, "-m", "zhome", "generate-config", "--server-name", server_name,
            "--config-path", str(self.config_path), "--data-dir", str(workdir / "data"),
            "--port", str(self.port), "--enable-registration",
        ]
        if federation_ip is not None:
            # A federating server is named by its IP literal and port, so
            # peers need no DNS: e.g. 127.0.0.2:28448.
            fed_port = free_port()
            server_name = f"{federation_ip}:{fed_port}"
            self.server_name = server_name
            args[args.index("--server-name") + 1] = server_name
            args += ["--federation-port", str(fed_port), "--self-signed-tls"]
        if database_url:
            args += ["--database-url", database_url]
        args += list(generate_args)
        # In this process (the command's own code, without starting another
        # interpreter for it: most tests start a server or two).
        from zhome.cli import main as zhome_command

        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = zhome_command(args[3:])
        if code != 0:
            raise RuntimeError(f"zhome generate-config failed ({code}): {out.getvalue()}")
        cfg = yaml.safe_load(self.config_path.read_text())
        cfg["rate_limits"]["enabled"] = rate_limits
        cfg["log_level"] = "INFO"
        if federation_ip is not None:
            cfg["federation"]["max_retry_interval_ms"] = 2000
        for k, v in (overrides or {}).items():
            if isinstance(v, dict) and isinstance(cfg.get(k), dict):
                cfg[k].update(v)
            else:
                cfg[k] = v
        self.config_path.write_text(yaml.safe_dump(cfg))

    def start(self) -> "ZhomeProcess":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "zhome", "run", "--config-path", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, cwd=str(self.workdir), env=_server_env(),
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"zhome exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.base_url + "/_matrix/client/versions", timeout=1) as r:
                    # Serving, and done starting: the client API answers
                    # before the rest (an email bridge's listeners) is up,
                    # and a start that fails there stops the server.
                    if r.status == 200 and self._started_line():
                        return self
            except (urllib.error.URLError, ConnectionError, socket.timeout):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"zhome did not start in {STARTUP_TIMEOUT_S}s:\n{self.log()}")

    def _started_line(self) -> bool:
        """Whether this process has logged that it started."""
        assert self.proc is not None
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.log_path) - 65536))
                tail = f.read()
        except OSError:
            return False
        return re.search(rb" started for \S+ \(pid %d\)" % self.proc.pid, tail) is not None

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def restart(self, kill: bool = False) -> None:
        self.stop(kill=kill)
        self.start()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    # -- plain HTTP, for raw-protocol checks ------------------------------------
    def request(self, method: str, path: str, body: Any = None, token: Optional[str] = None,
                raw: Optional[bytes] = None, headers: Optional[dict[str, str]] = None) -> tuple[int, Any]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                payload = r.read()
                status = r.status
        except urllib.error.HTTPError as e:
            payload = e.read()
            status = e.code
        try:
            return status, json.loads(payload) if payload else None
        except ValueError:
            return status, payload

    def register(self, username: str, password: str = "correct horse battery") -> dict[str, Any]:
        status, body = self.request("POST", "/_matrix/client/v3/register", {
            "username": username, "password": password, "auth": {"type": "m.login.dummy"}})
        assert status == 200, (status, body)
        return body


class ClientUser:
    """A user registered on ``hs``, with small helpers around ``hs.request``
    on the client-server API (paths are relative to ``CS``)."""

    def __init__(self, hs: ZhomeProcess, name: str) -> None:
        self.hs = hs
        reg = hs.register(name)
        self.user_id: str = reg["user_id"]
        self.token: str = reg["access_token"]

    def req(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return self.hs.request(method, CS + path, body, token=self.token)

    def ok(self, method: str, path: str, body: Any = None) -> Any:
        status, out = self.req(method, path, body)
        assert status == 200, (method, path, status, out)
        return out
