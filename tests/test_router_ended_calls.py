"""What the router keeps of a call once it ended: nothing. Against the real router app over
real sockets (the node is the fake of test_twilio_router): after native calls that hung up,
native callers that left without hanging up and Twilio streams, every per-call structure of
the router is empty, and nothing of those calls waits for the cyclic garbage collector
(what reference counting cannot free piles up between the router's rare collections:
callmesh.gc_tuning)."""

# ruff: noqa: F811 (the fixtures imported below are parameters of the tests)
from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from callmesh.auth import mint_dev_token
from callmesh.config import Backends, MembershipConfig, RouterConfig
from callmesh.protocol import encode
from callmesh_client.voice_wire import TwilioWire
from localcluster.servers import free_port
from router.app import Router
from tests.cluster_helpers import cyclic_garbage, eventually
from tests.test_twilio_router import (  # noqa: F401 (fixtures: node, start_router)
    PAYLOAD,
    SECRET,
    FakeNode,
    RouterFactory,
    node,
    start_router,
    twilio_stream,
)

pytestmark = pytest.mark.timeout(60)

CALLS = 6


async def native_call(http: aiohttp.ClientSession, url: str, call_id: str, *, hangup: bool) -> None:
    ws = await http.ws_connect(f"{url}/v1/calls/{call_id}")
    token = mint_dev_token(SECRET, "acme", call_id, "anonymous")
    await ws.send_str(encode({"type": "start", "seq": 1, "tenant": "acme", "token": token}))
    while (msg := await asyncio.wait_for(ws.receive(), 10)).type is aiohttp.WSMsgType.TEXT:
        kind = json.loads(msg.data)["type"]
        if kind == "ready" and not hangup:
            break  # the caller just goes away
        if kind == "ready":
            await ws.send_str(encode({"type": "hangup", "seq": 2}))
        if kind == "call_ended":
            break
    await ws.close()


async def twilio_call(http: aiohttp.ClientSession, url: str, sid: str) -> None:
    wire = TwilioWire(sid, "acme", "+1 (415) 555-0100")
    ws = await twilio_stream(http, url, wire)
    await ws.send_str(wire.media(PAYLOAD, 0))
    await ws.send_str(wire.stop())
    while (await asyncio.wait_for(ws.receive(), 10)).type is not aiohttp.WSMsgType.CLOSE:
        pass
    await ws.close()


def per_call_state(router: Router) -> dict[str, int]:
    """Everything the router holds per call (0 each once no call is live)."""
    channels = sum(len(mux.channels) for _, mux, _ in router.node_links._links.values())
    return {
        "calls": len(router.calls),
        "placement": sum(len(router.placement.calls_on(n)) for n in router.membership.nodes),
        "quota_held": len(router.admission._held),
        "tenants": len(router.admission.by_tenant),
        "connections": router.admission.connections,
        "link_channels": channels,
    }


def ours(garbage: list[object]) -> Counter[str]:
    """Garbage of the router and of its aiohttp server connections (the event loop's own
    transports under the test's selector loop are not the router's doing; uvloop's are
    not cyclic at all)."""
    names = (f"{type(o).__module__}.{type(o).__qualname__}" for o in garbage)
    return Counter(n for n in names if n.startswith(("router.", "callmesh.", "aiohttp.web")))


@pytest.fixture
async def served_router(
    redis_url: str, node: FakeNode, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Router, str]]:
    """The router served as ``callmesh router`` serves it (callmesh.runner): unlike the
    test server, its handlers are not cancelled when a client goes away."""
    monkeypatch.setenv("CALLMESH_AUTH_SECRET", SECRET)
    router = Router(
        RouterConfig(
            backends=Backends(redis_url=redis_url),
            membership=MembershipConfig(heartbeat_ms=100, dead_after_ms=3_600_000, poll_ms=50),
            auth_secret=SECRET,
            link_secret=SECRET[::-1],
        )
    )
    await router.start()
    runner = web.AppRunner(router.app(), handle_signals=False, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield router, f"ws://127.0.0.1:{port}"
    finally:
        await router.aclose()
        await runner.cleanup()


async def test_nothing_of_an_ended_call_stays_in_the_router(
    served_router: tuple[Router, str],
) -> None:
    router, url = served_router
    async with aiohttp.ClientSession() as http:
        for i in range(3):  # pools and caches fill once
            await native_call(http, url, f"warm-{i}", hangup=True)
        with cyclic_garbage() as garbage:
            for i in range(CALLS):
                await native_call(http, url, f"ended-{i}", hangup=True)
                await native_call(http, url, f"left-{i}", hangup=False)
                await twilio_call(http, url, f"CA{i:04d}")
            await eventually(lambda: not any(per_call_state(router).values()))
            await asyncio.sleep(0.1)  # the handlers' last steps after the sockets closed
    assert per_call_state(router) == dict.fromkeys(per_call_state(router), 0)
    # Each of the 2 * CALLS native calls used to leave its connection here; later, one run
    # in six left one connection: the handler that opened a Redis connection was kept by
    # the traceback cycle of a handshake command the server refused (state_store.client).
    assert not ours(garbage), ours(garbage)


async def test_a_cancelled_call_handler_leaves_nothing_behind(
    start_router: RouterFactory, node: FakeNode
) -> None:
    """The test server cancels a handler whose client went away (aiohttp's
    handler_cancellation): the call must still leave every per-call structure."""
    router, url = await start_router()
    async with aiohttp.ClientSession() as http:
        for i in range(CALLS):
            await native_call(http, url, f"left-{i}", hangup=False)
            await native_call(http, url, f"ended-{i}", hangup=True)
    await eventually(lambda: not any(per_call_state(router).values()))
