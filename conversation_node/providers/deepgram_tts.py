"""Deepgram Aura text-to-speech over the ``/v1/speak`` websocket (deepgram-sdk 7.x).

A sentence is ``Speak{text}`` + ``Flush``; audio comes back as binary messages and ends
with ``Flushed``. Opening a websocket costs a TLS handshake on the turn's critical path,
so sockets are pooled and reused: a call's sentences are sequential, so in practice a
call keeps reusing one socket. A sentence abandoned mid-way (barge-in) sends ``Clear``;
the socket goes back to the pool and the next user discards what is still in flight up
to ``Cleared``. Deepgram allows 20 flushes per minute per socket, so a socket that
reached that many is retired rather than reused.

Consumers that stop early should close the iterator (``contextlib.aclosing``) so the
``Clear`` is sent at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import warnings
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from callmesh.audio.format import TELEPHONY_RATE, AudioChunk, AudioEncoding
from conversation_node.providers.base import ProviderError, ProviderTimeout
from conversation_node.providers.deepgram_stt import (
    DeepgramClientEnvironment,
    make_client,
    translate_error,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from deepgram.speak.v1.types import SpeakV1Text

__all__ = ["DeepgramTTS", "DeepgramTTSOptions"]

log = logging.getLogger(__name__)

_ENCODINGS = {AudioEncoding.MULAW: "mulaw", AudioEncoding.PCM16: "linear16"}


@dataclass(frozen=True, slots=True)
class DeepgramTTSOptions:
    model: str = "aura-2-thalia-en"
    encoding: AudioEncoding = AudioEncoding.MULAW
    sample_rate: int = TELEPHONY_RATE
    connect_timeout_s: float = 5.0
    # Longest wait for the next message of a sentence (first audio, more audio, Flushed).
    chunk_timeout_s: float = 3.0
    close_timeout_s: float = 1.0
    # Idle sockets older than this are not reused (the server may have dropped them).
    idle_ttl_s: float = 10.0
    max_idle: int = 32
    flush_limit: int = 20
    flush_window_s: float = 60.0

    def __post_init__(self) -> None:
        if min(self.connect_timeout_s, self.chunk_timeout_s, self.close_timeout_s) <= 0:
            raise ValueError("timeouts must be > 0")
        if self.max_idle < 0 or self.flush_limit <= 0:
            raise ValueError("max_idle must be >= 0 and flush_limit > 0")


class _SpeakSocket:
    """One ``/v1/speak`` websocket and its reader task."""

    def __init__(self, tts: DeepgramTTS) -> None:
        self._tts = tts
        self._stack = contextlib.AsyncExitStack()
        self._conn: Any = None
        self._reader: asyncio.Task[None] | None = None
        # Audio, message types ("Flushed", "Cleared", ...), a failure, or None at the end.
        self.inbox: asyncio.Queue[bytes | str | ProviderError | None] = asyncio.Queue()
        self.flushes: deque[float] = deque()
        self.broken = False
        self.dirty = False  # a sentence was abandoned: drain up to "Cleared" before reuse
        self.used = 0
        self.idle_since = time.monotonic()

    async def open(self) -> None:
        opts = self._tts.options
        try:
            async with asyncio.timeout(opts.connect_timeout_s):
                self._conn = await self._stack.enter_async_context(
                    self._tts._client.speak.v1.connect(
                        model=opts.model,
                        encoding=_ENCODINGS[opts.encoding],
                        sample_rate=str(opts.sample_rate),
                    )
                )
        except BaseException as exc:
            await self._stack.aclose()
            if isinstance(exc, Exception):
                raise translate_error(self._tts.name, exc) from exc
            raise
        self._reader = asyncio.create_task(self._read(), name=f"{self._tts.name}-reader")

    async def _read(self) -> None:
        try:
            async for message in self._conn:
                if isinstance(message, bytes):
                    self.inbox.put_nowait(message)
                else:
                    kind = str(getattr(message, "type", "unknown"))
                    if kind == "Warning":
                        log.warning("deepgram tts warning: %s", getattr(message, "description", ""))
                    self.inbox.put_nowait(kind)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.inbox.put_nowait(translate_error(self._tts.name, exc))
        finally:
            self.broken = True
            self.inbox.put_nowait(None)

    def usable(self, now: float) -> bool:
        opts = self._tts.options
        while self.flushes and now - self.flushes[0] > opts.flush_window_s:
            self.flushes.popleft()
        return (
            not self.broken
            and now - self.idle_since < opts.idle_ttl_s
            and len(self.flushes) < opts.flush_limit
        )

    async def _next(self) -> bytes | str:
        try:
            async with asyncio.timeout(self._tts.options.chunk_timeout_s):
                item = await self.inbox.get()
        except TimeoutError:
            self.broken = True
            raise ProviderTimeout(self._tts.name, "no audio in time") from None
        if item is None:
            self.inbox.put_nowait(None)
            self.broken = True
            raise ProviderError(self._tts.name, "connection closed", retryable=True)
        if isinstance(item, ProviderError):
            self.broken = True
            raise item
        return item

    async def drain_clear(self) -> None:
        """Discard the abandoned sentence's leftovers, up to ``Cleared``."""
        while await self._next() != "Cleared":
            pass
        self.dirty = False

    async def speak(self, text: str) -> AsyncGenerator[AudioChunk, None]:
        opts = self._tts.options
        self.used += 1
        try:
            await self._conn.send_text(SpeakV1Text(text=text))
            await self._conn.send_flush()
        except Exception as exc:
            self.broken = True
            raise translate_error(self._tts.name, exc) from exc
        self.flushes.append(time.monotonic())
        while True:
            item = await self._next()
            if isinstance(item, bytes):
                yield AudioChunk(item, opts.encoding, opts.sample_rate)
            elif item == "Flushed":
                return

    async def abandon(self) -> None:
        """Stop the sentence in flight: ``Clear``, and drain lazily on the next use."""
        self.dirty = True
        try:
            async with asyncio.timeout(self._tts.options.close_timeout_s):
                await self._conn.send_clear()
        except Exception:
            self.broken = True

    async def aclose(self) -> None:
        healthy = self._conn is not None and not self.broken
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        self.broken = True
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self._tts.options.close_timeout_s):
                if healthy:
                    await self._conn.send_close()
                await self._stack.aclose()


