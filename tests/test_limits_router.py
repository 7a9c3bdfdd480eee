"""The router's bounds, against the real router app over real sockets (the node is the fake
of test_twilio_router): start deadline, connection caps, per-tenant call quotas across
routers in Redis, frame rate, unacknowledged bytes and relinks. Each refusal is a clear
error frame or close code, and a well-behaved call next to it goes on."""

# ruff: noqa: F811 (the fixtures imported below are parameters of the tests)
from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

from callmesh.auth import mint_dev_token
from callmesh.metric_names import REFUSED
from callmesh.protocol import CloseCode, ErrorCode, encode
from state_store import keys
from state_store.client import RedisClient
from state_store.errors import StoreUnavailable
from state_store.quota import CallQuota, QuotaVerdict
from tests.cluster_helpers import eventually
from tests.test_twilio_router import (  # noqa: F401 (fixtures: node, start_router)
    PAYLOAD,
    SECRET,
    FakeNode,
    RouterFactory,
    next_json,
    node,
    start_router,
)

pytestmark = pytest.mark.timeout(60)

WS = aiohttp.ClientWebSocketResponse


async def call(
    http: aiohttp.ClientSession, url: str, call_id: str, tenant: str = "acme", resume: str = ""
) -> WS:
    ws = await http.ws_connect(f"{url}/v1/calls/{call_id}")
    token = mint_dev_token(SECRET, tenant, call_id, "anonymous")
    start = {"type": "start", "seq": 1, "tenant": tenant, "token": token}
    if resume:  # a reconnect of a live call presents its resume secret
        start["resume"] = resume
    await ws.send_str(encode(start))
    return ws


async def closed_with(ws: WS) -> int | None:
    return (await frames_until_close(ws))[1]


async def frames_until_close(ws: WS) -> tuple[list[dict[str, Any]], int | None]:
    """Frames received until the router closed the connection, and its close code."""
    frames = []
    while True:
        msg = await asyncio.wait_for(ws.receive(), 10)
        if msg.type is aiohttp.WSMsgType.CLOSE:
            return frames, msg.data
        if msg.type is not aiohttp.WSMsgType.TEXT:
            return frames, ws.close_code
        frames.append(json.loads(msg.data))


async def test_a_connection_that_never_starts_is_closed_with_4408(
    start_router: RouterFactory,
) -> None:
    router, url = await start_router(start_timeout_ms=200)
    async with aiohttp.ClientSession() as http:
        idle = await http.ws_connect(f"{url}/v1/calls/idle-1")
        assert await closed_with(idle) == CloseCode.START_TIMEOUT
        await eventually(lambda: router.admission.connections == 0)
        assert router.metrics.get(REFUSED, bound="start_timeout") == 1


