"""The native wire protocol: the one home of message types, fields, error codes and close codes.

Every frame is a JSON text frame (an object with a ``type``). The same frames travel
client → router → node and back; the router adds nothing to inbound frames and the node
adds ``turn`` (and ``n``, the frame's ordinal within the turn) to every outbound frame.

Failover rests on two numbers (architecture invariant 5):

- every inbound frame carries ``seq``, strictly increasing per call; the node's checkpoint
  records the last ``seq`` it applied, so a frame replayed to a new owner is applied once;
- every outbound reply frame carries ``turn`` and ``n``; the router remembers what it has
  delivered of a turn that is not yet checkpointed, so a re-answered turn is never heard twice.

See ``docs/protocol.md`` for the user-facing description.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any

PROTOCOL_VERSION = 1
DEFAULT_MAX_FRAME_BYTES = 256 * 1024

# Identifiers end up in Redis keys and NATS subjects; dots, wildcards, braces and spaces
# would break hash tags and subject tokens, so they are refused at the edge.
_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def valid_id(value: object) -> bool:
    """True for a call id, tenant or caller id that is safe in keys and subjects."""
    return isinstance(value, str) and _ID_RE.match(value) is not None


class In(StrEnum):
    """Inbound message types (client → router → node)."""

    START = "start"
    USER_TEXT = "user_text"
    AUDIO = "audio"
    HANGUP = "hangup"


class Out(StrEnum):
    """Outbound message types (node → router → client)."""

    READY = "ready"
    AGENT_TEXT = "agent_text"
    AGENT_AUDIO = "agent_audio"
    TURN_METRICS = "turn_metrics"
    CLEAR = "clear"
    ERROR = "error"
    CALL_ENDED = "call_ended"


class Ctl(StrEnum):
    """Router ↔ node control frames; never forwarded to the client."""

    # node → router: everything up to ``seq`` (and ``turn``) is checkpointed.
    ACK = "ack"
    # node → router: this node gives the call up (drain, fenced out); re-pin it.
    HANDOFF = "handoff"


# Reply frames take part in the router's de-duplication of a re-answered turn.
REPLY_TYPES = frozenset({Out.AGENT_TEXT.value, Out.AGENT_AUDIO.value})
INBOUND_TYPES = frozenset(t.value for t in In)


class ErrorCode(StrEnum):
    BAD_JSON = "bad_json"
    BAD_MESSAGE = "bad_message"
    UNKNOWN_TYPE = "unknown_type"
    FRAME_TOO_LARGE = "frame_too_large"
    NOT_STARTED = "not_started"
    ALREADY_STARTED = "already_started"
    BAD_SEQ = "bad_seq"
    CALL_ENDED = "call_ended"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class CloseCode(IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
    TOO_LARGE = 1009
    # 4000-4999 are application codes (RFC 6455 §7.4.2).
    BAD_REQUEST = 4400
    UNAVAILABLE = 4503


class ProtocolError(Exception):
    """An inbound frame that cannot be accepted; carries the code sent back to the client."""

    def __init__(self, code: ErrorCode, message: str, seq: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.seq = seq


@dataclass(frozen=True, slots=True)
class Inbound:
    """A validated inbound frame. ``raw`` is the original text, forwarded without re-encoding."""

    type: In
    seq: int
    body: dict[str, Any]
    raw: str


def parse_inbound(raw: str | bytes, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Inbound:
    """Validate one inbound frame; raise :class:`ProtocolError` with a client-facing reason."""
    if len(raw) > max_bytes:
        raise ProtocolError(ErrorCode.FRAME_TOO_LARGE, f"frame of {len(raw)} bytes > {max_bytes}")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode()
        except UnicodeDecodeError:
            raise ProtocolError(ErrorCode.BAD_JSON, "frame is not UTF-8 text") from None
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise ProtocolError(ErrorCode.BAD_JSON, "frame is not valid JSON") from None
    if not isinstance(body, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "frame must be a JSON object")
    seq = body.get("seq")
    if type(seq) is not int or seq < 1:
        raise ProtocolError(ErrorCode.BAD_SEQ, "'seq' must be a positive integer")
    kind = body.get("type")
    if kind not in INBOUND_TYPES:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {kind!r}", seq)
    msg_type = In(kind)
    _check_fields(msg_type, body, seq)
    return Inbound(msg_type, seq, body, raw)


def _check_fields(kind: In, body: dict[str, Any], seq: int) -> None:
    if kind is In.START:
        if not valid_id(body.get("tenant")):
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE, "'tenant' must match [A-Za-z0-9_-]{1,64}", seq
            )
        caller = body.get("caller", "anonymous")
        if not valid_id(caller):
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE, "'caller' must match [A-Za-z0-9_-]{1,64}", seq
            )
    elif kind is In.USER_TEXT:
        text = body.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "'text' must be a non-empty string", seq)
    elif kind is In.AUDIO and not isinstance(body.get("data"), str):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "'data' must be base64 text", seq)


def encode(msg: dict[str, Any]) -> str:
    """Encode an outbound or control frame compactly."""
    return json.dumps(msg, separators=(",", ":"), ensure_ascii=False)


def error_frame(
    code: ErrorCode, message: str, *, seq: int | None = None, turn: int | None = None
) -> str:
    msg: dict[str, Any] = {"type": Out.ERROR.value, "code": code.value, "message": message}
    if seq is not None:
        msg["seq"] = seq
    if turn is not None:
        msg["turn"] = turn
    return encode(msg)