class DeepgramTTS:
    """Aura streaming TTS with a pool of reusable websockets. Implements ``TTS``.

    Owns the sockets it opened: :meth:`aclose` closes them (idempotent).
    """

    name = "deepgram-tts"

    def __init__(
        self,
        api_key: str,
        *,
        options: DeepgramTTSOptions | None = None,
        environment: DeepgramClientEnvironment | None = None,
    ) -> None:
        self.options = options or DeepgramTTSOptions()
        self._client = make_client(api_key, environment)
        self._idle: list[_SpeakSocket] = []
        self._retiring: set[asyncio.Task[None]] = set()
        self._closing: asyncio.Task[None] | None = None
        self.opened = 0  # sockets opened so far (observability, tests)

    async def synthesize(self, text: str) -> AsyncGenerator[AudioChunk, None]:
        """Stream the audio of one sentence; the first chunk is yielded as it arrives."""
        if self._closing is not None:
            raise ProviderError(self.name, "closed")
        if not text.strip():
            return
        for attempt in range(2):
            sock = await self._acquire()
            reused, started, finished = sock.used > 0, False, False
            try:
                async with contextlib.aclosing(sock.speak(text)) as chunks:
                    async for chunk in chunks:
                        started = True
                        yield chunk
                finished = True
                return
            except ProviderError:
                # A pooled socket can have died while idle; retry once on a fresh one,
                # unless the caller already heard part of this sentence.
                if started or not reused or attempt:
                    raise
            finally:
                if not finished and not sock.broken:
                    await sock.abandon()
                self._release(sock)

    async def _acquire(self) -> _SpeakSocket:
        while self._idle:
            sock = self._idle.pop()  # most recently used first: the freshest
            if not sock.usable(time.monotonic()):
                self._retire(sock)
                continue
            if sock.dirty:
                try:
                    await sock.drain_clear()
                except ProviderError:
                    self._retire(sock)
                    continue
            return sock
        sock = _SpeakSocket(self)
        await sock.open()
        self.opened += 1
        return sock

    def _release(self, sock: _SpeakSocket) -> None:
        sock.idle_since = time.monotonic()
        room = self._closing is None and len(self._idle) < self.options.max_idle
        if room and sock.usable(sock.idle_since):
            self._idle.append(sock)
        else:
            self._retire(sock)

    def _retire(self, sock: _SpeakSocket) -> None:
        # Closing takes a round trip; keep it off the sentence's critical path.
        task = asyncio.create_task(sock.aclose(), name=f"{self.name}-retire")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def aclose(self) -> None:
        """Close every pooled socket (idempotent, completes even if cancelled)."""
        if self._closing is None:
            self._closing = asyncio.create_task(self._close(), name=f"{self.name}-close")
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        idle, self._idle = self._idle, []
        for sock in idle:
            self._retire(sock)
        await asyncio.gather(*self._retiring, return_exceptions=True)

    def __repr__(self) -> str:
        return f"<DeepgramTTS [{len(self._idle)} idle, {self.opened} opened]>"
