"""A real Synapse, pinned in ``requirements-synapse.txt``, as a federation peer.

Synapse lives in its own venv (``<repo>/.synapse-venv``; its dependencies may
clash with ours), made once by :func:`ensure_synapse_venv` (``scripts/test.sh``
runs ``python -m tests.e2e.synapse_peer install`` before pytest).

A peer is named by its IP literal and federation port (``127.0.0.5:PORT``) so
no DNS is needed. Its federation listener uses a self-signed certificate; it
accepts self-signed certificates from others, may connect to loopback, asks
no outside notary for keys, retries a peer that was down within seconds, and
has its rate limits lifted. For local tests only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
REQUIREMENTS = REPO / "requirements-synapse.txt"
VENV = Path(os.environ.get("ZHOME_SYNAPSE_VENV", str(REPO / ".synapse-venv")))
STARTUP_TIMEOUT_S = 90


class SynapseUnavailable(RuntimeError):
    """The pinned Synapse could not be installed or started."""


def _pinned_version() -> str:
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("matrix-synapse=="):
            return line.split("==", 1)[1].strip()
    raise SynapseUnavailable(f"{REQUIREMENTS} pins no matrix-synapse version")


def _installed_version(python: Path) -> str | None:
    if not python.exists():
        return None
    r = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('matrix-synapse'))"],
                       capture_output=True, text=True, check=False)
    return r.stdout.strip() if r.returncode == 0 else None


def ensure_synapse_venv(quiet: bool = True) -> Path:
    """The venv's python, installing the pinned Synapse first if needed."""
    python = VENV / "bin" / "python"
    want = _pinned_version()
    if _installed_version(python) == want:
        return python
    log = VENV.parent / ".synapse-venv-pip.log"
    try:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, capture_output=quiet)
        with open(log, "wb") as out:
            subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS)], check=True,
                           stdout=out if quiet else None, stderr=subprocess.STDOUT if quiet else None)
    except (subprocess.CalledProcessError, OSError) as e:
        raise SynapseUnavailable(f"installing matrix-synapse=={want} into {VENV} failed ({e}); see {log}")
    got = _installed_version(python)
    if got != want:
        raise SynapseUnavailable(f"{VENV} has matrix-synapse {got!r}, wanted {want}")
    return python


class SynapsePeer:
    """One Synapse process on ``ip``: client API over HTTP, federation over TLS."""

    def __init__(self, workdir: Path, ip: str, client_port: int, federation_port: int) -> None:
        self.workdir = workdir
        self.ip = ip
        self.client_port = client_port
        self.federation_port = federation_port
        self.server_name = f"{ip}:{federation_port}"
        self.base_url = f"http://{ip}:{client_port}"
        self.config_path = workdir / "homeserver.yaml"
        self.log_path = workdir / "homeserver.log"
        self.out_path = workdir / "synapse.out"
        self.proc: subprocess.Popen[bytes] | None = None
        self.python = ensure_synapse_venv()
        workdir.mkdir(parents=True, exist_ok=True)
        if not self.config_path.exists():
            self._configure()

    def _configure(self) -> None:
        d = self.workdir
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "tls.key"),
             "-out", str(d / "tls.crt"), "-days", "30", "-subj", f"/CN={self.ip}",
             "-addext", f"subjectAltName=IP:{self.ip}"], check=True, capture_output=True)
        r = subprocess.run(
            [str(self.python), "-m", "synapse.app.homeserver", "--server-name", self.server_name,
             "--config-path", str(self.config_path), "--generate-config", "--report-stats=no"],
            cwd=str(d), capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise SynapseUnavailable(f"synapse --generate-config failed:\n{r.stdout}\n{r.stderr}")
        cfg: dict[str, Any] = yaml.safe_load(self.config_path.read_text())
        cfg["listeners"] = [
            {"port": self.client_port, "bind_addresses": [self.ip], "type": "http", "tls": False,
             "resources": [{"names": ["client"]}]},
            {"port": self.federation_port, "bind_addresses": [self.ip], "type": "http", "tls": True,
             "resources": [{"names": ["federation", "keys"]}]},
        ]
        big = {"per_second": 100000, "burst_count": 100000}
        cfg.update(
            tls_certificate_path=str(d / "tls.crt"), tls_private_key_path=str(d / "tls.key"),
            federation_verify_certificates=False, ip_range_blacklist=[], ip_range_whitelist=["127.0.0.0/8"],
            enable_registration=True, enable_registration_without_verification=True, report_stats=False,
            suppress_key_server_warning=True, trusted_key_servers=[],
            room_list_publication_rules=[{"action": "allow"}], allow_public_rooms_over_federation=True,
            federation={"max_short_retry_delay": "1s", "max_long_retry_delay": "5s",
                        "destination_min_retry_interval": "2s", "destination_max_retry_interval": "10s"},
            rc_message=big, rc_registration=big, rc_joins={"local": big, "remote": big}, rc_joins_per_room=big,
            rc_login={"address": big, "account": big, "failed_attempts": big},
            rc_invites={"per_room": big, "per_user": big, "per_issuer": big}, rc_room_creation=big,
            rc_federation={"sleep_limit": 10000, "reject_limit": 10000, "concurrent": 100, "window_size": 1000,
                           "sleep_delay": 1},
        )
        self.config_path.write_text(yaml.safe_dump(cfg))
        # The generated log config writes homeserver.log in the workdir.

    def start(self) -> SynapsePeer:
        with open(self.out_path, "ab") as out:
            self.proc = subprocess.Popen(
                [str(self.python), "-m", "synapse.app.homeserver", "-c", str(self.config_path)],
                stdout=out, stderr=subprocess.STDOUT, cwd=str(self.workdir))
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SynapseUnavailable(f"synapse exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.base_url + "/_matrix/client/versions", timeout=1) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        raise SynapseUnavailable(f"synapse did not start in {STARTUP_TIMEOUT_S}s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def log(self, chars: int = 6000) -> str:
        text = ""
        for p in (self.out_path, self.log_path):
            try:
                text += p.read_text(errors="replace")[-chars:]
            except OSError:
                pass
        return text


if __name__ == "__main__":
    if sys.argv[1:] != ["install"]:
        sys.exit("usage: python -m tests.e2e.synapse_peer install")
    try:
        ensure_synapse_venv()
    except SynapseUnavailable as e:
        sys.exit(str(e))
