"""Guest access inside the server, on both engines: which routes are open to
guests (the policy as one list), the join check, and the start-up sweep
that makes guests leave rooms that closed to them while the server was
not running its hook.

Spec: client-server-api "Guest Access".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from tests.storage.test_event_graph import _config
from zhome.http.errors import MatrixError
from zhome.server import HomeServer

# (method, route name) of every client route a guest may call: what the
# Guest Access module lists, plus logout, filters, account data, tags,
# typing, receipts, read markers and presence (which a guest's client shows
# and sets like any other), and TURN credentials for a guest's calls
# (voip.turn_allow_guests turns that off). Opening another route to guests
# is a decision to make here, on purpose.
GUEST_ROUTES = {
    ("GET", "versions"), ("POST", "register"), ("POST", "logout"), ("GET", "whoami"),
    ("GET", "devices"), ("GET", "device"), ("PUT", "device"),
    ("GET", "profile"), ("GET", "profile_field"), ("PUT", "profile_field"),
    ("GET", "sync"), ("POST", "filter"), ("GET", "filter"),
    ("POST", "join"), ("POST", "room_join"), ("POST", "leave"),
    ("PUT", "send"), ("POST", "send_post"), ("PUT", "put_state"),
    ("GET", "get_state"), ("GET", "get_state_event"), ("GET", "members"), ("GET", "messages"),
    ("GET", "get_event"), ("GET", "context"),
    ("GET", "events"), ("GET", "initialSync"), ("GET", "room_initialSync"),
    ("PUT", "typing"), ("POST", "receipt"), ("POST", "read_markers"),
    ("GET", "account_data"), ("PUT", "account_data"), ("GET", "room_account_data"), ("PUT", "room_account_data"),
    ("GET", "tags"), ("PUT", "tag"), ("DELETE", "tag"),
    ("GET", "media_download"), ("GET", "media_thumbnail"),
    ("GET", "presence"), ("PUT", "presence"),
    ("POST", "keys_upload"), ("POST", "keys_query"), ("POST", "keys_claim"), ("PUT", "send_to_device"),
    ("GET", "turn_server"),
}


async def _server(tmp_path: Path, db_config: tuple[str, dict[str, Any]]) -> HomeServer:
    hs = HomeServer(_config(tmp_path, db_config))
    await hs.setup()
    await hs.accounts.create_user("@owner:test.local", None, displayname="owner")
    await hs.accounts.create_user("@member:test.local", None, displayname="member")
    await hs.accounts.create_user("@123:test.local", None, displayname="123", guest=True)
    return hs


@pytest_twisted.ensureDeferred
async def test_guest_routes_are_one_list(tmp_path: Path, db_config: tuple[str, dict[str, Any]]) -> None:
    hs = await _server(tmp_path, db_config)
    try:
        open_to_guests = {(r.method, r.name) for r in hs.client_resource.routes if r.guests}
        assert open_to_guests == GUEST_ROUTES
    finally:
        await hs.stop()


@pytest_twisted.ensureDeferred
async def test_guest_join_check_and_sweep(tmp_path: Path, db_config: tuple[str, dict[str, Any]]) -> None:
    hs = await _server(tmp_path, db_config)
    guest, owner, member = "@123:test.local", "@owner:test.local", "@member:test.local"
    try:
        room_id, _ = await hs.room_creation.create_room(owner, {"preset": "public_chat"})
        with pytest.raises(MatrixError) as e:
            await hs.membership.update(guest, guest, room_id, "join")
        assert e.value.code == 403 and e.value.errcode == "M_FORBIDDEN"
        await hs.event_creator.send(room_id, "m.room.guest_access", owner, {"guest_access": "can_join"},
                                    state_key="")
        await hs.membership.update(guest, guest, room_id, "join")
        await hs.membership.update(member, member, room_id, "join")

        # Access withdrawn while the hook is not there (as if the server
        # stopped between the commit and the leaves).
        hs.persister.hooks.remove(hs.guest_access.after_persist)
        await hs.event_creator.send(room_id, "m.room.guest_access", owner, {"guest_access": "forbidden"},
                                    state_key="")
        assert await hs.membership.current_membership(room_id, guest) == "join"
        await hs.guest_access.sweep()
        assert await hs.membership.current_membership(room_id, guest) == "leave"
        assert await hs.membership.current_membership(room_id, member) == "join"
        # Nothing more to do the second time.
        assert await hs.guest_access.withdraw_if_closed(room_id) == 0
    finally:
        await hs.stop()
