"""``zhome bridge-email --config-path PATH quarantine list | release ID | delete ID``.

Acts on the bridge's own database (while the bridge runs or not): ``list``
shows each held mail's row ID, when it came, its room and the sender
checks' results (domains and results, no address, no content);
``release`` makes it due to be posted, marked as unverified, by the
running bridge (it looks at its table every few seconds); ``delete`` drops
its sealed content for good.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Optional

from twisted.internet import defer, task

from zhome.bridges.email.store import BridgeStore, open_bridge_database
from zhome.config import EmailBridgeConfig
from zhome.storage.at_rest import Sealer
from zhome.storage.database import Database


async def _run(cfg: EmailBridgeConfig, data_dir: str, seal: bool, action: str, mail_id: Optional[int]) -> int:
    assert cfg.database_path is not None
    if not os.path.exists(cfg.database_path):
        print("zhome bridge-email: the bridge has no database yet", file=sys.stderr)
        return 1
    db = open_bridge_database(cfg)
    sealer = Sealer(os.path.join(data_dir, "email_bridge_encryption.key"),
                    os.path.join(data_dir, "email_bridge_keystore.db"), enabled=seal)
    store = BridgeStore(db, sealer)
    try:
        await store.setup()
        if action == "list":
            held = await store.held_mail()
            for row_id, ts, room_id, auth in held:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts / 1000))
                a = auth or {}
                print(f"{row_id}\t{when}\t{room_id}\tfrom-domain={a.get('from_domain')} dkim={a.get('dkim')}"
                      f" spf={a.get('spf')} dmarc={a.get('dmarc')}")
            if not held:
                print("No mail is held.")
            return 0
        if mail_id is None:
            print(f"zhome bridge-email: quarantine {action} needs the ID of a held mail", file=sys.stderr)
            return 2
        done = await (store.release_held(mail_id) if action == "release" else store.delete_held(mail_id))
        if not done:
            print(f"zhome bridge-email: no held mail with ID {mail_id}", file=sys.stderr)
            return 1
        print(f"Mail {mail_id} {'released: it is posted, marked as unverified' if action == 'release' else 'deleted'}.")
        return 0
    finally:
        await db.close()
        sealer.close()


def run_quarantine(cfg: EmailBridgeConfig, data_dir: str, seal: bool, action: str, mail_id: Optional[int]) -> int:
    code = [1]

    async def main(_reactor: object) -> None:
        code[0] = await _run(cfg, data_dir, seal, action, mail_id)

    try:
        task.react(lambda r: defer.ensureDeferred(main(r)))
    except SystemExit as e:
        if e.code not in (0, None):
            return int(e.code) if isinstance(e.code, int) else 1
    return code[0]
