"""Rotating the server's signing key keeps the old verify key published."""

from __future__ import annotations

from pathlib import Path

from signedjson.key import decode_verify_key_base64
from signedjson.sign import verify_signed_json

from zhome.cli import main
from zhome.config import load_config
from zhome.crypto.keys import old_keys_path, read_old_verify_keys, read_signing_key_file


def test_rotate_signing_key_cli(tmp_path: Path) -> None:
    cfg = tmp_path / "homeserver.yaml"
    assert main(["generate-config", "--server-name", "hs.example", "--config-path", str(cfg)]) == 0
    config = load_config(str(cfg))
    before = read_signing_key_file(config.signing_key_path)[0]
    assert main(["rotate-signing-key", "-c", str(cfg)]) == 0
    after = read_signing_key_file(config.signing_key_path)[0]
    assert after.version != before.version
    old = read_old_verify_keys(old_keys_path(config.signing_key_path))
    assert list(old) == [f"ed25519:{before.version}"]
    vk_b64, expired = old[f"ed25519:{before.version}"]
    assert expired > 0
    # The kept verify key is really the old key's: it checks a signature the
    # old key made.
    from signedjson.sign import sign_json

    signed = sign_json({"a": 1}, "hs.example", before)
    verify_signed_json(signed, "hs.example", decode_verify_key_base64("ed25519", before.version, vk_b64))
    # A second rotation keeps both old keys.
    assert main(["rotate-signing-key", "-c", str(cfg)]) == 0
    assert len(read_old_verify_keys(old_keys_path(config.signing_key_path))) == 2


def test_old_keys_file_errors(tmp_path: Path) -> None:
    p = tmp_path / "k.old"
    p.write_text("ed25519 a_x notakey\n")
    try:
        read_old_verify_keys(str(p))
    except ValueError as e:
        assert "k.old:1" in str(e)
    else:
        raise AssertionError("malformed line accepted")


def test_published_keys_include_old_keys(tmp_path: Path) -> None:
    from zhome.federation.keyring import Keyring

    cfg = tmp_path / "homeserver.yaml"
    assert main(["generate-config", "--server-name", "hs.example", "--config-path", str(cfg)]) == 0
    config = load_config(str(cfg))
    before = read_signing_key_file(config.signing_key_path)[0]
    assert main(["rotate-signing-key", "-c", str(cfg)]) == 0
    current = read_signing_key_file(config.signing_key_path)
    old = read_old_verify_keys(old_keys_path(config.signing_key_path))
    keyring = Keyring("hs.example", current, old, None, None)  # type: ignore[arg-type]
    body = keyring.local_keys_json()
    assert f"ed25519:{current[0].version}" in body["verify_keys"]
    assert f"ed25519:{before.version}" in body["old_verify_keys"]
    assert f"ed25519:{before.version}" not in body["verify_keys"]
    assert body["old_verify_keys"][f"ed25519:{before.version}"]["expired_ts"] == old[f"ed25519:{before.version}"][1]
