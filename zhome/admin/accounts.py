"""Account operations the client API and the admin API share: changing a
profile (carried into every joined room) and deactivating an account.

Deactivation leaves and rejects every room, ends every session and device
(their keys, to-device messages and pushers go with them), and removes
the password, profile, account data and push rules; what other features
keep about a user is removed by the hooks in ``HomeServer.account_purge_hooks``.
``erase`` also marks the account as erased.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Optional

from zhome.http.errors import MatrixError

if TYPE_CHECKING:
    from zhome.server import HomeServer

logger = logging.getLogger(__name__)


async def set_profile(hs: "HomeServer", user_id: str, field: str, value: Optional[str]) -> None:
    await hs.accounts.set_profile_field(user_id, field, value)
    rooms = await hs.events.get_rooms_for_user(user_id)
    for room_id, (membership, _) in rooms.items():
        if membership == "join":
            try:
                await hs.membership.update(user_id, user_id, room_id, "join")
            except MatrixError:
                pass


async def deactivate_account(hs: "HomeServer", user_id: str, erase: bool) -> None:
    rooms = await hs.events.get_rooms_for_user(user_id)
    for room_id, (membership, _) in sorted(rooms.items()):
        if membership in ("join", "invite", "knock"):
            try:
                await hs.membership.update(user_id, user_id, room_id, "leave")
            except MatrixError as e:
                logger.info("deactivating %s: could not leave %s: %s", user_id, room_id, e.msg)
    await hs.accounts.set_deactivated(user_id)
    await hs.user_data.delete_for_user(user_id)
    for purge in hs.account_purge_hooks:
        await purge(user_id)
    if erase:
        await hs.admin_store.set_flags(user_id, erased=True)
