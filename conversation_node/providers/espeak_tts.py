"""Text to speech with eSpeak NG, offline: the library and its voices come in a wheel.

``espeakng-loader`` ships ``libespeak-ng`` and its data; this drives the library through
ctypes in synchronous mode: ``espeak_Synth`` calls back with blocks of 22,050 Hz samples
as it produces them (``buffer_ms`` each), which are resampled to the configured rate,
encoded, and streamed, so the first chunk of a sentence is out after one block.

eSpeak keeps its state in globals (voice, callback, rate): one synthesis at a time per
process, on one dedicated thread. It is fast (about 1 ms of CPU for 100 ms of speech),
so calls queue behind each other for microseconds, never for a whole sentence's playback.
"""

from __future__ import annotations

import asyncio
import ctypes
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import numpy.typing as npt

from callmesh.audio.codec import array_to_pcm16, mulaw_encode_array
from callmesh.audio.format import AudioChunk, AudioEncoding
from conversation_node.audio.resample import Resampler
from conversation_node.providers.base import ProviderError

__all__ = ["EspeakTTS", "espeak_available"]

_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM_RATE = 1
_MAX_TEXT_CHARS = 2000  # a sentence; anything longer is a caller of synthesize gone wrong

_Callback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


def espeak_available() -> bool:
    try:
        import espeakng_loader  # noqa: F401
    except ImportError:
        return False
    return True


class _Engine:
    """The process's one eSpeak instance; every method runs on its own thread."""

    def __init__(self, buffer_ms: int) -> None:
        import espeakng_loader

        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetSynthCallback.argtypes = [_Callback]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
            ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]  # fmt: skip
        data = espeakng_loader.get_data_path().encode()
        rate = lib.espeak_Initialize(_OUTPUT_SYNCHRONOUS, buffer_ms, data, _INITIALIZE_DONT_EXIT)
        if rate <= 0:
            raise ProviderError("espeak", f"initialisation failed ({rate})")
        self.lib, self.sample_rate = lib, int(rate)
        # The sink of the synthesis in progress; the callback object must outlive the
        # library's use of it, so it lives as long as the engine.
        self._sink: Any = None
        self._callback = _Callback(self._on_audio)
        lib.espeak_SetSynthCallback(self._callback)
        self._voice: tuple[str, int] | None = None

    def _on_audio(self, wav: Any, count: int, _events: Any) -> int:
        sink = self._sink
        if sink is None:
            return 1
        if wav and count > 0:
            samples = np.ctypeslib.as_array(wav, shape=(count,)).copy()
            return 1 if sink(samples) else 0  # 1 aborts the synthesis
        return 0

    def synth(self, text: str, voice: str, wpm: int, sink: Any) -> None:
        if self._voice != (voice, wpm):
            if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise ProviderError("espeak", f"unknown voice {voice!r}")
            self.lib.espeak_SetParameter(_PARAM_RATE, wpm, 0)
            self._voice = (voice, wpm)
        data = text.encode("utf-8")
        self._sink = sink
        try:
            err = self.lib.espeak_Synth(
                data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None
            )
        finally:
            self._sink = None
        if err not in (0, 2):  # EE_OK, or EE_BUFFER_FULL after an abort
            raise ProviderError("espeak", f"synthesis failed ({err})", retryable=True)


# eSpeak is one instance per process (its state is global), so the thread that drives it
# is too, shared by every EspeakTTS of the process.
_EXECUTOR = ThreadPoolExecutor(1, thread_name_prefix="espeak")
_ENGINE: list[_Engine] = []  # set once, on the eSpeak thread


def _engine(buffer_ms: int) -> _Engine:
    if not _ENGINE:
        _ENGINE.append(_Engine(buffer_ms))
    return _ENGINE[0]


class EspeakTTS:
    """eSpeak NG voice, streaming ``encoding`` audio at ``sample_rate`` in ``chunk_ms`` chunks.

    PCM16 at 16 kHz by default: calls at 8 kHz get it downsampled by an integer factor
    (a clean filter) where the call's audio is converted.
    """

    name = "espeak-tts"

    def __init__(
        self,
        *,
        voice: str = "en-us",
        words_per_minute: int = 175,
        encoding: AudioEncoding = AudioEncoding.PCM16,
        sample_rate: int = 16000,
        chunk_ms: int = 100,
        buffer_ms: int = 60,
    ) -> None:
        if not 80 <= words_per_minute <= 450:
            raise ValueError(f"words_per_minute must be within [80, 450], got {words_per_minute}")
        if sample_rate not in (8000, 16000, 24000) or chunk_ms <= 0:
            raise ValueError("sample_rate must be 8000, 16000 or 24000 and chunk_ms > 0")
        self.voice, self.words_per_minute = voice, words_per_minute
        self.encoding, self.sample_rate = encoding, sample_rate
        self._chunk_samples = sample_rate * chunk_ms // 1000
        self._buffer_ms = buffer_ms

    async def synthesize(self, text: str) -> AsyncIterator[AudioChunk]:
        text = " ".join(text.split())
        if not text:
            return
        if len(text) > _MAX_TEXT_CHARS:
            raise ProviderError(self.name, f"text longer than {_MAX_TEXT_CHARS} characters")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[npt.NDArray[np.int16] | None] = asyncio.Queue()
        stop = threading.Event()

        def sink(samples: npt.NDArray[np.int16]) -> bool:
            loop.call_soon_threadsafe(queue.put_nowait, samples)
            return stop.is_set()

        rates: list[int] = []

        def run() -> None:
            try:
                engine = _engine(self._buffer_ms)
                rates.append(engine.sample_rate)
                engine.synth(text, self.voice, self.words_per_minute, sink)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        job = asyncio.wrap_future(_EXECUTOR.submit(run))
        resampler: Resampler | None = None
        pending = np.zeros(0, dtype=np.int16)
        try:
            while (block := await queue.get()) is not None:
                if resampler is None:
                    resampler = Resampler(rates[0], self.sample_rate)
                pending = np.concatenate([pending, resampler.process(block)])
                while len(pending) >= self._chunk_samples:
                    yield self._chunk(pending[: self._chunk_samples])
                    pending = pending[self._chunk_samples :]
            await job  # raises what the synthesis raised
            if resampler is not None:
                pending = np.concatenate([pending, resampler.flush()])
            if len(pending):
                yield self._chunk(pending)
        finally:
            stop.set()  # a consumer that stopped listening aborts the synthesis
            if not job.done():
                await asyncio.shield(asyncio.wait([job]))

    def _chunk(self, samples: npt.NDArray[np.int16]) -> AudioChunk:
        if self.encoding is AudioEncoding.MULAW:
            return AudioChunk(mulaw_encode_array(samples), AudioEncoding.MULAW, self.sample_rate)
        return AudioChunk(array_to_pcm16(samples), AudioEncoding.PCM16, self.sample_rate)

    def __repr__(self) -> str:
        rate = f"{self.words_per_minute} wpm"
        return f"<EspeakTTS {self.voice} {rate} → {self.encoding} {self.sample_rate} Hz>"
