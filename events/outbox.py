"""Publishing a call's outbox to JetStream with de-duplication ids (invariant 4)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from nats.js import JetStreamContext
from nats.js import errors as js_errors

from events import subjects
from events.errors import EventsUnavailable, translate
from state_store.checkpoint import OutboxEntry

PUBLISH_TIMEOUT_S = 2.0
# A JetStream stream whose leader died is without one for NATS's raft election timeout,
# 4 to 9 s (measured on the embedded cluster: 7.5 s after a SIGKILL of the leader).
LEADER_ELECTION_WAIT_S = 10.0
ELECTION_RETRY_S = 0.25


def effect_entry(
    tenant: str, call_id: str, turn: int, n: int, kind: str, payload: dict[str, Any]
) -> OutboxEntry:
    """The n-th side effect of a turn as an outbox entry. The body carries everything the
    effects worker needs to deliver it and to log the outcome against the call."""
    msg_id = subjects.effect_msg_id(tenant, call_id, turn, n)
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


async def publish_deduplicated(
    js: JetStreamContext,
    subject: str,
    data: bytes,
    msg_id: str,
    *,
    timeout_s: float = PUBLISH_TIMEOUT_S,
    election_wait_s: float = LEADER_ELECTION_WAIT_S,
) -> None:
    """Publish under a ``Nats-Msg-Id`` (a repeat is stored once); raises EventsUnavailable.

    Connected but no stream leader answering means, on a cluster, that the server leading
    the stream died and the others are electing one: that is waited out here (bounded), so
    a call ending meanwhile still gets its last turn's records out before it closes."""
    deadline = time.monotonic() + election_wait_s
    while True:
        try:
            with translate():
                await js.publish(subject, data, timeout=timeout_s, headers={"Nats-Msg-Id": msg_id})
            return
        except EventsUnavailable as exc:
            electing = isinstance(exc.__cause__, js_errors.NoStreamResponseError)
            if not electing or time.monotonic() > deadline:
                raise
            await asyncio.sleep(ELECTION_RETRY_S)


class OutboxPublisher:
    """Publishes outbox entries and reports which JetStream acknowledged (a duplicate is
    acknowledged too: the message is already stored)."""

    def __init__(
        self,
        js: JetStreamContext,
        timeout_s: float = PUBLISH_TIMEOUT_S,
        election_wait_s: float = LEADER_ELECTION_WAIT_S,
    ) -> None:
        self._js = js
        self._timeout_s = timeout_s
        self._election_wait_s = election_wait_s

    async def _one(self, entry: OutboxEntry) -> str:
        await publish_deduplicated(
            self._js,
            entry.subject,
            entry.data,
            entry.msg_id,
            timeout_s=self._timeout_s,
            election_wait_s=self._election_wait_s,
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
