"""One audio encoding type and one home for frame arithmetic (callmesh.audio.format)."""

from __future__ import annotations

import pytest

from callmesh import protocol
from callmesh.audio.format import (
    MULAW_FRAME_BYTES,
    AudioChunk,
    AudioEncoding,
    bytes_in,
    bytes_per_ms,
    bytes_per_second,
    duration_ms,
    sample_width,
    samples_in,
)
from conversation_node.providers import base


def test_the_wire_and_the_providers_share_the_encoding_type() -> None:
    assert protocol.AudioEncoding is AudioEncoding
    assert not hasattr(base, "Encoding")


@pytest.mark.parametrize(
    ("encoding", "rate", "per_ms", "frame_20ms"),
    [
        (AudioEncoding.MULAW, 8000, 8.0, 160),
        (AudioEncoding.PCM16, 8000, 16.0, 320),
        (AudioEncoding.PCM16, 16000, 32.0, 640),
        (AudioEncoding.PCM16, 24000, 48.0, 960),
    ],
)
def test_frame_arithmetic(
    encoding: AudioEncoding, rate: int, per_ms: float, frame_20ms: int
) -> None:
    assert bytes_per_ms(encoding, rate) == per_ms
    assert bytes_per_second(encoding, rate) == per_ms * 1000
    assert bytes_in(20, encoding, rate) == frame_20ms
    assert samples_in(20, rate) * sample_width(encoding) == frame_20ms
    assert duration_ms(frame_20ms, encoding, rate) == 20.0
    assert AudioChunk(b"\0" * frame_20ms, encoding, rate).duration_ms == 20.0


def test_a_telephony_frame_is_160_bytes() -> None:
    assert MULAW_FRAME_BYTES == 160
    assert AudioChunk(b"\xff" * 80).duration_ms == 10.0  # mu-law 8 kHz by default
