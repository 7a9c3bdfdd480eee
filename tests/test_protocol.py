"""The native wire protocol's validation: every bad frame gets a precise error code."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from callmesh.protocol import (
    AGENT_AUDIO_TYPE,
    ErrorCode,
    In,
    Out,
    ProtocolError,
    agent_audio_frame,
    parse_inbound,
    read_agent_audio,
    reply_frame_text,
    valid_id,
)


def _err(raw: str | bytes, max_bytes: int = 1024) -> ErrorCode:
    with pytest.raises(ProtocolError) as info:
        parse_inbound(raw, max_bytes)
    return info.value.code


def test_valid_frames_parse() -> None:
    start = parse_inbound(json.dumps({"type": "start", "seq": 1, "tenant": "acme", "caller": "c1"}))
    assert start.type is In.START and start.seq == 1 and start.body["tenant"] == "acme"
    text = parse_inbound(json.dumps({"type": "user_text", "seq": 2, "text": "hi"}))
    assert text.type is In.USER_TEXT and text.raw.startswith("{")


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("{not json", ErrorCode.BAD_JSON),
        (b"\xff\xfe", ErrorCode.BAD_JSON),
        ("[1, 2]", ErrorCode.BAD_MESSAGE),
        ('{"type": "user_text", "text": "x"}', ErrorCode.BAD_SEQ),
        ('{"type": "user_text", "seq": 0, "text": "x"}', ErrorCode.BAD_SEQ),
        ('{"type": "user_text", "seq": true, "text": "x"}', ErrorCode.BAD_SEQ),
        ('{"type": "dance", "seq": 3}', ErrorCode.UNKNOWN_TYPE),
        ('{"type": "user_text", "seq": 3, "text": "   "}', ErrorCode.BAD_MESSAGE),
        ('{"type": "start", "seq": 1, "tenant": "a.b"}', ErrorCode.BAD_MESSAGE),
        ('{"type": "start", "seq": 1, "tenant": "a", "caller": "x y"}', ErrorCode.BAD_MESSAGE),
        ('{"type": "audio", "seq": 4, "data": 5}', ErrorCode.BAD_MESSAGE),
    ],
)
def test_bad_frames_are_named(raw: str, code: ErrorCode) -> None:
    assert _err(raw) is code


@pytest.mark.parametrize(
    "fields",
    [
        {"type": "audio", "seq": 7, "data": "AAEC/w=="},
        {"type": "audio", "seq": 7, "data": "AAEC/w==", "ts": 0},
        {"type": "audio", "seq": 10**15, "data": "", "ts": 160},  # a seq too long for the fast path
    ],
)
def test_audio_frames_parse_alike_however_spelled(fields: dict[str, object]) -> None:
    compact = parse_inbound(json.dumps(fields, separators=(",", ":")))  # as the router writes
    spaced = parse_inbound(json.dumps(fields))
    assert compact.type is spaced.type is In.AUDIO
    assert compact.seq == spaced.seq == fields["seq"]
    assert compact.body == spaced.body == fields


@pytest.mark.parametrize(
    "raw",
    [
        '{"type":"audio","seq":1,"data":"AA==","ts":-5}',
        '{"type":"audio","seq":1,"data":"AA==","ts":1.5}',
        '{"type":"audio","seq":0,"data":"AA=="}',
        '{"type":"audio","seq":01,"data":"AA=="}',
    ],
)
def test_bad_audio_frames_are_refused_in_either_spelling(raw: str) -> None:
    assert _err(raw) in (ErrorCode.BAD_MESSAGE, ErrorCode.BAD_SEQ, ErrorCode.BAD_JSON)


def test_oversized_frame() -> None:
    big = json.dumps({"type": "user_text", "seq": 1, "text": "x" * 2000})
    assert _err(big, max_bytes=1024) is ErrorCode.FRAME_TOO_LARGE


def test_ids_are_safe_for_keys_and_subjects() -> None:
    assert valid_id("call-123_X")
    for bad in ("", "a.b", "a*", "a>", "{x}", "a b", "x" * 65, None, 5):
        assert not valid_id(bad)


@given(
    turn=st.integers(0, 10**12),
    n=st.integers(0, 10**6),
    encoding=st.sampled_from(["mulaw", "pcm16", "alaw"]),
    rate=st.sampled_from([8000, 16000, 24000]),
    audio=st.binary(max_size=600),
)
def test_agent_audio_frames_read_back_as_json_would(
    turn: int, n: int, encoding: str, rate: int, audio: bytes
) -> None:
    data = base64.b64encode(audio).decode()
    raw = agent_audio_frame(turn, n, encoding, rate, data)
    assert json.loads(raw) == {
        "type": "agent_audio",
        "turn": turn,
        "n": n,
        "encoding": encoding,
        "sample_rate": rate,
        "data": data,
    }
    assert read_agent_audio(raw) == (turn, n, data)


@pytest.mark.parametrize(
    "raw",
    [
        # Another spelling, more fields, or data a JSON string would not hold as is: the
        # reader declines and the frame is parsed.
        '{"type":"agent_audio","n":1,"turn":2,"encoding":"mulaw","sample_rate":8000,"data":"AA=="}',
        '{"type":"agent_audio","turn":2,"n":1,"encoding":"mulaw","sample_rate":8000,"data":"AA==","resumed":true}',
        '{"type":"agent_audio","turn":2,"n":1,"encoding":"mulaw","sample_rate":8000,"data":"A\\"A"}',
        '{"type":"agent_audio","turn":2,"n":1,"encoding":"mulaw","sample_rate":8000,"data":"A\\nA"}',
        '{"type":"agent_audio","turn":02,"n":1,"encoding":"mulaw","sample_rate":8000,"data":"AA"}',
        '{"type":"agent_text","turn":2,"n":1,"text":"hi"}',
        "",
    ],
)
def test_agent_audio_reader_declines_any_other_text(raw: str) -> None:
    assert read_agent_audio(raw) is None


def test_the_agent_audio_type_is_the_enum_value_as_a_plain_string() -> None:
    # A plain str: the per-frame paths compare with it without an enum member lookup.
    assert type(AGENT_AUDIO_TYPE) is str and AGENT_AUDIO_TYPE == Out.AGENT_AUDIO
    assert json.loads(agent_audio_frame(1, 0, "mulaw", 8000, "AA=="))["type"] == AGENT_AUDIO_TYPE


def test_a_reply_frame_takes_the_template_only_with_exactly_its_fields() -> None:
    audio = {
        "type": "agent_audio",
        "n": 4,
        "encoding": "mulaw",
        "sample_rate": 8000,
        "data": "AAE=",
        "turn": 2,
    }
    assert reply_frame_text(audio) == agent_audio_frame(2, 4, "mulaw", 8000, "AAE=")
    # A field the template has no room for (a resumed chunk's flag) is never dropped.
    resumed = {**audio, "resumed": True}
    assert json.loads(reply_frame_text(resumed)) == resumed
    assert read_agent_audio(reply_frame_text(resumed)) is None
    for frame in (
        {"type": "agent_text", "turn": 2, "n": 0, "text": 'say "hi"'},
        {"type": "mark", "turn": 2, "n": 5, "name": "2.5"},
    ):
        assert json.loads(reply_frame_text(frame)) == frame
