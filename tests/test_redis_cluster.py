"""Redis Cluster specifics: the URL form, one hash slot per call, checkpoint durability
(``WAIT`` before the node acknowledges a turn), and a master failover during live calls
that loses no acknowledged turn. Scenarios shared with one server (calls, node failover,
drain, fencing, the effects benchmark) run on both in their own test modules."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from redis.crc import key_slot

from callmesh_client.client import CallClient
from localcluster.backends import EmbeddedBackends
from localcluster.cluster import LocalCluster
from localcluster.server_clusters import RedisClusterServers
from localcluster.servers import ManagedServer
from state_store import keys
from state_store.checkpoint import Checkpoint
from state_store.client import RedisClient, cluster_nodes, connect, is_cluster_url
from state_store.errors import FencedOut, NotReplicated
from state_store.store import Durability, StateStore
from tests.backend_modes import CLUSTERED, cluster_kwargs

pytestmark = pytest.mark.timeout(240)


def test_cluster_url_names_nodes_credentials_and_tls() -> None:
    url = "rediss+cluster://app:s%3Acret@10.0.0.1:6379,10.0.0.2:6380,[::1]:7000"
    assert is_cluster_url(url) and not is_cluster_url("redis://10.0.0.1:6379/0")
    nodes, user, password, tls = cluster_nodes(url)
    assert nodes == [("10.0.0.1", 6379), ("10.0.0.2", 6380), ("::1", 7000)]
    assert (user, password, tls) == ("app", "s:cret", True)
    with pytest.raises(ValueError):
        cluster_nodes("redis+cluster://10.0.0.1")


def test_every_key_a_script_or_transaction_touches_together_shares_a_slot() -> None:
    """The take/CAS/release scripts use a call's lease and checkpoint; the pin script one
    pin; the history transaction one list; membership is one hash."""
    for tenant, call in (("acme", "c1"), ("t-2", "a-very-long_call_id-0123456789")):
        slots = {
            key_slot(k.encode())
            for k in (
                keys.lease(tenant, call),
                keys.checkpoint(tenant, call),
                keys.pin(tenant, call),
            )
        }
        assert len(slots) == 1
    # Different calls spread over the cluster instead of piling onto one slot.
    assert len({key_slot(keys.checkpoint("acme", f"c{i}").encode()) for i in range(50)}) > 40


def test_durability_defaults_follow_the_backend() -> None:
    assert Durability.for_url("redis://127.0.0.1:6379/0").replicas == 0
    assert Durability.for_url("redis+cluster://127.0.0.1:7000").replicas == 1
    assert Durability.for_url("redis+cluster://127.0.0.1:7000", 2, 50) == Durability(2, 50)
    with pytest.raises(ValueError):
        Durability(-1)


def _ckpt(call_id: str, epoch: int, turn: int) -> Checkpoint:
    return Checkpoint("acme", call_id, "bob", epoch, "n1", turn=turn, last_seq=turn)


@pytest.fixture
def shared(clustered_backends: EmbeddedBackends) -> RedisClusterServers:
    assert clustered_backends.redis_nodes is not None
    return clustered_backends.redis_nodes


@pytest.fixture
async def cluster_redis(shared: RedisClusterServers) -> AsyncIterator[RedisClient]:
    client = connect(shared.url)
    await client.flushall()
    try:
        yield client
    finally:
        await client.aclose()


def _replica_of(servers: RedisClusterServers, master: ManagedServer) -> ManagedServer:
    with servers.client(master) as c:
        info = c.info("replication")
    port = int(info["slave0"]["port"])
    return next(s for s in servers.servers if s.port == port)


async def test_checkpoint_waits_for_a_replica_and_is_refused_without_one(
    shared: RedisClusterServers, cluster_redis: RedisClient
) -> None:
    store = StateStore(cluster_redis, durability=Durability(1, 100))
    epoch, _ = await store.take_ownership("acme", "w1", "n1")
    await store.save(_ckpt("w1", epoch, 1))  # a replica confirmed it
    replica = _replica_of(shared, shared.master_of(keys.checkpoint("acme", "w1")))
    assert replica.proc is not None
    replica.proc.send_signal(signal.SIGSTOP)
    try:
        with pytest.raises(NotReplicated) as info:
            await store.save(_ckpt("w1", epoch, 2))
        assert (info.value.wanted, info.value.got) == (1, 0)
        assert info.value.retryable  # the node keeps the turn unacknowledged and retries
        # Fencing still comes first: a stale owner is told so, not "not replicated".
        with pytest.raises(FencedOut):
            await store.save(_ckpt("w1", epoch - 1, 9))
    finally:
        replica.proc.send_signal(signal.SIGCONT)
    await store.save(_ckpt("w1", epoch, 2))  # the retry, once the replica is back
    saved = await store.load("acme", "w1")
    assert saved is not None and saved.turn == 2


async def test_one_server_without_replicas_cannot_confirm_a_wait(redis: RedisClient) -> None:
    store = StateStore(redis, durability=Durability(1, 20))
    epoch, _ = await store.take_ownership("acme", "w2", "n1")
    with pytest.raises(NotReplicated):
        await store.save(_ckpt("w2", epoch, 1))
    await StateStore(redis).save(_ckpt("w2", epoch, 1))  # replicas=0: the master suffices


# ---------------------------------------------------------------- master failover


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """Killing a master: a cluster of its own, not the shared one (logs kept in tmp_path)."""
    env = {"CALLMESH_SIM_LATENCY_SCALE": "0.2"}
    kwargs = cluster_kwargs(CLUSTERED)
    with LocalCluster(nodes=2, force_embedded=True, env=env, log_dir=tmp_path, **kwargs) as c:
        yield c


NAMES = ["Ada", "Bo", "Cyd", "Dee", "Eli", "Fay", "Gus", "Hal"]


async def test_master_failover_during_calls_loses_no_acknowledged_turn(
    own_cluster: LocalCluster,
) -> None:
    """Kill the Redis master of most calls mid-turn; its replica is promoted; the old
    master comes back as a replica. Then kill the node owning most calls, so they are
    restored from what Redis kept: every call must go on from the turns it completed,
    none answered twice, none forgotten."""
    backends = own_cluster.backends
    assert backends is not None and backends.redis_nodes is not None
    servers = backends.redis_nodes
    clients = [CallClient(own_cluster.router_url, f"mf-{i}") for i in range(len(NAMES))]
    for c in clients:
        await c.__aenter__()
    try:
        owners = [(await c.start("demo", f"caller-{i}"))["node"] for i, c in enumerate(clients)]
        for c, name in zip(clients, NAMES, strict=True):
            await c.say(f"Hi, my name is {name}")
        masters = [servers.master_of(keys.checkpoint("demo", c.call_id)) for c in clients]
        victim = _most(masters)
        turns = asyncio.gather(*(c.say("I need a cleaning") for c in clients))
        await asyncio.sleep(0.05)
        victim.stop(signal.SIGKILL)
        assert all(r.turn == 2 for r in await turns)
        await asyncio.to_thread(servers.wait_promoted, victim)
        replies = await asyncio.gather(*(c.say("Tuesday") for c in clients))
        assert all(r.turn == 3 for r in replies)
        victim.start()  # back as a replica of the promoted one; WAIT can succeed again
        await asyncio.to_thread(servers.wait_healthy)
        # The node owning most calls dies: its calls are restored from their checkpoints.
        node = _most(owners)
        next(p for p in own_cluster.nodes if p.name == node).signal(signal.SIGKILL)
        replies = await asyncio.gather(*(c.say("How about 3pm") for c in clients))
        for c, name, reply in zip(clients, NAMES, replies, strict=True):
            assert reply.turn == 4, (c.call_id, reply.turn)
            assert name in reply.text and "Tuesday" in reply.text, reply.text
        moved = [r for o, r in zip(owners, replies, strict=True) if o == node]
        assert moved and all(r.metrics["node"] != node for r in moved)
        assert all(c.duplicates == 0 and not c.errors for c in clients)
    finally:
        for c in clients:
            await c.aclose()
    redis = connect(own_cluster.redis_url)
    try:
        store = StateStore(redis)
        for c in clients:
            ckpt = await store.load("demo", c.call_id)
            assert ckpt is not None and ckpt.turn == 4
    finally:
        await redis.aclose()


T = TypeVar("T")


def _most(items: list[T]) -> T:
    return max(items, key=items.count)
