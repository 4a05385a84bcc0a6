"""Who authorises a join to a restricted room: the choice of the local user
(pure), and the decision on a real server's state on both engines.

Spec: client-server-api "Restricted rooms", server-server-api "Restricted
rooms", rooms v8/v10 auth rules for ``join_authorised_via_users_server``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import pytest
import pytest_twisted

from tests.storage.test_event_graph import _config
from zhome.http.errors import MatrixError
from zhome.rooms.events import Event
from zhome.rooms.restricted import (
    CANNOT_TELL,
    NOT_ALLOWED,
    NOT_GRANTED,
    JoinNotAuthorised,
    choose_authoriser,
    is_restricted,
)
from zhome.rooms.versions import get_room_version
from zhome.server import HomeServer

RV10 = get_room_version("10")
RV12 = get_room_version("12")
HS = "here.test"


def _ev(etype: str, state_key: str, content: dict[str, Any], sender: str = "@c:here.test",
        rv: Any = RV10) -> Event:
    pdu = {"type": etype, "state_key": state_key, "content": content, "sender": sender, "room_id": "!r:here.test"}
    return Event(pdu, f"${etype}{state_key}", rv)


def _state(users: dict[str, int], members: dict[str, str], invite: Optional[int] = None,
           rv: Any = RV10) -> dict[tuple[str, str], Event]:
    pl: dict[str, Any] = {"users": users}
    if invite is not None:
        pl["invite"] = invite
    state = {("m.room.create", ""): _ev("m.room.create", "", {"room_version": rv.identifier}, rv=rv),
             ("m.room.power_levels", ""): _ev("m.room.power_levels", "", pl, rv=rv)}
    for user, membership in members.items():
        state[("m.room.member", user)] = _ev("m.room.member", user, {"membership": membership}, user, rv)
    return state


def test_choice_prefers_the_most_powerful_local_joined_user() -> None:
    state = _state({"@a:here.test": 50, "@b:here.test": 100, "@far:there.test": 100},
                   {"@a:here.test": "join", "@b:here.test": "join", "@far:there.test": "join"})
    assert choose_authoriser(state, HS) == "@b:here.test"
    # Another server's users are never this server's to name.
    assert choose_authoriser(state, "there.test") == "@far:there.test"


def test_choice_needs_membership_and_the_invite_level() -> None:
    state = _state({"@a:here.test": 50, "@b:here.test": 100, "@z:here.test": 0},
                   {"@a:here.test": "join", "@b:here.test": "leave", "@z:here.test": "join"}, invite=60)
    assert choose_authoriser(state, HS) is None
    # The default invite level is 0: any joined user qualifies, ties by ID.
    state = _state({}, {"@y:here.test": "join", "@x:here.test": "join", "@w:here.test": "invite"})
    assert choose_authoriser(state, HS) == "@x:here.test"
    # The joiner does not vouch for themselves.
    assert choose_authoriser(state, HS, exclude="@x:here.test") == "@y:here.test"


def test_choice_in_v12_counts_creators_as_most_powerful() -> None:
    state = _state({"@a:here.test": 100}, {"@a:here.test": "join", "@c:here.test": "join"}, rv=RV12)
    assert choose_authoriser(state, HS) == "@c:here.test"


def test_which_rules_are_restricted() -> None:
    def rules(rule: str) -> Event:
        return _ev("m.room.join_rules", "", {"join_rule": rule})

    assert is_restricted(RV10, rules("restricted")) and is_restricted(RV10, rules("knock_restricted"))
    assert is_restricted(get_room_version("8"), rules("restricted"))
    assert not is_restricted(get_room_version("9"), rules("knock_restricted"))
    assert not is_restricted(get_room_version("7"), rules("restricted"))
    assert not is_restricted(RV10, rules("public")) and not is_restricted(RV10, None)


OWNER, MEMBER, OTHER = "@owner:test.local", "@member:test.local", "@other:test.local"


def _restricted(allowed: str, rule: str = "restricted", version: str = "10") -> dict[str, Any]:
    return {"preset": "private_chat", "room_version": version, "initial_state": [
        {"type": "m.room.join_rules", "state_key": "",
         "content": {"join_rule": rule, "allow": [{"type": "m.room_membership", "room_id": allowed}]}}]}


@pytest_twisted.ensureDeferred
async def test_local_restricted_joins(tmp_path: Path, db_config: tuple[str, dict[str, Any]]) -> None:
    hs = HomeServer(_config(tmp_path, db_config))
    await hs.setup()
    try:
        for user in (OWNER, MEMBER, OTHER):
            await hs.accounts.create_user(user, None, displayname=user[1:6])
        space, _ = await hs.room_creation.create_room(OWNER, {"preset": "public_chat"})
        await hs.membership.update(MEMBER, MEMBER, space, "join")
        for rule in ("restricted", "knock_restricted"):
            room, _ = await hs.room_creation.create_room(OWNER, _restricted(space, rule))
            rv = get_room_version("10")
            state = await hs.events.get_current_state_ids(room)
            assert await hs.membership.restricted.authoriser_for(rv, state, MEMBER) == OWNER
            with pytest.raises(JoinNotAuthorised) as e:
                await hs.membership.restricted.authoriser_for(rv, state, OTHER)
            assert e.value.errcode == NOT_ALLOWED and e.value.status == 403
            # Who vouches is the server's choice, not the client's.
            ev = await hs.membership.update(MEMBER, MEMBER, room, "join",
                                            extra={"join_authorised_via_users_server": "@x:elsewhere.test"})
            assert ev.content["join_authorised_via_users_server"] == OWNER
            # Joined now: a re-join (new profile) needs nobody.
            state = await hs.events.get_current_state_ids(room)
            assert await hs.membership.restricted.authoriser_for(rv, state, MEMBER) is None
            with pytest.raises(MatrixError) as me:
                await hs.membership.update(OTHER, OTHER, room, "join")
            assert me.value.code == 403 and me.value.errcode == "M_FORBIDDEN"
            assert await hs.membership.current_membership(room, OTHER) is None

        # Nobody of this server may invite: the owner asks for more.
        room, _ = await hs.room_creation.create_room(OWNER, {**_restricted(space), "power_level_content_override": {
            "invite": 101}})
        state = await hs.events.get_current_state_ids(room)
        with pytest.raises(JoinNotAuthorised) as e:
            await hs.membership.restricted.authoriser_for(get_room_version("10"), state, MEMBER)
        assert e.value.errcode == NOT_GRANTED and e.value.status == 400 and e.value.no_authoriser
        with pytest.raises(MatrixError) as me:
            await hs.membership.update(MEMBER, MEMBER, room, "join")
        assert me.value.code == 403 and "may invite" in me.value.msg
        # An allowed room this server is not in: it cannot tell.
        room, _ = await hs.room_creation.create_room(OWNER, _restricted("!elsewhere:far.test"))
        state = await hs.events.get_current_state_ids(room)
        with pytest.raises(JoinNotAuthorised) as e:
            await hs.membership.restricted.authoriser_for(get_room_version("10"), state, "@u:far.test")
        assert e.value.errcode == CANNOT_TELL and e.value.status == 400
        # An invited user joins without an authoriser.
        await hs.membership.update(OWNER, OTHER, room, "invite")
        ev = await hs.membership.update(OTHER, OTHER, room, "join")
        assert "join_authorised_via_users_server" not in ev.content
    finally:
        await hs.stop()
