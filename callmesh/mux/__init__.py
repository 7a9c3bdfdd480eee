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

At low load the loop rarely has two frames in hand at once, so a link that wrote within
the last ``flush_delay_s`` (``link_flush_ms``, 2 ms by default) holds a record until that
long after the write: a 20 ms frame arrives at most that much later, and at 100 calls a
write carries about ten frames instead of one. A link quiet for that long writes at once
(Nagle's rule): the first frame of a reply, or the caller's words at the end of a silence,
waits for no frames that are not coming.

A :class:`Channel` behaves like the per-call WebSocket it replaces: frames in order,
``receive()`` returns None once the channel ended (closed by the peer, or the link was
lost). Channels never wait for each other: the reader only queues frames, and a
channel whose reader falls ``MAX_QUEUED_FRAMES`` behind is closed rather than let it
hold memory without bound. Senders wait only when the link's output buffer is past
``HIGH_WATER_BYTES`` (the peer is not reading).
"""

from callmesh.mux.channel import Channel, OnOpen
from callmesh.mux.link import Mux
from callmesh.mux.wire import (
    HIGH_WATER_BYTES,
    LINK_PATH,
    MAX_BATCH_BYTES,
    MAX_MESSAGE_BYTES,
    MAX_QUEUED_FRAMES,
    LinkClosed,
    Op,
    WebSocket,
)

__all__ = [
    "HIGH_WATER_BYTES",
    "LINK_PATH",
    "MAX_BATCH_BYTES",
    "MAX_MESSAGE_BYTES",
    "MAX_QUEUED_FRAMES",
    "Channel",
    "LinkClosed",
    "Mux",
    "OnOpen",
    "Op",
    "WebSocket",
]
