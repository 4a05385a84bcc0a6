"""Where each user's invite permissions are kept (see
``zhome.admin.invite_permissions`` for what they mean)."""

from __future__ import annotations

import json
import time
from typing import Any, Optional

from zhome.storage.database import Database, Txn


class InvitePermissionsStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def get(self, user_id: str) -> Optional[tuple[dict[str, Any], str, int]]:
        """(settings, set_by, set_ts), or None when the user never set any."""
        rows = await self.db.execute("invite_permissions_get", "SELECT settings, set_by, set_ts"
                                     " FROM user_invite_permissions WHERE user_id = ?", user_id)
        if not rows:
            return None
        settings, by, ts = rows[0]
        return json.loads(settings), str(by), int(ts)

    async def set(self, user_id: str, settings: dict[str, Any], by: str) -> None:
        raw = json.dumps(settings, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

        def txn_fn(txn: Txn) -> None:
            txn.execute("DELETE FROM user_invite_permissions WHERE user_id = ?", (user_id,))
            txn.execute("INSERT INTO user_invite_permissions (user_id, settings, set_by, set_ts) VALUES (?,?,?,?)",
                        (user_id, raw, by, int(time.time() * 1000)))

        await self.db.run_interaction("invite_permissions_set", txn_fn)

    async def delete_for_user(self, user_id: str) -> None:
        await self.db.run_interaction("invite_permissions_delete", lambda txn: txn.execute(
            "DELETE FROM user_invite_permissions WHERE user_id = ?", (user_id,)))
