"""Fuzzing the pure parsers and state machines every inbound byte passes through.

No sockets and no event loop work: the native frame parser, the node's call core, the
router's failover buffer, the Twilio Media Streams translation and the router↔node link's
record decoding are called directly with generated hostile input (tests/fuzz_inputs.py).
The property everywhere: a clear refusal (a ``ProtocolError`` with a client-facing code,
a counted malformed message, a refused stream) or a well-formed result; never another
exception, never an ``internal`` error.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import msgpack
from hypothesis import given
from hypothesis import strategies as st

from callmesh.metric_names import LINK_BAD_RECORDS
from callmesh.mux import Channel, Mux
from callmesh.protocol import (
    DTMF_DIGITS,
    MAX_MARK_NAME,
    MAX_SEQ,
    ErrorCode,
    In,
    Inbound,
    ProtocolError,
    error_frame,
    parse_inbound,
    parse_mark_name,
    valid_id,
)
from callmesh.telemetry import Metrics
from conversation_node.call_core import CallCore, CallState, Step
from conversation_node.errors import CallDropped
from memory.session import MemoryConfig
from router.failover_buffer import UnackedFrames
from router.twilio import TwilioLink, _Refused
from tests.fuzz_inputs import (
    fuzz_settings,
    good_base64,
    hostile_text,
    json_values,
    native_frames,
    native_wire,
    twilio_messages,
)

MAX_BYTES = 64 * 1024


def parsed_or_refused(raw: str | bytes) -> Inbound | ProtocolError:
    try:
        return parse_inbound(raw, MAX_BYTES)
    except ProtocolError as exc:
        assert exc.code is not ErrorCode.INTERNAL
        assert exc.code in ErrorCode and exc.message
        json.loads(error_frame(exc.code, exc.message, seq=exc.seq))  # always encodable
        return exc


def check_accepted(msg: Inbound) -> None:
    """What every consumer of an accepted frame relies on."""
    # Checkpoints store seq as a msgpack int: past 2**63 every later turn failed.
    assert type(msg.seq) is int and 1 <= msg.seq <= MAX_SEQ
    assert msg.type in In and msg.body["type"] == msg.type.value
    body = msg.body
    if msg.type is In.START:
        assert valid_id(body["tenant"]) and valid_id(body.get("caller", "anonymous"))
    elif msg.type is In.USER_TEXT:
        assert isinstance(body["text"], str) and body["text"].strip()
    elif msg.type is In.AUDIO:
        assert isinstance(body["data"], str)
    elif msg.type is In.MARK:
        assert isinstance(body["name"], str) and 0 < len(body["name"]) <= MAX_MARK_NAME
    elif msg.type is In.DTMF:
        assert body["digit"] in DTMF_DIGITS
    # The router forwards ``raw`` as is; the node parses it again to the same frame.
    again = parse_inbound(msg.raw, MAX_BYTES)
    assert (again.type, again.seq) == (msg.type, msg.seq)


# ---------------------------------------------------------------------- native frames


@fuzz_settings(2500)
@given(native_wire)
def test_native_frame_is_parsed_or_refused_clearly(raw: str) -> None:
    result = parsed_or_refused(raw)
    if isinstance(result, Inbound):
        check_accepted(result)


@fuzz_settings(1500)
@given(native_frames())
def test_every_message_type_with_perturbed_fields(frame: dict[str, Any]) -> None:
    result = parsed_or_refused(json.dumps(frame))
    if isinstance(result, Inbound):
        check_accepted(result)
    elif frame.get("type") in {t.value for t in In} and type(frame.get("seq")) is not int:
        assert result.code is ErrorCode.BAD_SEQ


@fuzz_settings(500)
@given(st.binary(max_size=300))
def test_binary_garbage_is_refused(raw: bytes) -> None:
    result = parsed_or_refused(raw)
    if isinstance(result, Inbound):
        check_accepted(result)


@fuzz_settings(100)
@given(st.integers(MAX_BYTES + 1, MAX_BYTES * 4), st.sampled_from(["user_text", "audio"]))
def test_oversized_frame_is_refused_before_parsing(size: int, kind: str) -> None:
    field = "text" if kind == "user_text" else "data"
    raw = json.dumps({"type": kind, "seq": 1, field: "A" * size})
    result = parsed_or_refused(raw)
    assert isinstance(result, ProtocolError) and result.code is ErrorCode.FRAME_TOO_LARGE


@fuzz_settings(800)
@given(st.one_of(hostile_text, st.tuples(hostile_text, hostile_text).map(".".join)))
def test_mark_name_from_the_client_never_raises(name: str) -> None:
    # A mark's name is echoed by the client: anything may come back.
    parsed = parse_mark_name(name)
    if parsed is not None:
        turn, n = parsed
        assert turn >= 0 and n >= 0


# ---------------------------------------------------------------------- the node's call core


def active_core() -> CallCore:
    core = CallCore(
        "demo", "fuzz-1", "caller", node_id="node-1", memory_config=MemoryConfig(), created_ms=0
    )
    core.to(CallState.ACTIVE)
    return core


@fuzz_settings(500)
@given(st.lists(native_frames(), min_size=1, max_size=6))
def test_call_core_takes_any_accepted_frame_sequence(frames: list[dict[str, Any]]) -> None:
    core = active_core()
    for frame in frames:
        result = parsed_or_refused(json.dumps(frame))
        if not isinstance(result, Inbound):
            continue
        try:
            step = core.receive(result)
        except CallDropped:
            raise AssertionError("an active call dropped a frame") from None
        assert isinstance(step, Step)
        if step is not Step.SKIP:
            assert result.seq > core.last_seq
            core.applied(result.seq)
        ack = json.loads(core.ack())
        assert ack["seq"] == core.last_seq


# ---------------------------------------------------------------------- the failover buffer


@fuzz_settings(500)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("audio"), st.integers(1, 2**70), good_base64),
            st.tuples(st.just("text"), st.integers(1, 2**70), hostile_text),
            st.tuples(st.just("ack"), st.integers(-(2**70), 2**70), st.just("")),
        ),
        max_size=40,
    ),
    st.integers(0, 5000),
)
def test_failover_buffer_stays_bounded_and_ordered(
    ops: list[tuple[str, int, str]], cap: int
) -> None:
    buf = UnackedFrames(max_frames=8, max_audio_bytes=cap)
    acked = last = 0
    for op, seq, data in ops:
        if op == "ack":
            # The node acknowledges only what it was sent.
            buf.ack(min(seq, last))
            acked = max(acked, min(seq, last))
            continue
        kind = "audio" if op == "audio" else "user_text"
        frame = {"type": kind, "seq": seq, ("data" if op == "audio" else "text"): data}
        result = parsed_or_refused(json.dumps(frame))
        # The proxy refuses a seq that does not increase (bad_seq) before keeping it.
        if not isinstance(result, Inbound) or result.seq <= last:
            continue
        last = result.seq
        if result.type is In.AUDIO:
            buf.keep_audio(result)
        else:
            buf.keep(result)
        assert buf.audio_bytes >= 0
        assert len(buf) <= 8 + 1 + max(cap, 1)
    replay = buf.replay()
    seqs = [f.seq for f in replay]
    assert seqs == sorted(seqs) and all(s > acked for s in seqs)


# ---------------------------------------------------------------------- Twilio Media Streams


class _ClosedWs:
    closed = False


def twilio_link(started: bool) -> TwilioLink:
    link = TwilioLink(_ClosedWs(), Metrics("router"), MAX_BYTES)  # type: ignore[arg-type]
    if started:
        start = {
            "event": "start",
            "streamSid": "MZfuzz",
            "start": {"callSid": "CAfuzz", "customParameters": {"tenant": "demo"}},
        }
        assert link.translate(json.dumps(start)) is not None
    return link


@fuzz_settings(1500)
@given(st.booleans(), st.lists(twilio_messages("MZfuzz", "CAfuzz"), min_size=1, max_size=6))
def test_twilio_messages_are_translated_or_skipped(started: bool, messages: list[str]) -> None:
    link = twilio_link(started)
    last_seq = 1 if started else 0
    for data in messages:
        try:
            inbound = link.translate(data)
        except _Refused as exc:
            assert str(exc)  # the stream is closed with 4400 and this reason
            return
        if inbound is None:
            continue
        # What the router forwards to the node must be a frame the node accepts as is.
        again = parse_inbound(inbound.raw, MAX_BYTES)
        assert (again.type, again.seq) == (inbound.type, inbound.seq)
        check_accepted(inbound)
        assert inbound.seq == last_seq + 1
        last_seq = inbound.seq


@fuzz_settings(300)
@given(st.one_of(st.text(max_size=200), json_values.map(json.dumps), st.binary().map(repr)))
def test_twilio_garbage_is_counted_not_fatal(data: str) -> None:
    link = twilio_link(started=True)
    try:
        inbound = link.translate(data)
    except _Refused:
        return
    if inbound is not None:
        check_accepted(inbound)


# ---------------------------------------------------------------------- link records


class _NoWs:
    closed = True


def make_mux(node_side: bool) -> tuple[Mux, list[Channel], asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    opened: list[Channel] = []

    async def build() -> Mux:
        return Mux(_NoWs(), "fuzz", Metrics("node"), on_open=opened.append if node_side else None)  # type: ignore[arg-type]

    return loop.run_until_complete(build()), opened, loop


records = st.lists(
    st.one_of(
        st.lists(json_values, max_size=5),
        st.tuples(
            st.sampled_from([0, 1, 2, 3, -1, 0.0, "0", None]),
            st.one_of(st.integers(-3, 3), st.sampled_from([2**64, "1", None, 1.5]), json_values),
            json_values,
            json_values,
        ).map(list),
        st.tuples(st.just(0), st.integers(1, 3), hostile_text).map(list),
        st.tuples(st.just(1), st.integers(1, 3), hostile_text, hostile_text).map(list),
        json_values,
    ),
    max_size=8,
)


@fuzz_settings(1200)
@given(st.booleans(), st.one_of(records, json_values), st.integers(0, 400))
def test_link_records_never_break_the_reader(node_side: bool, message: object, cut: int) -> None:
    mux, opened, loop = make_mux(node_side)
    try:
        try:
            packed = msgpack.packb(message)
        except (TypeError, ValueError, OverflowError):
            return  # not representable in msgpack (e.g. an int past 64 bits)
        # Whole, truncated (a frame cut short by the peer), and with garbage appended.
        for data in (packed, packed[: cut % (len(packed) + 1)], packed + b"\xc1"):
            ok = mux._dispatch(data)
            assert isinstance(ok, bool)
        assert mux.lost is None  # a bad record is counted, the link itself stays up
        for channel in opened:
            assert type(channel.id) is int and isinstance(channel.call_id, str)
        assert mux._metrics.get(LINK_BAD_RECORDS) >= 0
    finally:
        loop.close()
