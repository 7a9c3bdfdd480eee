"""G.711 mu-law and PCM16 resampling, with numpy lookup tables.

Telephony audio (Twilio, Deepgram ``mulaw``) is 8 kHz mu-law; some voices (OpenAI TTS)
produce 24 kHz PCM16. ``audioop`` is deprecated and gone in Python 3.13, so the codec is
two precomputed tables: 65,536 entries for encoding, 256 for decoding. Both are
bit-exact with the G.711 reference (and with ``audioop``), and one call is a single
numpy gather, a few microseconds per 20 ms frame.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = [
    "MULAW_SILENCE",
    "Downsampler",
    "array_to_pcm16",
    "mulaw_decode",
    "mulaw_decode_array",
    "mulaw_encode",
    "mulaw_encode_array",
    "pcm16_to_array",
]

MULAW_SILENCE = 0xFF
"""The mu-law byte of a zero sample (0x7F also decodes to zero; encoders emit 0xFF)."""

_BIAS = 0x84
_CLIP = 32635

Int16Array = npt.NDArray[np.int16]


def _build_encode_table() -> npt.NDArray[np.uint8]:
    # The reference algorithm (Sun g711.c, as used by audioop): work on the 14-bit
    # magnitude, find the segment (exponent), keep 4 mantissa bits, invert all bits.
    pcm = np.arange(-32768, 32768, dtype=np.int32) >> 2
    negative = pcm < 0
    magnitude = np.minimum(np.where(negative, -pcm, pcm), _CLIP) + (_BIAS >> 2)
    seg_end = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])
    seg = np.searchsorted(seg_end, magnitude, side="left")
    mask = np.where(negative, 0x7F, 0xFF)
    in_range = seg < 8
    seg_c = np.minimum(seg, 7)
    uval = (seg_c << 4) | ((magnitude >> (seg_c + 1)) & 0xF)
    code = np.where(in_range, uval ^ mask, 0x7F ^ mask)
    # Index by the int16 value reinterpreted as uint16, so lookups need no offset.
    table = np.empty(65536, dtype=np.uint8)
    table[np.arange(-32768, 32768, dtype=np.int32) & 0xFFFF] = code.astype(np.uint8)
    return table


def _build_decode_table() -> Int16Array:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    t = (((u & 0x0F) << 3) + _BIAS) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, _BIAS - t, t - _BIAS).astype(np.int16)


_ENCODE = _build_encode_table()
_DECODE = _build_decode_table()


def pcm16_to_array(pcm: bytes) -> Int16Array:
    """Signed 16-bit little-endian bytes → int16 samples (an odd trailing byte is an error)."""
    if len(pcm) % 2:
        raise ValueError("PCM16 data must have an even number of bytes")
    return np.frombuffer(pcm, dtype="<i2").astype(np.int16, copy=False)


class SampleReader:
    """Chunks of mu-law or PCM16 audio → int16 samples. Chunk borders may split a PCM16
    sample (transports do not promise even lengths); the odd byte waits for the next chunk."""

    def __init__(self, mulaw: bool) -> None:
        self._mulaw = mulaw
        self._odd = b""

    def read(self, data: bytes) -> Int16Array:
        if self._mulaw:
            return mulaw_decode_array(data)
        data = self._odd + data
        cut = len(data) - len(data) % 2
        self._odd = data[cut:]
        return pcm16_to_array(data[:cut])


def array_to_pcm16(samples: npt.NDArray[np.integer]) -> bytes:
    """int16 samples → signed 16-bit little-endian bytes."""
    return np.asarray(samples, dtype="<i2").tobytes()


def mulaw_encode_array(samples: npt.NDArray[np.integer]) -> bytes:
    """int16 samples → mu-law bytes (G.711, bit-exact)."""
    index = np.asarray(samples, dtype=np.int16).view(np.uint16)
    return _ENCODE[index].tobytes()


def mulaw_decode_array(data: bytes) -> Int16Array:
    """mu-law bytes → int16 samples."""
    return _DECODE[np.frombuffer(data, dtype=np.uint8)]


def mulaw_encode(pcm: bytes) -> bytes:
    """PCM16 little-endian bytes → mu-law bytes (one byte per sample)."""
    return mulaw_encode_array(pcm16_to_array(pcm))


def mulaw_decode(data: bytes) -> bytes:
    """mu-law bytes → PCM16 little-endian bytes (two bytes per sample)."""
    return array_to_pcm16(mulaw_decode_array(data))


def _lowpass_taps(factor: int, taps_per_phase: int) -> npt.NDArray[np.float64]:
    # Windowed-sinc low-pass just under the output Nyquist frequency (0.45 · fs_out keeps
    # 8 kHz telephony's 3.4 kHz band flat and stops aliasing of what is above 4 kHz).
    n = taps_per_phase * factor + 1
    cutoff = 0.45 / factor  # cycles per input sample
    k = np.arange(n) - (n - 1) / 2
    h = 2 * cutoff * np.sinc(2 * cutoff * k) * np.hamming(n)
    return np.asarray(h / h.sum(), dtype=np.float64)  # unity gain at DC


class Downsampler:
    """Stateful integer-factor PCM16 decimator (e.g. 24 kHz → 8 kHz with ``factor=3``).

    Feed it arbitrarily split byte chunks, as they come off the network: an odd trailing
    byte and the filter history are carried to the next call, so the output is identical
    to processing the whole stream at once, and N input samples yield exactly
    ``ceil(N / factor)`` output samples in total. The filter is causal, so the output lags
    by about ``taps_per_phase / 2`` output samples (1 ms at 8 kHz with the defaults), and
    a 3.4 kHz tone loses about 3 dB while 4.6 kHz and above are ≥ 55 dB down.
    """

    def __init__(self, factor: int, *, taps_per_phase: int = 16) -> None:
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        self.factor = factor
        self._taps = _lowpass_taps(factor, taps_per_phase) if factor > 1 else np.ones(1)
        self._history = np.zeros(len(self._taps) - 1, dtype=np.float64)
        self._offset = 0  # index, in the next call's filter output, of the next sample kept
        self._pending = b""  # an odd byte waiting for its other half

    def process_array(self, samples: npt.NDArray[np.integer]) -> Int16Array:
        """Downsample int16 samples; returns the output samples available so far."""
        buf = np.concatenate([self._history, np.asarray(samples, dtype=np.float64)])
        n_valid = len(buf) - len(self._taps) + 1
        if n_valid <= 0:
            self._history = buf
            return np.zeros(0, dtype=np.int16)
        filtered = np.convolve(buf, self._taps[::-1], mode="valid")
        kept = filtered[self._offset :: self.factor]
        self._offset = self._offset + self.factor * len(kept) - n_valid
        self._history = buf[n_valid:]
        return np.clip(np.rint(kept), -32768, 32767).astype(np.int16)

    def process(self, pcm: bytes) -> bytes:
        """Downsample PCM16 little-endian bytes (any split, odd lengths included)."""
        data = self._pending + pcm
        cut = len(data) - (len(data) % 2)
        self._pending = data[cut:]
        return array_to_pcm16(self.process_array(pcm16_to_array(data[:cut])))

    def process_to_mulaw(self, pcm: bytes) -> bytes:
        """Downsample PCM16 bytes and encode the result as mu-law in one step."""
        data = self._pending + pcm
        cut = len(data) - (len(data) % 2)
        self._pending = data[cut:]
        return mulaw_encode_array(self.process_array(pcm16_to_array(data[:cut])))
