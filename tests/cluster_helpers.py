"""Helpers for tests that run the cluster as real processes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from callmesh_client.client import CallClient, Reply
from localcluster.cluster import LocalCluster
from state_store.client import connect
from state_store.store import StateStore

BOOKING_SCRIPT = [
    "Hi, my name is {name}",
    "I'd like a cleaning",
    "Tuesday works",
    "How about 3pm",
    "Yes, book it",
]


async def run_call(
    router_url: str,
    call_id: str,
    tenant: str = "demo",
    name: str = "Alice",
    script: list[str] | None = None,
    hangup: bool = True,
) -> list[Reply]:
    replies = []
    async with CallClient(router_url, call_id) as client:
        await client.start(tenant, f"caller-{call_id}")
        for line in script or BOOKING_SCRIPT:
            replies.append(await client.say(line.format(name=name)))
        if hangup:
            await client.hangup()
    return replies


async def eventually(pred: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait until ``pred()`` holds; a bound against hangs, not a timing assertion."""
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def load_checkpoint(cluster: LocalCluster, call_id: str, tenant: str = "demo") -> Any:
    """The call's checkpoint in the cluster's Redis (None: there is none)."""
    redis = connect(cluster.redis_url)
    try:
        return await StateStore(redis).load(tenant, call_id)
    finally:
        await redis.aclose()


@contextlib.contextmanager
def routers_cluster(
    routers: int, nodes: int, latency_scale: float, env: dict[str, str] | None = None
) -> Iterator[LocalCluster]:
    """A local cluster of several routers whose drain is bounded at 10 s."""
    env = {
        "CALLMESH_SIM_LATENCY_SCALE": str(latency_scale),
        "CALLMESH_ROUTER_DRAIN_S": "10",
        **(env or {}),
    }
    with LocalCluster(nodes=nodes, routers=routers, force_embedded=True, env=env) as c:
        yield c
