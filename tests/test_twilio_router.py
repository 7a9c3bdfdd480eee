"""The router's Twilio Media Streams link against the real router app over real sockets:
translation both ways, malformed input, refused streams, the unacknowledged-audio bound,
and failover (replay, de-duplication, ``clear``) on a Twilio call. The node is a fake
that speaks the node protocol and records what it receives."""

from __future__ import annotations

import asyncio
import base64
import json
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from redis.asyncio import Redis

from callmesh.auth import mint_dev_token
from callmesh.auth.twilio import mint_stream_token
from callmesh.config import Backends, MembershipConfig, RouterConfig
from callmesh.mux import LINK_PATH, Channel, Mux
from callmesh.protocol import encode
from callmesh.telemetry import Metrics
from callmesh_client.voice_wire import TwilioWire
from router.app import Router
from router.twilio import TwilioLink, caller_id
from state_store.membership import MembershipStore, NodeRecord
from tests.cluster_helpers import eventually

pytestmark = pytest.mark.timeout(60)

SECRET = "twilio-router-test-secret-0123456789abcdef"
PAYLOAD = base64.b64encode(bytes(range(160))).decode()


class FakeNode:
    """Speaks the node side of the router ↔ node link; records every frame per channel."""

    def __init__(self) -> None:
        self.links: dict[str, list[Channel]] = defaultdict(list)
        self.frames: dict[str, list[list[dict[str, Any]]]] = defaultdict(list)
        self.raw: dict[str, list[str]] = defaultdict(list)
        self._tasks: set[asyncio.Task[None]] = set()
        app = web.Application()
        app.router.add_get(LINK_PATH, self._link)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._healthz)
        self.server = TestServer(app)

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _link(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        mux = Mux(ws, "fake", Metrics("fake"), on_open=self._open)
        try:
            await mux.serve()
        finally:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        return ws

    def _open(self, channel: Channel) -> None:
        task = asyncio.get_running_loop().create_task(self._call(channel))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _call(self, channel: Channel) -> None:
        call_id = channel.call_id
        frames: list[dict[str, Any]] = []
        self.links[call_id].append(channel)
        self.frames[call_id].append(frames)
        while (text := await channel.receive()) is not None:
            frame = json.loads(text)
            frames.append(frame)
            self.raw[call_id].append(text)
            if frame["type"] == "start":
                ready = {"type": "ready", "turn": 0, "call_id": call_id, "last_seq": 0}
                await channel.send_str(encode(ready))
            elif frame["type"] == "hangup":
                await channel.send_str(encode({"type": "call_ended", "turn": 0}))

    async def send(self, call_id: str, frame: dict[str, Any]) -> None:
        await self.links[call_id][-1].send_str(encode(frame))

    def received(self, call_id: str, link: int = -1) -> list[dict[str, Any]]:
        return self.frames[call_id][link] if self.frames[call_id] else []


RouterFactory = Callable[..., Awaitable[tuple[Router, str]]]


@pytest.fixture
async def node(redis: Redis) -> AsyncIterator[FakeNode]:
    fake = FakeNode()
    await fake.server.start_server()
    await MembershipStore(redis).publish(NodeRecord("fake-1", fake.url))
    try:
        yield fake
    finally:
        await fake.server.close()


@pytest.fixture
async def start_router(
    redis_url: str, node: FakeNode, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[RouterFactory]:
    # The simulated Twilio mints its stream tokens with the router's secret.
    monkeypatch.setenv("CALLMESH_AUTH_SECRET", SECRET)
    started: list[tuple[Router, TestServer]] = []

    async def start(**config: Any) -> tuple[Router, str]:
        # The fake node never beats: liveness is not what these tests are about.
        membership = MembershipConfig(heartbeat_ms=100, dead_after_ms=3_600_000, poll_ms=50)
        router = Router(
            RouterConfig(
                backends=Backends(redis_url=redis_url),
                membership=membership,
                **{"auth_secret": SECRET, "link_secret": SECRET[::-1], **config},
            )
        )
        await router.start()
        server = TestServer(router.app())
        await server.start_server()
        started.append((router, server))
        return router, str(server.make_url("")).rstrip("/").replace("http", "ws")

    yield start
    for router, server in started:
        await router.aclose()
        await server.close()


async def twilio_stream(
    http: aiohttp.ClientSession, ws_url: str, wire: TwilioWire
) -> aiohttp.ClientWebSocketResponse:
    ws = await http.ws_connect(f"{ws_url}/v1/twilio/media", compress=0)
    for msg in wire.opening():
        await ws.send_str(msg)
    return ws


async def next_json(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    msg = await asyncio.wait_for(ws.receive(), 10)
    assert msg.type is aiohttp.WSMsgType.TEXT, msg
    result: dict[str, Any] = json.loads(msg.data)
    return result


async def test_twilio_events_become_native_frames_and_back(
    start_router: RouterFactory, node: FakeNode
) -> None:
    router, url = await start_router()
    wire = TwilioWire("CA0001", "acme", "+1 (415) 555-0100")
    async with aiohttp.ClientSession() as http:
        ws = await twilio_stream(http, url, wire)
        for k in range(3):
            await ws.send_str(wire.media(PAYLOAD, k * 20))
        await ws.send_str(wire.dtmf("5"))
        await ws.send_str(wire.mark("0.3"))
        await eventually(lambda: len(node.received("CA0001")) == 6)
        start, *audio, dtmf, mark = node.received("CA0001")
        assert start == {
            "type": "start",
            "seq": 1,
            "tenant": "acme",
            "caller": "14155550100",
            "audio": {"encoding": "mulaw", "sample_rate": 8000},
            "takes_decided": True,
        }
        assert [(a["type"], a["seq"], a["data"], a["ts"]) for a in audio] == [
            ("audio", 2, PAYLOAD, 0),
            ("audio", 3, PAYLOAD, 20),
            ("audio", 4, PAYLOAD, 40),
        ]
        assert dtmf == {"type": "dtmf", "seq": 5, "digit": "5"}
        assert mark == {"type": "mark", "seq": 6, "name": "0.3"}

        # Node → Twilio: only what Twilio understands; the rest stays in the router.
        agent = base64.b64encode(b"\x7f" * 800).decode()
        await node.send("CA0001", {"type": "agent_text", "turn": 1, "n": 0, "text": "Hi."})
        audio_frame = {"type": "agent_audio", "turn": 1, "n": 1, "encoding": "mulaw"}
        await node.send("CA0001", {**audio_frame, "sample_rate": 8000, "data": agent})
        await node.send("CA0001", {"type": "mark", "turn": 1, "n": 2, "name": "1.2"})
        await node.send("CA0001", {"type": "turn_metrics", "turn": 1, "latency_ms": 1.0})
        await node.send("CA0001", {"type": "clear", "turn": 2, "reason": "barge_in"})
        sid = wire.stream_sid
        assert await next_json(ws) == {
            "event": "media",
            "streamSid": sid,
            "media": {"payload": agent},
        }
        assert await next_json(ws) == {"event": "mark", "streamSid": sid, "mark": {"name": "1.2"}}
        assert await next_json(ws) == {"event": "clear", "streamSid": sid}
        assert router.metrics.get("twilio_frames_not_forwarded") == 3  # ready, text, metrics

        # stop → hangup → call_ended: the router ends the stream.
        await ws.send_str(wire.stop())
        assert (await asyncio.wait_for(ws.receive(), 10)).type is aiohttp.WSMsgType.CLOSE
        assert node.received("CA0001")[-1] == {"type": "hangup", "seq": 7}
        await ws.close()


async def test_malformed_messages_are_counted_and_the_call_goes_on(
    start_router: RouterFactory, node: FakeNode
) -> None:
    router, url = await start_router(max_frame_bytes=4096)
    wire = TwilioWire("CA0002", "acme", "bob")
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"{url}/v1/twilio/media")
        await ws.send_str(wire.media(PAYLOAD, 0))  # before start: dropped
        for msg in wire.opening():
            await ws.send_str(msg)
        await ws.send_str(wire.media(PAYLOAD, 0))
        bad = [
            "{oops",
            "[1, 2]",
            json.dumps({"event": "media", "streamSid": wire.stream_sid}),
            json.dumps({"event": "media", "media": {"payload": 'AAAA"}, "x": "'}}),
            json.dumps({"event": "media", "media": {"payload": "not base64!"}}),
            json.dumps({"event": "media", "media": {"payload": "A" * 8000}}),  # > 4096 bytes
            json.dumps({"event": "dtmf", "dtmf": {"digit": "X"}}),
            json.dumps({"event": "mark", "mark": {"name": ""}}),
            # Another stream's media (a hijack attempt) is never forwarded.
            wire.media(PAYLOAD, 0).replace(wire.stream_sid, "MZother"),
        ]
        for msg in bad:
            await ws.send_str(msg)
        await ws.send_bytes(b"\x00\x01")
        await ws.send_str(json.dumps({"event": "teleport", "streamSid": wire.stream_sid}))
        await ws.send_str(wire.opening()[1])  # a second start
        # Not malformed, just odd: a bad timestamp forwards the audio without one.
        await ws.send_str(wire.media(PAYLOAD, 20).replace('"timestamp":"20"', '"timestamp":"x"'))
        await ws.send_str(wire.media(PAYLOAD, 40))
        await eventually(lambda: len(node.received("CA0002")) == 4)
        frames = node.received("CA0002")
        assert [f["seq"] for f in frames] == [1, 2, 3, 4]
        assert [f["type"] for f in frames] == ["start", "audio", "audio", "audio"]
        assert "ts" not in frames[2] and frames[3]["ts"] == 40
        assert router.metrics.get("twilio_malformed_messages") == len(bad) + 1
        assert router.metrics.get("twilio_unknown_events") == 1
        # Three media, a dtmf and a mark that do not name this stream.
        assert router.metrics.get("twilio_stream_sid_mismatch") == 5
        assert router.metrics.get("twilio_duplicate_starts") == 1
        assert router.metrics.get("twilio_media_outside_stream") == 1
        assert not ws.closed
        await ws.close()


@pytest.mark.parametrize(
    ("parameters", "media_format", "code", "reason"),
    [
        ({"tenant": "acme", "caller": "bob"}, None, 4401, "token_malformed"),
        (
            {"token": (SECRET, "CA9999")},
            None,
            4403,
            "token_forbidden",
        ),
        (
            {"token": ("x" * 40, "CA0003")},
            None,
            4401,
            "bad_signature",
        ),
        (
            {"token": (SECRET, "CA0003")},
            {"encoding": "audio/x-l16", "sampleRate": 16000, "channels": 1},
            4400,
            "mediaFormat must be audio/x-mulaw",
        ),
    ],
)
async def test_a_stream_that_cannot_be_a_call_is_closed_with_the_reason(
    start_router: RouterFactory,
    node: FakeNode,
    parameters: dict[str, Any],
    media_format: dict[str, Any] | None,
    code: int,
    reason: str,
) -> None:
    router, url = await start_router()
    if "token" in parameters:  # (secret, callSid): minted now, the token lives 2 minutes
        secret, call_sid = parameters["token"]
        parameters = {"token": mint_stream_token(secret, call_sid, "acme", "b")}
    wire = TwilioWire("CA0003", "unused", "unused", parameters)
    connected, start = wire.opening()
    if media_format is not None:
        msg = json.loads(start)
        msg["start"]["mediaFormat"] = media_format
        start = json.dumps(msg)
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"{url}/v1/twilio/media")
        await ws.send_str(connected)
        await ws.send_str(start)
        msg = await asyncio.wait_for(ws.receive(), 10)
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert ws.close_code == code and reason in str(msg.extra)
    assert router.metrics.get("twilio_streams_refused") == 1
    assert "CA0003" not in node.frames


def test_caller_ids_are_reduced_to_safe_ids() -> None:
    assert caller_id("+14155550100") == "14155550100"
    assert caller_id("client:alice") == "clientalice"
    assert caller_id("sip:bob@example.com") == "sipbobexamplecom"
    assert caller_id("+++") == "anonymous" and caller_id(None) == "anonymous"
    assert len(caller_id("9" * 200)) == 64


def test_caller_falls_back_to_from_then_anonymous() -> None:
    class Metrics:
        def inc(self, name: str, value: float = 1.0) -> None:
            pass

    def start_caller(params: dict[str, str]) -> str:
        link = TwilioLink(None, Metrics(), 65536)  # type: ignore[arg-type]
        inbound = link.translate(TwilioWire("CA1", "x", "y", params).opening()[1])
        assert inbound is not None
        return str(inbound.body["caller"])

    assert start_caller({"tenant": "t", "caller": "alice"}) == "alice"
    assert start_caller({"tenant": "t", "From": "+14155550100"}) == "14155550100"
    assert start_caller({"tenant": "t"}) == "anonymous"


async def test_unacked_audio_is_bounded_by_dropping_the_oldest_audio_only(
    start_router: RouterFactory, node: FakeNode
) -> None:
    router, url = await start_router(max_unacked_audio_ms=200)  # 10 frames of 20 ms
    wire = TwilioWire("CA0004", "acme", "bob")
    async with aiohttp.ClientSession() as http:
        ws = await twilio_stream(http, url, wire)
        await eventually(lambda: len(node.received("CA0004")) == 1)  # linked: audio goes live
        await ws.send_str(wire.dtmf("1"))  # seq 2
        for k in range(30):  # seq 3..32, every one forwarded live
            await ws.send_str(wire.media(PAYLOAD, k * 20))
        await ws.send_str(wire.mark("0.1"))  # seq 33
        await eventually(lambda: len(node.received("CA0004")) == 33)
        await node.send("CA0004", {"type": "ack", "seq": 2, "turn": 0})
        await eventually(lambda: router.metrics.get("unacked_audio_frames_dropped") == 20)
        # The link breaks; the node is alive, so the router reconnects and replays what
        # was not acknowledged: the newest 200 ms of audio and every other frame.
        await node.links["CA0004"][0].close()
        await eventually(lambda: len(node.frames["CA0004"]) == 2)
        await eventually(lambda: len(node.received("CA0004")) == 12)
        start, *replayed = node.received("CA0004")
        assert start["type"] == "start" and start["resume"] == "reconnect"
        assert [f["seq"] for f in replayed] == [*range(23, 33), 33]
        assert replayed[-1]["type"] == "mark"
        # Live audio goes on after the replay.
        await ws.send_str(wire.media(PAYLOAD, 600))
        await eventually(lambda: node.received("CA0004")[-1]["seq"] == 34)
        await ws.close()


async def test_native_audio_is_never_refused_while_other_frames_are_bounded(
    start_router: RouterFactory, node: FakeNode
) -> None:
    _, url = await start_router(max_unacked_frames=2)
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"{url}/v1/calls/native-1")
        token = mint_dev_token(SECRET, "acme", "native-1", "anonymous")
        await ws.send_str(encode({"type": "start", "seq": 1, "tenant": "acme", "token": token}))
        assert (await next_json(ws))["type"] == "ready"
        for seq in range(2, 52):
            await ws.send_str(encode({"type": "audio", "seq": seq, "data": PAYLOAD}))
        for seq in range(52, 55):
            await ws.send_str(encode({"type": "user_text", "seq": seq, "text": "hello"}))
        error = await next_json(ws)
        assert (error["code"], error["seq"]) == ("unavailable", 54)
        await eventually(lambda: len(node.received("native-1")) == 53)
        await ws.close()


