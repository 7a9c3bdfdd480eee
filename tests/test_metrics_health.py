"""Liveness and readiness apart on the node and the router, and the health gauges."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer
from node_harness import running_node, simulated_providers
from redis.asyncio import Redis

from callmesh.config import Backends, MembershipConfig, RouterConfig
from router.app import Router
from state_store.errors import StoreUnavailable
from tests.exposition import parse_exposition

FAST = MembershipConfig(heartbeat_ms=50, dead_after_ms=1000, poll_ms=50)


async def _status(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url) as resp:
        return resp.status


async def _until(http: aiohttp.ClientSession, url: str, status: int) -> None:
    async with asyncio.timeout(10):
        while await _status(http, url) != status:  # noqa: ASYNC110 (bounded poll)
            await asyncio.sleep(0.05)


async def _gauges(http: aiohttp.ClientSession, url: str, prefix: str) -> dict[str, float]:
    async with http.get(f"{url}/metrics") as resp:
        exposed = parse_exposition(await resp.text())
    return {
        name.removeprefix(prefix + "_"): series[()]
        for name, series in exposed.items()
        if () in series
    }


async def test_node_is_alive_but_not_ready_while_draining_or_without_redis(
    redis_url: str, nats_url: str, redis: Redis
) -> None:
    async with (
        running_node(redis_url, nats_url, simulated_providers(), membership=FAST) as (node, url),
        aiohttp.ClientSession() as http,
    ):
        for path in ("/livez", "/healthz", "/readyz"):
            assert await _status(http, url + path) == 200, path
        gauges = await _gauges(http, url, "callmesh_node")
        assert (gauges["redis_up"], gauges["nats_up"], gauges["draining"]) == (1, 1, 0)

        # Redis stops answering the heartbeat: not ready, still alive.
        heartbeat: Any = node._heartbeat
        real_beat = heartbeat.publish

        def failing_beat() -> None:
            raise StoreUnavailable("test: redis unreachable")

        heartbeat.publish = failing_beat
        await _until(http, url + "/readyz", 503)
        assert await _status(http, url + "/livez") == 200
        assert (await _gauges(http, url, "callmesh_node"))["redis_up"] == 0
        heartbeat.publish = real_beat
        await _until(http, url + "/readyz", 200)

        node.draining = True
        assert await _status(http, url + "/readyz") == 503
        assert await _status(http, url + "/livez") == 200
        assert (await _gauges(http, url, "callmesh_node"))["draining"] == 1
        node.draining = False


async def test_router_is_ready_only_while_a_node_is_live(
    redis_url: str, nats_url: str, redis: Redis
) -> None:
    router = Router(
        RouterConfig(backends=Backends(redis_url=redis_url), membership=FAST, auth_disabled=1)
    )
    await router.start()
    server = TestServer(router.app())
    await server.start_server()
    url = str(server.make_url("")).rstrip("/")
    try:
        async with aiohttp.ClientSession() as http:
            assert await _status(http, url + "/livez") == 200
            assert await _status(http, url + "/readyz") == 503  # no node yet
            async with running_node(redis_url, nats_url, simulated_providers(), membership=FAST):
                await _until(http, url + "/readyz", 200)
                router.draining = True
                assert await _status(http, url + "/readyz") == 503
                gauges = await _gauges(http, url, "callmesh_router")
                assert (gauges["draining"], gauges["redis_up"]) == (1, 1)
                router.draining = False
    finally:
        await router.aclose()
        await server.close()
