"""How one call's frames reach the node: the router's multiplexed link, or a WebSocket.

The router carries every call over one :class:`callmesh.mux.Mux` per node (a
:class:`~callmesh.mux.Channel` per call); ``GET /v1/node/calls/{call_id}`` still takes a
single call on its own WebSocket, for tools and tests that talk to a node directly. A
session sees either through :class:`CallLink`.
"""

from __future__ import annotations

from typing import Protocol

from aiohttp import WSMsgType, web

from callmesh.protocol import CloseCode, ErrorCode, error_frame


class CallLink(Protocol):
    """One call's frames, in order, in both directions."""

    @property
    def closed(self) -> bool: ...

    async def receive(self) -> str | None:
        """The next frame's text; None once the link ended."""
        ...

    async def send_str(self, text: str) -> None:
        """Raises ConnectionError (or RuntimeError) when the link is failing."""
        ...

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None: ...


class WebSocketCallLink:
    """A whole WebSocket for one call; binary messages are answered with an error."""

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws

    @property
    def closed(self) -> bool:
        return self.ws.closed

    async def receive(self) -> str | None:
        while True:
            msg = await self.ws.receive()
            if msg.type is WSMsgType.TEXT:
                text: str = msg.data
                return text
            if msg.type is not WSMsgType.BINARY:
                return None
            await self.ws.send_str(
                error_frame(ErrorCode.BAD_MESSAGE, "binary frames are not accepted")
            )

    async def send_str(self, text: str) -> None:
        await self.ws.send_str(text)

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        await self.ws.close(code=code, message=reason.encode()[:120])
