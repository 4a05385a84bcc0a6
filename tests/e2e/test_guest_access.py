"""Guest access end to end: registration on and off, whoami, the endpoints a
guest may and may not call, joining by m.room.guest_access, leaving when it
is withdrawn (locally and over federation), upgrading to a full account,
and reading world_readable rooms without joining.

Spec: client-server-api "Guest Access", "Room History Visibility",
"Account registration and management" (kind=guest, guest_access_token).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator, Optional
from urllib.parse import quote

import pytest
import yaml

from tests.e2e.harness import ClientUser, ZhomeProcess

CS = "/_matrix/client/v3"
PASSWORD = "correct horse battery"
GUESTS_ON = {"registration": {"allow_guest_access": True}}
WAIT_S = 30.0


def q(s: str) -> str:
    return quote(s, safe="")


def wait_until(pred: Callable[[], bool], what: str, wait_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + wait_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {wait_s}s: {what}")
        time.sleep(0.2)


class Client(ClientUser):
    """An access token on one server (a guest's or a user's), with the
    harness's request helpers."""

    def __init__(self, hs: ZhomeProcess, user_id: str, token: str) -> None:
        # Not ClientUser's constructor: that one registers a user.
        self.hs = hs
        self.user_id = user_id
        self.token = token

    @classmethod
    def user(cls, hs: ZhomeProcess, name: str) -> "Client":
        reg = hs.register(name)
        return cls(hs, reg["user_id"], reg["access_token"])

    @classmethod
    def guest(cls, hs: ZhomeProcess, body: Optional[dict[str, Any]] = None) -> "Client":
        status, reg = hs.request("POST", CS + "/register?kind=guest", body or {})
        assert status == 200, (status, reg)
        return cls(hs, reg["user_id"], reg["access_token"])

    def create_room(self, **body: Any) -> str:
        return str(self.ok("POST", "/createRoom", body)["room_id"])

    def put_state(self, room_id: str, etype: str, content: dict[str, Any], state_key: str = "") -> str:
        return str(self.ok("PUT", f"/rooms/{q(room_id)}/state/{etype}/{q(state_key)}", content)["event_id"])

    def send(self, room_id: str, body: str) -> tuple[int, Any]:
        txn = f"t{time.monotonic_ns()}"
        return self.req("PUT", f"/rooms/{q(room_id)}/send/m.room.message/{txn}", {"msgtype": "m.text", "body": body})

    def join(self, target: str, query: str = "") -> tuple[int, Any]:
        return self.req("POST", f"/join/{q(target)}{query}", {})

    def membership_of(self, room_id: str, user_id: str) -> Optional[str]:
        status, body = self.req("GET", f"/rooms/{q(room_id)}/state/m.room.member/{q(user_id)}")
        return body.get("membership") if status == 200 else None

    def bodies(self, room_id: str) -> list[str]:
        chunk = self.ok("GET", f"/rooms/{q(room_id)}/messages?dir=b&limit=50")["chunk"]
        return [e["content"].get("body") for e in chunk if e["type"] == "m.room.message"]


@pytest.fixture
def guests_hs(zhome_factory: Any) -> Iterator[ZhomeProcess]:
    hs = zhome_factory(overrides=GUESTS_ON)
    hs.start()
    yield hs


def _assert_guest_forbidden(status: int, body: Any, what: str) -> None:
    assert status == 403, (what, status, body)
    assert body["errcode"] == "M_GUEST_ACCESS_FORBIDDEN", (what, body)


# -- registration ------------------------------------------------------------------------


def test_guest_registration_is_off_by_default(zhome: ZhomeProcess) -> None:
    # The generated config names the option, off; without it, it is off too.
    cfg = yaml.safe_load(zhome.config_path.read_text())
    assert cfg["registration"]["allow_guest_access"] is False
    for restart in (False, True):
        if restart:
            del cfg["registration"]["allow_guest_access"]
            zhome.config_path.write_text(yaml.safe_dump(cfg))
            zhome.restart()
        status, body = zhome.request("POST", CS + "/register?kind=guest", {})
        assert status == 403, (status, body)
        assert body["errcode"] == "M_GUEST_ACCESS_FORBIDDEN"
    # Ordinary registration is untouched.
    user = Client.user(zhome, "alice")
    assert user.ok("GET", "/account/whoami")["is_guest"] is False


