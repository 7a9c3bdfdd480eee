"""Streaming resampling between any two sample rates (e.g. eSpeak's 22,050 Hz → 8/16 kHz).

:class:`~callmesh.audio.codec.Downsampler` covers integer factors; a voice at
22,050 Hz needs the rational ratio 320/441 (to 16 kHz) or 160/441 (to 8 kHz). This is a
polyphase windowed-sinc interpolator: output sample ``n`` sits at input time
``n · down / up``; its ``up`` possible fractional offsets each have a precomputed filter
row, so one call is a single gather and a row-wise dot product.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

__all__ = ["Resampler"]


class Resampler:
    """Stateful resampler of int16 samples from ``rate_in`` to ``rate_out``.

    Feed chunks as they come; the output is identical to resampling the whole stream at
    once. The filter is centred, so output lags input by ``half_width`` zero crossings;
    :meth:`flush` pushes the tail out at the end of a stream.
    """

    def __init__(self, rate_in: int, rate_out: int, *, half_width: int = 12) -> None:
        if rate_in <= 0 or rate_out <= 0 or half_width <= 0:
            raise ValueError("rates and half_width must be > 0")
        g = math.gcd(rate_in, rate_out)
        self.up, self.down = rate_out // g, rate_in // g
        scale = min(1.0, self.up / self.down)  # < 1 when downsampling: narrower pass band
        cutoff = 0.5 * scale * 0.92  # cycles per input sample, under the lower Nyquist
        self._k = math.ceil(half_width / scale)  # taps either side of the output instant
        offsets = np.arange(-self._k + 1, self._k + 1)  # input index minus floor(instant)
        frac = np.arange(self.up)[:, None] / self.up
        t = frac - offsets[None, :]  # distance from each tap to the output instant
        # A Kaiser window evaluated at each tap's exact distance (beta 8: ~80 dB stop band).
        window = np.i0(8.0 * np.sqrt(np.clip(1 - (t / self._k) ** 2, 0, 1))) / np.i0(8.0)
        taps = 2 * cutoff * np.sinc(2 * cutoff * t) * window
        self._taps = taps / taps.sum(axis=1, keepdims=True)  # unity gain at DC, every phase
        self._offsets = offsets
        # Input history starts with k zeros so the first outputs have their left taps.
        self._buf = np.zeros(self._k, dtype=np.float64)
        self._buf_start = -self._k  # absolute input index of _buf[0]
        self._consumed = 0  # absolute input samples received
        self._next = 0  # absolute index of the next output sample

    @property
    def identity(self) -> bool:
        return self.up == self.down

    def process(self, samples: npt.NDArray[np.integer]) -> npt.NDArray[np.int16]:
        """Resample the next int16 samples; returns the output they complete."""
        x = np.asarray(samples, dtype=np.float64)
        if self.identity:
            return np.asarray(samples, dtype=np.int16)
        self._buf = np.concatenate([self._buf, x])
        self._consumed += len(x)
        return self._emit(self._consumed)

    def flush(self) -> npt.NDArray[np.int16]:
        """End of stream: the output still held back by the filter's look-ahead. Feed
        nothing after it (a new stream needs a new resampler)."""
        if self.identity:
            return np.zeros(0, dtype=np.int16)
        self._buf = np.concatenate([self._buf, np.zeros(self._k, dtype=np.float64)])
        return self._emit(self._consumed)

    def _emit(self, input_end: int) -> npt.NDArray[np.int16]:
        buf_end = self._buf_start + len(self._buf)
        # Output n needs input up to floor(n·down/up) + k, and only instants before the
        # real input's end are output (so the total is ceil(N · up / down)).
        last_by_taps = ((buf_end - self._k) * self.up - 1) // self.down
        last_by_input = (input_end * self.up - 1) // self.down
        stop = min(last_by_taps, last_by_input) + 1
        if stop <= self._next:
            return np.zeros(0, dtype=np.int16)
        n = np.arange(self._next, stop, dtype=np.int64)
        base = n * self.down // self.up
        phase = n * self.down % self.up
        index = base[:, None] + self._offsets[None, :] - self._buf_start
        out = np.einsum("ij,ij->i", self._buf[index], self._taps[phase])
        self._next = stop
        keep_from = int(self._next * self.down // self.up) - self._k + 1
        drop = max(0, keep_from - self._buf_start)
        self._buf = self._buf[drop:]
        self._buf_start += drop
        return np.clip(np.rint(out), -32768, 32767).astype(np.int16)

    def __repr__(self) -> str:
        return f"<Resampler {self.down}→{self.up}, {self._next} out>"
