"""The bridge's application service registration file.

Spec: application-service-api "Registration". The bridge writes it (tokens
made once, kept across restarts) and the homeserver loads it like any file
in ``app_service_config_files``. Ghost users are an exclusive namespace.
"""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass
from typing import Any

import yaml

from zhome.config import EmailBridgeConfig

SERVICE_ID = "zhome-email-bridge"


@dataclass(frozen=True)
class BridgeRegistration:
    path: str
    as_token: str
    hs_token: str
    sender_localpart: str
    ghost_regex: str


def ensure_registration(cfg: EmailBridgeConfig, server_name: str) -> BridgeRegistration:
    """Read the registration at ``cfg.registration_file``, writing it (or
    bringing its url, sender and namespace up to date) as needed; the tokens
    of an existing file are kept."""
    path = cfg.registration_file
    assert path is not None
    existing: dict[str, Any] = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f)
        if isinstance(loaded, dict):
            existing = loaded
    ghost_regex = "@" + re.escape(cfg.ghost_prefix) + ".*:" + re.escape(server_name)
    data = {
        "id": SERVICE_ID,
        "url": f"http://{cfg.appservice_listen}",
        "as_token": existing.get("as_token") if isinstance(existing.get("as_token"), str) else secrets.token_urlsafe(32),
        "hs_token": existing.get("hs_token") if isinstance(existing.get("hs_token"), str) else secrets.token_urlsafe(32),
        "sender_localpart": cfg.sender_localpart,
        "rate_limited": False,
        "namespaces": {"users": [{"exclusive": True, "regex": ghost_regex}], "aliases": [], "rooms": []},
    }
    if data != existing:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yaml.safe_dump(data, f, sort_keys=True)
        os.replace(tmp, path)
    return BridgeRegistration(path, str(data["as_token"]), str(data["hs_token"]), cfg.sender_localpart, ghost_regex)
