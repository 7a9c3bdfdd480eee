"""Tenant isolation through every entry point of a real cluster: a tenant's credentials
never reach another tenant's call, history, replay or status.

- router (native): a token of tenant A cannot start, join or take over a call of B, even
  with the same call id (B's call is its own, keyed by B);
- Twilio: the tenant is the signed stream token's, whatever ``customParameters`` claim;
- replay: ``callmesh replay --tenant B`` does not see A's call;
- status: neither the router's nor a node's public status names a tenant or a call;
- node link and history: tests/test_auth_links.py and tests/test_auth_native.py.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator

import aiohttp
import pytest

from callmesh.auth import mint_dev_token
from callmesh.auth.twilio import mint_stream_token
from callmesh_client.client import CallClient, CallError
from callmesh_client.voice_wire import TwilioWire
from events.cli import EXIT_NOT_FOUND, EXIT_OK
from localcluster.cluster import LocalCluster
from state_store import keys
from state_store.client import connect
from tests.cluster_helpers import eventually

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(
        nodes=1, force_embedded=True, env={"CALLMESH_SIM_LATENCY_SCALE": "0.05"}
    ) as c:
        yield c


async def test_a_token_of_one_tenant_never_reaches_another_tenants_call(
    cluster: LocalCluster,
) -> None:
    acme = mint_dev_token(cluster.auth_secret, "acme", "same-1", "alice")
    globex = mint_dev_token(cluster.auth_secret, "globex", "same-1", "gus")
    async with CallClient(cluster.router_url, "same-1", token=acme) as alice:
        await alice.start("acme", "alice")
        await alice.say("Hi, my name is Alice")
        # Acme's token naming globex: refused.
        async with CallClient(cluster.router_url, "same-1", token=acme) as mallory:
            with pytest.raises(CallError):
                await mallory.start("globex", "alice")
            assert mallory.close_code == 4403
        # Globex's own call of the same id is globex's: a new call, not acme's.
        async with CallClient(cluster.router_url, "same-1", token=globex) as gus:
            ready = await gus.start("globex", "gus")
            assert ready["resumed"] is False and ready["turn"] == 0
            reply = await gus.say("Hi, my name is Gus")
            assert "Alice" not in reply.text
        # Alice's call went on untouched.
        reply = await alice.say("I'd like a cleaning")
        assert "Alice" in reply.text
        await alice.hangup()


async def test_twilio_tenant_comes_from_the_stream_token_not_custom_parameters(
    cluster: LocalCluster,
) -> None:
    token = mint_stream_token(cluster.auth_secret, "CAiso1", "acme", "14155550100")
    wire = TwilioWire("CAiso1", "x", "y", {"token": token, "tenant": "globex", "caller": "z"})
    url = cluster.router_url.replace("http://", "ws://") + wire.path()
    redis = connect(cluster.redis_url)
    try:
        async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
            for msg in wire.opening():
                await ws.send_str(msg)

            async def pinned(tenant: str) -> bool:
                return bool(await redis.exists(keys.pin(tenant, "CAiso1")))

            for _ in range(200):
                if await pinned("acme"):
                    break
                await asyncio.sleep(0.05)
            assert await pinned("acme") and not await pinned("globex")
            await ws.send_str(wire.stop())
    finally:
        await redis.aclose()


async def test_replay_only_sees_its_own_tenant(cluster: LocalCluster) -> None:
    token = mint_dev_token(cluster.auth_secret, "acme", "rp-1", "alice")
    async with CallClient(cluster.router_url, "rp-1", token=token) as client:
        await client.start("acme", "alice")
        await client.say("Hi, my name is Alice")
        await client.hangup()

    def replay(tenant: str) -> int:
        argv = [sys.executable, "-m", "callmesh", "replay", "rp-1", "--tenant", tenant]
        argv += ["--redis", cluster.redis_url, "--nats", cluster.nats_url]
        return subprocess.run(argv, capture_output=True, timeout=60).returncode

    await eventually(lambda: replay("acme") == EXIT_OK, timeout_s=30)
    assert replay("globex") == EXIT_NOT_FOUND


async def test_public_status_names_no_tenant_and_no_call(cluster: LocalCluster) -> None:
    token = mint_dev_token(cluster.auth_secret, "hidden-tenant", "hidden-call", "alice")
    async with (
        CallClient(cluster.router_url, "hidden-call", token=token) as client,
        aiohttp.ClientSession() as http,
    ):
        await client.start("hidden-tenant", "alice")
        for url in [cluster.router_url, *(n.url for n in cluster.nodes)]:
            async with http.get(f"{url}/v1/status") as resp:
                text = json.dumps(await resp.json())
            assert "hidden-tenant" not in text and "hidden-call" not in text
        await client.hangup()
