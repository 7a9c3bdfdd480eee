"""Simulated speech: text carried *in* audio, and a decoder that reads it back.

This is not speech recognition. It lets the whole audio path (router, node, VAD,
endpointing, barge-in, load tests) run offline and deterministically on real 8 kHz
mu-law audio whose content can be checked end to end. The node's simulated recognizer
(``conversation_node.providers.simulated_audio``) and the simulated callers
(``callmesh_client``) both speak it, so it lives here, below both.

The signal is multi-frequency shift keying, audible as a warble of beeps:

* every symbol is a 30 ms cosine burst whose frequency is a multiple of 100 Hz, so each
  holds a whole number of cycles: symbols are orthogonal over their window and the
  phase is continuous (no clicks), and every symbol starts at full amplitude;
* a transmission is ``SYNC`` (400 Hz), then each UTF-8 byte as two nibbles (600 to 2100 Hz),
  then ``END`` (2300 Hz): 60 ms per character, about the pace of speech;
* at -12 dBFS it is far above any VAD threshold and nothing like silence (0xFF).

:class:`SpeechDecoder` needs no framing from the transport: it finds the onset of a
transmission in the sample stream, aligns on the SYNC symbol (searching a few samples
around the onset, so filtered/resampled audio decodes too), and classifies each symbol
with a 19-bin DFT.
"""

from __future__ import annotations

import codecs
import functools
from enum import Enum

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import sliding_window_view

from callmesh.audio.codec import MULAW_SILENCE, mulaw_decode_array, mulaw_encode_array
from callmesh.audio.format import TELEPHONY_RATE, samples_in

__all__ = [
    "ONSET_LEVEL",
    "SAMPLE_RATE",
    "SpeechDecoder",
    "decode_speech",
    "noise",
    "silence",
    "speech_from_text",
    "tones_for_text",
]

SAMPLE_RATE = TELEPHONY_RATE
SYMBOL_MS = 30
AMPLITUDE = 8192  # -12 dBFS
ONSET_LEVEL = 1024
"""|sample| that counts as the start of a transmission."""
_SYNC_HZ, _END_HZ = 400, 2300
_DATA_HZ = tuple(600 + 100 * k for k in range(16))
_TONES_HZ = (*_DATA_HZ, _SYNC_HZ, _END_HZ)
_SYNC, _END = 16, 17  # symbol ids: 0-15 are nibbles


def tones_for_text(text: str, sample_rate: int = SAMPLE_RATE) -> npt.NDArray[np.int16]:
    """The simulated speech signal of ``text`` as int16 samples at ``sample_rate``."""
    n = samples_in(SYMBOL_MS, sample_rate)
    symbols = [_SYNC]
    for byte in text.encode("utf-8"):
        symbols += [byte >> 4, byte & 0x0F]
    symbols.append(_END)
    t = np.arange(n) / sample_rate
    bursts = {s: np.rint(AMPLITUDE * np.cos(2 * np.pi * _TONES_HZ[s] * t)) for s in set(symbols)}
    return np.concatenate([bursts[s] for s in symbols]).astype(np.int16)


def speech_from_text(text: str) -> bytes:
    """8 kHz mu-law audio that says ``text`` to :class:`SpeechDecoder` (60 ms a character)."""
    return mulaw_encode_array(tones_for_text(text))


def silence(ms: int) -> bytes:
    """``ms`` of 8 kHz mu-law silence."""
    return bytes([MULAW_SILENCE]) * samples_in(ms, SAMPLE_RATE)


class _State(Enum):
    IDLE = "idle"  # waiting for an onset
    ALIGNING = "aligning"  # onset seen, collecting enough to find the SYNC boundary
    RECEIVING = "receiving"
    SKIPPING = "skipping"  # sound that is not a transmission: wait for a silence gap


