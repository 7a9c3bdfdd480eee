"""A conversation node in the test process, with injectable providers, and a direct link
to it that plays the router's part (numbered frames, a record of everything received):
a channel of a link, as the router carries calls, or the call's own WebSocket.

For tests that inject failures into one stage (a model that never answers, a voice that
fails, a recognizer that mishears): the node is the real one, on real Redis and NATS,
served over a real WebSocket; only its providers are chosen by the test.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Literal

import aiohttp
from aiohttp import web

from callmesh.audio.tones import silence, speech_from_text
from callmesh.config import Backends, NodeConfig, SimulatedLatency
from callmesh.link_auth import LinkAuth
from callmesh.mux import Channel
from callmesh.telemetry import Metrics
from conversation_node.app import ConversationNode
from conversation_node.audio.vad import VadConfig
from conversation_node.node_services import MemoryServices
from conversation_node.providers.registry import Providers
from conversation_node.providers.simulated import SimulatedLLM, SimulatedTTS
from conversation_node.providers.simulated_audio import SimulatedSTT
from localcluster.servers import free_port
from router.node_links import NodeLinks

FRAME_BYTES = 160  # 20 ms of 8 kHz mu-law
# The link secret of the harness's nodes and of the links it opens to them.
LINK_SECRET = "node-harness-link-secret-0123456789abcdef"


def simulated_providers(**overrides: Any) -> Providers:
    latency = SimulatedLatency().scaled(0.05)
    providers = Providers(
        stt=SimulatedSTT(vad=VadConfig(end_silence_ms=300)),
        llm=SimulatedLLM(latency),
        tts=SimulatedTTS(latency, chunk_ms=100),
        backup_tts=SimulatedTTS(latency, chunk_ms=100),
    )
    for role, provider in overrides.items():
        setattr(providers, role, provider)
    return providers


@asynccontextmanager
async def running_node(
    redis_url: str,
    nats_url: str,
    providers: Providers,
    memory: MemoryServices | None = None,
    **config: Any,
) -> AsyncIterator[tuple[ConversationNode, str]]:
    port = free_port()
    # Development mode: the tests also talk to a node over a call's own socket.
    config = {"link_secret": LINK_SECRET, "dev_mode": 1, **config}
    cfg = NodeConfig(backends=Backends(redis_url=redis_url, nats_url=nats_url), port=port, **config)
    node = ConversationNode(cfg, providers=providers, memory=memory)
    await node.start()
    # A handler still open at the end is a bug the test reports, not one to wait out.
    runner = web.AppRunner(node.app(), shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield node, f"http://127.0.0.1:{port}"
    finally:
        await node.aclose()
        await runner.cleanup()


class _SocketWire:
    """A call on its own WebSocket (``/v1/node/calls/{call_id}``)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws

    async def send(self, text: str) -> None:
        await self.ws.send_str(text)

    async def frames(self) -> AsyncIterator[str]:
        async for msg in self.ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                yield msg.data

    async def aclose(self) -> None:
        await self.ws.close()


class _LinkWire:
    """A call the way the router carries it: a channel of the router's own link to the
    node (``router.node_links``), opened by the call's first frame."""

    def __init__(self, links: NodeLinks, base_url: str, call_id: str) -> None:
        self.links = links
        self.base_url = base_url
        self.call_id = call_id
        self.channel: Channel | None = None
        self._opened = asyncio.Event()

    async def send(self, text: str) -> None:
        if self.channel is None:
            self.channel = await self.links.open("node", self.base_url, self.call_id, text)
            self._opened.set()
        else:
            await self.channel.send_str(text)

    async def frames(self) -> AsyncIterator[str]:
        await self._opened.wait()
        assert self.channel is not None
        while (text := await self.channel.receive()) is not None:
            yield text

    async def aclose(self) -> None:
        if self.channel is not None:
            await self.channel.close()


class NodeCall:
    """One call straight to a node. Frames received are kept in ``frames``."""

    def __init__(self, wire: _SocketWire | _LinkWire) -> None:
        self.wire = wire
        self.seq = 0
        self.frames: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for text in self.wire.frames():
            self.frames.append(json.loads(text))
            self._changed.set()

    async def send(self, **body: Any) -> int:
        self.seq += 1
        await self.wire.send(json.dumps({**body, "seq": self.seq}))
        return self.seq

    async def start(
        self, tenant: str = "demo", caller: str = "anonymous", audio: bool = True
    ) -> None:
        body: dict[str, Any] = {"type": "start", "tenant": tenant, "caller": caller}
        if audio:
            body["audio"] = {"encoding": "mulaw", "sample_rate": 8000}
        await self.send(**body)
        await self.wait_for(lambda f: f["type"] == "turn_metrics" and f["turn"] == 0)

    async def audio(self, data: bytes, *, pace_s: float = 0.0) -> None:
        """Send ``data`` as 20 ms frames (``pace_s`` between frames; 0: as fast as possible)."""
        for i in range(0, len(data), FRAME_BYTES):
            chunk = data[i : i + FRAME_BYTES]
            await self.send(type="audio", data=base64.b64encode(chunk).decode())
            if pace_s:
                await asyncio.sleep(pace_s)

    async def speak(self, text: str, *, pace_s: float = 0.0) -> None:
        await self.audio(silence(100) + speech_from_text(text) + silence(500), pace_s=pace_s)

    async def wait_for(
        self, pred: Callable[[dict[str, Any]], bool], timeout_s: float = 10.0, start: int = 0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            for f in self.frames[start:]:
                if pred(f):
                    return f
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                kinds = [(f["type"], f.get("turn")) for f in self.frames[-20:]]
                raise AssertionError(f"frame not received; last frames: {kinds}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass

    async def turn(self, turn: int, timeout_s: float = 10.0) -> dict[str, Any]:
        """The ``turn_metrics`` of ``turn`` (the turn is complete and checkpointed)."""
        return await self.wait_for(
            lambda f: f["type"] == "turn_metrics" and f["turn"] == turn, timeout_s
        )

    def of_turn(self, turn: int, kind: str) -> list[dict[str, Any]]:
        return [f for f in self.frames if f["type"] == kind and f.get("turn") == turn]

    def reply_text(self, turn: int) -> str:
        return " ".join(f["text"] for f in self.of_turn(turn, "agent_text"))

    async def echo_marks(self, turn: int, count: int | None = None) -> None:
        """Tell the node the caller played the first ``count`` marks of ``turn`` (all)."""
        marks = self.of_turn(turn, "mark")
        for m in marks if count is None else marks[:count]:
            await self.send(type="mark", name=m["name"])

    async def aclose(self) -> None:
        await self.wire.aclose()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)


@asynccontextmanager
async def node_call(
    base_url: str, call_id: str, *, via: Literal["link", "socket"] = "link"
) -> AsyncIterator[NodeCall]:
    """A call to the node at ``base_url``: over a link of its own, as the router carries
    calls (the default), or over the call's own WebSocket."""
    async with aiohttp.ClientSession() as http:
        links = NodeLinks(
            http, Metrics("test"), "test-router", flush_delay_s=0.0, link_auth=LinkAuth(LINK_SECRET)
        )
        wire: _SocketWire | _LinkWire
        if via == "socket":
            wire = _SocketWire(await http.ws_connect(f"{base_url}/v1/node/calls/{call_id}"))
        else:
            wire = _LinkWire(links, base_url, call_id)
        call = NodeCall(wire)
        try:
            yield call
        finally:
            await call.aclose()
            await links.aclose()
