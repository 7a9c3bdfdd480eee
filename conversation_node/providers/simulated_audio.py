"""Simulated speech: text carried *in* audio, and a speech-to-text that reads it back.

This is not speech recognition. It lets the whole audio path (router, node, VAD,
endpointing, barge-in, load tests) run offline and deterministically on real 8 kHz
mu-law audio whose content can be checked end to end.

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
with a 19-bin DFT. :class:`SimulatedSTT` wraps it with the energy VAD to produce the same
event sequence a streaming recognizer does.
"""

from __future__ import annotations

import asyncio
import codecs
import functools
import time
from collections.abc import AsyncGenerator
from enum import Enum

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import sliding_window_view

from conversation_node.audio.codec import SampleReader, mulaw_decode_array, mulaw_encode_array
from conversation_node.audio.vad import EnergyVAD, VadConfig, VadEventKind
from conversation_node.providers.base import AudioChunk, Encoding, ProviderError, STTEvent
from conversation_node.providers.base import STTEventKind as Kind

__all__ = [
    "LOW_CONFIDENCE",
    "LOW_CONFIDENCE_MARKER",
    "SimulatedSTT",
    "SimulatedSTTStream",
    "SpeechDecoder",
    "decode_speech",
    "silence",
    "speech_from_text",
    "tones_for_text",
]

SAMPLE_RATE = 8000
SYMBOL_MS = 30
AMPLITUDE = 8192  # -12 dBFS
_SYNC_HZ, _END_HZ = 400, 2300
_DATA_HZ = tuple(600 + 100 * k for k in range(16))
_TONES_HZ = (*_DATA_HZ, _SYNC_HZ, _END_HZ)
_SYNC, _END = 16, 17  # symbol ids: 0-15 are nibbles

LOW_CONFIDENCE_MARKER = "[mumble]"
"""Text that starts with this is 'heard' with :data:`LOW_CONFIDENCE` (the marker is
not part of the transcript): how tests drive the node's ask-to-repeat fallback."""
LOW_CONFIDENCE = 0.3


def tones_for_text(text: str, sample_rate: int = SAMPLE_RATE) -> npt.NDArray[np.int16]:
    """The simulated speech signal of ``text`` as int16 samples at ``sample_rate``."""
    n = sample_rate * SYMBOL_MS // 1000
    symbols = [_SYNC]
    for byte in text.encode("utf-8"):
        symbols += [byte >> 4, byte & 0x0F]
    symbols.append(_END)
    t = np.arange(n) / sample_rate
    bursts = {s: np.rint(AMPLITUDE * np.cos(2 * np.pi * _TONES_HZ[s] * t)) for s in set(symbols)}
    return np.concatenate([bursts[s] for s in symbols]).astype(np.int16)


def speech_from_text(text: str) -> bytes:
    """8 kHz mu-law audio that says ``text`` to :class:`SimulatedSTT` (60 ms a character)."""
    return mulaw_encode_array(tones_for_text(text))


