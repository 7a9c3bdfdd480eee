"""Audio calls through the whole cluster as real processes (router + nodes, Redis, NATS):
a simulated caller speaking Twilio Media Streams (and the native protocol) streams real-time
audio, hears the greeting, echoes marks, talks, barges in, survives its node being killed,
and hangs up."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from typing import Any, Literal

import pytest

from callmesh_client.voice_client import VoiceCaller
from localcluster.cluster import LocalCluster
from state_store.client import connect
from state_store.pins import PinStore
from state_store.store import StateStore

pytestmark = pytest.mark.timeout(180)

ENV = {"CALLMESH_SIM_LATENCY_SCALE": "0.05"}


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(nodes=2, force_embedded=True, env=ENV) as c:
        yield c


async def _checkpoint(cluster: LocalCluster, call_id: str) -> Any:
    redis = connect(cluster.redis_url)
    try:
        return await StateStore(redis).load("demo", call_id)
    finally:
        await redis.aclose()


@pytest.mark.parametrize("transport", ["twilio", "native"])
async def test_greeting_is_played_its_marks_echoed_and_the_call_ends(
    cluster: LocalCluster, transport: Any
) -> None:
    call_id = f"CAgreet{transport}"
    async with VoiceCaller(cluster.router_url, call_id, "demo", "bob", transport=transport) as c:
        greeting = await c.wait_greeting()
        assert greeting.agent_audio_bytes > 0 and not greeting.timed_out
        assert greeting.marks and c.marks_echoed == c.marks_received
        if transport == "native":
            assert greeting.turn == 0
        await c.hangup()
        assert c.errors == []
    assert c.stats.frames > 0
    ckpt = await _checkpoint(cluster, call_id)
    assert ckpt is not None and ckpt.status == "ended"


@pytest.mark.parametrize("transport", ["twilio", "native"])
async def test_spoken_turns_are_understood_and_answered(
    cluster: LocalCluster, transport: Any
) -> None:
    call_id = f"CAturns{transport}"
    async with VoiceCaller(cluster.router_url, call_id, "demo", "bob", transport=transport) as c:
        await c.wait_greeting()
        first = await c.say("Hi, my name is Priya")
        second = await c.say("I'd like a cleaning")
        await c.hangup()
    for reply in (first, second):
        assert reply.response_ms is not None and reply.agent_audio_bytes > 0
        assert reply.marks and not reply.cleared
    if transport == "native":
        assert (first.turn, second.turn) == (1, 2)
    ckpt = await _checkpoint(cluster, call_id)
    assert ckpt.turn == 2 and ckpt.status == "ended"
    assert ckpt.facts["name"][0] == "Priya"  # the node heard the audio


@pytest.mark.parametrize("transport", ["twilio", "native"])
async def test_barge_in_clears_the_reply_being_played(
    cluster: LocalCluster, transport: Literal["twilio", "native"]
) -> None:
    call_id = f"CAbarge{transport}"
    async with VoiceCaller(cluster.router_url, call_id, "demo", "bob", transport=transport) as c:
        await c.wait_greeting()
        long_reply = c.say("Hi, my name is Priya. What services do you offer?")
        interrupted = asyncio.create_task(long_reply)
        barged = await c.barge_in("Tuesday please", after_ms=300)
        first = await interrupted
        await c.hangup()
    assert c.clears and first.cleared
    assert barged.response_ms is not None and barged.agent_audio_bytes > 0


@pytest.fixture
def small_cluster() -> Iterator[LocalCluster]:
    with LocalCluster(nodes=2, force_embedded=True, env=ENV) as c:
        yield c


async def test_a_twilio_call_survives_its_node_being_killed(small_cluster: LocalCluster) -> None:
    cluster = small_cluster
    async with VoiceCaller(cluster.router_url, "CAkill", "demo", "bob") as c:
        await c.wait_greeting()
        await c.say("Hi, my name is Priya")
        redis = connect(cluster.redis_url)
        try:
            owner = await PinStore(redis).get("demo", "CAkill")
        finally:
            await redis.aclose()
        next(n for n in cluster.nodes if n.name == owner).signal(signal.SIGKILL)
        reply = await c.say("I need a cleaning")
        await c.hangup()
    assert reply.response_ms is not None and reply.agent_audio_bytes > 0
    assert c.errors == []
    ckpt = await _checkpoint(cluster, "CAkill")
    assert (ckpt.turn, ckpt.epoch, ckpt.status) == (2, 2, "ended")
    assert ckpt.facts["name"][0] == "Priya"  # context survived the failover
