"""Simulated speech-to-text: reads back the text carried in tones (:mod:`callmesh.audio.tones`).

This is not speech recognition. :class:`SimulatedSTT` wraps the tone decoder with the
energy VAD to produce the same event sequence a streaming recognizer does, so the whole
audio path (router, node, VAD, endpointing, barge-in, load tests) runs offline and
deterministically on real 8 kHz mu-law audio whose content can be checked end to end.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncGenerator

import numpy as np
import numpy.typing as npt

from callmesh.audio.codec import Downsampler, SampleReader, mulaw_decode_array
from callmesh.audio.format import AudioChunk, AudioEncoding, samples_in
from callmesh.audio.tones import ONSET_LEVEL, SAMPLE_RATE, SpeechDecoder
from conversation_node.audio.vad import EnergyVAD, VadConfig, VadEventKind
from conversation_node.endpointing import Endpointer, EndpointingConfig
from conversation_node.providers.base import ProviderError, STTEvent
from conversation_node.providers.base import STTEventKind as Kind

__all__ = [
    "LOW_CONFIDENCE",
    "LOW_CONFIDENCE_MARKER",
    "SimulatedSTT",
    "SimulatedSTTStream",
]

LOW_CONFIDENCE_MARKER = "[mumble]"
"""Text that starts with this is 'heard' with :data:`LOW_CONFIDENCE` (the marker is
not part of the transcript): how tests drive the node's ask-to-repeat fallback."""
LOW_CONFIDENCE = 0.3


@functools.lru_cache(maxsize=8)
def _audible_table(threshold_dbfs: float) -> bytes:
    """mu-law byte → 1 if its sample reaches the VAD threshold (or the decoder's onset
    level), for a C-speed "is this frame silent?" test with ``bytes.translate``."""
    level = min(32768.0 * 10 ** (threshold_dbfs / 20), ONSET_LEVEL)
    decoded = mulaw_decode_array(bytes(range(256)))
    return bytes(1 if abs(int(v)) >= level else 0 for v in decoded)


def _heard(text: str, confidence: float) -> tuple[str, float]:
    if text.startswith(LOW_CONFIDENCE_MARKER):
        return text[len(LOW_CONFIDENCE_MARKER) :].lstrip(), min(confidence, LOW_CONFIDENCE)
    if LOW_CONFIDENCE_MARKER.startswith(text):  # the marker is still arriving
        return "", min(confidence, LOW_CONFIDENCE)
    return text, confidence


class SimulatedSTT:
    """A deterministic stand-in for a streaming recognizer, over 8 kHz audio.

    ``latency_ms`` delays FINAL and UTTERANCE_END after the endpoint (a real recognizer's
    processing time); SPEECH_STARTED, INTERIM and EAGER_END are not delayed.

    ``endpointing``: the trailing silence that ends an utterance adapts to the words
    heard (:mod:`conversation_node.endpointing`); without it, it is the VAD's.
    ``eager_ms``: after this much silence inside an utterance, EAGER_END reports the words
    so far (the transcript is stable: a speculative reply may start); None: never.
    """

    name = "simulated-stt"

    def __init__(
        self,
        *,
        latency_ms: float = 0.0,
        vad: VadConfig | None = None,
        interim_interval_ms: int = 200,
        endpointing: EndpointingConfig | None = None,
        eager_ms: int | None = None,
    ) -> None:
        if latency_ms < 0 or interim_interval_ms <= 0:
            raise ValueError("latency_ms must be >= 0 and interim_interval_ms > 0")
        if eager_ms is not None and eager_ms <= 0:
            raise ValueError("eager_ms must be > 0")
        self.latency_ms = latency_ms
        self.vad_config = vad or VadConfig()
        self.interim_interval_ms = interim_interval_ms
        self.endpointing = endpointing or EndpointingConfig(
            base_ms=self.vad_config.end_silence_ms, adaptive=False
        )
        self.eager_ms = eager_ms

    async def open(
        self, encoding: AudioEncoding, sample_rate: int, *, tenant: str = ""
    ) -> SimulatedSTTStream:
        """A stream; the tones mean the same for every tenant."""
        # Wide-band calls (a browser's 16 kHz) are decimated to the decoder's 8 kHz: the
        # tones are below 2.4 kHz, so nothing of them is lost.
        if sample_rate % SAMPLE_RATE:
            why = f"needs a multiple of {SAMPLE_RATE} Hz, got {sample_rate}"
            raise ProviderError(self.name, why)
        return SimulatedSTTStream(self, encoding, sample_rate)


