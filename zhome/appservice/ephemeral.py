"""Ephemeral events for application services.

Spec: application-service-api "Pushing events" ``ephemeral`` (MSC2409):
``m.typing`` and ``m.receipt`` of rooms a service is interested in, and
``m.presence`` of users in its users namespace, go to the services
registered with ``receive_ephemeral``. Private read receipts are left out
(they are for their owner only). They are queued in the database
(zhome/storage/appservice_ephemeral.py) by
``AppServiceTransactions.push_ephemeral``; nothing is looked up or written
when no service has ``receive_ephemeral``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from twisted.internet import defer

from zhome.appservice.registration import ApplicationService
from zhome.appservice.transactions import AppServiceTransactions
from zhome.storage.events import EventsStore
from zhome.storage.presence import PresenceState
from zhome.sync.typing import TypingService

logger = logging.getLogger(__name__)


class EphemeralForwarder:
    def __init__(self, txns: AppServiceTransactions, events: EventsStore, typing: TypingService,
                 presence_event: Callable[[PresenceState], dict[str, Any]] | None = None) -> None:
        self.txns = txns
        self.events = events
        self.typing = typing
        self.presence_event = presence_event
        self.wanted = [s for s in txns.services if s.receive_ephemeral and s.url is not None]

    def _room_edu(self, room_id: str, edu: dict[str, Any], user_id: str | None = None) -> None:
        if not self.wanted:
            return

        async def forward() -> None:
            try:
                state = await self.events.get_current_state_ids(room_id)
                services = await self.txns.interested_services(room_id, state)
                await self.txns.push_ephemeral([s for s in services if s.receive_ephemeral], edu, user_id)
            except Exception:
                logger.exception("forwarding %s in %s to application services failed", edu.get("type"), room_id)

        defer.ensureDeferred(forward())

    def on_typing(self, room_id: str) -> None:
        self._room_edu(room_id, {"type": "m.typing", "room_id": room_id,
                                 "content": {"user_ids": self.typing.get_typing(room_id)}})

    def on_receipt(self, room_id: str, receipt_type: str, user_id: str, event_id: str, data: dict[str, Any],
                   thread_id: str) -> None:
        if receipt_type == "m.read.private":
            return
        d = dict(data)
        if thread_id:
            d["thread_id"] = thread_id
        self._room_edu(room_id, {"type": "m.receipt", "room_id": room_id,
                                 "content": {event_id: {receipt_type: {user_id: d}}}}, user_id)

    def on_presence(self, states: list[PresenceState]) -> None:
        if self.presence_event is None:
            return
        for st in states:
            services = [s for s in self.wanted if s.is_interested_in_user(st.user_id)]
            if services:
                defer.ensureDeferred(self._push_presence(services, self.presence_event(st), st.user_id))

    async def _push_presence(self, services: list[ApplicationService], edu: dict[str, Any], user_id: str) -> None:
        try:
            await self.txns.push_ephemeral(services, edu, user_id)
        except Exception:
            logger.exception("forwarding presence to application services failed")
