"""Node liveness as routers judge it (conversation_node.heartbeat): a node whose event loop
is blocked but alive keeps beating up to ``loop_stall_ms`` and is never declared dead
before; a hung loop is detected after that bound; a SIGKILLed or stopped process is
detected within ``dead_after_ms``. The judge is the router's own membership view, run on
a thread of its own with its own event loop, so blocking the node's loop does not block it.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
from node_harness import running_node, simulated_providers
from redis.asyncio import Redis

from callmesh.config import MembershipConfig
from localcluster.cluster import LocalCluster
from router.membership import MembershipView
from state_store.client import connect
from state_store.membership import MembershipStore, NodeRecord

pytestmark = pytest.mark.timeout(120)

FAST = MembershipConfig(heartbeat_ms=50, dead_after_ms=300, poll_ms=25)


@dataclass
class Verdicts:
    """What a router's membership view concluded, and when (monotonic)."""

    deaths: dict[str, float] = field(default_factory=dict)
    alive: set[str] = field(default_factory=set)


@contextmanager
def router_view(redis_url: str, config: MembershipConfig) -> Iterator[Verdicts]:
    """A router's membership view polling on a thread of its own."""
    verdicts = Verdicts()
    stop = threading.Event()

    async def watch() -> None:
        redis = connect(redis_url)
        view = MembershipView(MembershipStore(redis), config)
        view.on_dead(lambda node: verdicts.deaths.setdefault(node, time.monotonic()))
        try:
            while not stop.is_set():
                await view.refresh()
                verdicts.alive = {n for n, v in view.nodes.items() if v.alive}
                await asyncio.sleep(config.poll_ms / 1000)
        finally:
            await redis.aclose()

    thread = threading.Thread(target=asyncio.run, args=(watch(),), name="router-view")
    thread.start()
    try:
        yield verdicts
    finally:
        stop.set()
        thread.join(10)


def _wait_for(predicate: object, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


async def test_a_blocked_loop_keeps_the_node_alive_until_the_stall_bound(
    redis_url: str, nats_url: str, redis: Redis
) -> None:
    stall_s = 1.5
    async with running_node(
        redis_url,
        nats_url,
        simulated_providers(),
        membership=FAST,
        loop_stall_ms=int(stall_s * 1000),
        node_id="busy-node",
    ) as (node, _):
        with router_view(redis_url, FAST) as verdicts:
            assert await asyncio.to_thread(_wait_for, lambda: "busy-node" in verdicts.alive, 5)
            # The loop does not run for 1 s (a burst of work, a slow callback): more than
            # three times dead_after_ms, yet under the stall bound. The node stays alive.
            time.sleep(1.0)  # noqa: ASYNC251 (blocking the loop is the point)
            await asyncio.sleep(0.5)
            assert verdicts.deaths == {}
            # The loop hangs for 3 s: heartbeats stop once it has been stuck for stall_s,
            # and the routers declare the node dead, not before.
            hung_at = time.monotonic()
            time.sleep(3.0)  # noqa: ASYNC251
            assert "busy-node" in verdicts.deaths
            detected_after = verdicts.deaths["busy-node"] - hung_at
            assert stall_s <= detected_after < 3.0
            assert node._heartbeat is not None and node._heartbeat.withheld
            # The loop runs again: so do the beats, and the node is alive again.
            assert await asyncio.to_thread(_wait_for, lambda: "busy-node" in verdicts.alive, 5)
            assert not node._heartbeat.withheld


@pytest.mark.timeout(180)
async def test_a_killed_or_stopped_node_is_declared_dead_within_dead_after(
    redis_url: str,
) -> None:
    env = {
        "CALLMESH_HEARTBEAT_MS": "50",
        "CALLMESH_DEAD_AFTER_MS": "300",
        "CALLMESH_MEMBERSHIP_POLL_MS": "25",
    }
    with LocalCluster(nodes=2, force_embedded=True, env=env) as cluster:
        killed, stopped = cluster.nodes
        with router_view(cluster.redis_url, FAST) as verdicts:
            names = {killed.name, stopped.name}
            assert await asyncio.to_thread(_wait_for, lambda: names <= verdicts.alive, 10)
            struck_at = time.monotonic()
            killed.signal(signal.SIGKILL)  # its heartbeat thread dies with it
            stopped.signal(signal.SIGSTOP)  # so does a stopped one's, for as long
            try:
                assert await asyncio.to_thread(_wait_for, lambda: names <= set(verdicts.deaths), 5)
                for name in names:
                    # dead_after_ms, plus a poll and a beat's slack; the stall bound (3 s by
                    # default) plays no part.
                    assert verdicts.deaths[name] - struck_at < 1.5
            finally:
                stopped.signal(signal.SIGCONT)
            assert await asyncio.to_thread(_wait_for, lambda: stopped.name in verdicts.alive, 10)


class _Beats:
    """A membership hash whose beats the test advances (or not)."""

    def __init__(self, *nodes: str) -> None:
        self.beat = dict.fromkeys(nodes, 0)

    async def read_all(self) -> dict[str, NodeRecord]:
        return {n: NodeRecord(n, f"http://{n}", beat=b) for n, b in self.beat.items()}


async def test_a_node_with_a_late_heartbeat_but_an_active_link_is_not_declared_dead() -> None:
    """Overload: a node starved of CPU beats late but still sends on its links; moving its
    calls would pile a failover storm onto the overload. A node that sends nothing on its
    link (stopped, hung, cut off) or has no link here is dead after dead_after_ms."""
    config = MembershipConfig(heartbeat_ms=50, dead_after_ms=200, poll_ms=25)
    beats = _Beats("busy", "stopped", "unlinked")
    heard = {"busy": time.monotonic(), "stopped": time.monotonic()}
    view = MembershipView(beats, config, heard.get)  # type: ignore[arg-type]
    deaths: list[str] = []
    view.on_dead(deaths.append)
    await view.refresh()
    for _ in range(20):  # 0.5 s of polls, no beat from anyone
        await asyncio.sleep(0.025)
        heard["busy"] = time.monotonic()  # its replies keep coming
        await view.refresh()
    assert sorted(deaths) == ["stopped", "unlinked"]
    assert view.is_alive("busy") and view.nodes["busy"].beat_late
    # Its link goes quiet too: now it is dead, dead_after_ms after the last frame.
    quiet_at = time.monotonic()
    while "busy" not in deaths:
        assert time.monotonic() - quiet_at < 1.0, "not declared dead"
        await asyncio.sleep(0.025)
        await view.refresh()
    assert time.monotonic() - quiet_at >= 0.2


async def test_a_late_heartbeat_that_resumes_clears_the_link_reprieve() -> None:
    config = MembershipConfig(heartbeat_ms=50, dead_after_ms=100, poll_ms=25)
    beats = _Beats("busy")
    view = MembershipView(beats, config, lambda _: time.monotonic())
    await view.refresh()
    await asyncio.sleep(0.15)
    await view.refresh()
    assert view.nodes["busy"].beat_late
    beats.beat["busy"] += 1
    await view.refresh()
    assert view.is_alive("busy") and not view.nodes["busy"].beat_late
