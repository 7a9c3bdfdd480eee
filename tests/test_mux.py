"""The router ↔ node link (``callmesh.mux``) over a real WebSocket: per-channel order,
batching, closes from either side, link loss, malformed input and a stuck reader."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgpack
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from callmesh import mux as mux_module
from callmesh.mux import LINK_PATH, Channel, LinkClosed, Mux, Op
from callmesh.mux import channel as channel_module
from callmesh.protocol import CloseCode
from callmesh.telemetry import Metrics
from tests.cluster_helpers import eventually

pytestmark = pytest.mark.timeout(30)


@dataclass
class EchoNode:
    """The node side: echoes every frame on its channel, closes on ``bye``."""

    metrics: Metrics = field(default_factory=lambda: Metrics("node"))
    opened: list[Channel] = field(default_factory=list)
    ended: dict[int, int | None] = field(default_factory=dict)
    stall: bool = False
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def handler(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        link = Mux(ws, "node", self.metrics, on_open=self._open)
        try:
            await link.serve()
        finally:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        return ws

    def _open(self, channel: Channel) -> None:
        self.opened.append(channel)
        task = asyncio.get_running_loop().create_task(self._serve(channel))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _serve(self, channel: Channel) -> None:
        if self.stall:
            await asyncio.sleep(3600)
        while (text := await channel.receive()) is not None:
            if text == "bye":
                await channel.close(4000, "bye to you")
                break
            await channel.send_str(text)
        self.ended[channel.id] = channel.close_code


@pytest.fixture
async def node() -> AsyncIterator[tuple[EchoNode, str]]:
    echo = EchoNode()
    app = web.Application()
    app.router.add_get(LINK_PATH, echo.handler)
    server = TestServer(app)
    await server.start_server()
    try:
        yield echo, str(server.make_url(LINK_PATH))
    finally:
        for t in echo.tasks:
            t.cancel()
        await server.close()


@pytest.fixture
async def router_link(node: tuple[EchoNode, str]) -> AsyncIterator[Mux]:
    _, url = node
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(url)
        link = Mux(ws, "router", Metrics("router"))
        link.start()
        reader = asyncio.create_task(link.run())
        try:
            yield link
        finally:
            await link.aclose()
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)


async def test_each_channel_keeps_its_order_and_frames_share_messages(
    router_link: Mux, node: tuple[EchoNode, str]
) -> None:
    channels = [await router_link.open(f"call-{i}", "start") for i in range(40)]

    async def talk(ch: Channel) -> list[str]:
        for k in range(25):
            await ch.send_str(f"{ch.call_id}:{k}")
        got = [await ch.receive() for _ in range(26)]
        return [g or "" for g in got]

    results = await asyncio.gather(*(talk(ch) for ch in channels))
    for ch, got in zip(channels, results, strict=True):
        assert got == ["start", *(f"{ch.call_id}:{k}" for k in range(25))]
    sent = router_link._metrics.snapshot()
    # 40 opens + 1000 frames left in far fewer WebSocket messages.
    assert sent["link_records_sent"] == 1040
    assert sent["link_messages_sent"] < 1040 / 4


async def test_either_side_can_close_a_channel(
    router_link: Mux, node: tuple[EchoNode, str]
) -> None:
    echo, _ = node
    a = await router_link.open("a", "start")
    b = await router_link.open("b", "start")
    assert await a.receive() == "start"
    await a.send_str("bye")
    assert await a.receive() is None
    assert (a.close_code, a.close_reason) == (4000, "bye to you")
    with pytest.raises(LinkClosed):
        await a.send_str("anyone?")
    # The router closing b ends the node's channel; the link and other calls go on.
    await b.close()
    await eventually(lambda: echo.ended.get(b.id) == CloseCode.NORMAL)
    c = await router_link.open("c", "start")
    assert await c.receive() == "start"
    assert len(router_link.channels) == 1


async def test_losing_the_link_ends_every_channel(node: tuple[EchoNode, str]) -> None:
    echo, url = node
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(url)
        link = Mux(ws, "router", Metrics("router"))
        link.start()
        reader = asyncio.create_task(link.run())
        chans = [await link.open(f"c{i}", "start") for i in range(3)]
        for ch in chans:
            assert await ch.receive() == "start"
        await ws.close()
        await reader
        for ch in chans:
            assert await ch.receive() is None
            assert ch.close_code == CloseCode.ABNORMAL
        with pytest.raises(LinkClosed):
            await link.open("late", "start")
        await link.aclose()
    # The node saw the link go and ended its side of each call.
    await eventually(lambda: len(echo.ended) == 3)


async def test_bad_records_are_skipped_and_garbage_ends_only_that_link(
    node: tuple[EchoNode, str],
) -> None:
    echo, url = node
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(url)
        good = [int(Op.OPEN), 1, "ok", "start"]
        bad = [[9, 1, "x"], "not a record", [int(Op.DATA), 1, 42], [int(Op.OPEN), 1, "dup", "x"]]
        await ws.send_bytes(msgpack.packb([good, *bad, [int(Op.DATA), 1, "still here"]]))
        got = []
        while len(got) < 2:
            msg = await asyncio.wait_for(ws.receive(), 5)
            got += [rec[2] for rec in msgpack.unpackb(msg.data)]
        assert got == ["start", "still here"]
        assert echo.metrics.snapshot()["link_bad_records"] == len(bad)

        # A second router link is not disturbed by the first one's garbage.
        other = await http.ws_connect(url)
        await ws.send_bytes(b"\xc1 not msgpack")
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert msg.data == CloseCode.BAD_REQUEST
        await other.send_bytes(msgpack.packb([[int(Op.OPEN), 7, "fine", "start"]]))
        msg = await asyncio.wait_for(other.receive(), 5)
        assert msgpack.unpackb(msg.data) == [[int(Op.DATA), 7, "start"]]
        await other.close()


async def test_a_side_that_does_not_serve_calls_refuses_an_open(router_link: Mux) -> None:
    # The router's side has no ``on_open``: a channel opened from the node is refused.
    await router_link.ws.send_bytes(msgpack.packb([[int(Op.OPEN), 99, "x", "start"]]))
    ch = await router_link.open("y", "start")
    assert await ch.receive() == "start"
    assert 99 not in router_link.channels


async def test_a_reader_that_falls_behind_loses_its_call_not_the_link(
    router_link: Mux, node: tuple[EchoNode, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    echo, _ = node
    monkeypatch.setattr(channel_module, "MAX_QUEUED_FRAMES", 10)
    echo.stall = True
    stuck = await router_link.open("stuck", "start")
    for k in range(20):
        await stuck.send_str(str(k))
    assert await asyncio.wait_for(stuck.receive(), 5) is None
    assert stuck.close_code == CloseCode.UNAVAILABLE
    assert echo.metrics.snapshot()["link_channels_behind"] == 1
    echo.stall = False
    fine = await router_link.open("fine", "start")
    assert await fine.receive() == "start"


async def test_a_fast_path_takes_frames_only_while_the_reader_waits(
    router_link: Mux, node: tuple[EchoNode, str]
) -> None:
    echo, _ = node
    echo.stall = True  # the test reads the node's side of the channel itself
    up = await router_link.open("fast", "start")
    await eventually(lambda: len(echo.opened) == 1)
    down = echo.opened[0]
    taken: list[str] = []

    def fast(text: str) -> bool:
        if text.startswith("fast"):
            taken.append(text)
            return True
        return False

    down.fast_path = fast
    # Nobody waits in receive(): the frame queues behind "start", though the fast path
    # would take it, so that the channel's order holds.
    await up.send_str("fast-1")
    await eventually(lambda: len(down._inbox) == 2)
    assert [await down.receive(), await down.receive()] == ["start", "fast-1"]
    assert taken == []
    # Now the reader waits: what the fast path takes never reaches receive(); what it
    # declines does, in order.
    reading = asyncio.create_task(down.receive())
    await asyncio.sleep(0)
    await up.send_str("fast-2")
    await up.send_str("plain-3")
    await up.send_str("fast-4")
    assert await asyncio.wait_for(reading, 5) == "plain-3"
    assert await asyncio.wait_for(down.receive(), 5) == "fast-4"
    assert taken == ["fast-2"]


async def test_large_output_is_split_across_messages(
    router_link: Mux, node: tuple[EchoNode, str]
) -> None:
    ch = await router_link.open("big", "start")
    chunk = "x" * (mux_module.MAX_BATCH_BYTES // 3)
    for _ in range(7):
        await ch.send_str(chunk)
    got = [await ch.receive() for _ in range(8)]
    assert got == ["start", *[chunk] * 7]
    assert router_link._metrics.snapshot()["link_messages_sent"] >= 3


async def test_a_quiet_link_writes_at_once_and_a_busy_one_gathers_what_follows(
    node: tuple[EchoNode, str],
) -> None:
    _, url = node
    delay = 1.0
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(url)
        link = Mux(ws, "router", Metrics("router"), flush_delay_s=delay)
        link.start()
        reader = asyncio.create_task(link.run())

        def sent() -> float:
            return link._metrics.snapshot()["link_messages_sent"]

        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            first = await link.open("c0", "start")
            assert await first.receive() == "start"
            # The link had been quiet: its record left at once, not after the delay.
            assert loop.time() - started < delay
            assert sent() == 1
            # Now it is busy: records sent within the delay of that write, each in its
            # own turn of the loop, wait for the delay and leave in one message.
            chans = []
            for i in range(1, 5):
                await asyncio.sleep(0)
                chans.append(await link.open(f"c{i}", "start"))
            assert sent() == 1
            for ch in chans:
                assert await ch.receive() == "start"
            assert sent() == 2
        finally:
            await link.aclose()
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)


async def test_a_writer_that_fails_ends_the_link_instead_of_muting_it(router_link: Mux) -> None:
    ch = await router_link.open("a", "start")
    assert await ch.receive() == "start"
    unpackable: Any = {1, 2}  # msgpack cannot encode a set
    await ch.send_str(unpackable)
    assert await asyncio.wait_for(ch.receive(), 5) is None
    assert router_link.closed and "writer failed" in (router_link.lost or "")
