"""Failover with real processes: SIGKILL, SIGSTOP (paused owner fenced out), drain (SIGTERM),
scale-out without moving live calls, a second router, and a Redis outage. The first three
also run on clustered backends (a Redis Cluster and a NATS cluster)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from typing import Any

import pytest

from callmesh_client.client import CallClient
from localcluster.cluster import LocalCluster, Proc
from state_store.client import connect
from state_store.store import StateStore
from tests.backend_modes import both_backends, cluster_kwargs
from tests.cluster_helpers import call_records, eventually

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def cluster(backend_mode: str) -> Iterator[LocalCluster]:
    env = {"CALLMESH_SIM_LATENCY_SCALE": "0.5"}
    kwargs = cluster_kwargs(backend_mode)
    with LocalCluster(nodes=3, force_embedded=True, env=env, **kwargs) as c:
        yield c


def _node(cluster: LocalCluster, name: str) -> Proc:
    return next(n for n in cluster.nodes if n.name == name)


async def _load(cluster: LocalCluster, call_id: str):  # type: ignore[no-untyped-def]
    redis = connect(cluster.redis_url)
    try:
        return await StateStore(redis).load("demo", call_id)
    finally:
        await redis.aclose()


@both_backends
async def test_sigkill_mid_call_keeps_context_and_answers_in_flight_turn_once(
    cluster: LocalCluster,
) -> None:
    async with CallClient(cluster.router_url, "kill-1") as client:
        ready = await client.start("demo", "bob")
        await client.say("Hi, my name is Priya")
        await client.say("I need a cleaning")
        owner = _node(cluster, ready["node"])
        # The next utterance is in flight (the model takes ~100 ms) when the owner dies.
        say = asyncio.create_task(client.say("Tuesday please"))
        await asyncio.sleep(0.03)
        owner.signal(signal.SIGKILL)
        reply = await say
        assert reply.turn == 3
        assert reply.metrics["node"] != owner.name
        assert "Priya" in reply.text and "Tuesday" in reply.text  # context survived
        reply = await client.say("3pm")
        assert reply.turn == 4 and "cleaning on Tuesday at 3:00 pm for Priya" in reply.text
        assert client.duplicates == 0 and client.errors == []
        await client.hangup()
    ckpt = await _load(cluster, "kill-1")
    assert ckpt is not None and ckpt.turn == 4 and ckpt.epoch == 2


async def test_a_reply_under_way_survives_its_node_as_decided_text(cluster: LocalCluster) -> None:
    async with CallClient(cluster.router_url, "kill-2") as client:
        ready = await client.start("demo", "bob")
        await client.say("Hi, my name is Priya")
        await client.say("I need a cleaning")
        owner = _node(cluster, ready["node"])
        killed: list[int] = []
        on_frame = client._on_frame

        def kill_mid_reply(frame: dict[str, Any]) -> None:
            on_frame(frame)
            # The reply's last sentence: the model has written all of it (the owner told
            # the router before saying it) and the caller is hearing it.
            last = frame.get("type") == "agent_text" and frame.get("turn") == 3 and frame["n"]
            if last and not killed:
                killed.append(frame["n"])
                owner.signal(signal.SIGKILL)

        client._on_frame = kill_mid_reply  # type: ignore[method-assign]
        reply = await client.say("Tuesday please")
        assert killed
        assert reply.turn == 3 and reply.metrics["node"] != owner.name
        # The same reply went on: nothing cleared, nothing heard twice, no model asked.
        assert reply.text == "Got it, Priya, Tuesday. What time would you like?"
        assert not reply.cleared and client.duplicates == 0 and client.errors == []
        assert reply.metrics["retrieval_ms"] == 0 and reply.metrics["fallbacks"] == []
        reply = await client.say("3pm")
        assert reply.turn == 4 and "cleaning on Tuesday at 3:00 pm for Priya" in reply.text
        await client.hangup()
    llm = [r for r in await call_records(cluster, "demo", "kill-2") if r["type"] == "llm"]
    assert [r["turn"] for r in llm] == [1, 2, 3, 4]
    assert llm[2]["resumed"] == {"from": "decided_text", "node": owner.name}
    assert "resumed" not in llm[3]


@both_backends
async def test_paused_owner_is_fenced_out_when_it_wakes(cluster: LocalCluster) -> None:
    async with CallClient(cluster.router_url, "pause-1") as client:
        ready = await client.start("demo", "bob")
        await client.say("Hi, my name is Omar")
        owner = _node(cluster, ready["node"])
        say = asyncio.create_task(client.say("I need a checkup"))
        await asyncio.sleep(0.03)
        owner.signal(signal.SIGSTOP)  # mid-turn: it will try to checkpoint when it wakes
        try:
            reply = await say
            assert reply.metrics["node"] != owner.name and "Omar" in reply.text
            assert reply.turn == 2
        finally:
            owner.signal(signal.SIGCONT)
        await eventually(lambda: "fenced out" in owner.log_path.read_text())
        reply = await client.say("Friday")
        assert reply.turn == 3 and "Omar" in reply.text and client.duplicates == 0
    ckpt = await _load(cluster, "pause-1")
    assert ckpt is not None and ckpt.node != owner.name and ckpt.turn == 3


@both_backends
async def test_drain_hands_calls_off_and_exits_cleanly(cluster: LocalCluster) -> None:
    clients = [CallClient(cluster.router_url, f"drain-{i}") for i in range(6)]
    for c in clients:
        await c.__aenter__()
    try:
        owners = [(await c.start("demo", "x"))["node"] for c in clients]
        for c in clients:
            await c.say("Hi, my name is Lena")
        victim = _node(cluster, owners[0])
        victim.signal(signal.SIGTERM)
        # A turn already in flight may still be finished by the draining node; the call is
        # handed off at the next turn boundary, so the turn after is served elsewhere.
        replies = await asyncio.gather(*(c.say("I want a whitening") for c in clients))
        assert all(r.turn == 2 and "Lena" in r.text for r in replies)
        replies = await asyncio.gather(*(c.say("Thursday") for c in clients))
        for owner, reply in zip(owners, replies, strict=True):
            assert reply.turn == 3 and "Lena" in reply.text
            if owner == victim.name:
                assert reply.metrics["node"] != victim.name
        assert victim.popen is not None
        assert victim.popen.wait(15) == 0
        assert all(c.duplicates == 0 and not c.errors for c in clients)
    finally:
        for c in clients:
            await c.aclose()


async def test_scale_out_moves_no_live_call(cluster: LocalCluster) -> None:
    clients = [CallClient(cluster.router_url, f"stay-{i}") for i in range(8)]
    for c in clients:
        await c.__aenter__()
    try:
        owners = [(await c.start("demo", "x"))["node"] for c in clients]
        cluster.add_node()
        cluster.add_node()
        for _ in range(2):
            replies = await asyncio.gather(*(c.say("Hi, my name is Ana") for c in clients))
            assert [r.metrics["node"] for r in replies] == owners
    finally:
        for c in clients:
            await c.aclose()


async def test_second_router_routes_live_call_to_its_owner(cluster: LocalCluster) -> None:
    async with CallClient(cluster.router_url, "pin-1") as client:
        owner = (await client.start("demo", "x"))["node"]
        await client.say("Hi, my name is Kai")
        secret = client.resume_secret
    second = cluster.add_router()
    async with CallClient(second.url, "pin-1") as client:
        # Any router checks the call's resume secret (kept in Redis).
        ready = await client.start("demo", "x", resume=secret)
        assert ready["node"] == owner and ready["resumed"] is True
        reply = await client.say("I need a filling")
        assert "Kai" in reply.text


async def test_redis_outage_calls_continue_and_checkpoints_catch_up(cluster: LocalCluster) -> None:
    redis_server = cluster.backends.redis if cluster.backends else None
    assert redis_server is not None
    async with CallClient(cluster.router_url, "outage-1") as client:
        await client.start("demo", "x")
        await client.say("Hi, my name is Noor")
        redis_server.stop()
        try:
            r2 = await client.say("I need a cleaning")
            r3 = await client.say("Monday")
            assert "Noor" in r3.text and (r2.turn, r3.turn) == (2, 3)
        finally:
            redis_server.start()
        await eventually(lambda: True)

        async def caught_up() -> bool:
            ckpt = await _load(cluster, "outage-1")
            return ckpt is not None and ckpt.turn == 3

        for _ in range(100):
            if await caught_up():
                break
            await asyncio.sleep(0.1)
        assert await caught_up()
        reply = await client.say("10am")
        assert reply.turn == 4 and "Noor" in reply.text
