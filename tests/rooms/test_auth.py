"""Tests for zhome.rooms.auth: the authorization rules (rooms/v1..v12
"Authorization rules") and server-server-api "Auth events selection".

Each test builds a small room event by event: an event is checked against
the current state selected by ``auth_types_for_event`` and, when accepted,
becomes state, as the persistence path does.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import pytest
from canonicaljson import encode_canonical_json
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey
from unpaddedbase64 import encode_base64

from zhome.rooms.auth import (
    AuthError,
    auth_types_for_event,
    build_auth_events,
    can_redact,
    check_auth_rules,
    creators_of,
    get_named_level,
    get_required_level,
    get_user_power_level,
    is_valid_user_id,
)
from zhome.rooms.events import Event
from zhome.rooms.versions import EventIdFormat, get_room_version

ALICE = "@alice:a.example"  # creator
BOB = "@bob:b.example"
CAROL = "@carol:c.example"
DAVE = "@dave:a.example"

ALL = ["1", "6", "9", "10", "11", "12"]
KNOCK = ["9", "10", "11", "12"]
RESTRICTED = ["9", "10", "11", "12"]


class Room:
    """A room under construction; state is (type, state_key) -> Event."""

    def __init__(
        self,
        version: str,
        creator: str = ALICE,
        create_content: Optional[dict[str, Any]] = None,
    ) -> None:
        self.rv = get_room_version(version)
        self.state: dict[tuple[str, str], Event] = {}
        self.n = 0
        content = dict(create_content or {})
        if not self.rv.implicit_room_creator:
            content.setdefault("creator", creator)
        content.setdefault("room_version", version)
        pdu: dict[str, Any] = {
            "type": "m.room.create",
            "state_key": "",
            "sender": creator,
            "content": content,
            "prev_events": [],
            "auth_events": [],
        }
        if self.rv.hydra:
            create_id = "$createhash"
            self.room_id = "!createhash"
        else:
            self.room_id = "!room:" + creator.split(":", 1)[1]
            pdu["room_id"] = self.room_id
            create_id = self._new_id(creator)
        self.create = Event(pdu, create_id, self.rv)
        check_auth_rules(self.create, {})
        self.state[("m.room.create", "")] = self.create
        self.last = create_id

    def _new_id(self, sender: str) -> str:
        self.n += 1
        if self.rv.event_id_format is EventIdFormat.SERVER_CHOSEN:
            return f"$e{self.n}:{sender.split(':', 1)[1]}"
        return f"$e{self.n}"

    def make(
        self,
        type_: str,
        sender: str,
        content: dict[str, Any],
        state_key: Optional[str] = None,
        redacts: Optional[str] = None,
        event_id: Optional[str] = None,
    ) -> Event:
        pdu: dict[str, Any] = {
            "type": type_,
            "sender": sender,
            "content": content,
            "room_id": self.room_id,
            "prev_events": [self.last],
            "auth_events": [],
        }
        if state_key is not None:
            pdu["state_key"] = state_key
        if redacts is not None:
            if self.rv.redacts_in_content:
                content["redacts"] = redacts
            else:
                pdu["redacts"] = redacts
        if self.rv.event_id_format is EventIdFormat.SERVER_CHOSEN:
            pdu["prev_events"] = [[self.last, {}]]
        return Event(pdu, event_id or self._new_id(sender), self.rv)

    def auth_events(self, ev: Event) -> dict[tuple[str, str], Event]:
        keys = auth_types_for_event(self.rv, ev.type, ev.state_key, ev.sender, ev.content)
        out = {k: self.state[k] for k in keys if k in self.state}
        out[("m.room.create", "")] = self.create  # implied by room_id in v12
        return out

    def check(self, ev: Event) -> None:
        check_auth_rules(ev, self.auth_events(ev))

    def send(self, type_: str, sender: str, content: dict[str, Any], state_key: Optional[str] = None, **kw: Any) -> Event:
        ev = self.make(type_, sender, content, state_key, **kw)
        self.check(ev)
        if ev.is_state():
            self.state[ev.state_tuple()] = ev
        self.last = ev.event_id
        return ev

    def refused(self, type_: str, sender: str, content: dict[str, Any], state_key: Optional[str] = None, **kw: Any) -> AuthError:
        ev = self.make(type_, sender, content, state_key, **kw)
        with pytest.raises(AuthError) as info:
            self.check(ev)
        assert info.value.code == 403
        return info.value

    # -- shorthands ----------------------------------------------------
    def member(self, sender: str, target: str, membership: str, **extra: Any) -> Event:
        return self.send("m.room.member", sender, {"membership": membership, **extra}, target)

    def member_refused(self, sender: str, target: str, membership: str, **extra: Any) -> AuthError:
        return self.refused("m.room.member", sender, {"membership": membership, **extra}, target)

    def pl(self, sender: str, content: dict[str, Any]) -> Event:
        return self.send("m.room.power_levels", sender, content, "")

    def pl_refused(self, sender: str, content: dict[str, Any]) -> AuthError:
        return self.refused("m.room.power_levels", sender, content, "")

    def join_rule(self, rule: str, **extra: Any) -> Event:
        return self.send("m.room.join_rules", ALICE, {"join_rule": rule, **extra}, "")


def standard_pl(rv_version: str, **users: int) -> dict[str, Any]:
    """Power levels as room creation sets them: alice 100 (implicit in v12)."""
    levels: dict[str, int] = {} if get_room_version(rv_version).hydra else {ALICE: 100}
    levels.update({u: lvl for u, lvl in users.items()})
    return {"users": levels, "users_default": 0, "events_default": 0, "state_default": 50,
            "ban": 50, "kick": 50, "redact": 50, "invite": 0, "events": {}}


def setup(version: str, join_rule: str = "public", users: Optional[dict[str, int]] = None) -> Room:
    room = Room(version)
    room.member(ALICE, ALICE, "join")
    room.pl(ALICE, standard_pl(version, **(users or {})))
    room.join_rule(join_rule)
    return room


# ---------------------------------------------------------------------------
# create


@pytest.mark.parametrize("version", ALL)
def test_create_allowed(version: str) -> None:
    room = Room(version)
    assert room.state[("m.room.create", "")].sender == ALICE


def _create(version: str, **changes: Any) -> Event:
    rv = get_room_version(version)
    pdu: dict[str, Any] = {"type": "m.room.create", "state_key": "", "sender": ALICE,
                           "content": {"room_version": version}, "prev_events": [], "auth_events": []}
    if not rv.implicit_room_creator:
        pdu["content"]["creator"] = ALICE
    if not rv.hydra:
        pdu["room_id"] = "!r:a.example"
    for k, v in changes.items():
        if v is None:
            pdu.pop(k, None)
        else:
            pdu[k] = v
    return Event(pdu, "$create" + (":a.example" if rv.event_id_format is EventIdFormat.SERVER_CHOSEN else ""), rv)


@pytest.mark.parametrize("version", ALL)
def test_create_with_prev_events_refused(version: str) -> None:
    prev: list[Any] = [["$x:a.example", {}]] if version == "1" else ["$x"]
    with pytest.raises(AuthError, match="prev_events"):
        check_auth_rules(_create(version, prev_events=prev), {})


@pytest.mark.parametrize("version", ["1", "6", "9", "10", "11"])
def test_create_room_id_domain_must_match_sender(version: str) -> None:
    with pytest.raises(AuthError, match="domain"):
        check_auth_rules(_create(version, room_id="!r:elsewhere.example"), {})


def test_v12_create_must_not_have_room_id() -> None:
    with pytest.raises(AuthError, match="room_id"):
        check_auth_rules(_create("12", room_id="!r:a.example"), {})


@pytest.mark.parametrize("version", ALL)
def test_create_unknown_room_version_refused(version: str) -> None:
    ev = _create(version)
    ev.pdu["content"]["room_version"] = "99"
    with pytest.raises(AuthError, match="room version"):
        check_auth_rules(ev, {})


@pytest.mark.parametrize("version", ["1", "6", "9", "10"])
def test_create_needs_creator_until_v10(version: str) -> None:
    ev = _create(version)
    del ev.pdu["content"]["creator"]
    with pytest.raises(AuthError, match="creator"):
        check_auth_rules(ev, {})


@pytest.mark.parametrize("version", ["11", "12"])
def test_create_without_creator_allowed_from_v11(version: str) -> None:
    check_auth_rules(_create(version), {})


def test_v12_additional_creators_validated() -> None:
    ok = _create("12")
    ok.pdu["content"]["additional_creators"] = [BOB, CAROL]
    check_auth_rules(ok, {})
    for bad in (["not-a-user"], "@bob:b.example", [42], ["@:b.example"]):
        ev = _create("12")
        ev.pdu["content"]["additional_creators"] = bad
        with pytest.raises(AuthError, match="additional_creators"):
            check_auth_rules(ev, {})


# ---------------------------------------------------------------------------
# auth events checks


@pytest.mark.parametrize("version", ALL)
def test_auth_event_from_another_room_refused(version: str) -> None:
    room = setup(version)
    other = setup(version)
    ev = room.make("m.room.message", ALICE, {"body": "hi"})
    auth = room.auth_events(ev)
    check_auth_rules(ev, auth)
    foreign_pl = other.state[("m.room.power_levels", "")]
    foreign_pl.pdu["room_id"] = "!other:a.example"
    auth[("m.room.power_levels", "")] = foreign_pl
    with pytest.raises(AuthError, match="another room"):
        check_auth_rules(ev, auth)


@pytest.mark.parametrize("version", ALL)
def test_missing_create_refused(version: str) -> None:
    room = setup(version)
    ev = room.make("m.room.message", ALICE, {})
    auth = room.auth_events(ev)
    del auth[("m.room.create", "")]
    with pytest.raises(AuthError, match="m.room.create"):
        check_auth_rules(ev, auth)


@pytest.mark.parametrize("version", ALL)
def test_auth_event_not_in_selection_refused(version: str) -> None:
    room = setup(version)
    ev = room.make("m.room.message", ALICE, {})
    auth = room.auth_events(ev)
    auth[("m.room.join_rules", "")] = room.state[("m.room.join_rules", "")]
    with pytest.raises(AuthError, match="selection"):
        check_auth_rules(ev, auth)


@pytest.mark.parametrize("version", ALL)
def test_rejected_auth_event_refused(version: str) -> None:
    room = setup(version)
    ev = room.make("m.room.message", ALICE, {})
    auth = room.auth_events(ev)
    pl = auth[("m.room.power_levels", "")]
    auth[("m.room.power_levels", "")] = Event(pl.pdu, pl.event_id, pl.room_version, rejected_reason="auth")
    with pytest.raises(AuthError, match="rejected"):
        check_auth_rules(ev, auth)


def test_build_auth_events_rejects_duplicates() -> None:
    room = setup("10")
    pl = room.state[("m.room.power_levels", "")]
    assert build_auth_events([room.create, pl]) == {("m.room.create", ""): room.create, ("m.room.power_levels", ""): pl}
    with pytest.raises(AuthError, match="duplicate"):
        build_auth_events([room.create, pl, pl])


def test_v12_room_id_must_name_the_create_event() -> None:
    room = setup("12")
    ev = room.make("m.room.message", ALICE, {})
    ev.pdu["room_id"] = "!someotherhash"
    auth = room.auth_events(ev)
    with pytest.raises(AuthError):
        check_auth_rules(ev, auth)


@pytest.mark.parametrize("version", ALL)
def test_unfederated_room_refuses_other_servers(version: str) -> None:
    room = Room(version, create_content={"m.federate": False})
    room.member(ALICE, ALICE, "join")
    room.join_rule("public")
    room.member(DAVE, DAVE, "join")  # same server as the creator
    err = room.member_refused(BOB, BOB, "join")
    assert "federated" in err.msg


# ---------------------------------------------------------------------------
# joins


@pytest.mark.parametrize("version", ALL)
def test_creator_first_join_allowed(version: str) -> None:
    room = Room(version)
    room.member(ALICE, ALICE, "join")
    assert room.state[("m.room.member", ALICE)].membership == "join"


@pytest.mark.parametrize("version", ALL)
def test_non_creator_first_join_refused(version: str) -> None:
    room = Room(version)
    room.member_refused(BOB, BOB, "join")


@pytest.mark.parametrize("version", ALL)
def test_join_for_someone_else_refused(version: str) -> None:
    room = setup(version)
    room.member_refused(ALICE, BOB, "join")


@pytest.mark.parametrize("version", ALL)
def test_join_public_allowed(version: str) -> None:
    room = setup(version, "public")
    room.member(BOB, BOB, "join")


@pytest.mark.parametrize("version", ALL)
def test_join_invite_only(version: str) -> None:
    room = setup(version, "invite")
    room.member_refused(BOB, BOB, "join")
    room.member(ALICE, BOB, "invite")
    room.member(BOB, BOB, "join")


@pytest.mark.parametrize("version", ALL)
def test_join_without_join_rules_refused(version: str) -> None:
    room = Room(version)
    room.member(ALICE, ALICE, "join")
    room.member_refused(BOB, BOB, "join")


@pytest.mark.parametrize("version", KNOCK)
def test_knock_then_invite_then_join(version: str) -> None:
    room = setup(version, "knock")
    room.member_refused(BOB, BOB, "join")
    room.member(BOB, BOB, "knock")
    room.member(ALICE, BOB, "invite")
    room.member_refused(BOB, BOB, "knock")
    room.member(BOB, BOB, "join")


@pytest.mark.parametrize("version", KNOCK)
def test_knock_can_be_retracted(version: str) -> None:
    room = setup(version, "knock")
    room.member(BOB, BOB, "knock")
    room.member(BOB, BOB, "leave")


@pytest.mark.parametrize("version", KNOCK)
def test_knock_refused_in_public_room_and_for_others(version: str) -> None:
    room = setup(version, "public")
    room.member_refused(BOB, BOB, "knock")
    room2 = setup(version, "knock")
    room2.member_refused(ALICE, BOB, "knock")


@pytest.mark.parametrize("version", ["10", "11", "12"])
def test_knock_allowed_in_knock_restricted_room(version: str) -> None:
    room = setup(version, "knock_restricted")
    room.member(BOB, BOB, "knock")
    room.member(ALICE, BOB, "ban")
    room.member_refused(BOB, BOB, "knock")


def test_knock_restricted_is_not_knockable_in_v9() -> None:
    room = setup("9", "knock_restricted")
    room.member_refused(BOB, BOB, "knock")


@pytest.mark.parametrize("version", ["1", "6"])
def test_knock_unknown_before_v7(version: str) -> None:
    room = setup(version, "knock")
    err = room.member_refused(BOB, BOB, "knock")
    assert "unknown membership" in err.msg
    room.member_refused(BOB, BOB, "join")  # "knock" join rule means nothing yet


@pytest.mark.parametrize("version", RESTRICTED)
@pytest.mark.parametrize("rule", ["restricted", "knock_restricted"])
def test_restricted_join(version: str, rule: str) -> None:
    room = setup(version, rule, users={CAROL: 0})
    if rule == "knock_restricted" and version == "9":
        # knock_restricted exists from v10 only.
        room.member_refused(BOB, BOB, "join", join_authorised_via_users_server=ALICE)
        return
    room.member_refused(BOB, BOB, "join")
    # a user who is not joined cannot authorise
    room.member_refused(BOB, BOB, "join", join_authorised_via_users_server=CAROL)
    # alice is joined and may invite
    room.member(BOB, BOB, "join", join_authorised_via_users_server=ALICE)


@pytest.mark.parametrize("version", RESTRICTED)
def test_restricted_join_via_user_without_invite_power_refused(version: str) -> None:
    room = Room(version)
    room.member(ALICE, ALICE, "join")
    room.join_rule("public")
    room.member(CAROL, CAROL, "join")
    content = standard_pl(version, **{CAROL: 0})
    content["invite"] = 50
    room.pl(ALICE, content)
    room.join_rule("restricted", allow=[{"type": "m.room_membership", "room_id": "!space:a.example"}])
    err = room.member_refused(BOB, BOB, "join", join_authorised_via_users_server=CAROL)
    assert "invite" in err.msg
    room.member(BOB, BOB, "join", join_authorised_via_users_server=ALICE)


@pytest.mark.parametrize("version", RESTRICTED)
def test_restricted_join_allows_invited_without_via(version: str) -> None:
    room = setup(version, "restricted")
    room.member(ALICE, BOB, "invite")
    room.member(BOB, BOB, "join")


def test_restricted_means_nothing_before_v8() -> None:
    room = setup("6", "restricted")
    room.member_refused(BOB, BOB, "join", join_authorised_via_users_server=ALICE)


# ---------------------------------------------------------------------------
# invites


@pytest.mark.parametrize("version", ALL)
def test_invite_by_joined_member_allowed(version: str) -> None:
    room = setup(version, "invite")
    room.member(ALICE, BOB, "invite")


@pytest.mark.parametrize("version", ALL)
def test_invite_by_non_member_refused(version: str) -> None:
    room = setup(version, "invite")
    err = room.member_refused(CAROL, BOB, "invite")
    assert "not joined" in err.msg


@pytest.mark.parametrize("version", ALL)
def test_invite_needs_invite_level(version: str) -> None:
    room = setup(version, "public")
    room.member(BOB, BOB, "join")
    content = standard_pl(version)
    content["invite"] = 50
    room.pl(ALICE, content)
    room.member_refused(BOB, CAROL, "invite")
    room.member(ALICE, CAROL, "invite")


@pytest.mark.parametrize("version", ALL)
def test_invite_of_joined_or_banned_refused(version: str) -> None:
    room = setup(version, "public")
    room.member(BOB, BOB, "join")
    room.member_refused(ALICE, BOB, "invite")
    room.member(ALICE, CAROL, "ban")
    room.member_refused(ALICE, CAROL, "invite")


def _tpi_room(version: str) -> tuple[Room, SigningKey]:
    room = setup(version, "invite")
    key = SigningKey.generate()
    room.send(
        "m.room.third_party_invite", ALICE,
        {"display_name": "b...@example.com", "key_validity_url": "https://id.example/isvalid",
         "public_key": encode_base64(bytes(key.verify_key))},
        "tok",
    )
    return room, key


def _signed(key: SigningKey, mxid: str, token: str = "tok") -> dict[str, Any]:
    signed: dict[str, Any] = {"mxid": mxid, "token": token}
    sig = key.sign(encode_canonical_json(signed)).signature
    signed["signatures"] = {"id.example": {"ed25519:0": encode_base64(sig)}}
    return signed


@pytest.mark.parametrize("version", ["1", "10", "12"])
def test_third_party_invite_signed_by_identity_server_allowed(version: str) -> None:
    room, key = _tpi_room(version)
    room.member(ALICE, BOB, "invite", third_party_invite={"display_name": "b", "signed": _signed(key, BOB)})


@pytest.mark.parametrize("version", ["1", "10", "12"])
def test_third_party_invite_refusals(version: str) -> None:
    room, key = _tpi_room(version)
    other = SigningKey.generate()
    err = room.member_refused(ALICE, BOB, "invite", third_party_invite={"signed": _signed(other, BOB)})
    assert "signature" in err.msg
    err = room.member_refused(ALICE, BOB, "invite", third_party_invite={"signed": _signed(key, CAROL)})
    assert "mxid" in err.msg
    err = room.member_refused(ALICE, BOB, "invite", third_party_invite={"signed": _signed(key, BOB, "nope")})
    assert "token" in err.msg
    room.join_rule("public")
    room.member(CAROL, CAROL, "join")
    err = room.member_refused(CAROL, BOB, "invite", third_party_invite={"signed": _signed(key, BOB)})
    assert "did not send" in err.msg


@pytest.mark.parametrize("version", ALL)
def test_third_party_invite_event_needs_invite_level(version: str) -> None:
    room = setup(version, "public")
    room.member(BOB, BOB, "join")
    content = standard_pl(version)
    content["invite"] = 50
    room.pl(ALICE, content)
    room.refused("m.room.third_party_invite", BOB, {"public_key": "x"}, "t")
    room.send("m.room.third_party_invite", ALICE, {"public_key": "x"}, "t")


# ---------------------------------------------------------------------------
# leave, kick, ban


@pytest.mark.parametrize("version", ALL)
def test_leave_self(version: str) -> None:
    room = setup(version)
    room.member(BOB, BOB, "join")
    room.member(BOB, BOB, "leave")
    room.member_refused(BOB, BOB, "leave")  # already left


@pytest.mark.parametrize("version", ALL)
def test_reject_invite(version: str) -> None:
    room = setup(version, "invite")
    room.member(ALICE, BOB, "invite")
    room.member(BOB, BOB, "leave")


@pytest.mark.parametrize("version", ALL)
def test_kick_levels(version: str) -> None:
    room = setup(version, users={CAROL: 50})
    for user in (BOB, CAROL, DAVE):
        room.member(user, user, "join")
    room.member_refused(BOB, DAVE, "leave")    # bob 0 < kick 50
    room.member_refused(CAROL, ALICE, "leave")  # target has more power
    room.member(CAROL, DAVE, "leave")           # 50 >= kick, dave 0 < 50
    room.member(ALICE, CAROL, "leave")


@pytest.mark.parametrize("version", ALL)
def test_kick_equal_level_refused(version: str) -> None:
    room = setup(version, users={BOB: 50, CAROL: 50})
    room.member(BOB, BOB, "join")
    room.member(CAROL, CAROL, "join")
    room.member_refused(BOB, CAROL, "leave")


@pytest.mark.parametrize("version", ALL)
def test_kick_by_non_member_refused(version: str) -> None:
    room = setup(version, users={CAROL: 90})
    room.member(BOB, BOB, "join")
    room.member_refused(CAROL, BOB, "leave")


@pytest.mark.parametrize("version", ALL)
def test_ban_levels(version: str) -> None:
    room = setup(version, users={CAROL: 50})
    for user in (BOB, CAROL):
        room.member(user, user, "join")
    room.member_refused(BOB, CAROL, "ban")
    room.member_refused(CAROL, ALICE, "ban")
    room.member(CAROL, BOB, "ban")
    room.member(CAROL, DAVE, "ban")  # banning a non-member is fine


@pytest.mark.parametrize("version", ALL)
def test_ban_by_non_member_refused(version: str) -> None:
    room = setup(version, users={CAROL: 60})
    room.member(BOB, BOB, "join")
    room.member_refused(CAROL, BOB, "ban")


@pytest.mark.parametrize("version", ALL)
def test_unban_needs_ban_level(version: str) -> None:
    room = setup(version, users={CAROL: 50})
    room.member(CAROL, CAROL, "join")
    content = standard_pl(version, **{CAROL: 50})
    content["ban"] = 75
    room.pl(ALICE, content)
    room.member(ALICE, BOB, "ban")
    err = room.member_refused(CAROL, BOB, "leave")  # kick level yes, ban level no
    assert "ban level" in err.msg
    room.member(ALICE, BOB, "leave")
    room.member(BOB, BOB, "join")


@pytest.mark.parametrize("version", ALL)
def test_rejoin_after_ban_refused(version: str) -> None:
    room = setup(version)
    room.member(BOB, BOB, "join")
    room.member(ALICE, BOB, "ban")
    err = room.member_refused(BOB, BOB, "join")
    assert "banned" in err.msg
    room.member_refused(BOB, BOB, "leave")  # a ban cannot be lifted by oneself


@pytest.mark.parametrize("version", ALL)
def test_unknown_membership_refused(version: str) -> None:
    room = setup(version)
    room.member_refused(BOB, BOB, "lurk")
    room.refused("m.room.member", BOB, {}, BOB)


# ---------------------------------------------------------------------------
# sending events


@pytest.mark.parametrize("version", ALL)
def test_sender_not_in_room_refused(version: str) -> None:
    room = setup(version)
    err = room.refused("m.room.message", BOB, {"body": "hi"})
    assert "not joined" in err.msg
    room.member(BOB, BOB, "join")
    room.send("m.room.message", BOB, {"body": "hi"})
    room.member(BOB, BOB, "leave")
    room.refused("m.room.message", BOB, {"body": "hi"})


@pytest.mark.parametrize("version", ALL)
def test_events_default_and_state_default(version: str) -> None:
    room = setup(version)
    room.member(BOB, BOB, "join")
    room.send("m.room.message", BOB, {"body": "ok"})
    room.refused("m.room.topic", BOB, {"topic": "no"}, "")  # state_default 50
    content = standard_pl(version)
    content["events_default"] = 10
    content["events"] = {"m.room.topic": 0}
    room.pl(ALICE, content)
    room.refused("m.room.message", BOB, {"body": "no"})
    room.send("m.room.topic", BOB, {"topic": "yes"}, "")
    room.send("m.room.message", ALICE, {"body": "ok"})


@pytest.mark.parametrize("version", ALL)
def test_no_power_levels_event_defaults(version: str) -> None:
    room = Room(version)
    room.member(ALICE, ALICE, "join")
    room.join_rule("public")
    room.member(BOB, BOB, "join")
    auth = dict(room.state)
    assert get_user_power_level(ALICE, auth) == (math.inf if version == "12" else 100)
    assert get_user_power_level(BOB, auth) == 0
    # m.room.power_levels: "If there is no state_default in the
    # m.room.power_levels event, or there is no m.room.power_levels event,
    # the state_default is 50."
    assert get_required_level("m.room.name", True, auth) == 50
    assert get_named_level("ban", auth) == 50
    room.refused("m.room.name", BOB, {"name": "not just anyone"}, "")
    room.send("m.room.name", ALICE, {"name": "the creator may"}, "")
    # Nor may a non-creator be the one to set the first power levels.
    room.refused("m.room.power_levels", BOB, {"users": {BOB: 100}}, "")
    room.member_refused(BOB, ALICE, "ban")


@pytest.mark.parametrize("version", ALL)
def test_state_key_of_another_user_refused(version: str) -> None:
    room = setup(version)
    room.send("m.custom", ALICE, {}, ALICE)
    err = room.refused("m.custom", ALICE, {}, BOB)
    assert "another user" in err.msg


def test_aliases_special_case_v1() -> None:
    room = setup("1")
    # the server may set its own aliases without any member being joined
    room.send("m.room.aliases", BOB, {"aliases": ["#x:b.example"]}, "b.example")
    room.refused("m.room.aliases", BOB, {"aliases": ["#x:c.example"]}, "c.example")


@pytest.mark.parametrize("version", ["6", "10"])
def test_aliases_is_ordinary_state_from_v6(version: str) -> None:
    room = setup(version)
    room.refused("m.room.aliases", BOB, {"aliases": []}, "b.example")  # bob not joined
    room.send("m.room.aliases", ALICE, {"aliases": []}, "a.example")


# ---------------------------------------------------------------------------
# power levels changes


@pytest.mark.parametrize("version", ALL)
def test_power_level_changes(version: str) -> None:
    room = setup(version, users={CAROL: 50})
    room.member(CAROL, CAROL, "join")
    room.member(BOB, BOB, "join")
    # carol (50) may raise bob up to her own level, not beyond
    err = room.pl_refused(CAROL, standard_pl(version, **{CAROL: 50, BOB: 51}))
    assert "above" in err.msg
    room.pl(CAROL, standard_pl(version, **{CAROL: 50, BOB: 50}))
    # bob now equals carol: she cannot change him any more
    room.pl_refused(CAROL, standard_pl(version, **{CAROL: 50, BOB: 0}))
    # carol cannot touch alice (v1-v11) and may lower herself
    if version != "12":
        room.pl_refused(CAROL, {**standard_pl(version, **{CAROL: 50, BOB: 50}), "users": {ALICE: 40, CAROL: 50, BOB: 50}})
    room.pl(CAROL, standard_pl(version, **{CAROL: 10, BOB: 50}))


@pytest.mark.parametrize("version", ALL)
def test_power_level_named_and_event_levels(version: str) -> None:
    room = setup(version, users={CAROL: 50})
    room.member(CAROL, CAROL, "join")
    base = standard_pl(version, **{CAROL: 50})
    room.pl(CAROL, {**base, "ban": 40})
    room.pl_refused(CAROL, {**base, "ban": 60})
    base_ev = {**base, "ban": 40, "events": {"m.room.name": 50}}
    room.pl(CAROL, base_ev)
    room.pl_refused(CAROL, {**base_ev, "events": {"m.room.name": 50, "m.room.tombstone": 100}})
    room.pl(ALICE, {**base_ev, "events": {"m.room.name": 50, "m.room.tombstone": 100}})
    # an existing entry above one's level may be neither changed nor removed
    room.pl_refused(CAROL, {**base_ev, "events": {"m.room.name": 50}})
    room.pl_refused(CAROL, {**base_ev, "events": {"m.room.name": 50, "m.room.tombstone": 50}})
    room.pl_refused(CAROL, {**base_ev, "events": {"m.room.name": 50, "m.room.tombstone": 100}, "state_default": 100})


@pytest.mark.parametrize("version", ["6", "10", "12"])
def test_notifications_levels_checked_from_v6(version: str) -> None:
    room = setup(version, users={CAROL: 50})
    room.member(CAROL, CAROL, "join")
    base = standard_pl(version, **{CAROL: 50})
    room.pl(CAROL, {**base, "notifications": {"room": 50}})
    room.pl_refused(CAROL, {**base, "notifications": {"room": 60}})


def test_notifications_not_checked_in_v1() -> None:
    room = setup("1", users={CAROL: 50})
    room.member(CAROL, CAROL, "join")
    room.pl(CAROL, {**standard_pl("1", **{CAROL: 50}), "notifications": {"room": 60}})


@pytest.mark.parametrize("version", ALL)
def test_power_levels_users_must_be_user_ids(version: str) -> None:
    room = setup(version)
    room.pl_refused(ALICE, {**standard_pl(version), "users": {"not-a-user": 10}})
    room.pl_refused(ALICE, {**standard_pl(version), "users": ["@x:y"]})


@pytest.mark.parametrize("version", ["1", "6", "9"])
def test_string_power_levels_accepted_before_v10(version: str) -> None:
    room = setup(version, users={BOB: 0})
    room.member(BOB, BOB, "join")
    room.pl(ALICE, {**standard_pl(version), "users": {ALICE: "100", BOB: " +050 "}, "ban": "50"})
    auth = dict(room.state)
    assert get_user_power_level(BOB, auth) == 50
    assert get_named_level("ban", auth) == 50
    room.pl_refused(ALICE, {**standard_pl(version), "users": {ALICE: 100, BOB: "5.5"}})
    room.pl_refused(ALICE, {**standard_pl(version), "users": {ALICE: 100, BOB: "1_0"}})


@pytest.mark.parametrize("version", ["10", "11", "12"])
def test_string_power_levels_refused_from_v10(version: str) -> None:
    room = setup(version)
    base = standard_pl(version)
    room.pl_refused(ALICE, {**base, "ban": "50"})
    room.pl_refused(ALICE, {**base, "events": {"m.room.name": "50"}})
    room.pl_refused(ALICE, {**base, "notifications": {"room": "50"}})
    room.pl_refused(ALICE, {**base, "users": {BOB: "50"}})
    room.pl_refused(ALICE, {**base, "events": ["m.room.name"]})
    room.pl_refused(ALICE, {**base, "kick": True})
    room.pl(ALICE, {**base, "ban": 50})


def test_float_power_levels_truncated_in_v1() -> None:
    room = setup("1")
    room.member(BOB, BOB, "join")
    room.pl(ALICE, {**standard_pl("1"), "users": {ALICE: 100, BOB: 50.57}})
    assert get_user_power_level(BOB, dict(room.state)) == 50


# ---------------------------------------------------------------------------
# v12 creators


def test_v12_creator_has_infinite_power() -> None:
    room = setup("12", users={BOB: 100})
    room.member(BOB, BOB, "join")
    auth = dict(room.state)
    assert get_user_power_level(ALICE, auth) == math.inf
    room.member_refused(BOB, ALICE, "leave")  # 100 < infinity
    room.member_refused(BOB, ALICE, "ban")
    room.member(ALICE, BOB, "ban")
    # a creator may set any level, however high
    room.pl(ALICE, {**standard_pl("12"), "users": {CAROL: 2**53 - 1}, "ban": 2**53 - 1})


def test_v12_creators_in_power_levels_users_refused() -> None:
    room = Room("12", create_content={"additional_creators": [BOB]})
    assert creators_of(room.create) == {ALICE, BOB}
    room.member(ALICE, ALICE, "join")
    room.pl(ALICE, standard_pl("12"))
    err = room.pl_refused(ALICE, {**standard_pl("12"), "users": {ALICE: 100}})
    assert "creators" in err.msg
    room.pl_refused(ALICE, {**standard_pl("12"), "users": {BOB: 100}})
    room.join_rule("public")
    room.member(BOB, BOB, "join")
    assert get_user_power_level(BOB, dict(room.state)) == math.inf
    room.member_refused(ALICE, BOB, "ban")  # inf is not < inf
    room.pl(BOB, {**standard_pl("12"), "users": {CAROL: 99}})


def test_v12_only_sender_is_first_joiner() -> None:
    room = Room("12", create_content={"additional_creators": [BOB]})
    room.member_refused(BOB, BOB, "join")
    room.member(ALICE, ALICE, "join")


@pytest.mark.parametrize("version", ["1", "10", "11"])
def test_creator_in_users_allowed_before_v12(version: str) -> None:
    room = setup(version)
    room.pl(ALICE, {**standard_pl(version), "users": {ALICE: 100}})


# ---------------------------------------------------------------------------
# redactions


@pytest.mark.parametrize("version", ["1"])
def test_v1_redaction_rule(version: str) -> None:
    room = setup(version)
    room.member(BOB, BOB, "join")
    room.member(DAVE, DAVE, "join")
    own = room.send("m.room.message", BOB, {"body": "x"})  # $eN:b.example
    alices = room.send("m.room.message", ALICE, {"body": "y"})
    room.send("m.room.redaction", BOB, {}, redacts=own.event_id)
    err = room.refused("m.room.redaction", BOB, {}, redacts=alices.event_id)
    assert "redact" in err.msg
    room.send("m.room.redaction", ALICE, {}, redacts=own.event_id)  # redact level
    # v1 compares event ID domains: dave shares alice's server
    room.send("m.room.redaction", DAVE, {}, redacts=alices.event_id)


@pytest.mark.parametrize("version", ["6", "9", "10", "11", "12"])
def test_redaction_auth_only_uses_event_levels_from_v3(version: str) -> None:
    room = setup(version)
    room.member(BOB, BOB, "join")
    alices = room.send("m.room.message", ALICE, {"body": "y"})
    # the redact level is checked when applying, not by the auth rules
    room.send("m.room.redaction", BOB, {}, redacts=alices.event_id)
    room.pl(ALICE, {**standard_pl(version), "events": {"m.room.redaction": 50}})
    room.refused("m.room.redaction", BOB, {}, redacts=alices.event_id)


@pytest.mark.parametrize("version", ALL)
def test_can_redact(version: str) -> None:
    room = setup(version, users={CAROL: 50})
    rv = room.rv
    auth = dict(room.state)
    assert can_redact(rv, BOB, BOB, auth)
    assert not can_redact(rv, BOB, ALICE, auth)
    assert can_redact(rv, CAROL, BOB, auth)
    assert can_redact(rv, ALICE, CAROL, auth)
    assert not can_redact(rv, DAVE, ALICE, auth)
    assert can_redact(rv, DAVE, ALICE, auth, same_server_ok=True)
    room.pl(ALICE, {**standard_pl(version, **{CAROL: 50}), "redact": 60})
    assert not can_redact(rv, CAROL, BOB, dict(room.state))


# ---------------------------------------------------------------------------
# auth events selection


def test_auth_types_for_plain_event() -> None:
    v10 = get_room_version("10")
    assert auth_types_for_event(v10, "m.room.message", None, BOB, {}) == [
        ("m.room.create", ""), ("m.room.power_levels", ""), ("m.room.member", BOB)]
    assert auth_types_for_event(v10, "m.room.create", "", BOB, {}) == []


def test_auth_types_v12_omit_create() -> None:
    v12 = get_room_version("12")
    assert ("m.room.create", "") not in auth_types_for_event(v12, "m.room.message", None, BOB, {})


def test_auth_types_for_membership() -> None:
    v10 = get_room_version("10")
    join = auth_types_for_event(v10, "m.room.member", BOB, BOB,
                                {"membership": "join", "join_authorised_via_users_server": ALICE})
    assert set(join) == {("m.room.create", ""), ("m.room.power_levels", ""), ("m.room.member", BOB),
                         ("m.room.join_rules", ""), ("m.room.member", ALICE)}
    leave = auth_types_for_event(v10, "m.room.member", BOB, ALICE, {"membership": "leave"})
    assert ("m.room.join_rules", "") not in leave and ("m.room.member", BOB) in leave
    knock = auth_types_for_event(v10, "m.room.member", BOB, BOB, {"membership": "knock"})
    assert ("m.room.join_rules", "") in knock
    tpi = auth_types_for_event(v10, "m.room.member", BOB, ALICE,
                               {"membership": "invite", "third_party_invite": {"signed": {"token": "t"}}})
    assert ("m.room.third_party_invite", "t") in tpi
    # v6 has no restricted rooms: the authorising user is not selected
    v6 = get_room_version("6")
    assert ("m.room.member", ALICE) not in auth_types_for_event(
        v6, "m.room.member", BOB, BOB, {"membership": "join", "join_authorised_via_users_server": ALICE})


def test_is_valid_user_id() -> None:
    assert is_valid_user_id("@a:b.example")
    assert is_valid_user_id("@a:[::1]:8448")
    assert not is_valid_user_id("a:b")
    assert not is_valid_user_id("@a")
    assert not is_valid_user_id("@:b")
    assert not is_valid_user_id("@a b:c")
    assert not is_valid_user_id("@a:" + "x" * 300)


# ---------------------------------------------------------------------------
# property


@settings(max_examples=150, deadline=None)
@given(
    version=st.sampled_from(ALL),
    sender_level=st.integers(min_value=0, max_value=99),
    target_before=st.integers(min_value=-10, max_value=120),
    target_after=st.integers(min_value=-10, max_value=120),
)
def test_property_cannot_raise_others_above_own_level(
    version: str, sender_level: int, target_before: int, target_after: int
) -> None:
    room = setup(version, users={CAROL: sender_level, BOB: target_before})
    room.member(CAROL, CAROL, "join")
    new = standard_pl(version, **{CAROL: sender_level, BOB: target_after})
    content = {**new, "state_default": 0}  # only the users rules are in play
    room.pl(ALICE, {**standard_pl(version, **{CAROL: sender_level, BOB: target_before}), "state_default": 0})
    ev = room.make("m.room.power_levels", CAROL, content, "")
    allowed = True
    try:
        room.check(ev)
    except AuthError:
        allowed = False
    if target_after != target_before and target_after > sender_level:
        assert not allowed
    if target_before != target_after and target_before >= sender_level:
        assert not allowed
    if target_before == target_after or (target_after <= sender_level and target_before < sender_level):
        assert allowed
