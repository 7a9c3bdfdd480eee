"""Router failover with real processes: a router SIGKILLed or drained (SIGTERM) in the middle
of live native calls; every call goes on through another router with its context, each
utterance answered once. (Twilio callers: tests/test_router_failover_twilio.py.)"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator

import pytest

from callmesh_client.client import CallClient
from localcluster.cluster import LocalCluster
from tests.cluster_helpers import load_checkpoint, routers_cluster

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    with routers_cluster(routers=2, nodes=2, latency_scale=0.5) as c:
        yield c


async def test_two_routers_serve_one_call_on_its_owner(cluster: LocalCluster) -> None:
    first, second = cluster.router_urls
    async with CallClient(first, "two-1") as client:
        owner = (await client.start("demo", "x"))["node"]
        await client.say("Hi, my name is Kai")
        secret = client.resume_secret
    # Another connection may take the live call over only with its resume secret.
    async with CallClient(second, "two-1") as client:
        ready = await client.start("demo", "x", resume=secret)
        assert ready["resume"] != secret  # rotated on every (re)connect
        assert ready["node"] == owner and ready["resumed"] is True
        assert "Kai" in (await client.say("I need a filling")).text


@pytest.mark.parametrize("how", ["kill", "drain"])
async def test_router_lost_mid_call_client_resumes_through_another(
    cluster: LocalCluster, how: str
) -> None:
    victim = cluster.router
    assert victim is not None
    async with CallClient(cluster.router_urls, f"rkill-{how}") as client:
        ready = await client.start("demo", "bob")
        await client.say("Hi, my name is Priya")
        await client.say("I need a cleaning")
        # The next utterance is in flight (the model takes a while) when the router goes.
        say = asyncio.create_task(client.say("Tuesday please"))
        await asyncio.sleep(0.03)
        victim.signal(signal.SIGKILL if how == "kill" else signal.SIGTERM)
        reply = await say
        assert reply.turn == 3
        assert "Priya" in reply.text and "Tuesday" in reply.text  # context survived
        assert client.router_url != victim.url and client.reconnects == 1
        assert client.ready is not None and client.ready["node"] == ready["node"]
        # The reconnect presented the secret and keeps the rotated one for the next.
        assert client.resume_secret not in (None, ready["resume"])
        reply = await client.say("3pm")
        assert reply.turn == 4 and "cleaning on Tuesday at 3:00 pm for Priya" in reply.text
        assert client.duplicates == 0 and client.errors == []
        await client.hangup()
        assert client.ended
    if how == "drain":
        assert victim.popen is not None
        assert await asyncio.to_thread(victim.popen.wait, 30) == 0


async def test_drain_refuses_new_calls_and_moves_idle_callers(cluster: LocalCluster) -> None:
    victim = cluster.router
    assert victim is not None
    clients = [CallClient(cluster.router_urls, f"idle-{i}") for i in range(4)]
    try:
        for c in clients:
            await c.__aenter__()
            await c.start("demo", "x")
            await c.say("Hi, my name is Ana")
        victim.signal(signal.SIGTERM)
        assert victim.popen is not None
        assert await asyncio.to_thread(victim.popen.wait, 30) == 0
        replies = await asyncio.gather(*(c.say("I need a cleaning") for c in clients))
        assert all("Ana" in r.text and r.turn == 2 for r in replies)
        assert all(c.reconnects == 1 and c.duplicates == 0 for c in clients)
    finally:
        for c in clients:
            await c.aclose()


async def test_native_voice_caller_resumes_through_another_router(cluster: LocalCluster) -> None:
    from callmesh_client.reconnect import ReconnectPolicy
    from callmesh_client.voice_client import VoiceCaller

    victim = cluster.router
    assert victim is not None
    first, second = cluster.router_urls
    async with VoiceCaller(
        first,
        "vkill",
        "demo",
        "bob",
        transport="native",
        routers=[second],
        reconnect=ReconnectPolicy(),
    ) as c:
        await c.wait_greeting()
        before = await c.say("Hi, my name is Priya")
        victim.signal(signal.SIGKILL)
        after = await c.say("I need a cleaning")
        await c.hangup()
    assert c.reopens == 1 and c.errors == []
    assert (before.turn, after.turn) == (1, 2)
    assert after.agent_audio_bytes > 0
    ckpt = await load_checkpoint(cluster, "vkill")
    assert ckpt is not None and (ckpt.turn, ckpt.status) == (2, "ended")
    assert ckpt.facts["name"][0] == "Priya"  # the node heard it before the router died
