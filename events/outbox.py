"""Publishing a call's outbox to JetStream with de-duplication ids (invariant 4)."""

from __future__ import annotations

import json
from typing import Any

from nats.js import JetStreamContext

from events import subjects
from events.errors import EventsUnavailable, translate
from state_store.checkpoint import OutboxEntry

PUBLISH_TIMEOUT_S = 2.0


def effect_entry(
    tenant: str, call_id: str, turn: int, n: int, kind: str, payload: dict[str, Any]
) -> OutboxEntry:
    """The n-th side effect of a turn as an outbox entry. The body carries everything the
    effects worker needs to deliver it and to log the outcome against the call."""
    msg_id = subjects.effect_msg_id(call_id, turn, n)
    body = {
        "id": msg_id,
        "tenant": tenant,
        "call_id": call_id,
        "turn": turn,
        "n": n,
        "kind": kind,
        "payload": payload,
    }
    return OutboxEntry(subjects.effect(tenant, kind), msg_id, json.dumps(body).encode(), turn)


class OutboxPublisher:
    """Publishes outbox entries and reports which JetStream acknowledged (a duplicate is
    acknowledged too: the message is already stored)."""

    def __init__(self, js: JetStreamContext, timeout_s: float = PUBLISH_TIMEOUT_S) -> None:
        self._js = js
        self._timeout_s = timeout_s

    async def _one(self, entry: OutboxEntry) -> str:
        with translate():
            await self._js.publish(
                entry.subject,
                entry.data,
                timeout=self._timeout_s,
                headers={"Nats-Msg-Id": entry.msg_id},
            )
        return entry.msg_id

    async def publish(self, entries: list[OutboxEntry]) -> list[str]:
        """Publish in order, one at a time: the event log must keep the turn's order, and
        stopping at the first failure leaves the rest pending in order. Raises
        EventsUnavailable only when nothing at all could be published."""
        acked: list[str] = []
        for entry in entries:
            try:
                acked.append(await self._one(entry))
            except EventsUnavailable:
                if not acked:
                    raise
                break
        return acked
