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

from callmesh.audio.format import TELEPHONY_RATE, AudioEncoding

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
    # The client played every reply frame up to this mark (echoed ``mark`` name).
    MARK = "mark"
    DTMF = "dtmf"
    HANGUP = "hangup"


class Out(StrEnum):
    """Outbound message types (node → router → client)."""

    READY = "ready"
    AGENT_TEXT = "agent_text"
    AGENT_AUDIO = "agent_audio"
    # After a sentence's audio: echo it back (``mark`` inbound) once it has been played.
    MARK = "mark"
    TURN_METRICS = "turn_metrics"
    # What the recognizer heard of the caller: interim (``final`` false) while they speak,
    # then the utterance the turn answers. For display; nothing to echo.
    TRANSCRIPT = "transcript"
    # Sent by the router when a live call moved to another node (the connection's ``ready``
    # named the first owner).
    OWNER = "owner"
    CLEAR = "clear"
    ERROR = "error"
    CALL_ENDED = "call_ended"
    # The router is going away: connect to another router now and resume the call.
    RECONNECT = "reconnect"


class Ctl(StrEnum):
    """Router ↔ node control frames; never forwarded to the client."""

    # node → router: everything up to ``seq`` (and ``turn``) is checkpointed.
    ACK = "ack"
    # node → router: this node gives the call up (drain, fenced out); re-pin it.
    HANDOFF = "handoff"
    # node → router: the model finished writing the reply of ``turn`` (the turn answering
    # inbound ``seq``), without tool calls: its ``text`` is decided. The router keeps it
    # until that turn is acknowledged and gives it to a new owner in the resume ``start``
    # (``decided``), which then says it instead of asking the model again.
    DECIDED = "decided"


# Reply frames take part in the router's de-duplication of a re-answered turn.
REPLY_TYPES = frozenset({Out.AGENT_TEXT.value, Out.AGENT_AUDIO.value, Out.MARK.value})
# ``Out.AGENT_AUDIO`` as a plain string, for the paths taken once per audio frame (the
# template below, the router's routing and de-duplication): on Python 3.11 reading an
# enum member off its class costs ~150 ns, a module global ~15 ns.
AGENT_AUDIO_TYPE = Out.AGENT_AUDIO.value
INBOUND_TYPES = frozenset(t.value for t in In)
# Value → member by a dict lookup: In(value) costs an enum call on every audio frame.
_IN_BY_VALUE = {t.value: t for t in In}


# Sample rates a call may declare in ``start.audio``; the same format is used both ways.
AUDIO_SAMPLE_RATES = frozenset({8000, 16000, 24000})
DEFAULT_AUDIO = {"encoding": AudioEncoding.MULAW.value, "sample_rate": TELEPHONY_RATE}
DTMF_DIGITS = frozenset("0123456789*#ABCD")
MAX_MARK_NAME = 64
# Integers in frames (``seq``, ``ts``) are range-checked at parse: the checkpoint's Lua
# compares seq as a double and JavaScript clients lose precision above 2^53, so a larger
# number was accepted once and then failed every later turn of the call with ``internal``.
MAX_INT = 2**53 - 1
MAX_SEQ = MAX_INT  # the largest seq a frame may carry
# A decided reply (Ctl.DECIDED) is a few sentences; one longer than this (UTF-8 bytes) is
# not sent by a node nor kept by a router, and its turn is answered again by the model.
MAX_DECIDED_TEXT_BYTES = 4096
# Provider, model and node names in a decided reply.
MAX_DECIDED_NAME = 128
# Set (true) by a router in every ``start`` it sends a node: it keeps ``decided`` frames and
# never forwards them; a node sends none to a router that does not say so (an older one,
# during a rolling update, would pass them on to the caller).
TAKES_DECIDED = "takes_decided"
# A typed utterance longer than this is refused at the edge: it would be the model's
# prompt, a retrieval query and a cache key (speech is bounded by its own duration).
MAX_USER_TEXT_CHARS = 2000


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
    # Over a bound of docs/protocol.md "Limits": frames per second, unacknowledged bytes,
    # calls of the tenant; sustained, the connection is closed with CloseCode.OVER_LIMIT.
    RATE_LIMITED = "rate_limited"
    OVER_LIMIT = "over_limit"
    # The call's node link was re-established too often in a short time: the call ends.
    RELINK_LIMIT = "relink_limit"


