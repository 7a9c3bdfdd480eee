"""The caller's unacknowledged audio as the router keeps it: the decoded bytes, not the
frames' text, and a replay that gives every frame back byte for byte as it came in."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tracemalloc
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from callmesh.protocol import Inbound, parse_inbound
from callmesh.telemetry import Metrics
from router.failover_buffer import UnackedFrames
from router.twilio import TwilioLink
from router.unacked_audio import UnackedAudio, audio_frame_text

PROPERTY = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def twilio_frames(n: int, payload_bytes: int = 160) -> list[Inbound]:
    """``n`` audio frames as the router makes them of Twilio ``media`` messages."""
    return list(each_twilio_frame(n, payload_bytes))


def each_twilio_frame(n: int, payload_bytes: int = 160) -> Iterator[Inbound]:
    link = TwilioLink(None, Metrics("test"), 1 << 20)  # type: ignore[arg-type]
    start = {
        "event": "start",
        "streamSid": "MZ1",
        "start": {"callSid": "CA1", "customParameters": {"tenant": "acme"}},
    }
    assert link.translate(json.dumps(start)) is not None
    for i in range(n):
        payload = base64.b64encode(os.urandom(payload_bytes)).decode()
        media = (
            f'{{"event":"media","sequenceNumber":"{i + 2}","media":{{"track":"inbound",'
            f'"chunk":"{i + 1}","timestamp":"{20 * i}","payload":"{payload}"}},'
            f'"streamSid":"MZ1"}}'
        )
        frame = link.translate(media)
        assert frame is not None
        yield frame


# Spellings of an audio frame that the rebuilt text would not match: kept as their text.
ODD_SPELLINGS = [
    '{"type": "audio", "seq": %d, "data": "AAAA"}',  # spaces
    '{"seq":%d,"type":"audio","data":"AAAA"}',  # key order
    '{"type":"audio","seq":%d,"data":"AAB="}',  # base64 with its spare bits set
    '{"type":"audio","seq":%d,"data":"AAAA","ts":7,"x":0}',  # a field after ts
    '{"type":"audio","seq":%d,"data":"AAAA" }',  # a trailing space
    '{"type":"audio","seq":%d,"data":"AAAA","extra":1}',  # a field more
    '{"type":"audio","seq":%d,"data":"AA\\u0041A"}',  # an escape
]


def test_replay_gives_back_the_twilio_frames_byte_for_byte() -> None:
    frames = twilio_frames(60)
    audio = UnackedAudio()
    for frame in frames:
        assert audio.append(frame) == 160
    assert [(f.seq, f.raw, f.size) for f in audio.replay()] == [(f.seq, f.raw, 160) for f in frames]
    assert audio.bytes == 60 * 160


@pytest.mark.parametrize("spelling", ODD_SPELLINGS)
def test_a_frame_in_another_spelling_is_replayed_as_it_came(spelling: str) -> None:
    frames = twilio_frames(3)
    odd = parse_inbound(spelling % (frames[-1].seq + 1))
    audio = UnackedAudio()
    for frame in [*frames, odd]:
        audio.append(frame)
    assert [f.raw for f in audio.replay()] == [f.raw for f in [*frames, odd]]
    audio.ack(frames[0].seq)
    assert [f.raw for f in audio.replay()] == [f.raw for f in [*frames[1:], odd]]


@PROPERTY
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["twilio", "plain", "ts", "odd"]),
            st.integers(0, 400),
            st.sampled_from(["keep", "ack", "bound"]),
            st.integers(0, 3000),
        ),
        max_size=50,
    )
)
def test_kept_frames_replay_exactly_across_acks_and_bounds(
    steps: list[tuple[str, int, str, int]],
) -> None:
    audio, model = UnackedAudio(), []
    for seq, (kind, size, then, arg) in enumerate(steps, start=2):
        data = base64.b64encode(os.urandom(size)).decode()
        if kind == "twilio":
            raw = audio_frame_text(seq, base64.b64decode(data), 20 * seq)
        elif kind == "plain":
            raw = f'{{"type":"audio","seq":{seq},"data":"{data}"}}'
        elif kind == "ts":
            raw = f'{{"type":"audio","seq":{seq},"data":"{data}","ts":{arg}}}'
        else:
            raw = f'{{"type": "audio", "seq": {seq}, "data": "{data}"}}'
        frame = parse_inbound(raw, max_bytes=1 << 20)
        audio.append(frame)
        model.append((seq, raw, size))
        if then == "ack":
            audio.ack(seq - arg % 5)
            model = [m for m in model if m[0] > seq - arg % 5]
        elif then == "bound":
            dropped = audio.bound(arg)
            n = 0
            while sum(m[2] for m in model[n:]) > arg and n < len(model) - 1:
                n += 1
            assert dropped == n
            model = model[n:]
        assert [(f.seq, f.raw, f.size) for f in audio.replay()] == model
        assert (len(audio), audio.bytes) == (len(model), sum(m[2] for m in model))


def test_a_kept_frame_costs_its_audio_not_its_text() -> None:
    # ~70 frames wait on average in every audio call; kept as text each was ~390 bytes.
    buf = UnackedFrames(max_frames=10, max_audio_bytes=1 << 30)
    came_in = hashlib.sha256()  # what came in, in constant memory
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for frame in each_twilio_frame(500):
            buf.keep_audio(frame)
            came_in.update(frame.raw.encode())
        del frame
        per_frame = (tracemalloc.get_traced_memory()[0] - before) / 500
    finally:
        tracemalloc.stop()
    assert per_frame < 230, per_frame  # 160 bytes of audio, its seq, ts and size
    replayed = hashlib.sha256()
    for kept in buf.replay():
        replayed.update(kept.raw.encode())
    assert replayed.digest() == came_in.digest()
