"""The model's half of a reply: its stream read into sentences, within its budgets.

:class:`ModelReply` reads one turn's model stream into a queue of sentences for the
pipeline to voice (:mod:`conversation_node.pipeline`), replacing a model that fails or
misses its first-token budget before writing anything by a recovery line.
:class:`PreparedReply` is a model stream started before its turn is confirmed
(preemptive generation), read into memory until the turn adopts it or drops it.
:class:`DecidedReply` is a reply another owner's model already finished writing (its
``decided`` text, passed on by the router after a failover), read as a model that has
written all of it.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from callmesh.audio.format import AudioChunk
from callmesh.protocol import decided_reply
from conversation_node.providers.base import (
    LLM,
    TTS,
    LLMDelta,
    LLMRequest,
    ProviderError,
    ToolCall,
)

__all__ = [
    "RECOVERY_LINE",
    "DecidedReply",
    "ModelOutput",
    "ModelReply",
    "Prefetched",
    "PreparedReply",
    "SentenceSplitter",
    "next_or_none",
]

# End of a sentence: terminal punctuation followed by space. Short fragments are merged so
# TTS is not asked to say "Dr." on its own.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_MIN_SENTENCE_CHARS = 12

T = TypeVar("T")

RECOVERY_LINE = "Sorry, give me just a moment. Could you say that once more?"


class ModelOutput(Protocol):
    """What the model's reading writes into the turn's output
    (:class:`conversation_node.pipeline.TurnOutput`)."""

    text: str
    tool_calls: list[ToolCall]
    fallbacks: list[str]
    generated: list[str]
    llm_first_token_ms: float
    first_sentence_s: float


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


class ModelReply:
    """One turn's model output, read into a queue of sentences (None at the end) by
    whichever task needs it next. Budgets: the first token within ``first_token_ms``, the
    rest within ``total_ms`` of it. A model that fails or misses a budget before
    writing anything is replaced by the recovery line; after that, its reply ends there."""

    def __init__(
        self,
        llm: LLM,
        request: LLMRequest,
        out: ModelOutput,
        sentences: asyncio.Queue[str | None],
        *,
        first_token_ms: float,
        total_ms: float,
    ) -> None:
        self._llm = llm
        self._request = request
        self._out = out
        self._sentences = sentences
        self._first_token_ms = first_token_ms
        self._total_ms = total_ms
        self._splitter = SentenceSplitter()
        self._stream: AsyncIterator[LLMDelta] | None = None
        self._started = time.monotonic()
        # Loop time by which the whole reply must be written; set at the first token.
        self._deadline: float | None = None
        self.finished = False

    async def read(self, *, until_sentence: bool = False) -> None:
        """Queue sentences as the model writes them, then None. With ``until_sentence``,
        return as soon as one more sentence is queued (call again for the rest)."""
        out, queue = self._out, self._sentences
        queued = queue.qsize()
        try:
            if self._stream is None:
                self._stream = self._llm.stream(self._request)
            delta: LLMDelta | None = None
            first = self._deadline is None
            if first:
                async with asyncio.timeout(self._first_token_ms / 1000):
                    delta = await next_or_none(self._stream)
                out.llm_first_token_ms = (time.monotonic() - self._started) * 1000
                loop = asyncio.get_running_loop()
                self._deadline = loop.time() + self._total_ms / 1000
            async with asyncio.timeout_at(self._deadline):
                if not first:
                    delta = await next_or_none(self._stream)
                while delta is not None:
                    self._take(delta)
                    if until_sentence and queue.qsize() > queued:
                        return
                    delta = await next_or_none(self._stream)
        except (TimeoutError, ProviderError) as exc:
            out.fallbacks.append("llm_timeout" if isinstance(exc, TimeoutError) else "llm_error")
            if not out.generated:
                out.tool_calls.clear()
                out.first_sentence_s = time.monotonic() - self._started
                queue.put_nowait(RECOVERY_LINE)
                out.text = RECOVERY_LINE
                self._end()
                return
        rest = self._splitter.flush()
        if rest:
            self._sentence(rest)
        out.text = "".join(out.generated).strip()
        self._end()

    def adopt_decided(self, decided: DecidedReply) -> None:
        """Read ``decided`` (a reply written whole by another owner's model) instead of
        asking the model: its sentences are the ones the model's stream gave."""
        self._stream = decided.stream()

    def adopt(self, prepared: PreparedReply) -> None:
        """Read ``prepared`` (started earlier on the same request) instead of a new
        stream; budgets count from when it started."""
        self._stream = prepared.stream()
        self._started = prepared.started

    def _take(self, delta: LLMDelta) -> None:
        if delta.tool_call is not None:
            self._out.tool_calls.append(delta.tool_call)
        if delta.text:
            self._out.generated.append(delta.text)
            for sentence in self._splitter.feed(delta.text):
                self._sentence(sentence)

    def _sentence(self, sentence: str) -> None:
        if not self._out.first_sentence_s:
            self._out.first_sentence_s = time.monotonic() - self._started
        self._sentences.put_nowait(sentence)

    def _end(self) -> None:
        self.finished = True
        self._sentences.put_nowait(None)


class Prefetched(Generic[T]):
    """An async stream read ahead into memory by a task of its own (started here: the
    owner cancels it); :meth:`stream` gives what was read so far and goes on live.
    ``on_item`` sees each item as it is read; ``on_end`` the stream's normal end."""

    def __init__(
        self,
        source: AsyncIterator[T],
        *,
        name: str,
        on_item: Callable[[T], None] | None = None,
        on_end: Callable[[], None] | None = None,
    ) -> None:
        self._items: list[T] = []
        self._error: BaseException | None = None
        self._done = False
        self._changed = asyncio.Event()
        self._on_item = on_item
        self._on_end = on_end
        self._task = asyncio.create_task(self._read(source), name=name)

    @property
    def count(self) -> int:
        return len(self._items)

    async def _read(self, source: AsyncIterator[T]) -> None:
        try:
            async for item in source:
                self._items.append(item)
                self._changed.set()
                if self._on_item is not None:
                    self._on_item(item)
            if self._on_end is not None:
                self._on_end()
        except Exception as exc:  # given to the reader (the turn's budgets handle it)
            self._error = exc
        finally:
            self._done = True
            self._changed.set()

    async def stream(self) -> AsyncIterator[T]:
        i = 0
        while True:
            if i < len(self._items):
                i += 1
                yield self._items[i - 1]
                continue
            if self._done:
                if self._error is not None:
                    raise self._error
                return
            self._changed.clear()
            await self._changed.wait()

    async def cancel(self) -> None:
        if not self._task.done():
            self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


class PreparedReply:
    """A model's reply generated before its turn is confirmed: nothing reaches the caller
    until the turn adopts it (then :meth:`stream` gives what was read so far and goes on
    live). With ``voice``, its first sentence is voiced as soon as it is written, kept
    for the turn (:meth:`voiced`). Owned: ``cancel`` stops it, and the turn that adopts it
    closes it by reading it to the end."""

    def __init__(self, llm: LLM, request: LLMRequest, voice: TTS | None = None) -> None:
        self.request = request
        self.started = time.monotonic()
        self._voice = voice
        self._splitter = SentenceSplitter()
        self._first = ""  # the sentence voiced ahead, once written
        self._audio: Prefetched[AudioChunk] | None = None
        self._handed = False
        self._model = Prefetched(
            llm.stream(request), name="llm:preemptive", on_item=self._took, on_end=self._ended
        )

    @property
    def tokens(self) -> int:
        """Deltas the model has written so far (roughly its tokens)."""
        return self._model.count

    def stream(self) -> AsyncIterator[LLMDelta]:
        return self._model.stream()

    def voiced(self, sentence: str) -> AsyncIterator[AudioChunk] | None:
        """The voice of ``sentence`` if it is the first sentence, prepared (given once)."""
        if self._audio is None or self._handed or sentence != self._first:
            return None
        self._handed = True
        return self._audio.stream()

    def _took(self, delta: LLMDelta) -> None:
        if self._voice is not None and not self._first and delta.text:
            sentences = self._splitter.feed(delta.text)
            if sentences:
                self._prepare_voice(self._voice, sentences[0])

    def _ended(self) -> None:
        # A reply of one sentence ends with the stream, as the turn's reading ends it.
        if self._voice is not None and not self._first:
            rest = self._splitter.flush()
            if rest:
                self._prepare_voice(self._voice, rest)

    def _prepare_voice(self, voice: TTS, sentence: str) -> None:
        self._first = sentence
        self._audio = Prefetched(voice.synthesize(sentence), name="tts:preemptive")

    async def cancel(self) -> int:
        """Stop the model (and the voice) now; the number of deltas written for nothing."""
        await self._model.cancel()
        if self._audio is not None:
            await self._audio.cancel()
        return self.tokens


@dataclass(frozen=True)
class DecidedReply:
    """The reply of ``turn`` (answering inbound ``seq``) that the model of ``node``, a
    previous owner, finished writing before that node was lost: said again as written, so
    the caller hears the reply they were receiving go on, without waiting for a model."""

    turn: int
    seq: int
    text: str
    llm: tuple[str, str]
    node: str

    @classmethod
    def from_start(cls, body: object) -> DecidedReply | None:
        """The ``decided`` object of a resume ``start``; None if absent or malformed."""
        fields = decided_reply(body)
        if fields is None:
            return None
        provider, model = fields["llm"]
        return cls(fields["turn"], fields["seq"], fields["text"], (provider, model), fields["node"])

    def answers(self, turn: int, seq: int) -> bool:
        """Whether this is the reply of the turn ``turn`` begun on inbound ``seq``."""
        return self.turn == turn and self.seq == seq

    async def stream(self) -> AsyncIterator[LLMDelta]:
        # One delta: the sentence splitter cuts a text the same whichever way it arrives.
        yield LLMDelta(text=self.text)


async def next_or_none(stream: AsyncIterator[Any]) -> Any:
    try:
        return await anext(stream)
    except StopAsyncIteration:
        return None