def test_guest_registration_and_whoami(guests_hs: ZhomeProcess) -> None:
    # No user-interactive auth; every body parameter but the device's
    # display name is ignored.
    status, reg = guests_hs.request("POST", CS + "/register?kind=guest", {
        "username": "chosen", "password": PASSWORD, "device_id": "MINE",
        "initial_device_display_name": "Kiosk"})
    assert status == 200, (status, reg)
    assert reg["access_token"] and reg["device_id"] and reg["device_id"] != "MINE"
    localpart, server = reg["user_id"][1:].split(":", 1)
    assert server == guests_hs.server_name and localpart != "chosen" and localpart.isdigit()
    guest = Client(guests_hs, reg["user_id"], reg["access_token"])
    assert guest.ok("GET", "/account/whoami") == {
        "user_id": reg["user_id"], "device_id": reg["device_id"], "is_guest": True}
    devices = guest.ok("GET", "/devices")["devices"]
    assert [(d["device_id"], d.get("display_name")) for d in devices] == [(reg["device_id"], "Kiosk")]
    # Two guests are two accounts.
    other = Client.guest(guests_hs)
    assert other.user_id != guest.user_id
    assert Client.user(guests_hs, "bob").ok("GET", "/account/whoami")["is_guest"] is False
    # The guest survives a restart: the flag is in the database.
    guests_hs.restart()
    assert guest.ok("GET", "/account/whoami")["is_guest"] is True


def test_guest_endpoints_allowed_and_refused(guests_hs: ZhomeProcess) -> None:
    guest = Client.guest(guests_hs)
    me = q(guest.user_id)
    # Allowed: what the Guest Access module lists.
    guest.ok("GET", "/sync?timeout=0")
    fid = guest.ok("POST", f"/user/{me}/filter", {"room": {"timeline": {"limit": 5}}})["filter_id"]
    guest.ok("GET", f"/user/{me}/filter/{fid}")
    guest.ok("PUT", f"/profile/{me}/displayname", {"displayname": "Visitor"})
    assert guest.ok("GET", f"/profile/{me}/displayname") == {"displayname": "Visitor"}
    guest.ok("PUT", f"/user/{me}/account_data/org.example.prefs", {"theme": "dark"})
    assert guest.ok("GET", f"/user/{me}/account_data/org.example.prefs") == {"theme": "dark"}
    device = guest.ok("GET", "/account/whoami")["device_id"]
    guest.ok("GET", f"/devices/{q(device)}")
    guest.ok("PUT", f"/devices/{q(device)}", {"display_name": "Lobby screen"})
    status, body = guests_hs.request("GET", "/_matrix/client/versions", token=guest.token)
    assert status == 200, body
    guest.ok("GET", "/initialSync?limit=1")

    # Refused: everything else, with the guest-specific error.
    refused: list[tuple[str, str, Any]] = [
        ("POST", "/createRoom", {}),
        ("GET", "/joined_rooms", None),
        ("GET", "/capabilities", None),
        ("GET", "/pushrules/", None),
        ("POST", "/user_directory/search", {"search_term": "a"}),
        ("POST", "/account/password", {"new_password": "x"}),
        ("POST", "/account/deactivate", {}),
        ("POST", "/publicRooms", {}),
        ("PUT", "/directory/room/%23lobby:" + q(guests_hs.server_name), {"room_id": "!x:y"}),
        ("POST", "/rooms/!nowhere:localhost/invite", {"user_id": "@a:localhost"}),
        ("POST", "/rooms/!nowhere:localhost/kick", {"user_id": "@a:localhost"}),
        ("POST", "/knock/!nowhere:localhost", {}),
        ("DELETE", f"/devices/{q(device)}", {}),
        ("POST", "/delete_devices", {"devices": [device]}),
        ("POST", "/logout/all", {}),
        ("GET", "/notifications", None),
        # Legacy: /events only as used for room previews (with a room_id).
        ("GET", "/events?timeout=0", None),
        ("GET", "/events/$nothing", None),
        ("POST", "/rooms/!nowhere:localhost/redact/$nothing", {}),
    ]
    for method, path, body in refused:
        status, resp = guest.req(method, path, body)
        _assert_guest_forbidden(status, resp, f"{method} {path}")
    status, resp = guests_hs.request("POST", "/_matrix/media/v3/upload", raw=b"hello", token=guest.token,
                                     headers={"Content-Type": "text/plain"})
    _assert_guest_forbidden(status, resp, "media upload")
    # Still a working session after all those refusals; logout is allowed.
    guest.ok("POST", "/logout", {})
    status, resp = guest.req("GET", "/account/whoami")
    assert status == 401 and resp["errcode"] == "M_UNKNOWN_TOKEN"


