"""Helpers for tests that run the cluster as real processes."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import nats

from callmesh_client.client import CallClient, Reply
from events.replay import read_records
from localcluster.cluster import LocalCluster
from state_store.client import connect
from state_store.pins import PinStore
from state_store.store import StateStore

BOOKING_SCRIPT = [
    "Hi, my name is {name}",
    "I'd like a cleaning",
    "Tuesday works",
    "How about 3pm",
    "Yes, book it",
]


async def call_records(cluster: LocalCluster, tenant: str, call_id: str) -> list[dict[str, Any]]:
    """The call's whole event log, once its last record (call_ended) is published."""
    nc = await nats.connect(cluster.nats_url)
    try:
        js = nc.jetstream()
        for _ in range(100):
            records = await read_records(js, tenant, call_id)
            if records and records[-1]["type"] == "call_ended":
                return records
            await asyncio.sleep(0.05)
        raise AssertionError("event log incomplete")
    finally:
        await nc.drain()


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


async def owner_of(cluster: LocalCluster, call_id: str, tenant: str = "demo") -> Any:
    """The node process that owns ``call_id`` now (its pin)."""
    redis = connect(cluster.redis_url)
    try:
        owner = await PinStore(redis).get(tenant, call_id)
    finally:
        await redis.aclose()
    return next(n for n in cluster.nodes if n.name == owner)


def node_metric(node_url: str, name: str) -> float:
    """One unlabelled metric of a node, from its Prometheus text (0 when absent); a
    counter's exposed name ends in ``_total``."""
    with urllib.request.urlopen(node_url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    # The whole name: ``replies_resumed`` must not read ``decided_replies_resumed``.
    wanted = {f"callmesh_node_{name}", f"callmesh_node_{name}_total"}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key in wanted:
            return float(value)
    return 0.0


@contextmanager
def cyclic_garbage() -> Iterator[list[object]]:
    """Collects, with the collector off in between, what only the collector would free."""
    found: list[object] = []
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield found
        gc.collect()
        found.extend(gc.garbage)
    finally:
        gc.garbage.clear()
        gc.set_debug(0)
        gc.enable()