class CloseCode(IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
    ABNORMAL = 1006  # the connection was lost (never sent on the wire)
    TOO_LARGE = 1009
    # 4000-4999 are application codes (RFC 6455 §7.4.2).
    ROUTER_DRAINING = 4012  # reconnect to another router and resume
    BAD_REQUEST = 4400
    UNAUTHORIZED = 4401  # no token, or one that is malformed, expired or badly signed
    FORBIDDEN = 4403  # the token does not cover this tenant or call; resume secret wrong
    START_TIMEOUT = 4408  # no ``start`` within the bound
    OVER_LIMIT = 4429  # connections, calls per tenant or frame rate over their bound
    UNAVAILABLE = 4503


class ProtocolError(Exception):
    """An inbound frame that cannot be accepted; carries the code sent back to the client."""

    def __init__(self, code: ErrorCode, message: str, seq: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.seq = seq


# Not frozen, though nothing changes one: a frozen dataclass sets each field through
# object.__setattr__, which made building one 3.5 times slower (620 vs 176 ns), and the
# router and the node each build one per audio frame.
@dataclass(slots=True)
class Inbound:
    """A validated inbound frame. ``raw`` is the original text, forwarded without re-encoding."""

    type: In
    seq: int
    body: dict[str, Any]
    raw: str


# An audio frame as the router and callmesh's clients write it (these keys in this order, no
# spaces, base64 data): checked and taken apart in one pass instead of json.loads and the
# field checks. Audio is 50 frames a second per call; any other spelling of a frame takes
# the general path, which gives the same result.
_AUDIO_FRAME = re.compile(
    r'\{"type":"audio","seq":([1-9][0-9]{0,14}),"data":"([A-Za-z0-9+/]*={0,2})"'
    r'(?:,"ts":(0|[1-9][0-9]{0,14}))?\}'
)


_AUDIO_FRAME_PREFIX = '{"type":"audio","seq":'


def audio_frame(seq: int, data: str, ts: int | None = None) -> str:
    """An ``audio`` frame's text in the spelling ``_AUDIO_FRAME`` matches: the router's
    Twilio frames and callmesh's clients write it so, by hand (the per-frame path), and
    the router rebuilds unacknowledged audio from it byte for byte on a relink."""
    if ts is None:
        return f'{_AUDIO_FRAME_PREFIX}{seq},"data":"{data}"}}'
    return f'{_AUDIO_FRAME_PREFIX}{seq},"data":"{data}","ts":{ts}}}'


def parse_inbound(raw: str | bytes, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Inbound:
    """Validate one inbound frame; raise :class:`ProtocolError` with a client-facing reason."""
    if len(raw) > max_bytes:
        raise ProtocolError(ErrorCode.FRAME_TOO_LARGE, f"frame of {len(raw)} bytes > {max_bytes}")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode()
        except UnicodeDecodeError:
            raise ProtocolError(ErrorCode.BAD_JSON, "frame is not UTF-8 text") from None
    exact = _AUDIO_FRAME.fullmatch(raw)
    if exact is not None:
        audio_seq, ts = int(exact[1]), exact[3]
        audio = {"type": "audio", "seq": audio_seq, "data": exact[2]}
        if ts is not None:
            audio["ts"] = int(ts)
        return Inbound(In.AUDIO, audio_seq, audio, raw)
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise ProtocolError(ErrorCode.BAD_JSON, "frame is not valid JSON") from None
    if not isinstance(body, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "frame must be a JSON object")
    seq = body.get("seq")
    if type(seq) is not int or not 1 <= seq <= MAX_INT:
        raise ProtocolError(ErrorCode.BAD_SEQ, f"'seq' must be an integer in 1..{MAX_INT}")
    kind = body.get("type")
    msg_type = _IN_BY_VALUE.get(kind) if type(kind) is str else None
    if msg_type is None:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {kind!r}", seq)
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
        audio = body.get("audio")
        if audio is not None:
            _check_audio_format(audio, seq)
    elif kind is In.USER_TEXT:
        text = body.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "'text' must be a non-empty string", seq)
        if len(text) > MAX_USER_TEXT_CHARS:
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE, f"'text' is longer than {MAX_USER_TEXT_CHARS} chars", seq
            )
    elif kind is In.AUDIO:
        if not isinstance(body.get("data"), str):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "'data' must be base64 text", seq)
        ts = body.get("ts")
        if ts is not None and (type(ts) is not int or not 0 <= ts <= MAX_INT):
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE, f"'ts' must be an integer in 0..{MAX_INT}", seq
            )
    elif kind is In.MARK:
        name = body.get("name")
        if not isinstance(name, str) or not 0 < len(name) <= MAX_MARK_NAME:
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE, f"'name' must be a string of 1-{MAX_MARK_NAME} chars", seq
            )
    elif kind is In.DTMF and not _is_digit(body.get("digit")):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "'digit' must be one of 0-9 * # A-D", seq)


