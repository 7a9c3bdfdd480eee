"""What the router writes to a client socket, gathered per event-loop iteration
(callmesh.coalesced_writes): the bytes a raw client reads are exactly aiohttp's own, in the
same order, in fewer writes; a slow client still stops the sender; a close follows what
was sent before it; a socket that is going away still refuses sends."""

from __future__ import annotations

import asyncio
import base64
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from aiohttp._websocket.writer import WebSocketWriter

from callmesh.coalesced_writes import CoalescingTransport, coalesce_writes
from callmesh.protocol import agent_audio_frame
from callmesh.telemetry import Metrics
from router.links import NativeLink

Script = Callable[[web.WebSocketResponse], Awaitable[None]]

AUDIO = base64.b64encode(bytes(range(256)) * 15).decode()  # ~5 KB, as a node's frames
BURST = [
    '{"type":"agent_text","turn":3,"text":"Sure, one moment."}',
    *(agent_audio_frame(3, n, "pcm_s16le", 16000, AUDIO) for n in range(4)),
    '{"type":"turn_metrics","turn":3,"ttfb_ms":210}',
]
# Past aiohttp's 16 KiB, a frame's header and payload are written apart; '{' (0x7b) has
# the control bit of a first byte set, so the payload must not be taken for a header.
BIG = [
    '{"type":"agent_text","turn":4,"text":"' + "x" * 20_000 + '"}',
    '{"type":"agent_text","turn":4,"text":"' + "y" * 70_000 + '"}',
]


@dataclass
class Server:
    url_port: int
    layers: list[CoalescingTransport] = field(default_factory=list)
    sockets: list[web.WebSocketResponse] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)


