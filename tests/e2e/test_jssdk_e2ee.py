"""End-to-end encryption with a real crypto stack: matrix-js-sdk and its
Rust crypto (matrix-sdk-crypto-wasm) in Node, against zhome.

Each scenario is a Node script in ``tests/jssdk/`` that takes a homeserver
base URL, drives its own users and clients, and exits non-zero with a
message on failure (Client-Server API, End-to-end encryption: device keys,
one-time keys, to-device, device lists, cross-signing, server-side key
backups). ``scripts/test.sh`` installs the scripts' packages with
``npm ci``; when that did not happen these tests fail, they never skip.

The same scripts run against the pinned Synapse too: that they pass there
shows a zhome failure is zhome's, not the script's. And across federation
(a zhome on SQLite and that Synapse), with alice on either server and bob
on the other: then device lists, one-time key claims, to-device messages
and cross-signing updates cross between the servers.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import ZhomeProcess, free_port
from tests.e2e.synapse_peer import SynapsePeer

JSSDK = Path(__file__).resolve().parents[1] / "jssdk"
# Every script stops itself after 50 s; this only catches a hung Node.
SCENARIO_TIMEOUT_S = 90

SCENARIOS = [
    "two_users",  # two users in an encrypted room each decrypt the other's message
    "second_device",  # a device that logs in later decrypts new messages
    "cross_signing",  # cross-signing bootstrapped (and replaced under UIA), seen by another user
    "key_backup",  # a key backup restored by a fresh login decrypts old messages
    "recovery",  # a recovery key gives a fresh login the cross-signing keys and the backup
]


def _installed() -> None:
    """Fail (not skip) when Node or the scripts' packages are missing."""
    if shutil.which("node") is None:
        pytest.fail("node is not installed; the matrix-js-sdk scenarios need Node.js 20 or newer", pytrace=False)
    want = json.loads((JSSDK / "package.json").read_text())["dependencies"]["matrix-js-sdk"]
    installed = JSSDK / "node_modules" / "matrix-js-sdk" / "package.json"
    if not installed.exists():
        pytest.fail(f"matrix-js-sdk is not installed in {JSSDK}: run `npm ci` there (scripts/test.sh does)",
                    pytrace=False)
    got = json.loads(installed.read_text())["version"]
    if got != want:
        pytest.fail(f"{JSSDK} has matrix-js-sdk {got}, package.json pins {want}: run `npm ci` there", pytrace=False)


def run_scenario(name: str, base_urls: list[str], server_log: Callable[[], str]) -> None:
    """Run ``tests/jssdk/{name}.mjs`` with alice's (and bob's) server."""
    _installed()
    try:
        r = subprocess.run(["node", str(JSSDK / f"{name}.mjs"), *base_urls], cwd=str(JSSDK), capture_output=True,
                           text=True, timeout=SCENARIO_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{name}.mjs did not finish in {SCENARIO_TIMEOUT_S}s\n--- stdout\n{e.stdout!r}\n--- stderr\n"
                    f"{e.stderr!r}\n--- server log (tail)\n{server_log()}", pytrace=False)
    if r.returncode != 0:
        pytest.fail(f"{name}.mjs exited {r.returncode}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"
                    f"\n--- server log (tail)\n{server_log()}", pytrace=False)
    # A script that exits 0 has said so on its last line.
    assert r.stdout.splitlines()[-1:] and r.stdout.splitlines()[-1].startswith("PASS "), r.stdout


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_jssdk_scenario_against_zhome(zhome: ZhomeProcess, scenario: str) -> None:
    run_scenario(scenario, [zhome.base_url], zhome.log)


@pytest.fixture(scope="module")
def synapse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SynapsePeer]:
    peer = SynapsePeer(tmp_path_factory.mktemp("synapse_jssdk"), "127.0.0.6", free_port("127.0.0.6"),
                       free_port("127.0.0.6"))
    peer.start()
    try:
        yield peer
    finally:
        peer.stop()


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_jssdk_scenario_against_synapse(synapse: SynapsePeer, scenario: str) -> None:
    run_scenario(scenario, [synapse.base_url], synapse.log)


@pytest.fixture(scope="module")
def zhome_fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZhomeProcess]:
    proc = ZhomeProcess(tmp_path_factory.mktemp("zhome_jssdk"), federation_ip="127.0.0.7")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.mark.parametrize("alice_on", ["zhome", "synapse"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_jssdk_scenario_across_federation(zhome_fed: ZhomeProcess, synapse: SynapsePeer, scenario: str,
                                          alice_on: str) -> None:
    urls = [zhome_fed.base_url, synapse.base_url]
    if alice_on == "synapse":
        urls.reverse()
    run_scenario(scenario, urls, lambda: f"zhome:\n{zhome_fed.log()}\nSynapse:\n{synapse.log(3000)}")
