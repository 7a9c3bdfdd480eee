"""A node killed while a speculative reply is running: the utterance is answered once, by
the new owner, through the router (real processes, Twilio and native callers)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from typing import Literal

import nats
import pytest
from cluster_helpers import eventually, node_metric, owner_of

from callmesh.metric_names import PREEMPTIVE_STARTED
from callmesh_client.voice_client import VoiceCaller
from events.eventlog import EventType
from events.replay import build_report, read_records
from localcluster.cluster import LocalCluster
from state_store.client import connect
from state_store.store import StateStore

pytestmark = pytest.mark.timeout(180)

# A long endpoint (2 s) behind a short stability pause (100 ms): the speculative reply
# runs for most of two seconds before the turn can be confirmed; the node dies then.
ENV = {
    "CALLMESH_SIM_LATENCY_SCALE": "0.05",
    "CALLMESH_STT_ENDPOINTING_MS": "2000",
    "CALLMESH_ENDPOINTING_MAX_MS": "2000",
    "CALLMESH_PREEMPTIVE_STABLE_MS": "100",
}


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(nodes=2, force_embedded=True, env=ENV) as c:
        yield c


@pytest.mark.parametrize("transport", ["twilio", "native"])
async def test_a_node_killed_during_speculation_answers_the_utterance_once(
    cluster: LocalCluster, transport: Literal["twilio", "native"]
) -> None:
    call_id = f"CAspec{transport}"
    async with VoiceCaller(cluster.router_url, call_id, "demo", "bob", transport=transport) as c:
        await c.wait_greeting()
        owner = await owner_of(cluster, call_id)
        before = await asyncio.to_thread(node_metric, owner.url, PREEMPTIVE_STARTED)
        said = asyncio.create_task(c.say("I need a cleaning"))
        await eventually(lambda: node_metric(owner.url, PREEMPTIVE_STARTED) > before, timeout_s=20)
        assert not said.done(), "the turn is confirmed only after the 2 s endpoint"
        owner.signal(signal.SIGKILL)
        reply = await said
        await c.hangup()
    assert reply.response_ms is not None and reply.agent_audio_bytes > 0
    assert c.errors == []
    redis = connect(cluster.redis_url)
    try:
        ckpt = await StateStore(redis).load("demo", call_id)
    finally:
        await redis.aclose()
    assert ckpt is not None and (ckpt.turn, ckpt.epoch) == (1, 2)
    assert ckpt.facts["service"][0] == "cleaning"
    nc = await nats.connect(cluster.nats_url)
    try:
        records = await read_records(nc.jetstream(), "demo", call_id)
    finally:
        await nc.drain()
    # The dead owner's speculation left nothing: one answer to the utterance, in order.
    for kind in (EventType.USER_TURN, EventType.LLM):
        assert len([r for r in records if r["turn"] == 1 and r["type"] == kind]) == 1
    report = build_report("demo", call_id, records, ckpt)
    assert report.verified is True, report.divergences
