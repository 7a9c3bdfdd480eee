"""Deepgram live speech-to-text over the ``/v1/listen`` websocket (deepgram-sdk 7.x).

Deepgram's messages map onto :class:`STTEvent` like this:

* ``SpeechStarted`` (and the first words of an utterance) → SPEECH_STARTED, once;
* ``Results`` with ``is_final=false`` → INTERIM, text = finals so far + the hypothesis;
* ``Results`` with ``is_final=true`` → FINAL for that segment; when it does not also end
  the utterance, EAGER_END with the finals so far (Deepgram finalizes a segment at a
  pause: the words are stable, the turn may be ending);
* ``speech_final=true`` (endpointing), ``from_finalize=true`` or ``UtteranceEnd`` (the
  fallback when endpointing is fooled by noise) → UTTERANCE_END, once per utterance,
  with the whole utterance, its mean confidence, and the monotonic time at which the
  audio holding the last word was sent (from Deepgram's word timings).

This module also holds what the Deepgram TTS adapter shares: the SDK import, client
construction and error translation.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import time
import warnings
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import websockets.exceptions

from callmesh.audio.format import AudioChunk, AudioEncoding, bytes_per_second
from conversation_node.providers.base import (
    EventQueue,
    ProviderError,
    ProviderTimeout,
    STTEvent,
    STTEventKind,
    read_events,
)

# deepgram-sdk 7 imports websockets' deprecated legacy client; the warning is not ours
# to fix, and under ``-W error`` it would make the import itself fail.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from deepgram import AsyncDeepgramClient, DeepgramClientEnvironment
    from deepgram.core.api_error import ApiError

    # The SDK imports its websocket clients lazily, on first use: load them now, here.
    for _module in ("deepgram.listen.v1.client", "deepgram.speak.v1.client"):
        importlib.import_module(_module)

__all__ = [
    "DeepgramClientEnvironment",
    "DeepgramSTT",
    "DeepgramSTTOptions",
    "DeepgramSTTStream",
    "make_client",
    "translate_error",
]

log = logging.getLogger(__name__)

_ENCODINGS = {AudioEncoding.MULAW: "mulaw", AudioEncoding.PCM16: "linear16"}
# Close codes that mean "your request is wrong": retrying the same thing will not help.
_FATAL_CLOSE_CODES = frozenset({1002, 1003, 1007, 1008})


def make_client(api_key: str, environment: DeepgramClientEnvironment | None = None) -> Any:
    """An ``AsyncDeepgramClient`` (pointed at ``environment``, e.g. a local test double)."""
    kwargs: dict[str, Any] = {"api_key": api_key}
    if environment is not None:
        kwargs["environment"] = environment
    return AsyncDeepgramClient(**kwargs)


def translate_error(provider: str, exc: BaseException) -> ProviderError:
    """Map SDK, websocket and network failures to :class:`ProviderError` (one boundary)."""
    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, TimeoutError):
        return ProviderTimeout(provider)
    if isinstance(exc, ApiError):
        status = exc.status_code
        retryable = status is None or status in (408, 429) or status >= 500
        return ProviderError(provider, f"HTTP {status}: {exc.body}", retryable=retryable)
    if isinstance(exc, websockets.exceptions.ConnectionClosed):
        code = exc.rcvd.code if exc.rcvd is not None else None
        reason = exc.rcvd.reason if exc.rcvd is not None else "no close frame"
        return ProviderError(
            provider,
            f"connection closed ({code}: {reason})",
            retryable=code not in _FATAL_CLOSE_CODES,
        )
    if isinstance(exc, OSError | websockets.exceptions.WebSocketException):
        return ProviderError(provider, f"connection failed: {exc!r}", retryable=True)
    return ProviderError(provider, f"unexpected error: {exc!r}")


@dataclass(frozen=True, slots=True)
class DeepgramSTTOptions:
    """Live transcription settings (see Deepgram's ``/v1/listen`` query parameters)."""

    model: str = "nova-3"
    language: str | None = None
    endpointing_ms: int = 300
    utterance_end_ms: int = 1000
    smart_format: bool = True
    # Report EAGER_END when a segment is finalized short of the end of the utterance
    # (preemptive generation); off, the node never speculates.
    eager: bool = True
    # Deepgram closes a socket that has had no audio for 10 s; 3-5 s keepalives are advised.
    keepalive_s: float = 4.0
    connect_timeout_s: float = 5.0
    close_timeout_s: float = 2.0

    def __post_init__(self) -> None:
        if self.keepalive_s <= 0 or self.keepalive_s >= 10:
            raise ValueError("keepalive_s must be in (0, 10)")
        if self.connect_timeout_s <= 0 or self.close_timeout_s <= 0:
            raise ValueError("timeouts must be > 0")


class DeepgramSTT:
    """Opens one Deepgram live transcription websocket per :meth:`open`."""

    name = "deepgram-stt"

    def __init__(
        self,
        api_key: str,
        *,
        options: DeepgramSTTOptions | None = None,
        environment: DeepgramClientEnvironment | None = None,
    ) -> None:
        self.options = options or DeepgramSTTOptions()
        self._client = make_client(api_key, environment)

    async def open(
        self, encoding: AudioEncoding, sample_rate: int, *, tenant: str = ""
    ) -> DeepgramSTTStream:
        """A stream on one Deepgram socket (one general model for every tenant)."""
        stream = DeepgramSTTStream(self, encoding, sample_rate)
        await stream._connect()
        return stream


class _AudioClock:
    """When (monotonic) the audio up to a given stream offset was sent: turns Deepgram's
    audio-time word timings back into the wall-clock moment speech ended."""

    def __init__(self, bytes_per_second: int) -> None:
        self._bytes_per_second = bytes_per_second
        self._sent = 0
        self._marks: deque[tuple[float, float]] = deque(maxlen=4096)  # (audio s, monotonic)

    def sent(self, n_bytes: int) -> None:
        self._sent += n_bytes
        self._marks.append((self._sent / self._bytes_per_second, time.monotonic()))

    def at(self, audio_s: float) -> float:
        """Send time of the chunk holding ``audio_s`` (now, if not sent yet)."""
        found = time.monotonic()
        for offset, when in reversed(self._marks):  # recent audio is what is asked for
            if offset < audio_s:
                break
            found = when
        return found


class DeepgramSTTStream:
    """One live transcription websocket. Implements ``STTStream``.

    Owns two named tasks (reader, keepalive), started by ``DeepgramSTT.open`` and
    cancelled by :meth:`aclose`. Failures surface as :class:`ProviderError` from
    :meth:`send_audio` and from :meth:`events`.
    """

    def __init__(self, stt: DeepgramSTT, encoding: AudioEncoding, sample_rate: int) -> None:
        self._stt = stt
        self._encoding = encoding
        self._sample_rate = sample_rate
        self._clock = _AudioClock(bytes_per_second(encoding, sample_rate))
        self._stack = contextlib.AsyncExitStack()
        self._conn: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        # Events, then a failure (if any), then None: the end of the stream.
        self._queue: EventQueue = asyncio.Queue()
        self._error: ProviderError | None = None
        self._last_send = time.monotonic()
        self._closing: asyncio.Task[None] | None = None
        # The utterance being recognized.
        self._in_speech = False
        self._finals: list[tuple[str, float]] = []
        self._last_word_end: float | None = None

    async def _connect(self) -> None:
        opts = self._stt.options
        name = self._stt.name
        try:
            async with asyncio.timeout(opts.connect_timeout_s):
                self._conn = await self._stack.enter_async_context(
                    self._stt._client.listen.v1.connect(
                        model=opts.model,
                        language=opts.language,
                        encoding=_ENCODINGS[self._encoding],
                        sample_rate=str(self._sample_rate),
                        channels="1",
                        interim_results="true",
                        endpointing=str(opts.endpointing_ms),
                        utterance_end_ms=str(opts.utterance_end_ms),
                        vad_events="true",
                        smart_format="true" if opts.smart_format else "false",
                    )
                )
        except BaseException as exc:
            await self._stack.aclose()
            if isinstance(exc, Exception):
                raise translate_error(name, exc) from exc
            raise
        self._tasks = [
            asyncio.create_task(self._read(), name=f"{name}-reader"),
            asyncio.create_task(self._keepalive(), name=f"{name}-keepalive"),
        ]

    # ------------------------------------------------------------------ sending

    async def send_audio(self, chunk: AudioChunk) -> None:
        if self._error is not None:
            raise self._error
        if self._closing is not None or self._conn is None:
            raise ProviderError(self._stt.name, "stream is closed")
        if chunk.encoding is not self._encoding or chunk.sample_rate != self._sample_rate:
            raise ProviderError(self._stt.name, "audio format differs from the stream's")
        try:
            await self._conn.send_media(chunk.data)
        except Exception as exc:
            raise translate_error(self._stt.name, exc) from exc
        self._clock.sent(len(chunk.data))
        self._last_send = time.monotonic()

    async def finalize(self) -> None:
        """Ask Deepgram to finalize now; the result comes back with ``from_finalize``."""
        if self._closing is not None or self._conn is None or self._error is not None:
            return
        try:
            await self._conn.send_finalize()
        except Exception as exc:
            raise translate_error(self._stt.name, exc) from exc

    async def _keepalive(self) -> None:
        interval = self._stt.options.keepalive_s
        while True:
            await asyncio.sleep(interval - (time.monotonic() - self._last_send))
            if time.monotonic() - self._last_send >= interval:
                try:
                    await self._conn.send_keep_alive()
                except Exception:
                    return  # the reader reports the broken connection
                self._last_send = time.monotonic()

    # ------------------------------------------------------------------ receiving

    async def _read(self) -> None:
        try:
            async for message in self._conn:
                self._on_message(message)
            if self._closing is None:
                # Deepgram ends a session on its side after 10 s without audio or on
                # an internal error: either way this stream is over, and a new one may work.
                closed = ProviderError(self._stt.name, "server closed the stream", retryable=True)
                self._fail(closed)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if self._closing is None:
                self._fail(translate_error(self._stt.name, exc))
        finally:
            self._queue.put_nowait(None)

    def _fail(self, error: ProviderError) -> None:
        self._error = error
        self._queue.put_nowait(error)

    def _on_message(self, message: Any) -> None:
        kind = getattr(message, "type", None)
        if kind == "Results":
            self._on_results(message)
        elif kind == "SpeechStarted":
            self._speech_started()
        elif kind == "UtteranceEnd":
            if self._in_speech:
                self._end_utterance(float(message.last_word_end))
        elif kind == "Error":
            log.warning("deepgram error: %s", getattr(message, "description", message))
        else:
            log.debug("deepgram message ignored: %s", kind)

    def _on_results(self, message: Any) -> None:
        alternatives = message.channel.alternatives
        best = alternatives[0] if alternatives else None
        transcript = best.transcript.strip() if best is not None else ""
        confidence = float(best.confidence) if best is not None else 0.0
        if transcript:
            self._speech_started()
        if not message.is_final:
            if transcript:
                text = " ".join([*(t for t, _ in self._finals), transcript])
                self._emit(STTEvent(STTEventKind.INTERIM, text, confidence))
            return
        if transcript:
            self._finals.append((transcript, confidence))
            words = best.words if best is not None else []
            self._last_word_end = (
                float(words[-1].end) if words else float(message.start + message.duration)
            )
            self._emit(STTEvent(STTEventKind.FINAL, transcript, confidence))
        if (message.speech_final or message.from_finalize) and self._in_speech:
            self._end_utterance(self._last_word_end)
        elif transcript and self._stt.options.eager:
            text = " ".join(t for t, _ in self._finals)
            self._emit(STTEvent(STTEventKind.EAGER_END, text, confidence))

    def _speech_started(self) -> None:
        if not self._in_speech:
            self._in_speech = True
            self._emit(STTEvent(STTEventKind.SPEECH_STARTED))

    def _end_utterance(self, last_word_end: float | None) -> None:
        text = " ".join(t for t, _ in self._finals)
        confidence = sum(c for _, c in self._finals) / len(self._finals) if self._finals else 0.0
        ended = self._clock.at(last_word_end) if last_word_end is not None else time.monotonic()
        self._emit(STTEvent(STTEventKind.UTTERANCE_END, text, confidence, speech_end_at=ended))
        self._in_speech = False
        self._finals = []
        self._last_word_end = None

    def _emit(self, event: STTEvent) -> None:
        self._queue.put_nowait(event)

    def events(self) -> AsyncGenerator[STTEvent, None]:
        """Events until the stream closes; raises :class:`ProviderError` if it broke."""
        return read_events(self._queue)

    # ------------------------------------------------------------------ closing

    async def aclose(self) -> None:
        """Close the stream (idempotent, completes even if the caller is cancelled)."""
        if self._closing is None:
            self._closing = asyncio.create_task(self._close(), name=f"{self._stt.name}-close")
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        if self._conn is not None and self._error is None:
            # Polite end: Deepgram stops billing and flushes; we do not wait for results.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._stt.options.close_timeout_s):
                    await self._conn.send_close_stream()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self._stt.options.close_timeout_s):
                await self._stack.aclose()
        self._queue.put_nowait(None)

    def __repr__(self) -> str:
        state = "closed" if self._closing else ("failed" if self._error else "open")
        return f"<DeepgramSTTStream [{state}, {self._clock._sent} bytes sent]>"
