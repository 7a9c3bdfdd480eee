"""An ended call's effects are never lost (architecture invariant 4): a caller hanging up
while JetStream or Redis is away leaves its final checkpoint or outbox to the node's
drainer, which saves and publishes them once the backend is back (exactly once in the
effects stream); a drain waits for it; a call left by a dead node is swept up by another;
over its bounds the drainer names the call it gives up and counts it."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js import JetStreamContext
from node_harness import NodeCall, node_call, running_node, simulated_providers
from redis.asyncio import Redis

from callmesh.metric_names import OUTBOX_ABANDONED_CALLS
from callmesh.telemetry import Metrics
from conversation_node.app import ConversationNode
from conversation_node.outbox_drain import OutboxDrainer
from events import subjects
from events.outbox import effect_entry
from localcluster.servers import ManagedServer, nats_server
from state_store import keys
from state_store.checkpoint import Checkpoint
from state_store.ended_outbox import EndedOutboxIndex
from state_store.errors import StoreUnavailable
from state_store.store import StateStore

BOOKING = ["Hi, my name is Fay", "I'd like a cleaning", "Tuesday works", "How about 3pm"]


async def _talk(call: NodeCall, tenant: str, lines: list[str]) -> None:
    await call.start(tenant=tenant, audio=False)
    for i, line in enumerate(lines, start=1):
        await call.send(type="user_text", text=line)
        await call.turn(i, timeout_s=20)


async def _hang_up(call: NodeCall) -> None:
    await call.send(type="hangup")
    await call.wait_for(lambda f: f["type"] == "call_ended", timeout_s=30)


async def _stored_effects(js: JetStreamContext, tenant: str) -> int:
    info = await js.stream_info(subjects.EFFECTS_STREAM, subjects_filter=f"effects.{tenant}.>")
    return sum((info.state.subjects or {}).values())


@asynccontextmanager
async def _hung_up_with_jetstream_down(
    redis_url: str, tmp_path: Path, tenant: str, call_id: str, **config: Any
) -> AsyncIterator[tuple[ConversationNode, ManagedServer]]:
    """A node on a JetStream of its own; the caller books while it is down and hangs up."""
    server = nats_server(tmp_path)
    server.start()
    try:
        async with running_node(redis_url, server.url, simulated_providers(), **config) as (
            node,
            url,
        ):
            async with node_call(url, call_id) as call:
                await _talk(call, tenant, BOOKING)
                server.stop()
                await call.send(type="user_text", text="Yes, book it")
                await call.turn(5, timeout_s=30)
                await _hang_up(call)
            yield node, server
    finally:
        server.stop()


async def _stored_effects_at(url: str, tenant: str) -> int:
    nc = await nats.connect(url)
    try:
        return await _stored_effects(nc.jetstream(), tenant)
    finally:
        await nc.drain()


async def test_effect_booked_before_a_jetstream_outage_at_hangup_is_stored_once(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    tenant = "drainjs"
    async with _hung_up_with_jetstream_down(redis_url, tmp_path, tenant, "od-js") as (
        node,
        server,
    ):
        ckpt = await StateStore(redis).load(tenant, "od-js")
        assert ckpt is not None and ckpt.status == "ended"
        assert any(subjects.is_effect(e.subject) for e in ckpt.outbox)
        server.start()
        assert await node._drainer.wait_idle(60)  # type: ignore[union-attr]
        assert await _stored_effects_at(server.url, tenant) == 1
        ckpt = await StateStore(redis).load(tenant, "od-js")
        assert ckpt is not None and ckpt.outbox == []
        assert await redis.zscore(keys.ENDED_OUTBOX, f"{tenant}/od-js") is None
        assert node.services.metrics.snapshot().get(OUTBOX_ABANDONED_CALLS, 0) == 0


async def test_final_checkpoint_failing_at_hangup_is_saved_and_published_later(
    redis: Redis,
    redis_url: str,
    nats_url: str,
    js: JetStreamContext,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tenant = "drainredis"
    real_save = StateStore.save
    redis_down = False

    async def flaky_save(store: StateStore, ckpt: Checkpoint) -> None:
        if redis_down:
            raise StoreUnavailable("injected: redis unreachable")
        await real_save(store, ckpt)

    # Every store of the node (the calls' and the drainer's, each on its own client).
    monkeypatch.setattr(StateStore, "save", flaky_save)
    async with running_node(redis_url, nats_url, simulated_providers()) as (node, url):
        async with node_call(url, "od-redis") as call:
            await _talk(call, tenant, BOOKING)
            redis_down = True
            # The booking turn's checkpoint fails: its effect waits, unpublished, in memory.
            await call.send(type="user_text", text="Yes, book it")
            await call.wait_for(lambda f: f["type"] == "agent_text" and f.get("turn") == 5)
            await _hang_up(call)
        assert await _stored_effects(js, tenant) == 0
        ckpt = await StateStore(redis).load(tenant, "od-redis")
        assert ckpt is not None and ckpt.status != "ended", "the final checkpoint failed"
        redis_down = False
        assert await node._drainer.wait_idle(60)  # type: ignore[union-attr]
        assert await _stored_effects(js, tenant) == 1
        ckpt = await StateStore(redis).load(tenant, "od-redis")
        assert ckpt is not None and ckpt.status == "ended" and ckpt.outbox == []


async def test_drain_waits_for_the_outbox_of_ended_calls(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    tenant = "draindrain"
    async with _hung_up_with_jetstream_down(
        redis_url, tmp_path, tenant, "od-drain", drain_timeout_s=30
    ) as (node, server):
        assert len(node._drainer) == 1  # type: ignore[arg-type]
        server.start()
        await node.drain()
        # No polling: when drain returns, the booking is in the stream.
        assert await _stored_effects_at(server.url, tenant) == 1


async def test_a_dead_nodes_ended_call_is_swept_up_by_another(
    redis: Redis, redis_url: str, nats_url: str, js: JetStreamContext
) -> None:
    tenant, call_id = "drainsweep", "od-sweep"
    # What a node that died right after the hang-up leaves: the final checkpoint with its
    # booking unpublished, and its mark in the index, not renewed since.
    store = StateStore(redis)
    epoch, _ = await store.take_ownership(tenant, call_id, "dead-node")
    effect = effect_entry(tenant, call_id, 5, 0, "booking_create", {"slot": "Tue 15:00"})
    await store.save(
        Checkpoint(
            tenant, call_id, "anonymous", epoch, "dead-node", status="ended", outbox=[effect]
        )
    )
    await redis.zadd(keys.ENDED_OUTBOX, {keys.ended_outbox_member(tenant, call_id): 1})
    async with running_node(redis_url, nats_url, simulated_providers()) as (node, _):
        assert await node._sweep.sweep_once() == 1  # type: ignore[union-attr]
        assert await node._drainer.wait_idle(30)  # type: ignore[union-attr]
        assert await node._sweep.sweep_once() == 0, "nothing is left to sweep"  # type: ignore[union-attr]
    assert await _stored_effects(js, tenant) == 1
    msg = await js.get_last_msg(subjects.EFFECTS_STREAM, subjects.effect(tenant, "booking_create"))
    assert json.loads(msg.data)["call_id"] == call_id
    ckpt = await store.load(tenant, call_id)
    assert ckpt is not None and ckpt.outbox == [] and ckpt.epoch == epoch + 1
    assert await redis.zscore(keys.ENDED_OUTBOX, f"{tenant}/{call_id}") is None


class _DownStore:
    async def save(self, ckpt: Checkpoint) -> None:
        raise StoreUnavailable("injected")


async def test_over_its_bounds_the_drainer_names_counts_and_hands_on_each_call(
    redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics("test")
    drainer = OutboxDrainer(
        _DownStore(),  # type: ignore[arg-type]
        None,
        metrics,
        EndedOutboxIndex(redis),
        max_calls=1,
        max_age_s=0.3,
        first_delay_s=0.01,
        max_delay_s=0.05,
    )
    caplog.set_level(logging.ERROR, "callmesh.node.outbox_drain")
    try:
        drainer.adopt(Checkpoint("bound", "kept", "c", 1, "n", status="ended"), saved=False)
        drainer.adopt(Checkpoint("bound", "over", "c", 1, "n", status="ended"), saved=False)
        assert metrics.snapshot()[OUTBOX_ABANDONED_CALLS] == 1
        assert await drainer.wait_idle(10), "given up after its time bound"
        assert metrics.snapshot()[OUTBOX_ABANDONED_CALLS] == 2
        named = [r.fields["call_id"] for r in caplog.records]  # type: ignore[attr-defined]
        assert named == ["over", "kept"]
        # Both are due for any node's sweep now.
        for call_id in ("kept", "over"):
            assert await redis.zscore(keys.ENDED_OUTBOX, f"bound/{call_id}") == 0
    finally:
        await drainer.aclose()
        await redis.zrem(keys.ENDED_OUTBOX, "bound/kept", "bound/over")
