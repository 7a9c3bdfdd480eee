"""Audio formats and the arithmetic of their frames: the one place that knows how many
bytes a millisecond of audio takes.

A format is an encoding and a sample rate. The wire protocol names them in ``start.audio``
(``callmesh.protocol``); voices and recognizers exchange :class:`AudioChunk` s.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class AudioEncoding(StrEnum):
    MULAW = "mulaw"  # G.711 mu-law, 8 kHz: telephony (Twilio)
    PCM16 = "pcm16"  # signed 16-bit little-endian


TELEPHONY_RATE = 8000
"""Hz: G.711 mu-law telephony, what Twilio Media Streams and the simulated voices carry."""
FRAME_MS = 20
"""A telephony frame: Twilio sends one every 20 ms, and so do the simulated callers."""


def sample_width(encoding: AudioEncoding) -> int:
    """Bytes per sample."""
    return 1 if encoding is AudioEncoding.MULAW else 2


def bytes_per_second(encoding: AudioEncoding, sample_rate: int) -> int:
    return sample_width(encoding) * sample_rate


def bytes_per_ms(encoding: AudioEncoding, sample_rate: int) -> float:
    return bytes_per_second(encoding, sample_rate) / 1000


def samples_in(ms: int, sample_rate: int) -> int:
    """Whole samples in ``ms`` milliseconds."""
    return sample_rate * ms // 1000


def bytes_in(ms: int, encoding: AudioEncoding, sample_rate: int) -> int:
    """Bytes of ``ms`` milliseconds of audio (whole samples)."""
    return samples_in(ms, sample_rate) * sample_width(encoding)


def duration_ms(nbytes: int, encoding: AudioEncoding, sample_rate: int) -> float:
    return 1000.0 * nbytes / bytes_per_second(encoding, sample_rate)


MULAW_FRAME_BYTES = bytes_in(FRAME_MS, AudioEncoding.MULAW, TELEPHONY_RATE)
"""160: one telephony frame of 8 kHz mu-law."""


@dataclass(frozen=True, slots=True)
class AudioChunk:
    """A piece of audio in one format, as voices produce it and recognizers take it."""

    data: bytes
    encoding: AudioEncoding = AudioEncoding.MULAW
    sample_rate: int = TELEPHONY_RATE

    @property
    def duration_ms(self) -> float:
        return duration_ms(len(self.data), self.encoding, self.sample_rate)
