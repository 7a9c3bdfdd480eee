"""Replay every call of a load run with a node kill in it: zero divergence."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator

import aiohttp
import nats
import pytest

from events.replay import build_report, read_records
from loadtest.callers import scripted_call
from localcluster.cluster import LocalCluster
from state_store.client import connect
from state_store.store import StateStore

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    env = {"CALLMESH_SIM_LATENCY_SCALE": "0.3", "CALLMESH_TTS_CHUNK_MS": "500"}
    with LocalCluster(nodes=3, force_embedded=True, env=env) as c:
        yield c


async def test_every_call_of_a_run_with_a_kill_replays_without_divergence(
    cluster: LocalCluster,
) -> None:
    ids = [f"rp-{i}" for i in range(12)]
    runs = [asyncio.create_task(scripted_call(cluster.router_url, c, 7, think_s=0.15)) for c in ids]
    await asyncio.sleep(1.0)
    # Kill the node with the most calls while all calls are mid-conversation (placement
    # depends on loads, so no node is sure to own any given call).
    calls: dict[str, int] = {}
    async with aiohttp.ClientSession() as http:
        for n in cluster.nodes:
            async with http.get(f"{n.url}/v1/status") as resp:
                calls[n.name] = int((await resp.json())["calls"])
    victim = max(cluster.nodes, key=lambda n: calls[n.name])
    victim.signal(signal.SIGKILL)
    results = await asyncio.gather(*runs)
    assert all(not r.errors and r.completed for r in results), [r.errors for r in results]

    redis = connect(cluster.redis_url)
    nc = await nats.connect(cluster.nats_url)
    try:
        js = nc.jetstream()
        store = StateStore(redis)
        failovers = 0
        for call_id in ids:
            records = await read_records(js, "demo", call_id)
            ckpt = await store.load("demo", call_id)
            report = build_report("demo", call_id, records, ckpt)
            assert report.verified is True, (call_id, [vars(d) for d in report.divergences])
            failovers += sum(
                1 for r in records if r["type"] == "ownership" and r.get("reason") == "failover"
            )
            # Another tenant asking for the same call sees nothing.
            assert await read_records(js, "other", call_id) == []
        assert failovers > 0  # the kill hit some of these calls
    finally:
        await nc.drain()
        await redis.aclose()