def _is_digit(value: object) -> bool:
    """A DTMF digit; checked for type first, since a list or an object is unhashable."""
    return type(value) is str and value in DTMF_DIGITS


def _check_audio_format(audio: object, seq: int) -> None:
    if not isinstance(audio, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "'audio' must be an object", seq)
    # Type first: an unhashable value (a list, an object) in a set lookup raises.
    encoding = audio.get("encoding")
    if type(encoding) is not str or encoding not in {e.value for e in AudioEncoding}:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "'audio.encoding' must be mulaw or pcm16", seq)
    rate = audio.get("sample_rate")
    if type(rate) is not int or rate not in AUDIO_SAMPLE_RATES:
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE,
            f"'audio.sample_rate' must be one of {sorted(AUDIO_SAMPLE_RATES)}",
            seq,
        )
    if audio["encoding"] == AudioEncoding.MULAW and rate != TELEPHONY_RATE:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "mulaw audio is 8000 Hz", seq)


def decided_reply(body: object) -> dict[str, Any] | None:
    """The fields of a ``decided`` control frame (or of the ``decided`` object a router puts
    in a resume ``start``), checked and bounded: ``turn``, ``seq``, ``text``, ``llm``
    (provider and model names), ``node``. None when anything is missing, of the wrong
    type or over a bound: the text is then dropped, never half kept."""
    if not isinstance(body, dict):
        return None
    turn, seq, text = body.get("turn"), body.get("seq"), body.get("text")
    llm, node = body.get("llm"), body.get("node", "")
    if type(turn) is not int or not 1 <= turn <= MAX_INT:
        return None
    if type(seq) is not int or not 1 <= seq <= MAX_INT:
        return None
    if not isinstance(text, str) or not text.strip():
        return None
    if len(text) > MAX_DECIDED_TEXT_BYTES or len(text.encode()) > MAX_DECIDED_TEXT_BYTES:
        return None
    if not (isinstance(llm, list) and len(llm) == 2 and all(_short_name(x) for x in llm)):
        return None
    if not _short_name(node):
        return None
    return {"turn": turn, "seq": seq, "text": text, "llm": list(llm), "node": node}


def _short_name(value: object) -> bool:
    return isinstance(value, str) and len(value) <= MAX_DECIDED_NAME


def mark_name(turn: int, n: int) -> str:
    """The name of the mark after reply frame ``n`` of ``turn``."""
    return f"{turn}.{n}"


