"""Shared fixtures: a real Redis-compatible server and a real NATS (JetStream) on free
ports, started by the test session itself, and a guard that fails tests leaking tasks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import nats
import pytest
from nats.js import JetStreamContext
from redis.asyncio import Redis

from localcluster.backends import EmbeddedBackends
from state_store.client import RedisClient, connect
from tests.backend_modes import CLUSTERED, MODES, SINGLE, cluster_kwargs


@pytest.fixture(scope="session")
def backends() -> Iterator[EmbeddedBackends]:
    # Always embedded: tests never touch the machine's own Redis/NATS, and may restart these.
    with EmbeddedBackends(force_embedded=True) as b:
        yield b


@pytest.fixture
def redis_url(backends: EmbeddedBackends) -> str:
    return backends.redis_url


@pytest.fixture
def nats_url(backends: EmbeddedBackends) -> str:
    return backends.nats_url


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = connect(redis_url)
    await client.flushall()
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(nats_url)
    ctx = nc.jetstream()
    for info in await ctx.streams_info():
        await ctx.delete_stream(info.config.name)
    try:
        yield ctx
    finally:
        await nc.drain()


@pytest.fixture
def backend_mode(request: pytest.FixtureRequest) -> str:
    """``single`` unless a test opts into both with ``tests.backend_modes.both_backends``."""
    return str(getattr(request, "param", SINGLE))


@pytest.fixture(scope="session")
def clustered_backends() -> Iterator[EmbeddedBackends]:
    """A Valkey cluster (3 masters + 3 replicas) and a 3-server NATS cluster, shared by the
    tests that kill none of their servers (the others start their own)."""
    with EmbeddedBackends(**cluster_kwargs(CLUSTERED)) as b:
        yield b


@pytest.fixture(params=MODES)
async def any_redis(request: pytest.FixtureRequest) -> AsyncIterator[RedisClient]:
    """An empty Redis: one server, then a Redis Cluster (a test using it runs on both)."""
    if request.param == SINGLE:
        url = request.getfixturevalue("redis_url")
    else:
        url = request.getfixturevalue("clustered_backends").redis_url
    client = connect(url)
    await client.flushall()
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture(autouse=True)
async def no_leaked_tasks() -> AsyncIterator[None]:
    """Fail a test that leaves asyncio tasks running (livekit/agents does the same)."""
    before = asyncio.all_tasks()
    yield
    for _ in range(3):
        await asyncio.sleep(0)
    me = asyncio.current_task()
    leaked = [t for t in asyncio.all_tasks() - before if t is not me and not t.done()]
    for t in leaked:
        t.cancel()
    if leaked:
        pytest.fail(f"test leaked tasks: {[t.get_name() for t in leaked]}")
