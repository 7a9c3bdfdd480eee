"""Two tenants may use the same call id: JetStream de-duplication ids include the tenant, so
neither tenant's events or effects are dropped as duplicates of the other's (issue 15)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from nats.js import JetStreamContext
from node_harness import node_call, running_node, simulated_providers
from redis.asyncio import Redis

from events import subjects
from events.replay import build_report, read_records
from loadtest.callers import BOOKING
from state_store.store import StateStore

pytestmark = pytest.mark.timeout(90)

CALL = "same-call-id"


def test_ids_of_two_tenants_differ() -> None:
    assert subjects.effect_msg_id("a", CALL, 1, 0) != subjects.effect_msg_id("b", CALL, 1, 0)
    assert subjects.event_msg_id("a", CALL, 3) != subjects.event_msg_id("b", CALL, 3)


async def _book(url: str, js: JetStreamContext, tenant: str, name: str) -> str:
    async with node_call(url, CALL) as call:
        await call.start(tenant=tenant, caller=f"caller-{tenant}", audio=False)
        for turn, line in enumerate(BOOKING, start=1):
            await call.send(type="user_text", text=line.format(name=name))
            await call.turn(turn)
        # Stay on the call until the last turn's outbox is published (off the reply path).
        await _records(js, tenant)
        return call.reply_text(len(BOOKING))


async def _records(js: JetStreamContext, tenant: str) -> list[dict[str, Any]]:
    """The call's log once its last turn is in (the outbox is published after the reply)."""
    deadline = time.monotonic() + 10
    while True:
        records = await read_records(js, tenant, CALL)
        done = any(r["type"] == "turn_metrics" and r["turn"] == len(BOOKING) for r in records)
        if done or time.monotonic() > deadline:
            return records
        await asyncio.sleep(0.1)


async def test_two_tenants_with_one_call_id_each_keep_their_events_and_booking(
    redis_url: str, nats_url: str, redis: Redis, js: JetStreamContext
) -> None:
    async with running_node(redis_url, nats_url, simulated_providers()) as (_, url):
        said = {
            t: await _book(url, js, t, name)
            for t, name in (("tenant-a", "Ann"), ("tenant-b", "Bo"))
        }
    for tenant in said:
        assert "booked" in said[tenant]
        # The booking reached the effects stream under this tenant's subject.
        msg = await js.get_last_msg(
            subjects.EFFECTS_STREAM, subjects.effect(tenant, "booking_create")
        )
        effect = json.loads(msg.data)
        assert effect["tenant"] == tenant and effect["call_id"] == CALL
        assert effect["id"] == subjects.effect_msg_id(tenant, CALL, len(BOOKING), 0)
        assert effect["payload"]
        # Every turn's events are in this tenant's log, and the call replays verified.
        records = await _records(js, tenant)
        assert [r["turn"] for r in records if r["type"] == "turn_metrics"] == list(
            range(len(BOOKING) + 1)
        )
        assert any(r["type"] == "effect" for r in records)
        ckpt = await StateStore(redis).load(tenant, CALL)
        report = build_report(tenant, CALL, records, ckpt)
        assert report.verified is True, [vars(d) for d in report.divergences]
