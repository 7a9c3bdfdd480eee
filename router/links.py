"""The client side of a proxied call: one link object per client connection.

A :class:`ProxySession <router.proxy.ProxySession>` speaks the native protocol to the
node; a link turns whatever the client speaks into validated native :class:`Inbound`
frames and native node frames back into what the client understands:

- :class:`NativeLink`: the native protocol itself (frames pass through unchanged);
- :class:`router.twilio.TwilioLink`: Twilio Media Streams.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import WSMsgType, web

from callmesh.coalesced_writes import coalesced
from callmesh.metric_names import CLIENT_ERRORS
from callmesh.protocol import ErrorCode, Inbound, Out, ProtocolError, error_frame, parse_inbound
from callmesh.telemetry import Metrics


class ClientLink(Protocol):
    """What a proxy session needs of its client connection."""

    kind: str
    # Whether a live call may be taken over through this link (with its resume proof).
    resumable: bool
    # Known once ``receive`` returned the ``start`` frame.
    call_id: str

    @property
    def closed(self) -> bool: ...

    async def receive(self) -> Inbound | None:
        """The next valid inbound frame, or None when the client is gone. Frames that
        cannot be accepted are answered (or counted) by the link itself."""
        ...

    async def send(
        self, kind: str, raw: str, frame: dict[str, Any] | None = None, data: str | None = None
    ) -> None:
        """Deliver one node frame (``raw`` native text of type ``kind``; ``frame`` is its
        parsed form when the session has it, ``data`` an ``agent_audio`` frame's data when
        the session read it unparsed, :func:`callmesh.protocol.read_agent_audio`). Raises
        ConnectionError/RuntimeError when the connection is failing."""
        ...

    async def refuse(self, code: ErrorCode, message: str, seq: int | None = None) -> None:
        """Tell the client a frame was refused (the call goes on)."""
        ...

    async def close(self, code: int, message: bytes = b"") -> None: ...


class NativeLink:
    """The native protocol: the client already speaks what the node speaks."""

    kind = "native"
    resumable = True  # with the call's current resume secret

    def __init__(
        self, ws: web.WebSocketResponse, call_id: str, metrics: Metrics, max_frame_bytes: int
    ) -> None:
        self.ws = ws
        self.call_id = call_id
        self._metrics = metrics
        self._max_frame_bytes = max_frame_bytes
        self.writes = coalesced(ws)

    def __repr__(self) -> str:
        return f"<NativeLink {self.call_id} closed={self.ws.closed} {self.writes!r}>"

    @property
    def closed(self) -> bool:
        return self.ws.closed

    async def receive(self) -> Inbound | None:
        ws = self.ws
        while True:
            msg = await ws.receive()
            if msg.type is WSMsgType.TEXT:
                try:
                    return parse_inbound(msg.data, self._max_frame_bytes)
                except ProtocolError as exc:
                    self._metrics.inc(CLIENT_ERRORS, code=exc.code.value)
                    await self._send_quietly(error_frame(exc.code, exc.message, seq=exc.seq))
            elif msg.type is WSMsgType.BINARY:
                await self._send_quietly(error_frame(ErrorCode.BAD_MESSAGE, "use text frames"))
            else:
                return None

    async def send(
        self, kind: str, raw: str, frame: dict[str, Any] | None = None, data: str | None = None
    ) -> None:
        if not self.ws.closed:
            await self.ws.send_str(raw)

    async def refuse(self, code: ErrorCode, message: str, seq: int | None = None) -> None:
        await self._send_quietly(error_frame(code, message, seq=seq))

    async def _send_quietly(self, raw: str) -> None:
        # A client that is going away learns nothing from an error; its reader sees the close.
        try:
            await self.send(Out.ERROR.value, raw)
        except (ConnectionError, RuntimeError):
            pass

    async def close(self, code: int, message: bytes = b"") -> None:
        await self.ws.close(code=code, message=message)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def free_connections_at_end(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Let a connection's memory go when its handler ends, not at a garbage collection.

    Two reference cycles of aiohttp's server WebSocket outlive the connection, and hold
    the response, request, protocol, parser, queues and buffers of one call. The cyclic
    garbage collector frees them, but the router runs it rarely (gc_tuning): meanwhile
    the ended calls' connections pile up, and the allocator keeps the memory they
    fragmented. Both are broken here, once the handler is done (the socket is closed):

    - with a heartbeat, the protocol keeps the response's data-received callback (a bound
      method) after the connection is lost; the response keeps the request, which keeps
      the protocol;
    - a connection that failed (the client reset it) keeps its exception, whose traceback
      holds the frames of the response's own methods.
    """
    response: web.StreamResponse | None = None
    try:
        response = await handler(request)
        return response
    finally:
        protocol = request.protocol
        if getattr(protocol, "_data_received_cb", None) is not None:
            protocol._data_received_cb = None
        if isinstance(response, web.WebSocketResponse) and response.closed:
            _drop_tracebacks(response.exception())


def _drop_tracebacks(exc: BaseException | None) -> None:
    """Unlink the frames from an exception and the ones it chains to (bounded)."""
    for _ in range(8):
        if exc is None:
            return
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__
