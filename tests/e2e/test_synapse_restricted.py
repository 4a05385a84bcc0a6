"""Restricted rooms between zhome and a real Synapse: each side's users
join the other side's restricted rooms through membership of an allowed
room, the resident server naming and signing for the authorising user.

Spec: client-server-api "Restricted rooms", server-server-api "Restricted
rooms" (make_join, send_join v2 ``event``).
"""

from __future__ import annotations

import uuid
from typing import Any

from tests.e2e.harness import ZhomeProcess
from tests.e2e.synapse_peer import SynapsePeer
from tests.e2e.test_synapse_federation import Client, _q, register
from tests.e2e.test_synapse_federation import synapse, zhome_fed  # noqa: F401  (the module's servers)


def _restricted(owner: Client, allowed: str) -> str:
    return owner.create_room(preset="private_chat", room_version="10", initial_state=[
        {"type": "m.room.join_rules", "state_key": "",
         "content": {"join_rule": "restricted", "allow": [{"type": "m.room_membership", "room_id": allowed}]}}])


def _member(c: Client, room_id: str, user_id: str) -> dict[str, Any]:
    return dict(c.ok("GET", f"/_matrix/client/v3/rooms/{_q(room_id)}/state/m.room.member/{_q(user_id)}"))


def test_synapse_user_joins_restricted_zhome_room(zhome_fed: ZhomeProcess,  # noqa: F811
                                                  synapse: SynapsePeer) -> None:  # noqa: F811
    z = register(zhome_fed.base_url, "z" + uuid.uuid4().hex[:10])
    s = register(synapse.base_url, "s" + uuid.uuid4().hex[:10])
    outsider = register(synapse.base_url, "o" + uuid.uuid4().hex[:10])
    space = z.create_room(preset="public_chat", creation_content={"type": "m.space"})
    assert s.join(space, via=[zhome_fed.server_name]) == space
    room = _restricted(z, space)

    status, body = outsider.request("POST", f"/_matrix/client/v3/join/{_q(room)}", {},
                                    {"server_name": [zhome_fed.server_name]})
    # zhome's make_join says 403 M_FORBIDDEN; Synapse tells its
    # user that no server would let it join.
    assert status in (403, 502), body
    assert outsider.user_id not in z.joined_members(room)

    assert s.join(room, via=[zhome_fed.server_name]) == room
    z.wait_for(lambda: s.user_id in z.joined_members(room), "the Synapse user's restricted join")
    assert _member(z, room, s.user_id)["join_authorised_via_users_server"] == z.user_id
    # Synapse took the join zhome signed: it is in the room on its side too.
    assert s.joined_members(room) == {z.user_id, s.user_id}


def test_zhome_user_joins_restricted_synapse_room(zhome_fed: ZhomeProcess,  # noqa: F811
                                                  synapse: SynapsePeer) -> None:  # noqa: F811
    z = register(zhome_fed.base_url, "z" + uuid.uuid4().hex[:10])
    outsider = register(zhome_fed.base_url, "o" + uuid.uuid4().hex[:10])
    s = register(synapse.base_url, "s" + uuid.uuid4().hex[:10])
    space = s.create_room(preset="public_chat", creation_content={"type": "m.space"})
    assert z.join(space, via=[synapse.server_name]) == space
    room = _restricted(s, space)

    status, body = outsider.request("POST", f"/_matrix/client/v3/join/{_q(room)}", {},
                                    {"server_name": [synapse.server_name]})
    assert status == 403 and body["errcode"] in ("M_UNABLE_TO_GRANT_JOIN", "M_FORBIDDEN"), body

    assert z.join(room, via=[synapse.server_name]) == room
    s.wait_for(lambda: z.user_id in s.joined_members(room), "the zhome user's restricted join")
    assert _member(s, room, z.user_id)["join_authorised_via_users_server"] == s.user_id
    assert _member(z, room, z.user_id)["join_authorised_via_users_server"] == s.user_id
    s.send(room, "after the restricted join")
    z.wait_for(lambda: "after the restricted join" in z.timeline_bodies(room), "a message after the join")
