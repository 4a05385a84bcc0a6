"""Registration files and namespaces (zhome/appservice/registration.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from zhome.appservice.registration import RegistrationError, load_registrations, parse_registration

SERVER = "example.org"


def reg(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "irc", "url": "http://127.0.0.1:9999", "as_token": "as_secret", "hs_token": "hs_secret",
        "sender_localpart": "ircbot",
        "namespaces": {"users": [{"exclusive": True, "regex": "@irc_.*"}],
                       "aliases": [{"exclusive": False, "regex": "#irc_.*:example\\.org"}],
                       "rooms": [{"exclusive": False, "regex": "!bridged:.*"}]},
        "rate_limited": False, "protocols": ["irc"],
    }
    base.update(over)
    return base


def write(tmp_path: Path, name: str, data: Any) -> str:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(p)


def test_parses_synapse_format(tmp_path: Path) -> None:
    [s] = load_registrations([write(tmp_path, "irc.yaml", reg())], SERVER)
    assert (s.id, s.url, s.as_token, s.hs_token, s.sender) == (
        "irc", "http://127.0.0.1:9999", "as_secret", "hs_secret", "@ircbot:example.org")
    assert s.rate_limited is False and s.protocols == ("irc",) and s.receive_ephemeral is False


@pytest.mark.parametrize("key", ["receive_ephemeral", "de.sorunome.msc2409.push_ephemeral"])
def test_receive_ephemeral_both_names(key: str) -> None:
    assert parse_registration(reg(**{key: True}), "f.yaml", SERVER).receive_ephemeral is True


def test_url_may_be_null() -> None:
    assert parse_registration(reg(url=None), "f.yaml", SERVER).url is None


def test_namespace_matching() -> None:
    s = parse_registration(reg(), "f.yaml", SERVER)
    assert s.is_interested_in_user("@irc_alice:example.org")
    assert s.is_interested_in_user("@ircbot:example.org")  # its sender
    assert not s.is_interested_in_user("@alice:example.org")
    assert not s.is_interested_in_user("@x_irc_alice:example.org")  # anchored at the start
    assert s.is_exclusive_user("@irc_bob:example.org")
    assert s.is_interested_in_alias("#irc_chan:example.org")
    assert not s.is_exclusive_alias("#irc_chan:example.org")
    assert not s.is_interested_in_alias("#irc_chan:other.org")
    assert s.is_interested_in_room("!bridged:example.org")
    assert not s.is_interested_in_room("!other:example.org")


def test_no_namespaces_matches_only_sender() -> None:
    s = parse_registration(reg(namespaces={}), "f.yaml", SERVER)
    assert s.is_interested_in_user("@ircbot:example.org")
    assert not s.is_interested_in_user("@irc_alice:example.org")
    assert not s.is_interested_in_alias("#a:example.org") and not s.is_interested_in_room("!a:example.org")


@pytest.mark.parametrize("change, key", [
    ({"as_token": None}, "as_token"),
    ({"hs_token": 5}, "hs_token"),
    ({"id": ""}, "id"),
    ({"url": "ftp://x"}, "url"),
    ({"rate_limited": "no"}, "rate_limited"),
    ({"protocols": "irc"}, "protocols"),
    ({"namespaces": {"users": [{"exclusive": True, "regex": "(["}]}}, "namespaces.users[0].regex"),
    ({"namespaces": {"users": [{"exclusive": "yes", "regex": "@a"}]}}, "namespaces.users[0].exclusive"),
    ({"namespaces": {"user": []}}, "namespaces.user"),
    ({"namespaces": {"users": "@a.*"}}, "namespaces.users"),
    ({"sender_localprt": "x"}, "sender_localprt"),
])
def test_broken_file_names_file_and_key(tmp_path: Path, change: dict[str, Any], key: str) -> None:
    data = reg(**change)
    data = {k: v for k, v in data.items() if v is not None or k == "url"}
    path = write(tmp_path, "broken.yaml", data)
    with pytest.raises(RegistrationError) as e:
        load_registrations([path], SERVER)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(path + ": " + key + ": "), msg


def test_missing_url_key_is_an_error(tmp_path: Path) -> None:
    data = reg()
    del data["url"]
    with pytest.raises(RegistrationError, match=r"broken\.yaml: url: "):
        load_registrations([write(tmp_path, "broken.yaml", data)], SERVER)


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RegistrationError, match="invalid YAML"):
        load_registrations([write(tmp_path, "bad.yaml", "id: [unclosed\n")], SERVER)
    with pytest.raises(RegistrationError, match="cannot read"):
        load_registrations([str(tmp_path / "absent.yaml")], SERVER)


@pytest.mark.parametrize("key", ["as_token", "id", "sender_localpart"])
def test_duplicates_refused(tmp_path: Path, key: str) -> None:
    a = reg()
    b = reg(id="other", as_token="other_as", hs_token="other_hs", sender_localpart="otherbot")
    b[key] = a[key]
    pa, pb = write(tmp_path, "a.yaml", a), write(tmp_path, "b.yaml", b)
    with pytest.raises(RegistrationError) as e:
        load_registrations([pa, pb], SERVER)
    assert str(e.value).startswith(f"{pb}: {key}: ") and pa in str(e.value)


def test_two_distinct_services(tmp_path: Path) -> None:
    a = reg()
    b = reg(id="other", as_token="other_as", hs_token="other_hs", sender_localpart="otherbot")
    got = load_registrations([write(tmp_path, "a.yaml", a), write(tmp_path, "b.yaml", b)], SERVER)
    assert [s.id for s in got] == ["irc", "other"]
