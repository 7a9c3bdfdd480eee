"""What a simulated caller measures: its own sending lag and each utterance's reply."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from callmesh.audio.format import FRAME_MS, MULAW_FRAME_BYTES

__all__ = ["FRAME_BYTES", "FRAME_MS", "FRAME_S", "SendStats", "TurnResult"]

FRAME_S = FRAME_MS / 1000
FRAME_BYTES = MULAW_FRAME_BYTES  # the caller sends 8 kHz mu-law


@dataclass
class SendStats:
    """How late the caller's own clock was sending frames (caller lag, not callmesh's)."""

    frames: int = 0
    speech_frames: int = 0
    lag_sum_ms: float = 0.0
    max_lag_ms: float = 0.0
    late_frames: int = 0  # sent more than one frame period after their due time

    def record(self, lag_s: float) -> None:
        ms = lag_s * 1000
        self.frames += 1
        self.lag_sum_ms += ms
        self.max_lag_ms = max(self.max_lag_ms, ms)
        if ms > FRAME_MS:
            self.late_frames += 1


@dataclass
class TurnResult:
    """One utterance (or the greeting: ``text == ""``) and the reply it got."""

    text: str
    started_at: float
    speech_end_at: float | None = None
    first_audio_at: float | None = None
    done_at: float | None = None
    turn: int | None = None  # native only: Twilio does not say
    metrics: dict[str, Any] | None = None  # native only: the reply's ``turn_metrics``
    agent_audio_bytes: int = 0
    cleared: bool = False
    marks: list[str] = field(default_factory=list)  # echoed mark names
    superseded: bool = False  # the caller spoke again before this reply was done
    timed_out: bool = False
    audio: bytearray = field(default_factory=bytearray)  # when keep_audio
    # A caller that repeats itself (VoiceCaller's ``repeat_after_s``): how often it said
    # this again for want of an answer, and when it first finished saying it.
    repeats: int = 0
    first_speech_end_at: float | None = None

    @property
    def response_ms(self) -> float | None:
        if self.first_audio_at is None or self.speech_end_at is None:
            return None
        return (self.first_audio_at - self.speech_end_at) * 1000
