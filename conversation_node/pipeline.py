"""One turn through the streaming pipeline: prompt → LLM tokens → sentences → TTS → frames.

The LLM streams into a sentence splitter; each finished sentence goes to TTS while the
model keeps generating the next one, and every audio chunk is sent the moment it exists
(architecture invariant 6). Budgets are enforced here: a model that misses its first-token
budget is replaced by a short recovery line, and a failing voice by the backup voice
(invariant 7). Every fallback is named in the result so it reaches the turn's telemetry.
"""

from __future__ import annotations

import asyncio
import base64
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from conversation_node.providers.base import LLM, TTS, LLMDelta, LLMRequest, ProviderError, ToolCall

# End of a sentence: terminal punctuation followed by space. Short fragments are merged so
# TTS is not asked to say "Dr." on its own.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_MIN_SENTENCE_CHARS = 12

RECOVERY_LINE = "Sorry, give me just a moment. Could you say that once more?"

Emit = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class Budgets:
    """Per-stage budgets in ms; a breach triggers the stage's fallback."""

    llm_first_token_ms: float = 1500.0
    llm_total_ms: float = 8000.0
    tts_first_chunk_ms: float = 1000.0


@dataclass
class TurnOutput:
    text: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)
    llm_first_token_ms: float = 0.0
    tts_first_chunk_ms: float = 0.0
    first_audio_at: float | None = None  # monotonic seconds
    # Time the first sentence took to generate: the model's share of the critical path.
    first_sentence_s: float = 0.0


class SentenceSplitter:
    def __init__(self) -> None:
        self._buf = ""

    def feed(self, text: str) -> list[str]:
        self._buf += text
        parts = _SENTENCE_END.split(self._buf)
        done, self._buf = parts[:-1], parts[-1]
        out: list[str] = []
        carry = ""
        for p in done:
            carry = f"{carry} {p}".strip() if carry else p
            if len(carry) >= _MIN_SENTENCE_CHARS:
                out.append(carry)
                carry = ""
        if carry:
            self._buf = f"{carry} {self._buf}".strip()
        return out

    def flush(self) -> str:
        rest, self._buf = self._buf.strip(), ""
        return rest


class TurnPipeline:
    """Runs one turn and emits its reply frames (``agent_text`` per sentence, then that
    sentence's ``agent_audio`` chunks). Frames carry ``n``, their ordinal in the turn."""

    def __init__(self, llm: LLM, tts: TTS, backup_tts: TTS | None, budgets: Budgets) -> None:
        self._llm = llm
        self._tts = tts
        self._backup_tts = backup_tts
        self._budgets = budgets

    async def run(self, request: LLMRequest, emit: Emit) -> TurnOutput:
        out = TurnOutput()
        sentences: asyncio.Queue[str | None] = asyncio.Queue()
        started = time.monotonic()
        producer = asyncio.create_task(self._produce(request, sentences, out, started), name="llm")
        n = 0
        try:
            while (sentence := await sentences.get()) is not None:
                n = await self._speak(sentence, n, emit, out)
        finally:
            if not producer.done():
                producer.cancel()
            # The producer's own exceptions were turned into fallbacks; only cancellation
            # is left to absorb here.
            await asyncio.gather(producer, return_exceptions=True)
        return out

    async def speak(self, text: str, emit: Emit) -> TurnOutput:
        """Say an already-decided reply again, frame for frame as the first time (same
        sentences, same ``n``), so the router can drop what the caller already heard."""
        out = TurnOutput(text=text)
        splitter = SentenceSplitter()
        sentences = splitter.feed(text)
        rest = splitter.flush()
        n = 0
        for sentence in [*sentences, *([rest] if rest else [])]:
            n = await self._speak(sentence, n, emit, out)
        return out

    async def _produce(
        self,
        request: LLMRequest,
        sentences: asyncio.Queue[str | None],
        out: TurnOutput,
        started: float,
    ) -> None:
        splitter = SentenceSplitter()
        parts: list[str] = []
        try:
            stream = self._llm.stream(request)
            first = await asyncio.wait_for(_next(stream), self._budgets.llm_first_token_ms / 1000)
            out.llm_first_token_ms = (time.monotonic() - started) * 1000
            async with asyncio.timeout(self._budgets.llm_total_ms / 1000):
                delta: LLMDelta | None = first
                while delta is not None:
                    if delta.tool_call is not None:
                        out.tool_calls.append(delta.tool_call)
                    if delta.text:
                        parts.append(delta.text)
                        for s in splitter.feed(delta.text):
                            if not out.first_sentence_s:
                                out.first_sentence_s = time.monotonic() - started
                            sentences.put_nowait(s)
                    delta = await _next(stream)
        except (TimeoutError, ProviderError) as exc:
            out.fallbacks.append("llm_timeout" if isinstance(exc, TimeoutError) else "llm_error")
            if not parts:
                out.tool_calls.clear()
                out.first_sentence_s = time.monotonic() - started
                sentences.put_nowait(RECOVERY_LINE)
                out.text = RECOVERY_LINE
                sentences.put_nowait(None)
                return
        rest = splitter.flush()
        if rest:
            if not out.first_sentence_s:
                out.first_sentence_s = time.monotonic() - started
            sentences.put_nowait(rest)
        out.text = "".join(parts).strip()
        sentences.put_nowait(None)

    async def _speak(self, sentence: str, n: int, emit: Emit, out: TurnOutput) -> int:
        await emit({"type": "agent_text", "n": n, "text": sentence})
        n += 1
        voices = [self._tts] + ([self._backup_tts] if self._backup_tts else [])
        for i, voice in enumerate(voices):
            t0 = time.monotonic()
            got_audio = False
            try:
                stream = voice.synthesize(sentence)
                chunk = await asyncio.wait_for(
                    _next(stream), self._budgets.tts_first_chunk_ms / 1000
                )
                while chunk is not None:
                    if not got_audio:
                        got_audio = True
                        if out.first_audio_at is None:
                            out.first_audio_at = time.monotonic()
                            out.tts_first_chunk_ms = (out.first_audio_at - t0) * 1000
                    await emit(
                        {
                            "type": "agent_audio",
                            "n": n,
                            "encoding": chunk.encoding.value,
                            "sample_rate": chunk.sample_rate,
                            "data": base64.b64encode(chunk.data).decode(),
                        }
                    )
                    n += 1
                    chunk = await _next(stream)
                return n
            except (TimeoutError, ProviderError):
                if got_audio:
                    return n  # the caller heard part of it; switching voice mid-sentence is worse
                if i + 1 < len(voices):
                    out.fallbacks.append("tts_backup")
        out.fallbacks.append("tts_failed")
        return n


async def _next(stream: AsyncIterator[Any]) -> Any:
    try:
        return await anext(stream)
    except StopAsyncIteration:
        return None