def silence(ms: int) -> bytes:
    """``ms`` of 8 kHz mu-law silence."""
    return b"\xff" * (SAMPLE_RATE * ms // 1000)


class _State(Enum):
    IDLE = "idle"  # waiting for an onset
    ALIGNING = "aligning"  # onset seen, collecting enough to find the SYNC boundary
    RECEIVING = "receiving"
    SKIPPING = "skipping"  # sound that is not a transmission: wait for a silence gap


class SpeechDecoder:
    """Streaming decoder of :func:`speech_from_text` audio (8 kHz), any chunking.

    ``text`` is everything decoded since the last :meth:`take` (finished transmissions
    joined by spaces, plus the prefix of one in progress), so it doubles as an interim
    transcript.
    """

    _ONSET = 1024  # |sample| that counts as the start of a transmission
    _QUIET = 64
    _GAP = 40  # quiet samples (5 ms) that end a stretch of non-speech sound
    _SLACK = 8  # samples searched either side of the onset for the SYNC boundary
    _MIN_PURITY = 0.5

    def __init__(self) -> None:
        self._n = SAMPLE_RATE * SYMBOL_MS // 1000
        # The DFT at the symbol frequencies as one real matrix (cosines over sines): half
        # the work of a complex product, and |X|² is the sum of the two halves squared.
        phase = 2 * np.pi * np.outer(_TONES_HZ, np.arange(self._n) / SAMPLE_RATE)
        self._basis = np.vstack([np.cos(phase), np.sin(phase)])
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
            loud = np.flatnonzero(np.abs(buf) >= self._ONSET)
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


@functools.lru_cache(maxsize=8)
def _audible_table(threshold_dbfs: float) -> bytes:
    """mu-law byte → 1 if its sample reaches the VAD threshold (or the decoder's onset
    level), for a C-speed "is this frame silent?" test with ``bytes.translate``."""
    level = min(32768.0 * 10 ** (threshold_dbfs / 20), SpeechDecoder._ONSET)
    decoded = mulaw_decode_array(bytes(range(256)))
    return bytes(1 if abs(int(v)) >= level else 0 for v in decoded)


def decode_speech(mulaw: bytes) -> str:
    """Decode a whole buffer of simulated speech (tests, fakes, load-test callers)."""
    decoder = SpeechDecoder()
    decoder.push(mulaw)
    return decoder.take()[0]


def _heard(text: str, confidence: float) -> tuple[str, float]:
    if text.startswith(LOW_CONFIDENCE_MARKER):
        return text[len(LOW_CONFIDENCE_MARKER) :].lstrip(), min(confidence, LOW_CONFIDENCE)
    if LOW_CONFIDENCE_MARKER.startswith(text):  # the marker is still arriving
        return "", min(confidence, LOW_CONFIDENCE)
    return text, confidence


class SimulatedSTT:
    """A deterministic stand-in for a streaming recognizer, over 8 kHz audio.

    ``latency_ms`` delays FINAL and UTTERANCE_END after the endpoint (a real recognizer's
    processing time); SPEECH_STARTED and INTERIM are not delayed.
    """

    name = "simulated-stt"

    def __init__(
        self,
        *,
        latency_ms: float = 0.0,
        vad: VadConfig | None = None,
        interim_interval_ms: int = 200,
    ) -> None:
        if latency_ms < 0 or interim_interval_ms <= 0:
            raise ValueError("latency_ms must be >= 0 and interim_interval_ms > 0")
        self.latency_ms = latency_ms
        self.vad_config = vad or VadConfig()
        self.interim_interval_ms = interim_interval_ms

    async def open(self, encoding: Encoding, sample_rate: int) -> SimulatedSTTStream:
        if sample_rate != SAMPLE_RATE:
            raise ProviderError(self.name, f"only {SAMPLE_RATE} Hz audio, got {sample_rate}")
        return SimulatedSTTStream(self, encoding)


class SimulatedSTTStream:
    """One recognition session of :class:`SimulatedSTT`. Implements ``STTStream``."""

    def __init__(self, stt: SimulatedSTT, encoding: Encoding) -> None:
        self._stt = stt
        self._encoding = encoding
        self._vad = EnergyVAD(stt.vad_config, sample_rate=SAMPLE_RATE)
        self._decoder = SpeechDecoder()
        self._frame = SAMPLE_RATE * stt.vad_config.frame_ms // 1000
        self._pending = np.zeros(0, dtype=np.float64)  # part of a frame
        self._reader: SampleReader | None = None
        self._audible = _audible_table(stt.vad_config.threshold_dbfs)
        # Events with the monotonic time before which they must not be delivered.
        self._queue: asyncio.Queue[tuple[float, STTEvent | None]] = asyncio.Queue()
        self._last_voice_at: float | None = None
        self._last_interim = ("", -1e9)  # (text, audio ms)
        self._closed = False

    async def send_audio(self, chunk: AudioChunk) -> None:
        self.send_audio_nowait(chunk)

    def send_audio_nowait(self, chunk: AudioChunk) -> bool:
        """Decode ``chunk`` now (it never waits: decoding is synchronous)."""
        if self._closed:
            raise ProviderError(self._stt.name, "stream is closed")
        if chunk.sample_rate != SAMPLE_RATE:
            raise ProviderError(self._stt.name, f"unexpected sample rate {chunk.sample_rate}")
        if self._skip_if_quiet(chunk):
            return True
        if self._reader is None or chunk.encoding is not self._encoding:
            self._encoding = chunk.encoding
            self._reader = SampleReader(mulaw=chunk.encoding is Encoding.MULAW)
        samples = self._reader.read(chunk.data).astype(np.float64)
        # Decoder and VAD advance frame by frame together, so a burst holding several
        # utterances is split at the right places.
        buf = np.concatenate([self._pending, samples]) if len(self._pending) else samples
        whole = len(buf) - len(buf) % self._frame
        self._pending = buf[whole:]
        for start in range(0, whole, self._frame):
            self._process_frame(buf[start : start + self._frame])
        return True

    def _skip_if_quiet(self, chunk: AudioChunk) -> bool:
        """The fast path of a line that is silent between utterances (most of a call):
        whole mu-law frames with every sample below the VAD threshold, while nothing is
        being heard, advance the audio clock without any signal processing. The result
        is exactly what the slow path would produce for such frames."""
        data = chunk.data
        if (
            chunk.encoding is not Encoding.MULAW
            or len(data) % self._frame
            or len(self._pending)
            or self._vad.in_speech
            or not self._vad.at_frame_boundary
            or not self._decoder.idle
            or data.translate(self._audible).strip(b"\x00")
        ):
            return False
        self._vad.skip_unvoiced(len(data) // self._frame)
        self._decoder.skip_quiet(data)
        return True

    def _process_frame(self, frame: npt.NDArray[np.float64]) -> None:
        self._decoder.push_samples(frame)
        event = self._vad.push_frame_energy(float(np.dot(frame, frame)) / len(frame))
        if event is not None:
            if event.kind is VadEventKind.SPEECH_START:
                self._emit(STTEvent(Kind.SPEECH_STARTED))
            else:
                self._end_utterance()
        if self._vad.last_voiced_end_ms == self._vad.position_ms:
            self._last_voice_at = time.monotonic()
        if self._vad.in_speech:
            self._maybe_interim()

    def _maybe_interim(self) -> None:
        last_text, last_ms = self._last_interim
        now_ms = self._vad.position_ms
        if now_ms - last_ms < self._stt.interim_interval_ms:
            return  # checked first: building the text every frame is most of the cost
        text, confidence = _heard(self._decoder.text, self._decoder.confidence)
        if text and text != last_text:
            self._last_interim = (text, now_ms)
            self._emit(STTEvent(Kind.INTERIM, text, confidence))

    def _end_utterance(self) -> None:
        text, confidence = _heard(*self._decoder.take())
        speech_end_at = self._last_voice_at or time.monotonic()
        not_before = time.monotonic() + self._stt.latency_ms / 1000
        if text:
            self._emit(STTEvent(Kind.FINAL, text, confidence), not_before)
        # An utterance that decodes to nothing was noise: reported with confidence 0 so
        # the node can tell it from words.
        end = STTEvent(Kind.UTTERANCE_END, text, confidence if text else 0.0, speech_end_at)
        self._emit(end, not_before)
        self._last_interim = ("", -1e9)

    def _emit(self, event: STTEvent, not_before: float = 0.0) -> None:
        self._queue.put_nowait((not_before, event))

    async def finalize(self) -> None:
        """End the utterance in progress now (caller hung up, DTMF...)."""
        if self._closed:
            return
        if self._vad.in_speech or self._decoder.text or self._decoder.receiving:
            self._vad.flush()
            self._end_utterance()

    async def events(self) -> AsyncGenerator[STTEvent, None]:
        while True:
            not_before, event = await self._queue.get()
            if event is None:
                return
            delay = not_before - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            yield event

    async def aclose(self) -> None:
        """Stop the stream; ``events()`` ends after the events already queued."""
        if not self._closed:
            self._closed = True
            self._queue.put_nowait((0.0, None))

    def __repr__(self) -> str:
        return f"<SimulatedSTTStream [{self._vad!r}, closed={self._closed}]>"
