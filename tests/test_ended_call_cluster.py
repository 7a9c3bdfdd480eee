"""What ended calls leave behind in a running cluster (real processes): in Redis, only
their checkpoint, under the ended-call retention, whether the caller hung up or left and
never came back; and replay (``callmesh replay`` and the console's inspector) still
rebuilds and verifies such a call."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from callmesh.config import Backends
from callmesh_client.client import CallClient
from events.cli import EXIT_OK
from loadtest.callers import scripted_call
from localcluster.cluster import LocalCluster
from router.console_replay import ReplayReader
from state_store import keys
from state_store.client import connect

pytestmark = pytest.mark.timeout(120)

RETENTION_S = 300
GRACE_MS = 300


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    env = {
        "CALLMESH_SIM_LATENCY_SCALE": "0.1",
        "CALLMESH_ENDED_CALL_RETENTION_S": str(RETENTION_S),
        "CALLMESH_RECONNECT_GRACE_MS": str(GRACE_MS),
    }
    with LocalCluster(nodes=2, force_embedded=True, env=env) as c:
        yield c


async def _call_keys(redis: Any, call_id: str) -> dict[str, int]:
    """Every key of one call (``cm:*:call:{call_id}:*``) by kind → its TTL in s."""
    out = {}
    async for key in redis.scan_iter(match=f"cm:*:call:{{{call_id}}}:*"):
        out[keys.kind_of(key.decode())] = int(await redis.ttl(key))
    return out


async def test_hung_up_and_abandoned_calls_keep_only_their_checkpoint(
    cluster: LocalCluster,
) -> None:
    hung_up = [f"end-{i}" for i in range(4)]
    results = await asyncio.gather(*(scripted_call(cluster.router_url, c, 2) for c in hung_up))
    assert all(r.completed and not r.errors for r in results), [r.errors for r in results]
    # A caller who leaves without hanging up: the node ends the call after the grace.
    async with CallClient(cluster.router_url, "gone-1") as client:
        await client.start("demo", "caller-gone-1")
        await client.say("Hi, my name is Alice")
    redis = connect(cluster.redis_url)
    try:
        for call_id in [*hung_up, "gone-1"]:
            left = await _call_keys(redis, call_id)
            for _ in range(100):  # the abandoned call ends after the grace
                if set(left) == set(keys.ENDED_CALL_KEPT):
                    break
                await asyncio.sleep(0.1)
                left = await _call_keys(redis, call_id)
            assert set(left) == {"ckpt"}, (call_id, left)
            assert 0 < left["ckpt"] <= RETENTION_S, (call_id, left)
        live = await redis.zrange(keys.tenant_calls("demo"), 0, -1)
        assert not {m.decode() for m in live} & set(hung_up)
    finally:
        await redis.aclose()


async def test_replay_of_an_ended_call_within_retention(cluster: LocalCluster) -> None:
    result = await scripted_call(cluster.router_url, "replayed-1", 3)
    assert result.completed and not result.errors
    env = {**os.environ, "REDIS_URL": cluster.redis_url, "NATS_URL": cluster.nats_url}
    argv = [sys.executable, "-m", "callmesh", "replay", "replayed-1", "--tenant", "demo", "--json"]

    def replay() -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)

    # The call's last records reach the event log just after its end.
    for _ in range(50):
        done = await asyncio.to_thread(replay)
        report = json.loads(done.stdout) if done.stdout else {}
        if done.returncode == EXIT_OK and report.get("final_state", {}).get("status") == "ended":
            break
        await asyncio.sleep(0.1)
    assert done.returncode == EXIT_OK, done.stderr
    assert report["verified"] is True and report["checkpoint"]["status"] == "ended"
    assert report["final_state"]["turn"] == report["checkpoint"]["turn"] >= 3

    reader = ReplayReader(Backends(redis_url=cluster.redis_url, nats_url=cluster.nats_url))
    try:
        page = await reader.report("demo", "replayed-1")
    finally:
        await reader.aclose()
    assert page is not None and page["verified"] is True
    assert page["checkpoint"]["status"] == "ended"
