"""The link's wire format: its endpoint, its size bounds, its record ops, and how a run of
records is cut into WebSocket messages (see :mod:`callmesh.mux` for the format itself)."""

from __future__ import annotations

from enum import IntEnum
from typing import Any

from aiohttp import ClientWebSocketResponse, web

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
OP_DATA, OP_OPEN, OP_CLOSE = int(Op.DATA), int(Op.OPEN), int(Op.CLOSE)


class LinkClosed(ConnectionResetError):
    """The link (or the channel) is closed: nothing more can be sent on it."""


WebSocket = web.WebSocketResponse | ClientWebSocketResponse


def batches(records: list[tuple[Any, ...]]) -> list[list[tuple[Any, ...]]]:
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