async def test_failover_on_a_twilio_call_deduplicates_and_clears(
    start_router: RouterFactory, node: FakeNode
) -> None:
    router, url = await start_router()
    wire = TwilioWire("CA0005", "acme", "bob")
    first = base64.b64encode(b"\x10" * 400).decode()
    second = base64.b64encode(b"\x20" * 400).decode()
    different = base64.b64encode(b"\x30" * 400).decode()
    audio = {"type": "agent_audio", "turn": 1, "encoding": "mulaw", "sample_rate": 8000}
    async with aiohttp.ClientSession() as http:
        ws = await twilio_stream(http, url, wire)
        await eventually(lambda: len(node.received("CA0005")) == 1)
        await node.send("CA0005", {**audio, "n": 0, "data": first})
        await node.send("CA0005", {"type": "mark", "turn": 1, "n": 1, "name": "1.1"})
        assert (await next_json(ws))["media"]["payload"] == first
        assert (await next_json(ws))["mark"]["name"] == "1.1"

        # Relink; the new link says the same first, then goes on: nothing is heard twice.
        await node.links["CA0005"][0].close()
        await eventually(lambda: len(node.frames["CA0005"]) == 2)
        await node.send("CA0005", {**audio, "n": 0, "data": first})
        await node.send("CA0005", {"type": "mark", "turn": 1, "n": 1, "name": "1.1"})
        await node.send("CA0005", {**audio, "n": 2, "data": second})
        assert (await next_json(ws))["media"]["payload"] == second
        assert router.metrics.get("replies_deduplicated") == 2

        # Relink again; this time the reply diverges: Twilio clears, then hears it anew.
        await node.links["CA0005"][1].close()
        await eventually(lambda: len(node.frames["CA0005"]) == 3)
        await node.send("CA0005", {**audio, "n": 0, "data": different})
        assert await next_json(ws) == {"event": "clear", "streamSid": wire.stream_sid}
        assert (await next_json(ws))["media"]["payload"] == different
        await ws.close()


