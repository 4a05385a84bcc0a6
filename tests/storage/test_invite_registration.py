"""Invitation-bound registration tokens and invitation claims (migration
0025), on both engines: hashed tokens, sealed addresses, single use, expiry."""

from __future__ import annotations

from typing import Any

import pytest_twisted

from zhome.identity.store import IdentityStore
from zhome.storage.database import Database
from zhome.storage.threepids import ThreepidStore


@pytest_twisted.ensureDeferred
async def test_registration_token_lifecycle(database: Database) -> None:
    store = IdentityStore(database, None, ThreepidStore(database, None))
    await store.add_registration_token("tok", "email", "a@example.org", "inv1", "!r:test", 60_000)
    row = await store.registration_token("tok")
    assert row is not None and row["address"] == "a@example.org" and row["room_id"] == "!r:test"
    assert row["used_ts"] is None and row["done_ts"] is None
    rows: list[Any] = await database.execute("raw", "SELECT token_hash FROM invite_registration_tokens")
    assert rows and rows[0][0] != "tok"
    assert await store.registration_token("other") is None
    # Reserved for one user; the same user may retry, another may not.
    assert await store.reserve_registration_token("tok", "@u:test")
    assert await store.reserve_registration_token("tok", "@u:test")
    assert not await store.reserve_registration_token("tok", "@v:test")
    # Released (the name was taken): free again.
    await store.release_registration_token("tok", "@u:test")
    assert await store.reserve_registration_token("tok", "@v:test")
    await store.finish_registration_token("tok")
    assert not await store.reserve_registration_token("tok", "@v:test")
    # Expired: not reservable.
    await store.add_registration_token("old", "email", "b@example.org", "inv2", "!r:test", -1)
    assert not await store.reserve_registration_token("old", "@w:test")
    # Expired unused tokens are deleted as new ones come; the user's go with the user.
    await store.add_registration_token("new", "email", "c@example.org", "inv3", "!r:test", 60_000)
    assert await store.registration_token("old") is None
    await store.delete_for_user("@v:test")
    assert await store.registration_token("tok") is None
    assert await store.registration_token("new") is not None
    # Claims are recorded once.
    await store.record_claim("inv1", "!r:test", "@g:test")
    await store.record_claim("inv1", "!other:test", "@h:test")
    assert await store.claim("inv1") == ("!r:test", "@g:test")
    assert await store.claim("nope") is None
