"""The small interfaces every speech and language provider implements.

A turn streams through them: audio in → :class:`STTStream` events; a prompt in →
:class:`LLM` deltas (text and tool calls); a sentence in → :class:`TTS` audio chunks.
Simulated, Deepgram and OpenAI adapters implement the same Protocols, so the pipeline
never knows which one it runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from callmesh.audio.format import AudioChunk, AudioEncoding


class ProviderError(Exception):
    """A provider failed. ``retryable`` says whether the same request may succeed again."""

    def __init__(self, provider: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(f"{provider}: {message}")
        self.provider = provider
        self.retryable = retryable


class ProviderTimeout(ProviderError):
    def __init__(self, provider: str, message: str = "timed out") -> None:
        super().__init__(provider, message, retryable=True)


# ---------------------------------------------------------------- speech to text


class STTEventKind(StrEnum):
    SPEECH_STARTED = "speech_started"
    INTERIM = "interim"  # a hypothesis that may still change
    FINAL = "final"  # a finalized segment of the utterance
    # The words so far look complete and the caller has paused: the turn may be ending
    # (a short silence, or the provider's own eager end-of-turn). A hint: the utterance
    # may yet go on; only UTTERANCE_END ends it.
    EAGER_END = "eager_end"
    UTTERANCE_END = "utterance_end"  # the caller stopped speaking: end of the turn


@dataclass(frozen=True, slots=True)
class STTEvent:
    kind: STTEventKind
    text: str = ""
    confidence: float = 1.0
    # For UTTERANCE_END: the whole utterance, its confidence, and when speech ended
    # (monotonic seconds), the moment turn latency is measured from.
    speech_end_at: float | None = None
    # For UTTERANCE_END: the trailing silence that ended it (ms), where the provider knows.
    endpoint_ms: float | None = None


class STTStream(Protocol):
    """One utterance-spanning recognition session, fed with audio as it arrives."""

    async def send_audio(self, chunk: AudioChunk) -> None: ...

    # A stream may also offer ``send_audio_nowait(chunk) -> bool``: take the chunk at once,
    # or return False having taken nothing. The node then applies a call's audio frame
    # where it reads it, without a turn of the event loop (see VoiceLane.feed_now);
    # streams without it (a network recognizer's send waits) get every frame through
    # ``send_audio``.

    async def finalize(self) -> None:
        """Ask for the pending hypothesis to be finalized now (caller hung up, DTMF...)."""

    # A stream may also offer ``async end_of_audio() -> None``: no more audio will come
    # (the call's link ended); end an utterance whose speech had stopped, and drop one cut
    # off mid-speech. Streams without it get ``finalize()``.

    def events(self) -> AsyncIterator[STTEvent]: ...

    async def aclose(self) -> None: ...

    # A stream whose endpointing adapts (:mod:`conversation_node.endpointing`) may also
    # offer ``expect_yes_no(flag: bool) -> None``: the agent just asked a yes/no question,
    # so a short "yes" ends the turn sooner; and ``speech_probability(p: float) -> None``:
    # a provider-supplied probability that speech goes on (a VAD such as Silero, a turn
    # model), which then decides the wait.


# What a stream queues for its reader: events, then a failure (if any), then None: the end.
EventQueue = asyncio.Queue[STTEvent | ProviderError | None]


async def read_events(queue: EventQueue) -> AsyncGenerator[STTEvent, None]:
    """A stream's events from its queue until the end; raises the :class:`ProviderError`
    that broke it. The end is left queued, so a later reader ends too."""
    while True:
        item = await queue.get()
        if item is None:
            queue.put_nowait(None)
            return
        if isinstance(item, ProviderError):
            raise item
        yield item


class STT(Protocol):
    name: str

    # ``tenant`` is the call's verified tenant: a recognizer that adapts to what a
    # tenant's callers say (pocketsphinx's per-tenant language model) uses it.
    async def open(
        self, encoding: AudioEncoding, sample_rate: int, *, tenant: str
    ) -> STTStream: ...


# ---------------------------------------------------------------- language model


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True, slots=True)
class LLMRequest:
    """What the model sees. ``messages`` is the OpenAI chat shape; the structured fields
    carry the same compressed state for providers (the simulated one) that reason on it."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] = field(default_factory=list)
    user_text: str = ""
    facts: dict[str, Any] = field(default_factory=dict)
    snippets: list[str] = field(default_factory=list)
    # Deterministic providers seed themselves from this so a re-answered turn is identical.
    seed: str = ""


@dataclass(frozen=True, slots=True)
class LLMDelta:
    text: str = ""
    tool_call: ToolCall | None = None


class LLM(Protocol):
    name: str

    def stream(self, request: LLMRequest) -> AsyncIterator[LLMDelta]: ...


# ---------------------------------------------------------------- text to speech


class TTS(Protocol):
    name: str

    def synthesize(self, text: str) -> AsyncIterator[AudioChunk]:
        """Stream audio for one sentence; the first chunk should come as early as possible."""
        ...
