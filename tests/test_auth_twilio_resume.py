"""A second Twilio media stream for a live callSid, through a real cluster: only the
stream token the ``<Connect action>`` mints (marked as a resume, bound to the callSid)
may take the call over; a replayed ordinary stream token, or a resume token for another
call, is refused with 4403 while the call goes on."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import aiohttp
import pytest

from callmesh.auth.twilio import RESUME_STREAM_TOKEN_TTL_S, mint_stream_token
from callmesh_client.voice_wire import TwilioWire
from localcluster.cluster import LocalCluster
from state_store import keys
from state_store.client import connect

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    env = {"CALLMESH_SIM_LATENCY_SCALE": "0.05"}
    with LocalCluster(nodes=1, force_embedded=True, env=env) as c:
        yield c


async def _generation(cluster: LocalCluster, call_sid: str) -> int | None:
    redis = connect(cluster.redis_url)
    try:
        value = await redis.hget(keys.resume("demo", call_sid), "generation")
    finally:
        await redis.aclose()
    return None if value is None else int(value)


async def _until_live(cluster: LocalCluster, call_sid: str, generation: int) -> None:
    deadline = time.monotonic() + 20
    while await _generation(cluster, call_sid) != generation:
        assert time.monotonic() < deadline, "the stream never became the call's"
        await asyncio.sleep(0.05)


async def _open(
    http: aiohttp.ClientSession, cluster: LocalCluster, call_sid: str, params: dict[str, str]
) -> tuple[aiohttp.ClientWebSocketResponse, TwilioWire]:
    wire = TwilioWire(call_sid, "demo", "14155550100", params)
    ws = await http.ws_connect(cluster.router_url.replace("http", "ws") + wire.path())
    for frame in wire.opening():
        await ws.send_str(frame)
    return ws, wire


async def _closed(ws: aiohttp.ClientWebSocketResponse) -> tuple[int | None, str]:
    while True:
        msg = await ws.receive(timeout=20)
        if msg.type is not aiohttp.WSMsgType.TEXT:
            return ws.close_code, msg.extra if isinstance(msg.extra, str) else ""


async def test_only_the_action_resume_token_takes_a_live_stream_over(
    cluster: LocalCluster,
) -> None:
    sid = "CAresume1"
    secret = cluster.auth_secret
    first_token = mint_stream_token(secret, sid, "demo", "14155550100")
    async with aiohttp.ClientSession() as http:
        first, wire = await _open(http, cluster, sid, {"token": first_token})
        await _until_live(cluster, sid, 0)
        # The first stream's token, replayed on a second stream: refused, call untouched.
        replay, _ = await _open(http, cluster, sid, {"token": first_token})
        assert await _closed(replay) == (4403, "resume_denied")
        # A resume token for another call: refused too.
        other = mint_stream_token(
            secret, "CAother", "demo", "14155550100", RESUME_STREAM_TOKEN_TTL_S, resume=True
        )
        stranger, _ = await _open(http, cluster, sid, {"token": other})
        assert (await _closed(stranger))[0] == 4403
        assert not first.closed and await _generation(cluster, sid) == 0
        await first.send_str(wire.media("//8=", 20))
        # The <Connect action>'s token: the new stream takes the call over.
        resume = mint_stream_token(
            secret, sid, "demo", "14155550100", RESUME_STREAM_TOKEN_TTL_S, resume=True
        )
        second, wire2 = await _open(
            http, cluster, sid, {"token": resume, "seq_base": str(time.time_ns() // 1000)}
        )
        try:
            await _until_live(cluster, sid, 1)
        except AssertionError:
            raise AssertionError(await _closed(second)) from None
        assert (await _closed(first))[1] == "replaced"
        await second.send_str(wire2.stop())
        assert (await _closed(second))[0] is not None