def test_media_as_twilio_writes_it_and_otherwise_translate_alike() -> None:
    metrics = Metrics("test")
    link = TwilioLink(None, metrics, 65536)  # type: ignore[arg-type]
    wire = TwilioWire("CA1", "t", "bob")
    assert link.translate(wire.opening()[1]) is not None
    exact = wire.media(PAYLOAD, 40)  # Twilio's own spelling: the fast path
    reordered = json.dumps({"streamSid": wire.stream_sid, **json.loads(exact)}, indent=1)
    a, b = link.translate(exact), link.translate(reordered)
    assert a is not None and b is not None
    assert (a.seq, b.seq) == (2, 3)
    assert a.body == {**b.body, "seq": 2} and a.body["ts"] == 40
    assert json.loads(a.raw) == a.body and json.loads(b.raw) == b.body
    # Whatever the spelling, a payload that is not base64 or a bad timestamp is caught.
    for bad in (exact.replace(PAYLOAD, "not base64!"), reordered.replace(PAYLOAD, "not base64!")):
        assert link.translate(bad) is None
    assert metrics.get("twilio_malformed_messages") == 2
    odd_ts = exact.replace('"timestamp":"40"', '"timestamp":"٤٠"')  # Arabic-Indic digits
    c = link.translate(odd_ts)
    assert c is not None and "ts" not in c.body
