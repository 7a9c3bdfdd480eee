"""A small energy-based voice activity detector with endpointing.

It works in audio time (milliseconds of audio consumed), never wall-clock time, so it
behaves the same whether frames arrive in real time, in bursts, or from a file: the
caller maps audio time to wall time if it needs to (see ``SimulatedSTT``).

Speech starts after ``start_ms`` of consecutive frames louder than ``threshold_dbfs``;
the utterance ends after ``end_silence_ms`` of consecutive quieter frames. A 20 ms frame
is the unit (Twilio sends one per media message).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import numpy.typing as npt

from callmesh.audio.codec import mulaw_decode_array, pcm16_to_array
from callmesh.audio.format import TELEPHONY_RATE, AudioEncoding, samples_in

__all__ = ["EnergyVAD", "VadConfig", "VadEvent", "VadEventKind"]


@dataclass(frozen=True, slots=True)
class VadConfig:
    """Thresholds of :class:`EnergyVAD`. Durations are in ms and multiples of ``frame_ms``
    in effect (they are counted in whole frames)."""

    # Telephone line noise sits around -60 dBFS; speech is -30 to -10 dBFS.
    threshold_dbfs: float = -45.0
    start_ms: int = 60
    end_silence_ms: int = 300
    frame_ms: int = 20

    def __post_init__(self) -> None:
        if self.frame_ms <= 0 or self.start_ms <= 0 or self.end_silence_ms <= 0:
            raise ValueError("frame_ms, start_ms and end_silence_ms must be > 0")
        if self.threshold_dbfs >= 0:
            raise ValueError(f"threshold_dbfs must be < 0, got {self.threshold_dbfs}")


class VadEventKind(StrEnum):
    SPEECH_START = "speech_start"
    SPEECH_END = "speech_end"


@dataclass(frozen=True, slots=True)
class VadEvent:
    """A boundary in audio time: for SPEECH_START the start of the first voiced frame, for
    SPEECH_END the end of the last voiced frame (the endpoint is *detected* later, after
    ``end_silence_ms`` of silence)."""

    kind: VadEventKind
    at_ms: float


class EnergyVAD:
    """Frame-energy VAD over mu-law or PCM16 audio at one sample rate.

    ``push`` accepts any split of the byte stream and returns the events that the new
    audio completed, in order. Not thread-safe; one instance per audio stream.
    """

    def __init__(
        self,
        config: VadConfig | None = None,
        *,
        encoding: AudioEncoding = AudioEncoding.MULAW,
        sample_rate: int = TELEPHONY_RATE,
    ) -> None:
        self.config = config or VadConfig()
        self.encoding = encoding
        self.sample_rate = sample_rate
        self._frame_samples = samples_in(self.config.frame_ms, sample_rate)
        if self._frame_samples <= 0:
            raise ValueError("frame too short for the sample rate")
        # Compare mean square energy against the threshold's square: no log, no sqrt.
        self._threshold_sq = (32768.0 * 10 ** (self.config.threshold_dbfs / 20)) ** 2
        self._bytes = b""  # a partial sample (PCM16) waiting for its other byte
        self._samples = np.zeros(0, dtype=np.int16)  # a partial frame
        self._position_ms = 0.0
        # The silence that ends an utterance: the config's, until adaptive endpointing
        # changes it (it may, between frames).
        self.end_silence_ms = self.config.end_silence_ms
        self.reset()

    def reset(self) -> None:
        """Forget speech state (keeps the audio clock running)."""
        self._in_speech = False
        self._voiced_run_ms = 0
        self._run_start_ms = 0.0
        self._silence_ms = 0
        self._last_voiced_end_ms: float | None = None

    @property
    def in_speech(self) -> bool:
        return self._in_speech

    @property
    def silence_ms(self) -> int:
        """Consecutive quiet audio (ms) inside the utterance being heard (0 outside one)."""
        return self._silence_ms if self._in_speech else 0

    @property
    def position_ms(self) -> float:
        """Audio consumed so far, in whole frames."""
        return self._position_ms

    @property
    def last_voiced_end_ms(self) -> float | None:
        """End of the most recent voiced frame since the last reset/endpoint (audio time)."""
        return self._last_voiced_end_ms

    def push(self, data: bytes) -> list[VadEvent]:
        """Feed encoded audio; returns the events it completed."""
        if self.encoding is AudioEncoding.MULAW:
            return self.push_samples(mulaw_decode_array(data))
        data = self._bytes + data
        cut = len(data) - len(data) % 2
        self._bytes = data[cut:]
        return self.push_samples(pcm16_to_array(data[:cut]))

    def push_samples(self, samples: npt.NDArray[np.integer]) -> list[VadEvent]:
        """Feed int16 samples; returns the events they completed."""
        buf = np.concatenate([self._samples, np.asarray(samples, dtype=np.int16)])
        n = self._frame_samples
        whole = len(buf) - len(buf) % n
        self._samples = buf[whole:]
        events: list[VadEvent] = []
        if whole:
            frames = buf[:whole].astype(np.float64).reshape(-1, n)
            energies = np.einsum("ij,ij->i", frames, frames) / n
            for energy in energies:
                event = self._step(bool(energy > self._threshold_sq))
                if event is not None:
                    events.append(event)
        return events

    def push_frame_energy(self, mean_square: float) -> VadEvent | None:
        """Advance one whole frame whose mean square sample value the caller computed
        (it has the samples already); only between frames, like :meth:`skip_unvoiced`."""
        if not self.at_frame_boundary:
            raise RuntimeError("push_frame_energy with a partial frame buffered")
        return self._step(mean_square > self._threshold_sq)

    @property
    def at_frame_boundary(self) -> bool:
        """No partial frame is waiting for more audio."""
        return not len(self._samples) and not self._bytes

    def skip_unvoiced(self, frames: int) -> None:
        """Advance over ``frames`` whole frames known to be below the threshold while not
        in speech: what ``push_samples`` would do for them, without computing energies."""
        if self._in_speech:
            raise RuntimeError("skip_unvoiced during speech would miss the endpoint")
        self._voiced_run_ms = 0
        self._position_ms += frames * self.config.frame_ms

    def flush(self) -> list[VadEvent]:
        """End of stream: close an utterance still in progress."""
        if not self._in_speech:
            return []
        end = self._last_voiced_end_ms if self._last_voiced_end_ms is not None else 0.0
        self.reset()
        return [VadEvent(VadEventKind.SPEECH_END, end)]

    def _step(self, voiced: bool) -> VadEvent | None:
        frame_ms = self.config.frame_ms
        start, self._position_ms = self._position_ms, self._position_ms + frame_ms
        if not self._in_speech:
            if not voiced:
                self._voiced_run_ms = 0
                return None
            if self._voiced_run_ms == 0:
                self._run_start_ms = start
            self._voiced_run_ms += frame_ms
            self._last_voiced_end_ms = self._position_ms
            if self._voiced_run_ms >= self.config.start_ms:
                self._in_speech = True
                self._silence_ms = 0
                return VadEvent(VadEventKind.SPEECH_START, self._run_start_ms)
            return None
        if voiced:
            self._silence_ms = 0
            self._last_voiced_end_ms = self._position_ms
            return None
        self._silence_ms += frame_ms
        if self._silence_ms >= self.end_silence_ms:
            end = self._last_voiced_end_ms if self._last_voiced_end_ms is not None else start
            self.reset()
            return VadEvent(VadEventKind.SPEECH_END, end)
        return None

    def __repr__(self) -> str:
        state = "speech" if self._in_speech else "silence"
        return f"<EnergyVAD [{state}, at {self._position_ms:.0f} ms]>"