# -- joining and leaving ------------------------------------------------------------------


def test_guest_joins_only_can_join_rooms_and_leaves_on_withdrawal(guests_hs: ZhomeProcess) -> None:
    owner = Client.user(guests_hs, "owner")
    guest = Client.guest(guests_hs)
    room = owner.create_room(preset="public_chat", room_alias_name="lobby")
    alias = f"#lobby:{guests_hs.server_name}"

    # No m.room.guest_access: a public room is still closed to guests.
    status, body = guest.join(room)
    assert status == 403 and body["errcode"] == "M_FORBIDDEN", (status, body)
    owner.put_state(room, "m.room.guest_access", {"guest_access": "forbidden"})
    status, body = guest.req("POST", f"/rooms/{q(room)}/join", {})
    assert status == 403 and body["errcode"] == "M_FORBIDDEN", (status, body)
    assert owner.membership_of(room, guest.user_id) is None
    # A guest cannot send to a room it has not joined.
    status, body = guest.send(room, "sneaky")
    assert status == 403, (status, body)

    owner.put_state(room, "m.room.guest_access", {"guest_access": "can_join"})
    status, body = guest.join(alias)
    assert status == 200 and body["room_id"] == room, (status, body)
    assert owner.membership_of(room, guest.user_id) == "join"
    status, body = guest.send(room, "hello from a guest")
    assert status == 200, (status, body)
    assert "hello from a guest" in owner.bodies(room)
    # Typing and receipts are open to guests in rooms they are in.
    guest.ok("PUT", f"/rooms/{q(room)}/typing/{q(guest.user_id)}", {"typing": True, "timeout": 1000})
    event_id = body["event_id"]
    guest.ok("POST", f"/rooms/{q(room)}/receipt/m.read/{q(event_id)}", {})

    # Withdrawn: the server makes its guest leave.
    owner.put_state(room, "m.room.guest_access", {"guest_access": "forbidden"})
    wait_until(lambda: owner.membership_of(room, guest.user_id) == "leave", "the guest left")
    status, body = guest.send(room, "still here?")
    assert status == 403, (status, body)
    status, body = guest.join(room)
    assert status == 403 and body["errcode"] == "M_FORBIDDEN", (status, body)
    # A full member is not touched by the change.
    member = Client.user(guests_hs, "member")
    assert member.join(room)[0] == 200
    owner.put_state(room, "m.room.guest_access", {"guest_access": "can_join"})
    owner.put_state(room, "m.room.guest_access", {"guest_access": "forbidden"})
    time.sleep(1)
    assert owner.membership_of(room, member.user_id) == "join"
    # Leaving is a guest's right as well.
    owner.put_state(room, "m.room.guest_access", {"guest_access": "can_join"})
    assert guest.join(room)[0] == 200
    guest.ok("POST", f"/rooms/{q(room)}/leave", {})
    assert owner.membership_of(room, guest.user_id) == "leave"


def test_world_readable_rooms_readable_without_joining(guests_hs: ZhomeProcess) -> None:
    owner = Client.user(guests_hs, "owner")
    guest = Client.guest(guests_hs)
    outsider = Client.user(guests_hs, "outsider")
    room = owner.create_room(preset="public_chat")
    owner.send(room, "before")
    for reader in (guest, outsider):
        status, body = reader.req("GET", f"/rooms/{q(room)}/messages?dir=b")
        assert status == 403, (status, body)
        status, body = reader.req("GET", f"/rooms/{q(room)}/state")
        assert status == 403, (status, body)

    owner.put_state(room, "m.room.history_visibility", {"history_visibility": "world_readable"})
    owner.send(room, "after")
    for reader in (guest, outsider):
        bodies = reader.bodies(room)
        assert "after" in bodies and "before" not in bodies, bodies
        state = {(e["type"], e["state_key"]) for e in reader.ok("GET", f"/rooms/{q(room)}/state")}
        assert ("m.room.create", "") in state
        member = reader.ok("GET", f"/rooms/{q(room)}/state/m.room.member/{q(owner.user_id)}")
        assert member["membership"] == "join"
        members = reader.ok("GET", f"/rooms/{q(room)}/members")["chunk"]
        assert [m["state_key"] for m in members] == [owner.user_id]
        initial = reader.ok("GET", f"/rooms/{q(room)}/initialSync")
        assert "after" in [e["content"].get("body") for e in initial["messages"]["chunk"]]
        reader.ok("GET", f"/events?room_id={q(room)}&timeout=0")
    # Reading is not joining: the guest still may not send.
    status, body = guest.send(room, "hi")
    assert status == 403, (status, body)


