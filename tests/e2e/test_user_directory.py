"""The user directory finds only whom the searcher may know of.

Spec: client-server-api "User directory" (POST /user_directory/search): at
least the users who share a room with the searcher and the users in public
rooms. A user alone with a colleague in a private room must not be found by
anyone else on the server; ``user_directory.search_all_users`` widens the
search to every local user.
"""

from __future__ import annotations

from typing import Any

from tests.e2e.harness import ClientUser, ZhomeProcess, q


def _found(searcher: ClientUser, term: str) -> list[str]:
    body = searcher.ok("POST", "/user_directory/search", {"search_term": term, "limit": 50})
    return [r["user_id"] for r in body["results"]]


def _named(hs: ZhomeProcess, name: str, display: str) -> ClientUser:
    u = ClientUser(hs, name)
    u.ok("PUT", f"/profile/{q(u.user_id)}/displayname", {"displayname": display})
    return u


def test_private_room_members_are_found_only_by_who_shares_a_room(zhome: ZhomeProcess) -> None:
    nurse = _named(zhome, "nurse", "Nurse Ratched")
    patient = _named(zhome, "patient", "Patient Zorro")
    stranger = ClientUser(zhome, "stranger")
    room = nurse.ok("POST", "/createRoom", {"preset": "private_chat", "invite": [patient.user_id]})["room_id"]
    patient.ok("POST", f"/join/{q(room)}", {})

    assert _found(stranger, "zorro") == []
    assert _found(stranger, "patient") == []
    assert _found(nurse, "zorro") == [patient.user_id]
    assert _found(patient, "ratched") == [nurse.user_id]
    # Nor does a private room make its members find themselves.
    assert _found(patient, "zorro") == []

    # Leaving the room ends it.
    patient.ok("POST", f"/rooms/{q(room)}/leave", {})
    assert _found(nurse, "zorro") == []


def test_public_rooms_follow_join_rules_and_history_visibility(zhome: ZhomeProcess) -> None:
    creator = ClientUser(zhome, "creator")
    member = _named(zhome, "member", "Member Quixote")
    searcher = ClientUser(zhome, "searcher")
    room = creator.ok("POST", "/createRoom", {"preset": "private_chat", "invite": [member.user_id]})["room_id"]
    member.ok("POST", f"/join/{q(room)}", {})
    assert _found(searcher, "quixote") == []

    creator.ok("PUT", f"/rooms/{q(room)}/state/m.room.join_rules/", {"join_rule": "public"})
    assert _found(searcher, "quixote") == [member.user_id]
    creator.ok("PUT", f"/rooms/{q(room)}/state/m.room.join_rules/", {"join_rule": "invite"})
    assert _found(searcher, "quixote") == []

    creator.ok("PUT", f"/rooms/{q(room)}/state/m.room.history_visibility/", {"history_visibility": "world_readable"})
    assert _found(searcher, "quixote") == [member.user_id]
    creator.ok("PUT", f"/rooms/{q(room)}/state/m.room.history_visibility/", {"history_visibility": "shared"})
    assert _found(searcher, "quixote") == []

    # A public room made public from the start; leaving it takes the user out.
    lobby = creator.ok("POST", "/createRoom", {"preset": "public_chat"})["room_id"]
    member.ok("POST", f"/join/{q(lobby)}", {})
    assert _found(searcher, "quixote") == [member.user_id]
    assert _found(member, "quixote") == [member.user_id]
    member.ok("POST", f"/rooms/{q(lobby)}/leave", {})
    assert _found(searcher, "quixote") == []


def test_deactivated_users_drop_out(zhome: ZhomeProcess) -> None:
    creator = ClientUser(zhome, "host")
    leaving = _named(zhome, "leaving", "Leaving Lazarus")
    searcher = ClientUser(zhome, "seeker")
    lobby = creator.ok("POST", "/createRoom", {"preset": "public_chat"})["room_id"]
    leaving.ok("POST", f"/join/{q(lobby)}", {})
    assert _found(searcher, "lazarus") == [leaving.user_id]
    status, body = leaving.req("POST", "/account/deactivate", {
        "auth": {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": leaving.user_id},
                 "password": "correct horse battery"}})
    assert status == 200, body
    assert _found(searcher, "lazarus") == []


def test_search_all_users_widens_to_every_local_user(zhome_factory: Any) -> None:
    hs = zhome_factory(overrides={"user_directory": {"search_all_users": True}}).start()
    loner = _named(hs, "loner", "Lonely Hermit")
    searcher = ClientUser(hs, "finder")
    assert _found(searcher, "hermit") == [loner.user_id]
    # The results are bounded and say so.
    for i in range(3):
        _named(hs, f"hermit{i}", f"Hermit {i}")
    body = searcher.ok("POST", "/user_directory/search", {"search_term": "hermit", "limit": 2})
    assert len(body["results"]) == 2 and body["limited"] is True