async def test_a_call_whose_records_cannot_be_read_is_refused_with_4503(
    start_router: RouterFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    router, url = await start_router()

    async def store_away(*args: Any, **kwargs: Any) -> Any:
        raise StoreUnavailable("No connection available.")

    monkeypatch.setattr(router.auth, "admit", store_away)
    async with aiohttp.ClientSession() as http:
        frames, code = await frames_until_close(await call(http, url, "no-records-1"))
    assert code == CloseCode.UNAVAILABLE
    assert [f.get("code") for f in frames] == [ErrorCode.UNAVAILABLE]
    await eventually(lambda: router.admission.connections == 0)


async def test_connections_per_router_are_capped_with_4429(start_router: RouterFactory) -> None:
    router, url = await start_router(max_connections=2)
    async with aiohttp.ClientSession() as http:
        held = [await http.ws_connect(f"{url}/v1/calls/held-{i}") for i in range(2)]
        over = await http.ws_connect(f"{url}/v1/calls/over")
        assert await closed_with(over) == CloseCode.OVER_LIMIT
        for ws in held:
            await ws.close()
        await eventually(lambda: router.admission.connections == 0)
        again = await call(http, url, "again")
        assert (await next_json(again))["type"] == "ready"
        await again.close()


async def test_connections_per_tenant_are_capped_and_other_tenants_go_on(
    start_router: RouterFactory,
) -> None:
    _, url = await start_router(max_connections_per_tenant=1)
    async with aiohttp.ClientSession() as http:
        first = await call(http, url, "t-1")
        assert (await next_json(first))["type"] == "ready"
        second = await call(http, url, "t-2")
        frames, code = await frames_until_close(second)
        assert frames[-1]["code"] == ErrorCode.OVER_LIMIT
        assert code == CloseCode.OVER_LIMIT
        other = await call(http, url, "t-3", tenant="other")
        assert (await next_json(other))["type"] == "ready"
        for ws in (first, other):
            await ws.close()


async def test_concurrent_calls_per_tenant_are_enforced_across_routers(
    start_router: RouterFactory, redis: Redis
) -> None:
    _, url_a = await start_router(max_calls_per_tenant=2)
    _, url_b = await start_router(max_calls_per_tenant=2)
    async with aiohttp.ClientSession() as http:
        one = await call(http, url_a, "q-1")
        two = await call(http, url_b, "q-2")
        readies = [await next_json(ws) for ws in (one, two)]
        assert [r["type"] for r in readies] == ["ready", "ready"]
        three = await call(http, url_a, "q-3")
        frames, code = await frames_until_close(three)
        assert frames[-1]["code"] == ErrorCode.OVER_LIMIT
        assert code == CloseCode.OVER_LIMIT
        # A call that hangs up frees its slot at once.
        await one.send_str(encode({"type": "hangup", "seq": 2}))
        assert (await next_json(one))["type"] == "call_ended"
        quota = CallQuota(redis)
        for _ in range(100):
            if await quota.live("acme") == 1:
                break
            await asyncio.sleep(0.05)
        assert await quota.live("acme") == 1
        four = await call(http, url_b, "q-4")
        assert (await next_json(four))["type"] == "ready"
        # A reconnect of a live call is not a new call.
        two_again = await call(http, url_a, "q-2", resume=readies[1]["resume"])
        assert (await next_json(two_again))["type"] == "ready"
        for ws in (two, four, two_again):
            await ws.close()


async def test_new_calls_per_second_per_tenant_are_enforced(start_router: RouterFactory) -> None:
    _, url = await start_router(max_new_calls_per_tenant_per_s=2)
    async with aiohttp.ClientSession() as http:
        sockets = [await call(http, url, f"r-{i}") for i in range(5)]
        firsts = [await next_json(ws) for ws in sockets]
        refused = [f for f in firsts if f["type"] == "error"]
        assert refused and all(f["code"] == ErrorCode.OVER_LIMIT for f in refused)
        assert sum(1 for f in firsts if f["type"] == "ready") >= 2
        for ws in sockets:
            await ws.close()


def test_a_tenants_quota_keys_share_a_slot_of_their_own() -> None:
    slots = {
        key_slot(k(t).encode())
        for t in ("acme",)
        for k in (keys.tenant_calls, keys.tenant_call_rate)
    }
    assert len(slots) == 1
    assert len({key_slot(keys.tenant_calls(f"t{i}").encode()) for i in range(50)}) > 40


async def test_a_crashed_routers_quota_slots_lapse(any_redis: RedisClient) -> None:
    quota = CallQuota(any_redis)
    ok = await quota.acquire("lapse", "c1", max_calls=1, max_new_per_s=0, lease_ms=150)
    assert ok is QuotaVerdict.ADMITTED
    full = await quota.acquire("lapse", "c2", max_calls=1, max_new_per_s=0, lease_ms=150)
    assert full is QuotaVerdict.TOO_MANY_CALLS
    await asyncio.sleep(0.3)  # nobody renews c1's lease
    again = await quota.acquire("lapse", "c2", max_calls=1, max_new_per_s=0, lease_ms=150)
    assert again is QuotaVerdict.ADMITTED


async def test_a_frame_flood_is_refused_then_closed_while_another_call_goes_on(
    start_router: RouterFactory, node: FakeNode
) -> None:
    router, url = await start_router(max_frames_per_s=50, frame_burst=10)
    async with aiohttp.ClientSession() as http:
        calm = await call(http, url, "calm")
        flood = await call(http, url, "flood")
        for ws in (calm, flood):
            assert (await next_json(ws))["type"] == "ready"
        for seq in range(2, 400):
            await flood.send_str(encode({"type": "audio", "seq": seq, "data": PAYLOAD}))
        frames, code = await frames_until_close(flood)
        assert [f["code"] for f in frames] == [ErrorCode.RATE_LIMITED] * len(frames)
        assert len(frames) <= 3, "one error a second, not one per frame"
        assert code == CloseCode.OVER_LIMIT
        # The calm call at its own pace is untouched.
        for seq in range(2, 12):
            await calm.send_str(encode({"type": "audio", "seq": seq, "data": PAYLOAD}))
        await eventually(lambda: len(node.received("calm")) == 11)
        assert router.metrics.get(REFUSED, bound="frame_rate") > 0
        await calm.close()


async def test_unacknowledged_bytes_are_bounded(
    start_router: RouterFactory, node: FakeNode
) -> None:
    router, url = await start_router(max_unacked_bytes=200_000)
    pad = "x" * 50_000
    async with aiohttp.ClientSession() as http:
        ws = await call(http, url, "bytes-1")
        assert (await next_json(ws))["type"] == "ready"
        for seq in range(2, 12):  # 10 frames of 50 KB; the fake node never acknowledges
            await ws.send_str(encode({"type": "dtmf", "seq": seq, "digit": "1", "pad": pad}))
        error = await next_json(ws)
        assert error["type"] == "error" and error["seq"] == 5
        session = router.calls[("acme", "bytes-1")]
        assert session.unacked.frame_bytes <= 200_000
        await ws.close()


async def test_a_call_that_relinks_too_often_is_ended_with_a_clear_error(
    start_router: RouterFactory, node: FakeNode
) -> None:
    router, url = await start_router(max_relinks=2, relink_window_s=60)
    async with aiohttp.ClientSession() as http:
        ws = await call(http, url, "loop-1")
        assert (await next_json(ws))["type"] == "ready"
        for n in range(1, 4):
            await eventually(lambda n=n: len(node.links["loop-1"]) == n)  # type: ignore[misc]
            await node.links["loop-1"][-1].close()
        frames, code = await frames_until_close(ws)
        assert frames[-1]["code"] == ErrorCode.RELINK_LIMIT, frames
        assert code == CloseCode.UNAVAILABLE
        assert len(node.links["loop-1"]) == 3
        assert router.metrics.get(REFUSED, bound="relinks") == 1