def test_history_visibility_change_seen_from_either_side(guests_hs: ZhomeProcess) -> None:
    # Spec "Room History Visibility": a history_visibility event is visible
    # when the visibility before *or* after it allows it.
    owner = Client.user(guests_hs, "owner")
    guest = Client.guest(guests_hs)
    room = owner.create_room(preset="public_chat")
    owner.put_state(room, "m.room.guest_access", {"guest_access": "can_join"})
    owner.send(room, "shared era")
    hv = owner.put_state(room, "m.room.history_visibility", {"history_visibility": "joined"})
    owner.send(room, "joined era")
    assert guest.join(room)[0] == 200
    chunk = guest.ok("GET", f"/rooms/{q(room)}/messages?dir=b&limit=50")["chunk"]
    ids = [e["event_id"] for e in chunk]
    bodies = [e["content"].get("body") for e in chunk if e["type"] == "m.room.message"]
    # Shared before the change (and joined later): seen; joined-only after it: not.
    assert hv in ids and "shared era" in bodies and "joined era" not in bodies, chunk
    timeline = guest.ok("GET", "/sync")["rooms"]["join"][room]["timeline"]["events"]
    assert hv in [e["event_id"] for e in timeline]


# -- upgrading -----------------------------------------------------------------------------


def _register(hs: ZhomeProcess, body: dict[str, Any]) -> tuple[int, Any]:
    return hs.request("POST", CS + "/register", body)


def test_guest_upgrade_keeps_user_id_and_rooms(guests_hs: ZhomeProcess) -> None:
    owner = Client.user(guests_hs, "owner")
    guest = Client.guest(guests_hs)
    room = owner.create_room(preset="public_chat")
    owner.put_state(room, "m.room.guest_access", {"guest_access": "can_join"})
    assert guest.join(room)[0] == 200
    localpart = guest.user_id[1:].split(":", 1)[0]

    body = {"username": localpart, "password": PASSWORD, "guest_access_token": guest.token}
    status, first = _register(guests_hs, body)
    assert status == 401, (status, first)
    status, reg = _register(guests_hs, {**body, "auth": {"type": "m.login.dummy", "session": first["session"]}})
    assert status == 200, (status, reg)
    assert reg["user_id"] == guest.user_id

    full = Client(guests_hs, reg["user_id"], reg["access_token"])
    assert full.ok("GET", "/account/whoami")["is_guest"] is False
    # The same account: still in the room, and now with the full API.
    assert room in full.ok("GET", "/joined_rooms")["joined_rooms"]
    assert owner.membership_of(room, guest.user_id) == "join"
    full.create_room()
    # The guest's own token is no longer a guest's either.
    assert guest.ok("GET", "/account/whoami")["is_guest"] is False
    # Withdrawing guest access leaves a former guest alone.
    owner.put_state(room, "m.room.guest_access", {"guest_access": "forbidden"})
    time.sleep(1)
    assert owner.membership_of(room, guest.user_id) == "join"
    # The password works.
    status, login = guests_hs.request("POST", CS + "/login", {
        "type": "m.login.password", "identifier": {"type": "m.id.user", "user": localpart},
        "password": PASSWORD})
    assert status == 200 and login["user_id"] == guest.user_id, (status, login)
    # Upgrading twice is not possible: the account is no guest any more.
    status, again = _register(guests_hs, {"password": PASSWORD, "guest_access_token": guest.token,
                                          "auth": {"type": "m.login.dummy"}})
    assert status == 403, (status, again)

    # Without a username the guest's own user ID is kept as well.
    other = Client.guest(guests_hs)
    status, reg = _register(guests_hs, {"password": PASSWORD, "guest_access_token": other.token,
                                        "auth": {"type": "m.login.dummy"}})
    assert status == 200 and reg["user_id"] == other.user_id, (status, reg)


