"""One socket write per server WebSocket per event-loop iteration.

A turn's reply reaches the router as a burst (text, several audio frames, metrics of one
call in one read from the node) and aiohttp writes each WebSocket frame with its own
``transport.write``: one ``send`` system call each, the router's largest CPU cost per
turn. A node's side of a router link sends batches past 16 KiB, which aiohttp writes as
two (header, then payload): two system calls, two segments, two reads at the router.
:func:`coalesce_writes` puts a :class:`CoalescingTransport` between the
connection's aiohttp WebSocket writer and its socket: the writer still builds every frame
(so the bytes are exactly aiohttp's, compressed or not, in order), and what it writes in
one iteration of the event loop leaves in one ``write``.

What stays as aiohttp has it:

- control frames (ping, pong, close) are written at once, after whatever is pending: a
  close follows every frame sent before it, and aiohttp may close the socket right after
  writing it;
- flow control: the pending bytes are bounded (written at once past ``limit``), so the
  transport's buffer fills, pauses the protocol, and aiohttp's writer waits for it to
  drain as it does without this layer;
- a write on a closing transport still raises in aiohttp (``is_closing`` is the socket's);
  pending bytes of a transport that is closing are dropped, as the socket would never
  have carried them after its close frame.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from aiohttp._websocket.writer import WebSocketWriter

# Past this many pending bytes they are written at once: one burst of a turn (a few
# ~5 KB audio frames) fits; a sender that never yields cannot grow it. aiohttp's own
# writer checks the transport's pause every 64 KiB of output (its ``writer_limit``).
DEFAULT_LIMIT = 64 * 1024

# A frame's first byte: FIN, RSV1-3, then the opcode; opcodes 8-15 are control frames.
_CONTROL_BIT = 0x08


class CoalescingTransport:
    """What an aiohttp WebSocket writer writes to: the socket's transport, with the writes
    of one event-loop iteration gathered into one.

    aiohttp writes a frame either whole (header and payload in one ``write``) or, past
    16 KiB, as its header then its payload; :meth:`write` follows that to tell a control
    frame's header from a payload's first byte.
    """

    __slots__ = (
        "_flush_scheduled",
        "_payload_next",
        "_pending",
        "_pending_bytes",
        "limit",
        "transport",
        "writes",
    )

    def __init__(self, transport: asyncio.Transport, limit: int = DEFAULT_LIMIT) -> None:
        self.transport = transport
        self.limit = limit
        self.writes = 0  # socket writes made (evidence, and the tests')
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._flush_scheduled = False
        # The next write is the payload of a frame whose header came alone.
        self._payload_next = False

    def __repr__(self) -> str:
        return (
            f"<CoalescingTransport pending={self._pending_bytes}B "
            f"writes={self.writes} closing={self.transport.is_closing()}>"
        )

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        control = False
        if self._payload_next:
            self._payload_next = False
        elif data:
            control = bool(data[0] & _CONTROL_BIT)
            self._payload_next = _header_only(data)
        self._pending.append(bytes(data))
        self._pending_bytes += len(data)
        if control or self._pending_bytes >= self.limit:
            self.flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._scheduled_flush)

    def flush(self) -> None:
        """Write everything pending now, in one write."""
        if not self._pending:
            return
        pending = self._pending
        self._pending = []
        self._pending_bytes = 0
        if self.transport.is_closing():
            return
        self.writes += 1
        self.transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self.flush()


def _header_only(data: bytes | bytearray | memoryview) -> bool:
    """Whether ``data`` is a frame header alone (its payload is the next write)."""
    if len(data) < 2:
        return False
    length = data[1] & 0x7F
    if length < 126:
        header = 2
    elif length == 126:
        header = 4
        length = int.from_bytes(data[2:4], "big") if len(data) >= 4 else 0
    else:
        header = 10
        length = int.from_bytes(data[2:10], "big") if len(data) >= 10 else 0
    if data[1] & 0x80:  # masked: a client's frame (aiohttp writes those whole)
        header += 4
    return len(data) == header and length > 0


def coalesce_writes(ws: web.WebSocketResponse, limit: int = DEFAULT_LIMIT) -> CoalescingTransport:
    """Gather the writes of a prepared server WebSocket; returns the layer (idempotent).

    The one place that touches aiohttp's internals: ``WebSocketResponse._writer`` (the
    connection's ``WebSocketWriter``) and that writer's ``transport`` attribute, which
    every frame goes through (``_write_websocket_frame``). aiohttp has no public hook for
    where a WebSocket writes; tests/test_coalesced_writes.py fails if this stops holding.
    """
    writer = ws._writer
    if not isinstance(writer, WebSocketWriter):
        raise RuntimeError("coalesce_writes needs a prepared aiohttp WebSocketResponse")
    current = writer.transport
    if isinstance(current, CoalescingTransport):
        return current
    layer = CoalescingTransport(current, limit)
    writer.transport = layer  # type: ignore[assignment]
    return layer


def coalesced(ws: web.WebSocketResponse | None) -> CoalescingTransport | None:
    """:func:`coalesce_writes` for a client link's connection; None when there is no
    upgraded aiohttp connection (a link built without one, as in unit tests)."""
    if isinstance(ws, web.WebSocketResponse) and ws.prepared:
        return coalesce_writes(ws)
    return None