class SimulatedSTTStream:
    """One recognition session of :class:`SimulatedSTT`. Implements ``STTStream``."""

    def __init__(
        self, stt: SimulatedSTT, encoding: AudioEncoding, sample_rate: int = SAMPLE_RATE
    ) -> None:
        self._stt = stt
        self._encoding = encoding
        self._rate = sample_rate
        self._down = Downsampler(sample_rate // SAMPLE_RATE) if sample_rate != SAMPLE_RATE else None
        self._vad = EnergyVAD(stt.vad_config, sample_rate=SAMPLE_RATE)
        self._decoder = SpeechDecoder()
        self._frame = samples_in(stt.vad_config.frame_ms, SAMPLE_RATE)
        self._pending = np.zeros(0, dtype=np.float64)  # part of a frame
        self._reader: SampleReader | None = None
        self._audible = _audible_table(stt.vad_config.threshold_dbfs)
        # Events with the monotonic time before which they must not be delivered.
        self._queue: asyncio.Queue[tuple[float, STTEvent | None]] = asyncio.Queue()
        self._last_voice_at: float | None = None
        self._last_interim = ("", -1e9)  # (text, audio ms)
        self._endpointer = Endpointer(stt.endpointing)
        self._speech_p: float | None = None
        self._pause_text = ""  # the words before the current pause
        self._eager_sent = False
        self._closed = False

    def expect_yes_no(self, flag: bool) -> None:
        """The agent just asked a yes/no question: a short answer ends the turn sooner."""
        self._endpointer.expect_yes_no = flag

    def speech_probability(self, p: float) -> None:
        """A provider-supplied probability that speech goes on (the hook for a real VAD
        or a turn model): the next pause's wait follows it."""
        self._speech_p = p

    async def send_audio(self, chunk: AudioChunk) -> None:
        self.send_audio_nowait(chunk)

    def send_audio_nowait(self, chunk: AudioChunk) -> bool:
        """Decode ``chunk`` now (it never waits: decoding is synchronous)."""
        if self._closed:
            raise ProviderError(self._stt.name, "stream is closed")
        if chunk.sample_rate != self._rate:
            raise ProviderError(self._stt.name, f"unexpected sample rate {chunk.sample_rate}")
        if self._skip_if_quiet(chunk):
            return True
        if self._reader is None or chunk.encoding is not self._encoding:
            self._encoding = chunk.encoding
            self._reader = SampleReader(mulaw=chunk.encoding is AudioEncoding.MULAW)
        read = self._reader.read(chunk.data)
        if self._down is not None:
            read = self._down.process_array(read)
        samples = read.astype(np.float64)
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
            chunk.encoding is not AudioEncoding.MULAW
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
                self._end_utterance(float(self._vad.end_silence_ms))
        if self._vad.last_voiced_end_ms == self._vad.position_ms:
            self._last_voice_at = time.monotonic()
        if self._vad.in_speech:
            self._pause()
            self._maybe_interim()

    def _pause(self) -> None:
        """Inside an utterance: at the first quiet frame the words so far choose how long
        a pause ends it; once the pause reaches ``eager_ms`` (short of that), EAGER_END."""
        vad = self._vad
        silence = vad.silence_ms
        if silence == 0:
            self._eager_sent = False
            return
        if silence == vad.config.frame_ms:
            self._pause_text = _heard(self._decoder.text, self._decoder.confidence)[0]
            vad.end_silence_ms = self._endpointer.wait_ms(self._pause_text, self._speech_p)
        eager = self._stt.eager_ms
        if (
            eager is not None
            and not self._eager_sent
            and silence >= eager
            and silence < vad.end_silence_ms
            and self._pause_text
        ):
            self._eager_sent = True
            self._emit(STTEvent(Kind.EAGER_END, self._pause_text))

    def _maybe_interim(self) -> None:
        last_text, last_ms = self._last_interim
        now_ms = self._vad.position_ms
        if now_ms - last_ms < self._stt.interim_interval_ms:
            return  # checked first: building the text every frame is most of the cost
        text, confidence = _heard(self._decoder.text, self._decoder.confidence)
        if text and text != last_text:
            self._last_interim = (text, now_ms)
            self._emit(STTEvent(Kind.INTERIM, text, confidence))

    def _end_utterance(self, endpoint_ms: float | None = None) -> None:
        text, confidence = _heard(*self._decoder.take())
        speech_end_at = self._last_voice_at or time.monotonic()
        not_before = time.monotonic() + self._stt.latency_ms / 1000
        if text:
            self._emit(STTEvent(Kind.FINAL, text, confidence), not_before)
        # An utterance that decodes to nothing was noise: reported with confidence 0 so
        # the node can tell it from words.
        end = STTEvent(
            Kind.UTTERANCE_END, text, confidence if text else 0.0, speech_end_at, endpoint_ms
        )
        self._emit(end, not_before)
        self._last_interim = ("", -1e9)
        self._eager_sent = False

    def _emit(self, event: STTEvent, not_before: float = 0.0) -> None:
        self._queue.put_nowait((not_before, event))

    async def finalize(self) -> None:
        """End the utterance in progress now (caller hung up, DTMF...)."""
        if self._closed:
            return
        if self._vad.in_speech or self._decoder.text or self._decoder.receiving:
            self._vad.flush()
            self._end_utterance()

    async def end_of_audio(self) -> None:
        """No more audio will come (the call's link ended). An utterance whose speech had
        stopped (its trailing silence begun) ends now; one cut off mid-speech is dropped:
        the caller never finished it, and will say it again."""
        if self._closed:
            return
        if self._decoder.receiving or (self._vad.in_speech and self._vad.silence_ms == 0):
            self._decoder.take()
            self._vad.reset()
            return
        await self.finalize()

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
