"""Reading a node's frames on the router's hot path: the type without parsing.

Nodes encode ``type`` first (``callmesh.protocol.encode`` of a dict built type first), so
most frames are routed by a prefix check; only the frames whose fields the router needs
(acks, replies, turn metrics, errors) are parsed, and only once. ``agent_audio``, the bulk
of what a node says, is not: its template spelling is read by
``callmesh.protocol.read_agent_audio`` (router.upstream), and parsed only when a node
spells it otherwise.
"""

from __future__ import annotations

import json
from typing import Any

_TYPE_PREFIX = '{"type":"'


def kind_of(raw: str) -> str | None:
    """The type of a node frame without parsing it; None if it is not where expected."""
    if raw.startswith(_TYPE_PREFIX):
        end = raw.find('"', 9)
        if end > 9:
            return raw[9:end]
    return None


def parse(raw: str) -> dict[str, Any] | None:
    """The frame as a JSON object, or None if it is not one."""
    try:
        frame = json.loads(raw)
    except ValueError:
        return None
    return frame if isinstance(frame, dict) else None