def parse_mark_name(name: str) -> tuple[int, int] | None:
    turn, _, n = name.partition(".")
    # ASCII only: str.isdigit() is also true of "²" and other digits int() refuses.
    if not (turn.isascii() and n.isascii() and turn.isdigit() and n.isdigit()):
        return None
    return int(turn), int(n)


# Built once: json.dumps with options builds an encoder per call, several frames a turn.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def encode(msg: dict[str, Any]) -> str:
    """Encode an outbound or control frame compactly."""
    return _ENCODER.encode(msg)


# The reply's audio, about ten frames of several KB a turn, is the bulk of what nodes send
# and routers forward. Nodes write it in one fixed spelling, from a template (JSON-encoding
# the base64 text costs 40x more), and routers read turn, n and data back from it without
# parsing the frame. Any other spelling of an ``agent_audio`` frame (an older node's, or
# one with more fields) is still valid JSON and takes the general path.
_AGENT_AUDIO_HEAD = re.compile(
    r'\{"type":"agent_audio","turn":(0|[1-9][0-9]{0,14}),"n":(0|[1-9][0-9]{0,14}),'
    r'"encoding":"[a-z0-9_]{1,32}","sample_rate":[1-9][0-9]{0,8},"data":"'
)


def agent_audio_frame(turn: int, n: int, encoding: str, sample_rate: int, data: str) -> str:
    """An ``agent_audio`` frame's text in the spelling :func:`read_agent_audio` reads;
    ``data`` is base64 (which never needs escaping in JSON)."""
    return (
        f'{{"type":"agent_audio","turn":{turn},"n":{n},"encoding":"{encoding}",'
        f'"sample_rate":{sample_rate},"data":"{data}"}}'
    )


# The fields of an ``agent_audio`` frame :func:`reply_frame_text` writes from the template.
_AGENT_AUDIO_FIELDS = frozenset({"type", "turn", "n", "encoding", "sample_rate", "data"})


def reply_frame_text(frame: dict[str, Any]) -> str:
    """A reply frame's text as a node sends it: an ``agent_audio`` frame with exactly the
    template's fields (``data`` base64, as the pipeline writes it) in
    :func:`agent_audio_frame`'s spelling, any other frame (text, a mark, a resumed chunk
    with its ``resumed`` flag) JSON-encoded. Same frame, same text: a reply said again is
    byte for byte what it was."""
    if frame["type"] == AGENT_AUDIO_TYPE and frame.keys() == _AGENT_AUDIO_FIELDS:
        return agent_audio_frame(
            frame["turn"], frame["n"], frame["encoding"], frame["sample_rate"], frame["data"]
        )
    return _ENCODER.encode(frame)


def read_agent_audio(raw: str) -> tuple[int, int, str] | None:
    """``(turn, n, data)`` of an ``agent_audio`` frame in :func:`agent_audio_frame`'s
    spelling, or None for any other text (parse it as JSON then). The data is checked for
    what would end or escape its JSON string (a quote, a backslash), so for any frame that
    parses, what is returned is what parsing gives. Not checked: raw control characters,
    which make the frame invalid JSON (a ~9 µs scan of the data, twice a json.loads);
    nodes write base64, and routers forward node frames unparsed by type anyway."""
    head = _AGENT_AUDIO_HEAD.match(raw)
    if head is None or not raw.endswith('"}'):
        return None
    data = raw[head.end() : -2]
    if '"' in data or "\\" in data:
        return None
    return int(head[1]), int(head[2]), data


def transcript_frame(turn: int, text: str, final: bool, confidence: float) -> str:
    return encode(
        {
            "type": Out.TRANSCRIPT.value,
            "turn": turn,
            "text": text,
            "final": final,
            "confidence": round(confidence, 3),
        }
    )


def error_frame(
    code: ErrorCode, message: str, *, seq: int | None = None, turn: int | None = None
) -> str:
    msg: dict[str, Any] = {"type": Out.ERROR.value, "code": code.value, "message": message}
    if seq is not None:
        msg["seq"] = seq
    if turn is not None:
        msg["turn"] = turn
    return encode(msg)