def test_guest_cannot_upgrade_another_account(guests_hs: ZhomeProcess) -> None:
    first = Client.guest(guests_hs)
    second = Client.guest(guests_hs)
    real = Client.user(guests_hs, "real")
    first_local = first.user_id[1:].split(":", 1)[0]
    dummy = {"type": "m.login.dummy"}

    # Another guest's username with my token.
    status, body = _register(guests_hs, {"username": first_local, "password": PASSWORD,
                                         "guest_access_token": second.token})
    assert status == 403, (status, body)
    status, body = _register(guests_hs, {"username": first_local, "password": PASSWORD,
                                         "guest_access_token": second.token, "auth": dummy})
    assert status == 403, (status, body)
    # A real user's username with a guest's token.
    status, body = _register(guests_hs, {"username": "real", "password": PASSWORD,
                                         "guest_access_token": first.token, "auth": dummy})
    assert status == 403, (status, body)
    # A real user's token is not a guest's token.
    status, body = _register(guests_hs, {"password": PASSWORD, "guest_access_token": real.token, "auth": dummy})
    assert status == 403, (status, body)
    # A guest's username without its token is taken.
    status, body = _register(guests_hs, {"username": first_local, "password": PASSWORD, "auth": dummy})
    assert status == 400 and body["errcode"] == "M_USER_IN_USE", (status, body)
    status, body = _register(guests_hs, {"password": PASSWORD, "guest_access_token": "nonsense", "auth": dummy})
    assert status == 403, (status, body)
    # Nobody changed.
    assert first.ok("GET", "/account/whoami")["is_guest"] is True
    assert second.ok("GET", "/account/whoami")["is_guest"] is True
    assert real.ok("GET", "/account/whoami")["is_guest"] is False
    status, body = guests_hs.request("POST", CS + "/login", {
        "type": "m.login.password", "identifier": {"type": "m.id.user", "user": first_local},
        "password": PASSWORD})
    assert status == 403, (status, body)


# -- over federation ------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["sqlite3", "postgres"])
def fed_guests(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Server A (no guests) and server G (guests allowed), federating."""
    import contextlib

    from tests.e2e.conftest import ZhomeServers

    root = tmp_path_factory.mktemp(f"guest_fed_{request.param}")
    with contextlib.ExitStack() as stack:
        servers = ZhomeServers(request.param, root, stack)
        servers.a = servers.spawn("127.0.0.2", "a")
        servers.b = servers.spawn("127.0.0.5", "g", overrides=GUESTS_ON)
        yield servers


def test_guest_over_federation(fed_guests: Any) -> None:
    a, g = fed_guests.a, fed_guests.b
    alice = Client.user(a, "alice")
    guest = Client.guest(g)
    via = f"?via={q(a.server_name)}"

    # A public room on A that lets guests in: G's guest joins through A.
    room = alice.create_room(preset="public_chat")
    alice.put_state(room, "m.room.guest_access", {"guest_access": "can_join"})
    status, body = guest.join(room, via)
    assert status == 200, (status, body)
    wait_until(lambda: alice.membership_of(room, guest.user_id) == "join", "A sees the guest join")
    assert guest.send(room, "hello from G")[0] == 200
    wait_until(lambda: "hello from G" in alice.bodies(room), "the guest's message at A")

    # A withdraws guest access: G makes its guest leave, and A sees it.
    alice.put_state(room, "m.room.guest_access", {"guest_access": "forbidden"})
    wait_until(lambda: guest.membership_of(room, guest.user_id) == "leave"
               or guest.membership_of(room, guest.user_id) is None, "G's guest left")
    wait_until(lambda: alice.membership_of(room, guest.user_id) == "leave", "A sees the guest leave")

    # An invite to a private room that is can_join may be accepted...
    open_room = alice.create_room(preset="private_chat", invite=[guest.user_id])
    alice.put_state(open_room, "m.room.guest_access", {"guest_access": "can_join"})
    wait_until(lambda: guest.join(open_room)[0] == 200, "the guest accepts the invite")
    wait_until(lambda: alice.membership_of(open_room, guest.user_id) == "join", "A sees the invite accepted")

    # ...but not one to a room closed to guests: refused, and not left joined at A.
    closed = alice.create_room(preset="private_chat")
    alice.put_state(closed, "m.room.guest_access", {"guest_access": "forbidden"})
    alice.ok("POST", f"/rooms/{q(closed)}/invite", {"user_id": guest.user_id})

    def invited() -> bool:
        return closed in guest.ok("GET", "/sync?timeout=0").get("rooms", {}).get("invite", {})

    wait_until(invited, "the invite reaches G")
    status, body = guest.join(closed)
    assert status == 403 and body["errcode"] == "M_FORBIDDEN", (status, body)
    wait_until(lambda: alice.membership_of(closed, guest.user_id) == "leave", "A sees the guest out again")
    assert alice.membership_of(closed, guest.user_id) != "join"
