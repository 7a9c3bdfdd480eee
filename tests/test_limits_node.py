"""A call whose client left without ``hangup`` waits out the reconnect grace on its node,
then ends and its state on the node is released; a client back in time resumes it."""

from __future__ import annotations

import asyncio
import time

import pytest
from nats.js import JetStreamContext
from node_harness import node_call, running_node, simulated_providers
from redis.asyncio import Redis

from callmesh.metric_names import CALLS_ABANDONED
from conversation_node.app import ConversationNode
from events.replay import read_records
from state_store.store import StateStore

pytestmark = pytest.mark.timeout(60)


async def gone(node: ConversationNode, key: tuple[str, str]) -> None:
    deadline = time.monotonic() + 10
    while key in node.sessions:
        assert time.monotonic() < deadline, "the call is still held"
        await asyncio.sleep(0.05)


async def test_a_call_left_without_hangup_ends_after_the_grace_and_is_released(
    redis_url: str, nats_url: str, redis: Redis, js: JetStreamContext
) -> None:
    async with running_node(redis_url, nats_url, simulated_providers(), reconnect_grace_ms=300) as (
        node,
        url,
    ):
        async with node_call(url, "left-1") as call:
            await call.start(tenant="g1", audio=False)
            await call.send(type="user_text", text="Hi, my name is Ann")
            await call.turn(1)
        # The link is gone without a hangup: held for the grace, then ended.
        await gone(node, ("g1", "left-1"))
        ckpt = await StateStore(redis).load("g1", "left-1")
        assert ckpt is not None and ckpt.status == "ended"
        assert node.services.metrics.get(CALLS_ABANDONED) == 1
        deadline = time.monotonic() + 10
        while True:
            ended = [r for r in await read_records(js, "g1", "left-1") if r["type"] == "call_ended"]
            if ended or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert [r["reason"] for r in ended] == ["abandoned"]
        # Too late to come back: the call is over, and says so.
        async with node_call(url, "left-1") as again:
            await again.send(type="start", tenant="g1", caller="anonymous")
            refusal = await again.wait_for(lambda f: f["type"] in ("error", "call_ended"))
            assert refusal.get("code", "call_ended") == "call_ended"


async def test_a_client_back_within_the_grace_resumes_the_call(
    redis_url: str, nats_url: str, redis: Redis
) -> None:
    async with running_node(
        redis_url, nats_url, simulated_providers(), reconnect_grace_ms=5_000
    ) as (node, url):
        async with node_call(url, "back-1") as call:
            await call.start(tenant="g2", audio=False)
            await call.send(type="user_text", text="Hi, my name is Ann")
            await call.turn(1)
        await asyncio.sleep(0.2)
        assert ("g2", "back-1") in node.sessions  # detached, waiting
        async with node_call(url, "back-1") as again:
            again.seq = 2
            await again.send(type="start", tenant="g2", caller="anonymous", resume="reconnect")
            ready = await again.wait_for(lambda f: f["type"] == "ready")
            assert ready["resumed"] is True
            await again.send(type="user_text", text="I'd like a cleaning")
            await again.turn(2)
            await again.send(type="hangup")
            await again.wait_for(lambda f: f["type"] == "call_ended")
        await gone(node, ("g2", "back-1"))
        ckpt = await StateStore(redis).load("g2", "back-1")
        assert ckpt is not None and ckpt.status == "ended"
        assert not node.services.metrics.get(CALLS_ABANDONED)
