"""Many calls over one WebSocket: the link between a router and a conversation node.

Why one link and not one WebSocket per call: every caller sends a 20 ms audio frame 50
times a second, and with a socket per call each of those frames cost the router a
``write`` system call and the node a ``read`` (on loopback the writer also pays for the
receiver's TCP processing). py-spy put those calls at about 60 % of the router's busy
time. On a shared link, whatever the calls say within one turn of the event loop leaves
as one WebSocket message, so under load one system call carries many frames.

Wire: every WebSocket message is binary, a msgpack array of records:

- ``[0, chan, text]`` DATA: one native protocol frame on channel ``chan``;
- ``[1, chan, call_id, text]`` OPEN: a new channel for ``call_id``; ``text`` is its
  first frame (the call's ``start``). Only the router opens channels;
- ``[2, chan, code, reason]`` CLOSE: the channel ends (either side may say so), with a
  WebSocket close code.

At low load the loop rarely has two frames in hand at once, so the writer waits
``flush_delay_s`` (``link_flush_ms``, 2 ms by default) after the first record before it
writes: a 20 ms frame arrives at most that much later, and at 100 calls a write carries
about ten frames instead of one.

A :class:`Channel` behaves like the per-call WebSocket it replaces: frames in order,
``receive()`` returns None once the channel ended (closed by the peer, or the link was
lost). Channels never wait for each other: the reader only queues frames, and a
channel whose reader falls ``MAX_QUEUED_FRAMES`` behind is closed rather than let it
hold memory without bound. Senders wait only when the link's output buffer is past
``HIGH_WATER_BYTES`` (the peer is not reading).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from enum import IntEnum
from typing import Any

import msgpack
from aiohttp import ClientWebSocketResponse, WSMsgType, web

from callmesh.metric_names import (
    LINK_BAD_RECORDS,
    LINK_CHANNELS_BEHIND,
    LINK_MESSAGES_SENT,
    LINK_RECORDS_SENT,
)
from callmesh.protocol import CloseCode
from callmesh.telemetry import Metrics

log = logging.getLogger("callmesh.mux")

# The node's endpoint for a router's link.
LINK_PATH = "/v1/node/link"
# One WebSocket message carries at most this much (a single larger frame goes alone).
MAX_BATCH_BYTES = 256 * 1024
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
# Past this much unsent output, senders wait for the writer.
HIGH_WATER_BYTES = 1024 * 1024
# 40 s of 20 ms audio: a reader this far behind is stuck, not slow.
MAX_QUEUED_FRAMES = 2000


class Op(IntEnum):
    DATA = 0
    OPEN = 1
    CLOSE = 2


# Plain ints for the per-frame path (an IntEnum comparison costs a method call).
_DATA, _OPEN, _CLOSE = int(Op.DATA), int(Op.OPEN), int(Op.CLOSE)


class LinkClosed(ConnectionResetError):
    """The link (or the channel) is closed: nothing more can be sent on it."""


WebSocket = web.WebSocketResponse | ClientWebSocketResponse
# Called by the node's link for every channel the router opens; the channel already
# holds its first frame.
OnOpen = Callable[["Channel"], None]


class Channel:
    """One call's frames on a :class:`Mux`; what a per-call WebSocket used to be."""

    __slots__ = (
        "_inbox",
        "_loop",
        "_mux",
        "_waiter",
        "call_id",
        "close_code",
        "close_reason",
        "fast_path",
        "id",
    )

    def __init__(self, mux: Mux, chan: int, call_id: str) -> None:
        self._mux = mux
        # Cached: asyncio.get_running_loop() checks the process id, a system call, and
        # this is paid for every frame.
        self._loop = mux.loop
        self.id = chan
        self.call_id = call_id
        self._inbox: deque[str] = deque()
        self._waiter: asyncio.Future[None] | None = None
        # Set once the channel ended, by either side or by the loss of the link.
        self.close_code: int | None = None
        self.close_reason = ""
        # Set by the channel's reader while it waits in receive(): takes a frame right
        # where the link reads it (True) instead of queueing it and waking the reader a
        # turn of the loop later; False (having done nothing) to queue it as usual. It
        # must not raise (the link's reader runs it) and must never wait.
        self.fast_path: Callable[[str], bool] | None = None

    def __repr__(self) -> str:
        state = "open" if self.close_code is None else f"closed {self.close_code}"
        return f"<Channel {self.id} {self.call_id} [{state}, {len(self._inbox)} queued]>"

    @property
    def closed(self) -> bool:
        return self.close_code is not None

    async def receive(self) -> str | None:
        """The next frame; None once the channel has ended and every frame was read."""
        while not self._inbox:
            if self.close_code is not None:
                return None
            waiter = self._waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        return self._inbox.popleft()

    async def send_str(self, text: str) -> None:
        if self.close_code is not None:
            raise LinkClosed(f"channel {self.id} ({self.call_id}) is closed")
        await self._mux.send((_DATA, self.id, text), len(text))

    def send_nowait(self, text: str) -> None:
        """Queue a frame without waiting for a link past its high water (for the rare
        frame a fast path answers with)."""
        if self.close_code is not None:
            raise LinkClosed(f"channel {self.id} ({self.call_id}) is closed")
        self._mux._queue((_DATA, self.id, text), len(text))

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """End the channel and tell the peer; never waits for the link."""
        if self.close_code is None:
            self._ended(code, reason)
            self._mux.closed_locally(self)

    # ------------------------------------------------------------------ from the link

    def _deliver(self, text: str) -> bool:
        """Queue a frame; False when the reader is too far behind to keep up."""
        if self.close_code is not None:
            return True  # we closed it; the peer had not heard yet
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            # The reader is waiting, so nothing is queued before this frame: taking it
            # here keeps the channel's order.
            fast = self.fast_path
            if fast is not None and fast(text):
                return True
            waiter.set_result(None)
        self._inbox.append(text)
        return len(self._inbox) <= MAX_QUEUED_FRAMES

    def _ended(self, code: int, reason: str) -> None:
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Mux:
    """One WebSocket carrying many channels. ``start()`` the writer, then ``run()`` the
    reader until the link ends; every channel ends with it. ``aclose()`` is idempotent.
    Made inside the event loop that will run it."""

    def __init__(
        self,
        ws: WebSocket,
        name: str,
        metrics: Metrics,
        on_open: OnOpen | None = None,
        flush_delay_s: float = 0.0,
    ) -> None:
        self.ws = ws
        self.loop = asyncio.get_running_loop()
        self._flush_delay = flush_delay_s
        self._flush_timer: asyncio.TimerHandle | None = None
        self.name = name
        self.channels: dict[int, Channel] = {}
        self._metrics = metrics
        # Bound once: the writer counts every message it sends.
        self._messages_sent = metrics.counter(LINK_MESSAGES_SENT)
        self._records_sent = metrics.counter(LINK_RECORDS_SENT)
        self._on_open = on_open
        self._out: list[tuple[Any, ...]] = []
        self._out_bytes = 0
        self._wake_writer: asyncio.Future[None] | None = None
        self._drained = asyncio.Event()
        self._drained.set()
        self._writer: asyncio.Task[None] | None = None
        self._next_chan = 0
        self.lost: str | None = None  # why the link ended, once it has

    def __repr__(self) -> str:
        state = "open" if self.lost is None else f"lost: {self.lost}"
        return f"<Mux {self.name} [{state}, {len(self.channels)} channels]>"

    @property
    def closed(self) -> bool:
        return self.lost is not None

    def start(self) -> None:
        self._writer = self.loop.create_task(self._write_loop(), name=f"mux-writer:{self.name}")

    # ------------------------------------------------------------------ sending

    async def open(self, call_id: str, first: str) -> Channel:
        """A new channel for ``call_id`` whose first frame is ``first`` (router side)."""
        if self.lost is not None:
            raise LinkClosed(f"link {self.name} is closed: {self.lost}")
        self._next_chan += 1
        channel = Channel(self, self._next_chan, call_id)
        self.channels[channel.id] = channel
        await self.send((_OPEN, channel.id, call_id, first), len(first))
        return channel

    async def send(self, record: tuple[Any, ...], size: int) -> None:
        self._queue(record, size)
        if self._out_bytes > HIGH_WATER_BYTES:
            self._drained.clear()
            await self._drained.wait()
            if self.lost is not None:
                raise LinkClosed(f"link {self.name} is closed: {self.lost}")

    def closed_locally(self, channel: Channel) -> None:
        if self.channels.pop(channel.id, None) is not None and self.lost is None:
            self._queue(
                (_CLOSE, channel.id, channel.close_code, channel.close_reason),
                len(channel.close_reason),
            )

    def _queue(self, record: tuple[Any, ...], size: int) -> None:
        if self.lost is not None:
            raise LinkClosed(f"link {self.name} is closed: {self.lost}")
        self._out.append(record)
        self._out_bytes += size
        # The first record wakes the writer, after the flush delay; the writer runs after
        # the callbacks already scheduled, so what they send shares its message.
        if self._flush_timer is None or self._out_bytes > MAX_BATCH_BYTES:
            if self._flush_delay and self._out_bytes <= MAX_BATCH_BYTES:
                self._flush_timer = self.loop.call_later(self._flush_delay, self._flush)
            else:
                self._flush()

    def _flush(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        wake = self._wake_writer
        if wake is not None and not wake.done():
            wake.set_result(None)

    async def _write_loop(self) -> None:
        loop = self.loop
        try:
            while True:
                # Wait for a record, and then for its flush delay to pass.
                if not self._out or self._flush_timer is not None:
                    self._wake_writer = loop.create_future()
                    await self._wake_writer
                    self._wake_writer = None
                if self._flush_timer is not None:
                    self._flush_timer.cancel()
                    self._flush_timer = None
                out, self._out = self._out, []
                self._out_bytes = 0
                for message in _batches(out):
                    await self.ws.send_bytes(msgpack.packb(message))
                    self._messages_sent.inc()
                self._records_sent.inc(len(out))
                if self._out_bytes <= HIGH_WATER_BYTES:
                    self._drained.set()
        except (ConnectionError, RuntimeError) as exc:
            self._lose(f"write failed: {exc}")
        except Exception as exc:
            # A writer that died quietly would leave every call on the link mute: end the
            # link instead, so the calls relink.
            log.exception("link writer failed", extra={"fields": {"link": self.name}})
            self._lose(f"writer failed: {exc!r}")

    # ------------------------------------------------------------------ receiving

    async def serve(self) -> None:
        """The whole life of a link whose reader is this task: write, read until the link
        ends, close."""
        self.start()
        try:
            await self.run()
        finally:
            await self.aclose()

    async def run(self) -> None:
        """Read until the link ends (or the peer breaks the wire format)."""
        code: int = CloseCode.GOING_AWAY
        try:
            async for msg in self.ws:
                if msg.type is not WSMsgType.BINARY or not self._dispatch(msg.data):
                    log.error("link broke the wire format", extra={"fields": {"link": self.name}})
                    self._lose("malformed message")
                    code = CloseCode.BAD_REQUEST
                    break
            else:
                self._lose(f"closed by peer ({self.ws.close_code})")
        finally:
            self._lose("reader stopped")
            if not self.ws.closed:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.ws.close(code=code))

    def _dispatch(self, data: bytes) -> bool:
        try:
            records = msgpack.unpackb(data)
        except Exception:  # msgpack raises several unrelated types for bad input
            return False
        if type(records) is not list:
            return False
        channels = self.channels
        for rec in records:
            # A channel id is an int: anything else (a list, a map) is not even hashable.
            if type(rec) is not list or len(rec) < 3 or type(rec[1]) is not int:
                self._bad_record(rec)
                continue
            op, chan = rec[0], rec[1]
            if op == _DATA and type(rec[2]) is str:
                channel = channels.get(chan)
                if channel is not None and not channel._deliver(rec[2]):
                    self._behind(channel)
            elif op == _OPEN and len(rec) == 4 and type(rec[2]) is str and type(rec[3]) is str:
                self._opened(chan, rec[2], rec[3])
            elif op == _CLOSE and len(rec) == 4 and type(rec[2]) is int:
                channel = channels.pop(chan, None)
                if channel is not None:
                    channel._ended(rec[2], str(rec[3]))
            else:
                self._bad_record(rec)
        return True

    def _opened(self, chan: object, call_id: str, first: str) -> None:
        if type(chan) is not int or chan in self.channels:
            self._bad_record(["open", chan])
            return
        if self._on_open is None:
            # Only routers open channels; the node side is the one with ``on_open``.
            self._queue((_CLOSE, chan, int(CloseCode.BAD_REQUEST), "cannot open here"), 0)
            return
        channel = Channel(self, chan, call_id)
        self.channels[chan] = channel
        channel._deliver(first)
        self._on_open(channel)

    def _behind(self, channel: Channel) -> None:
        self._metrics.inc(LINK_CHANNELS_BEHIND)
        log.warning("call fell behind its link", extra={"fields": {"call_id": channel.call_id}})
        channel._ended(CloseCode.UNAVAILABLE, "fell behind")
        self.closed_locally(channel)

    def _bad_record(self, rec: object) -> None:
        self._metrics.inc(LINK_BAD_RECORDS)
        fields = {"link": self.name, "record": repr(rec)[:120]}
        log.error("malformed link record", extra={"fields": fields})

    # ------------------------------------------------------------------ ending

    def _lose(self, why: str) -> None:
        """The link is over: end every channel, release waiting senders, stop writing."""
        if self.lost is not None:
            return
        self.lost = why
        channels, self.channels = self.channels, {}
        for channel in channels.values():
            channel._ended(CloseCode.ABNORMAL, why)
        self._drained.set()
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        writer = self._writer
        if writer is not None and writer is not asyncio.current_task():
            writer.cancel()

    def abandon(self, why: str) -> None:
        """End the link now without waiting for the peer (e.g. it was declared dead);
        the socket closes in the background of ``run``."""
        self._lose(why)

    async def aclose(self) -> None:
        self._lose("closed")
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)
        if not self.ws.closed:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.ws.close())


def _batches(records: list[tuple[Any, ...]]) -> list[list[tuple[Any, ...]]]:
    """Split records into messages of at most MAX_BATCH_BYTES (a larger record alone)."""
    out: list[list[tuple[Any, ...]]] = [[]]
    size = 0
    for rec in records:
        n = len(rec[-1]) if type(rec[-1]) is str else 0
        if out[-1] and size + n > MAX_BATCH_BYTES:
            out.append([])
            size = 0
        out[-1].append(rec)
        size += n
    return out
