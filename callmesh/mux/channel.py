"""One call's frames on a shared link: what a per-call WebSocket used to be."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from callmesh.mux.wire import MAX_QUEUED_FRAMES, OP_DATA, LinkClosed
from callmesh.protocol import CloseCode


class ChannelLink(Protocol):
    """What a channel needs of the link that carries it (:class:`callmesh.mux.Mux`)."""

    loop: asyncio.AbstractEventLoop

    async def send(self, record: tuple[Any, ...], size: int) -> None: ...

    def enqueue(self, record: tuple[Any, ...], size: int) -> None: ...

    def closed_locally(self, channel: Channel) -> None: ...


# Called by the node's link for every channel the router opens; the channel already
# holds its first frame.
OnOpen = Callable[["Channel"], None]


class Channel:
    """One call's frames on a :class:`~callmesh.mux.Mux`; what a per-call WebSocket used
    to be."""

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

    def __init__(self, mux: ChannelLink, chan: int, call_id: str) -> None:
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
        await self._mux.send((OP_DATA, self.id, text), len(text))

    def send_nowait(self, text: str) -> None:
        """Queue a frame without waiting for a link past its high water (for the rare
        frame a fast path answers with)."""
        if self.close_code is not None:
            raise LinkClosed(f"channel {self.id} ({self.call_id}) is closed")
        self._mux.enqueue((OP_DATA, self.id, text), len(text))

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """End the channel and tell the peer; never waits for the link."""
        if self.close_code is None:
            self.ended(code, reason)
            self._mux.closed_locally(self)

    # ------------------------------------------------------------------ from the link

    def deliver(self, text: str) -> bool:
        """Queue a frame read off the link; False when the reader is too far behind to
        keep up."""
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

    def ended(self, code: int, reason: str) -> None:
        """The link says the channel is over (the peer closed it, or the link was lost)."""
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