@asynccontextmanager
async def server(script: Script, *, coalesce: bool, compress: bool = True) -> AsyncIterator[Server]:
    srv = Server(0)

    async def handler(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(compress=compress)
        await ws.prepare(request)
        srv.sockets.append(ws)
        if coalesce:
            srv.layers.append(coalesce_writes(ws))
        try:
            await script(ws)
        finally:
            srv.done.set()
        return ws

    app = web.Application()
    app.router.add_get("/ws", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    srv.url_port = runner.addresses[0][1]
    try:
        yield srv
    finally:
        await runner.cleanup()


class RawClient:
    """A WebSocket client that keeps every byte the server sent after its handshake."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.data = bytearray()

    @classmethod
    async def connect(cls, port: int, *, deflate: bool = False, rcvbuf: int = 0) -> RawClient:
        sock = socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        ext = "Sec-WebSocket-Extensions: permessage-deflate\r\n" if deflate else ""
        writer.write(
            (
                "GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                f"{ext}\r\n"
            ).encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101")
        assert (b"permessage-deflate" in head) is deflate
        return cls(reader, writer)

    async def read_to_close(self) -> list[tuple[int, bytes]]:
        """Every frame up to the server's close (answered), as (first byte, payload)."""
        while True:
            frames, complete = split_frames(bytes(self.data))
            if frames and frames[-1][0] & 0x0F == 0x8 and complete:
                break
            chunk = await self.reader.read(1 << 16)
            assert chunk, "the server hung up without a close frame"
            self.data += chunk
        self.writer.write(b"\x88\x82\x00\x00\x00\x00\x03\xe8")  # masked close 1000 (zero key)
        await self.writer.drain()
        self.writer.close()
        await self.writer.wait_closed()
        return frames


def split_frames(data: bytes) -> tuple[list[tuple[int, bytes]], bool]:
    frames, at = [], 0
    while at + 2 <= len(data):
        length, head = data[at + 1] & 0x7F, 2
        if length == 126:
            if at + 4 > len(data):
                break
            (length,), head = struct.unpack("!H", data[at + 2 : at + 4]), 4
        elif length == 127:
            if at + 10 > len(data):
                break
            (length,), head = struct.unpack("!Q", data[at + 2 : at + 10]), 10
        if at + head + length > len(data):
            break
        frames.append((data[at], data[at + head : at + head + length]))
        at += head + length
    return frames, at == len(data)


async def wire_bytes(script: Script, *, coalesce: bool, deflate: bool = False) -> bytes:
    async with server(script, coalesce=coalesce) as srv:
        client = await RawClient.connect(srv.url_port, deflate=deflate)
        await client.read_to_close()
        await srv.done.wait()
        return bytes(client.data)


async def send_all(ws: web.WebSocketResponse, frames: list[str]) -> None:
    for raw in frames:
        await ws.send_str(raw)


class _RecordingTransport:
    """A transport that keeps what is written to it."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes) -> None:
        self.writes.append(data)


def test_aiohttp_still_writes_every_frame_through_its_writers_transport() -> None:
    # The one private hook (callmesh.coalesced_writes.coalesce_writes): if aiohttp renames the
    # writer or stops writing through ``WebSocketWriter.transport``, this fails first.
    assert "_writer" in web.WebSocketResponse.__annotations__
    writer = WebSocketWriter.__new__(WebSocketWriter)
    transport = _RecordingTransport()
    writes = transport.writes

    writer.transport = transport  # type: ignore[assignment]
    writer.use_mask, writer._output_size = False, 0
    writer._write_websocket_frame(b"hi", 0x1, 0)
    assert writes == [b"\x81\x02hi"]


async def test_a_burst_reaches_the_client_byte_identical_in_order_in_one_write() -> None:
    layers: list[CoalescingTransport] = []

    async def script(ws: web.WebSocketResponse) -> None:
        await send_all(ws, BURST)
        if isinstance(ws._writer.transport, CoalescingTransport):  # type: ignore[union-attr]
            layers.append(ws._writer.transport)  # type: ignore[union-attr]
            await asyncio.sleep(0)
            assert layers[0].writes == 1  # six frames, one socket write
        await ws.close()

    plain = await wire_bytes(script, coalesce=False)
    gathered = await wire_bytes(script, coalesce=True)
    assert gathered == plain
    frames, _ = split_frames(gathered)
    assert [p.decode() for _, p in frames[:-1]] == BURST
    assert {first for first, _ in frames[:-1]} == {0x81}  # FIN + text, no RSV bits
    assert layers[0].writes == 2  # the burst, then the close frame


async def test_long_frames_pings_and_a_close_keep_their_place() -> None:
    async def script(ws: web.WebSocketResponse) -> None:
        await send_all(ws, BURST[:2])
        await ws.ping(b"p")  # aiohttp's own control frame: after the whole messages
        await send_all(ws, [*BIG, BURST[-1]])
        await ws.close()  # same iteration: the close still follows everything

    plain = await wire_bytes(script, coalesce=False)
    gathered = await wire_bytes(script, coalesce=True)
    assert gathered == plain
    frames, _ = split_frames(gathered)
    assert [first & 0x0F for first, _ in frames] == [1, 1, 9, 1, 1, 1, 8]


async def test_compressed_connections_are_aiohttps_bytes_too() -> None:
    async def script(ws: web.WebSocketResponse) -> None:
        assert ws.compress  # the client offered permessage-deflate
        await send_all(ws, [*BURST, *BIG])
        await ws.close()

    plain = await wire_bytes(script, coalesce=False, deflate=True)
    gathered = await wire_bytes(script, coalesce=True, deflate=True)
    assert gathered == plain
    frames, _ = split_frames(gathered)
    assert all(first & 0x40 for first, _ in frames[:-1])  # RSV1: compressed


async def test_a_link_closed_right_after_sending_delivers_what_it_sent_first() -> None:
    async def script(ws: web.WebSocketResponse) -> None:
        link = NativeLink(ws, "c1", Metrics("t"), 1 << 20)
        assert link.writes is not None
        for raw in BURST:
            await link.send("x", raw)
        assert link.writes.pending_bytes > 0
        await link.close(4001, b"bye")
        assert link.writes.pending_bytes == 0

    async with server(script, coalesce=False) as srv:
        client = await RawClient.connect(srv.url_port)
        frames = await client.read_to_close()
        await srv.done.wait()
    assert [p.decode() for _, p in frames[:-1]] == BURST
    assert frames[-1] == (0x88, struct.pack("!H", 4001) + b"bye")


async def test_a_slow_client_stops_the_sender_and_the_router_buffers_a_bound() -> None:
    total, frame = 3000, BURST[1]  # ~15 MB: far past what sockets hold
    sent = 0
    held: list[int] = []

    async def script(ws: web.WebSocketResponse) -> None:
        nonlocal sent
        sock = ws.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
        layer = coalesce_writes(ws)
        transport = layer.transport
        for _ in range(total):
            await ws.send_str(frame)
            sent += 1
            held.append(transport.get_write_buffer_size() + layer.pending_bytes)
        await ws.close()

    async with server(script, coalesce=False) as srv:
        client = await RawClient.connect(srv.url_port, rcvbuf=32 * 1024)
        # The client reads nothing: wait for the sender to stop making progress.
        last, still = -1, 0
        while still < 20:
            await asyncio.sleep(0.01)
            still = still + 1 if sent == last else 0
            last = sent
        assert sent < total  # it waits for the client, it does not buffer the call
        # aiohttp alone holds its transport's high-water mark (64 KiB) plus a writer limit
        # (64 KiB); gathering adds at most its own limit (64 KiB) and a frame.
        assert max(held) < 200 * 1024
        frames = await client.read_to_close()
        await srv.done.wait()
    assert sent == total
    assert len(frames) == total + 1 and all(p.decode() == frame for _, p in frames[:-1])


async def test_a_send_on_a_socket_going_away_raises_as_before() -> None:
    outcome: list[BaseException] = []

    async def script(ws: web.WebSocketResponse) -> None:
        await ws.send_str(BURST[0])
        await ws.receive()  # the client reset the connection
        assert coalesce_writes(ws).is_closing()
        try:
            await ws.send_str(BURST[1])
        except (ConnectionError, RuntimeError) as exc:
            outcome.append(exc)

    async with server(script, coalesce=True) as srv:
        client = await RawClient.connect(srv.url_port)
        await client.reader.readexactly(2 + len(BURST[0].encode()))
        client.writer.transport.abort()
        await srv.done.wait()
    assert outcome and isinstance(outcome[0], ConnectionError)


@pytest.mark.parametrize("size", [0, 1, 125, 126, 16385, 65535, 65536])
async def test_header_lengths_as_aiohttp_writes_them(size: int) -> None:
    transport = _RecordingTransport()
    writes = transport.writes

    layer = CoalescingTransport(transport, limit=1 << 20)  # type: ignore[arg-type]
    writer = WebSocketWriter.__new__(WebSocketWriter)
    writer.transport, writer.use_mask, writer._output_size = layer, False, 0  # type: ignore[assignment]
    writer._write_websocket_frame(b"{" * size, 0x1, 0)
    writer._write_websocket_frame(b"", 0x9, 0)  # a ping: written at once, after the frame
    assert len(writes) == 1 and writes[0].endswith(b"{" * size + b"\x89\x00")


async def test_the_answer_to_a_clients_close_is_written_before_the_socket_closes() -> None:
    # aiohttp answers a close and closes the socket in one go: no iteration in between.
    async def script(ws: web.WebSocketResponse) -> None:
        await send_all(ws, BURST)
        msg = await ws.receive()  # the client's close: answered, then the socket closed
        assert msg.type.name == "CLOSE"

    async with server(script, coalesce=True) as srv:
        client = await RawClient.connect(srv.url_port)
        while len(split_frames(bytes(client.data))[0]) < len(BURST):
            client.data += await client.reader.read(1 << 16)
        client.writer.write(b"\x88\x82\x00\x00\x00\x00\x03\xe8")
        while chunk := await client.reader.read(1 << 16):
            client.data += chunk
        client.writer.close()
        await client.writer.wait_closed()
        await srv.done.wait()
    frames, complete = split_frames(bytes(client.data))
    assert complete and [p.decode() for _, p in frames[:-1]] == BURST
    assert frames[-1] == (0x88, struct.pack("!H", 1000))
