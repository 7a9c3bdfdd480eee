"""The link itself: one WebSocket carrying many channels, its batching writer, its reader
and how it ends."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import msgpack
from aiohttp import WSMsgType

from callmesh.metric_names import (
    LINK_BAD_RECORDS,
    LINK_CHANNELS_BEHIND,
    LINK_MESSAGES_SENT,
    LINK_RECORDS_SENT,
)
from callmesh.mux.channel import Channel, OnOpen
from callmesh.mux.wire import (
    HIGH_WATER_BYTES,
    MAX_BATCH_BYTES,
    OP_CLOSE,
    OP_DATA,
    OP_OPEN,
    LinkClosed,
    WebSocket,
    batches,
)
from callmesh.protocol import CloseCode
from callmesh.telemetry import Metrics

log = logging.getLogger("callmesh.mux")


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
        # Loop time of the writer's last message: a link quiet for the flush delay writes
        # its next record at once (see enqueue).
        self._last_write = float("-inf")
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
        # When the peer last sent anything (monotonic): a peer that sends is running, even
        # when its heartbeat is late (router.membership).
        self.last_heard = time.monotonic()

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
        await self.send((OP_OPEN, channel.id, call_id, first), len(first))
        return channel

    async def send(self, record: tuple[Any, ...], size: int) -> None:
        self.enqueue(record, size)
        if self._out_bytes > HIGH_WATER_BYTES:
            self._drained.clear()
            await self._drained.wait()
            if self.lost is not None:
                raise LinkClosed(f"link {self.name} is closed: {self.lost}")

    def closed_locally(self, channel: Channel) -> None:
        if self.channels.pop(channel.id, None) is not None and self.lost is None:
            self.enqueue(
                (OP_CLOSE, channel.id, channel.close_code, channel.close_reason),
                len(channel.close_reason),
            )

    def enqueue(self, record: tuple[Any, ...], size: int) -> None:
        if self.lost is not None:
            raise LinkClosed(f"link {self.name} is closed: {self.lost}")
        self._out.append(record)
        self._out_bytes += size
        # The first record wakes the writer; the writer runs after the callbacks already
        # scheduled, so what they send shares its message. As Nagle's rule has it, the
        # wait is only for a busy link: one that wrote within the flush delay holds the
        # record until the delay has passed since that write (later records share the
        # message), and a quiet one writes at once, so the first frame of a reply or of
        # an utterance is not held for frames that are not coming.
        if self._flush_timer is None or self._out_bytes > MAX_BATCH_BYTES:
            hold = self._last_write + self._flush_delay - self.loop.time()
            if hold > 0 and self._out_bytes <= MAX_BATCH_BYTES:
                self._flush_timer = self.loop.call_later(hold, self._flush)
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
                self._last_write = loop.time()
                for message in batches(out):
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
                self.last_heard = time.monotonic()
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
            if op == OP_DATA and type(rec[2]) is str:
                channel = channels.get(chan)
                if channel is not None and not channel.deliver(rec[2]):
                    self._behind(channel)
            elif op == OP_OPEN and len(rec) == 4 and type(rec[2]) is str and type(rec[3]) is str:
                self._opened(chan, rec[2], rec[3])
            elif op == OP_CLOSE and len(rec) == 4 and type(rec[2]) is int:
                channel = channels.pop(chan, None)
                if channel is not None:
                    channel.ended(rec[2], str(rec[3]))
            else:
                self._bad_record(rec)
        return True

    def _opened(self, chan: object, call_id: str, first: str) -> None:
        if type(chan) is not int or chan in self.channels:
            self._bad_record(["open", chan])
            return
        if self._on_open is None:
            # Only routers open channels; the node side is the one with ``on_open``.
            self.enqueue((OP_CLOSE, chan, int(CloseCode.BAD_REQUEST), "cannot open here"), 0)
            return
        channel = Channel(self, chan, call_id)
        self.channels[chan] = channel
        channel.deliver(first)
        self._on_open(channel)

    def _behind(self, channel: Channel) -> None:
        self._metrics.inc(LINK_CHANNELS_BEHIND)
        log.warning("call fell behind its link", extra={"fields": {"call_id": channel.call_id}})
        channel.ended(CloseCode.UNAVAILABLE, "fell behind")
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
            channel.ended(CloseCode.ABNORMAL, why)
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
