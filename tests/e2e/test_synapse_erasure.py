"""Erasure across federation with a real Synapse: the redactions zhome
sends for an erased user reach Synapse, which applies them, so its users no
longer see the content; zhome's erasure report names Synapse's server as
having acknowledged them.
"""

from __future__ import annotations

import secrets
import time
import uuid
from pathlib import Path

from tests.e2e.harness import ZhomeProcess, q
from tests.e2e.synapse_peer import SynapsePeer
from tests.e2e.test_admin_api import Admin
from tests.e2e.test_synapse_federation import _redacted, _zhome_room_with, register
from tests.e2e.test_synapse_federation import synapse, zhome_fed  # noqa: F401  (the module's servers)

WAIT_S = 30.0


def test_erasure_reaches_synapse(zhome_fed: ZhomeProcess, synapse: SynapsePeer, tmp_path: Path) -> None:  # noqa: F811
    admin = Admin(zhome_fed, "root_syn", tmp_path)
    z = register(zhome_fed.base_url, "z" + uuid.uuid4().hex[:10])
    s = register(synapse.base_url, "s" + uuid.uuid4().hex[:10])
    room = _zhome_room_with(z, s)
    marker = "MRK" + secrets.token_hex(16)
    eid = z.send(room, marker)
    s.wait_for(lambda: s.event(room, eid)[0] == 200 and s.event(room, eid)[1]["content"].get("body") == marker,
               "the message on Synapse")

    out = admin.ok("POST", f"/_zhome/admin/v1/users/{q(z.user_id)}/erase")
    assert out["redactions_sent"] >= 1
    s.wait_for(lambda: _redacted(s.event(room, eid)), "Synapse applying the redaction", wait=WAIT_S)
    deadline = time.monotonic() + WAIT_S
    delivery = None
    while time.monotonic() < deadline:
        delivery = admin.ok("GET", f"/_zhome/admin/v1/erasures/{out['id']}")["federation"].get(synapse.server_name)
        if delivery and delivery["pending"] == 0:
            break
        time.sleep(0.3)
    assert delivery is not None and delivery["acknowledged"] == delivery["sent"] == out["redactions_sent"]