@functools.cache
def _dft_basis() -> npt.NDArray[np.float64]:
    """The DFT at the symbol frequencies as one real matrix (cosines over sines): half the
    work of a complex product, and |X|² is the sum of the two halves squared. The same for
    every decoder, so made once and shared read-only: 69 KB that each call's decoder used
    to hold a copy of."""
    n = samples_in(SYMBOL_MS, SAMPLE_RATE)
    phase = 2 * np.pi * np.outer(_TONES_HZ, np.arange(n) / SAMPLE_RATE)
    basis = np.vstack([np.cos(phase), np.sin(phase)])
    basis.flags.writeable = False
    return basis


class SpeechDecoder:
    """Streaming decoder of :func:`speech_from_text` audio (8 kHz), any chunking.

    ``text`` is everything decoded since the last :meth:`take` (finished transmissions
    joined by spaces, plus the prefix of one in progress), so it doubles as an interim
    transcript.
    """

    _QUIET = 64
    _GAP = 40  # quiet samples (5 ms) that end a stretch of non-speech sound
    _SLACK = 8  # samples searched either side of the onset for the SYNC boundary
    _MIN_PURITY = 0.5

    def __init__(self) -> None:
        self._n = samples_in(SYMBOL_MS, SAMPLE_RATE)
        self._basis = _dft_basis()
        self._buf = np.zeros(0, dtype=np.float64)
        self._state = _State.IDLE
        self._done: list[str] = []
        self._current = ""
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._high: int | None = None
        self._purities: list[float] = []
        # Mu-law tail of the last quiet frame, decoded only if a transmission follows: the
        # silence fast path runs 50 times a second per call, speech is rarer.
        self._quiet_tail: bytes | None = None

    @property
    def text(self) -> str:
        return " ".join([*self._done, self._current] if self._current else self._done)

    @property
    def receiving(self) -> bool:
        """True while in the middle of a transmission."""
        return self._state in (_State.ALIGNING, _State.RECEIVING)

    @property
    def confidence(self) -> float:
        """Mean spectral purity of the symbols decoded since the last take (0 if none)."""
        if not self._purities:
            return 0.0
        # Asked every frame while speech is heard: a plain sum beats numpy on a short list.
        return round(min(1.0, sum(self._purities) / len(self._purities)), 3)

    @property
    def idle(self) -> bool:
        """Waiting for the onset of a transmission, nothing half-decoded."""
        return self._state is _State.IDLE and not self._done and not self._current

    def skip_quiet(self, mulaw: bytes) -> None:
        """Consume mu-law audio known to be far below the onset level, without scanning
        it: only its tail is kept (undecoded), as :meth:`push_samples` would when idle."""
        if self._state is not _State.IDLE:
            self.push(mulaw)
            return
        self._quiet_tail = mulaw[-self._SLACK :]

    def take(self) -> tuple[str, float]:
        """Return ``(text, confidence)`` decoded so far and start afresh; a transmission
        in progress is cut at what arrived (the VAD has decided the utterance ended)."""
        if self._state is _State.RECEIVING:
            self._finish()
        text, confidence = self.text, self.confidence
        self._done, self._current, self._purities = [], "", []
        if self._state is _State.ALIGNING:
            self._state = _State.IDLE
        return text, confidence

    def push(self, mulaw: bytes) -> None:
        self.push_samples(mulaw_decode_array(mulaw))

    def push_samples(self, samples: npt.NDArray[np.integer] | npt.NDArray[np.float64]) -> None:
        """Feed samples (int16 values; float64 arrays of them are used without a copy)."""
        if self._quiet_tail is not None:
            self._buf = mulaw_decode_array(self._quiet_tail).astype(np.float64)
            self._quiet_tail = None
        self._buf = np.concatenate([self._buf, np.asarray(samples, dtype=np.float64)])
        while self._advance():
            pass

    def _advance(self) -> bool:
        """Make one step of progress on the buffer; False when it needs more samples."""
        buf, n, slack = self._buf, self._n, self._SLACK
        if self._state is _State.IDLE:
            loud = np.flatnonzero(np.abs(buf) >= ONSET_LEVEL)
            if not len(loud):
                self._buf = buf[-slack:]
                return False
            self._buf = buf[max(0, int(loud[0]) - slack) :]
            self._state = _State.ALIGNING
            return True
        if self._state is _State.ALIGNING:
            if len(buf) < n + 2 * slack:
                return False
            # Every alignment within the slack at once: one window per offset.
            windows = sliding_window_view(buf[: n + 2 * slack], n)
            symbols, purities = self._classify_many(windows)
            sync_purity = np.where(symbols == _SYNC, purities, -1.0)
            best = int(sync_purity.argmax())
            symbol, purity = int(symbols[best]), float(purities[best])
            if symbol != _SYNC or purity < self._MIN_PURITY:
                self._state = _State.SKIPPING
                return True
            self._buf = buf[best + n :]
            self._purities.append(purity)
            self._state = _State.RECEIVING
            return True
        if self._state is _State.RECEIVING:
            if len(buf) < n:
                return False
            window, self._buf = buf[:n], buf[n:]
            energy = float(np.dot(window, window))
            if energy < self._QUIET**2 * n:  # audio stopped mid-transmission
                self._finish()
                return True
            symbol, purity = self._classify(window, energy)
            self._purities.append(purity)
            if symbol == _END:
                self._finish()
            elif symbol < 16:
                self._nibble(symbol)
            return True
        quiet = (np.abs(buf) < self._QUIET).astype(np.int32)
        run_lengths = np.convolve(quiet, np.ones(self._GAP, dtype=np.int32), "valid")
        runs = np.flatnonzero(run_lengths >= self._GAP)
        if not len(runs):
            self._buf = buf[-(self._GAP - 1) :]
            return False
        self._buf = buf[int(runs[0]) + self._GAP :]
        self._state = _State.IDLE
        return True

    def _classify(self, window: npt.NDArray[np.float64], energy: float) -> tuple[int, float]:
        """The symbol a window holds and its purity; ``energy`` is Σx² of the window."""
        parts = self._basis @ window
        parts *= parts
        magnitudes = parts[: len(_TONES_HZ)] + parts[len(_TONES_HZ) :]
        symbol = int(magnitudes.argmax())
        # Parseval: a pure on-bin tone puts all the window's energy in one bin, |X|² = N/2·Σx².
        purity = float(magnitudes[symbol]) / (self._n / 2 * energy) if energy else 0.0
        return symbol, purity

    def _classify_many(
        self, windows: npt.NDArray[np.float64]
    ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.float64]]:
        """:meth:`_classify` of each row of ``windows``: (symbols, purities)."""
        parts = windows @ self._basis.T
        parts *= parts
        magnitudes = parts[:, : len(_TONES_HZ)] + parts[:, len(_TONES_HZ) :]
        symbols = magnitudes.argmax(axis=1)
        energies = np.einsum("ij,ij->i", windows, windows) * (self._n / 2)
        best = magnitudes[np.arange(len(symbols)), symbols]
        purities = np.divide(best, energies, out=np.zeros_like(best), where=energies > 0)
        return symbols, purities

    def _nibble(self, value: int) -> None:
        if self._high is None:
            self._high = value
            return
        byte, self._high = (self._high << 4) | value, None
        self._current += self._utf8.decode(bytes([byte]))

    def _finish(self) -> None:
        self._current += self._utf8.decode(b"", final=True)
        if self._current:
            self._done.append(self._current)
        self._current, self._high = "", None
        self._utf8.reset()
        self._state = _State.IDLE


def decode_speech(mulaw: bytes) -> str:
    """Decode a whole buffer of simulated speech (tests, fakes, load-test callers)."""
    decoder = SpeechDecoder()
    decoder.push(mulaw)
    return decoder.take()[0]


def noise(ms: float, sample_rate: int = SAMPLE_RATE, seed: int = 0) -> bytes:
    """``ms`` of loud mu-law noise (about -20 dBFS) that carries no text: sound a voice
    activity detector hears and the decoder reads nothing in (a cough, a door)."""
    rng = np.random.default_rng(seed)
    samples = rng.standard_normal(samples_in(int(ms), sample_rate)) * 3000
    return mulaw_encode_array(samples.astype(np.int16))
