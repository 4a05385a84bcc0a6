"""The media encryption key at start-up and its rotation from the CLI."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import yaml

from tests.e2e.test_media import download, upload
from zhome.media import crypto


def _key_path(proc: Any) -> str:
    cfg = yaml.safe_load(proc.config_path.read_text())
    path = cfg["media"]["encryption_key_file"]
    return str(proc.config_path.parent / path)


def test_wrong_or_missing_key_stops_start_up(zhome_factory: Any) -> None:
    proc = zhome_factory()
    proc.start()
    token = proc.register("alice")["access_token"]
    server, media_id = upload(proc, token, b"kept safe", "text/plain")
    proc.stop()
    key_path = _key_path(proc)
    original = open(key_path).read()

    with open(key_path, "w") as f:
        f.write(crypto.new_key_text() + "\n")
    with pytest.raises(RuntimeError, match="exited with 1"):
        proc.start()
    assert "media encryption key does not match" in proc.log()

    import os

    os.unlink(key_path)
    with pytest.raises(RuntimeError, match="exited with 1"):
        proc.start()
    assert "does not exist" in proc.log()
    assert "Traceback" not in proc.log()

    with open(key_path, "w") as f:
        f.write(original)
    proc.start()
    status, _, body = download(proc, token, server, media_id)
    assert status == 200 and body == b"kept safe"


def test_rotate_media_key(zhome_factory: Any) -> None:
    proc = zhome_factory()
    proc.start()
    token = proc.register("alice")["access_token"]
    server, media_id = upload(proc, token, b"rotate me " * 1000, "text/plain")
    proc.stop()
    files_before = {p: p.read_bytes() for p in (proc.workdir / "data" / "media").rglob("*") if p.is_file()}

    new_key = proc.workdir / "new.media.key"
    result = subprocess.run(
        [sys.executable, "-m", "zhome", "rotate-media-key", "-c", str(proc.config_path), "--new-key-file",
         str(new_key)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "Re-wrapped 1 media file keys" in result.stdout
    # Files were not rewritten.
    assert {p: p.read_bytes() for p in files_before} == files_before

    # The old key no longer fits the database ...
    with pytest.raises(RuntimeError, match="exited with 1"):
        proc.start()
    # ... the new one does, and the media reads back.
    cfg = yaml.safe_load(proc.config_path.read_text())
    cfg["media"]["encryption_key_file"] = str(new_key)
    proc.config_path.write_text(yaml.safe_dump(cfg))
    proc.start()
    status, _, body = download(proc, token, server, media_id)
    assert status == 200 and body == b"rotate me " * 1000
