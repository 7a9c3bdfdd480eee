"""Preemptive generation, without a node: the decision object (when to speculate, adopt
or cancel), the request comparison, and a prepared reply spoken by the pipeline."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from callmesh.audio.format import AudioChunk
from callmesh.config import SimulatedLatency
from conversation_node.pipeline import Budgets, TurnPipeline
from conversation_node.preemptive import Decision, Outcome, SpeculationConfig, Speculator
from conversation_node.preemptive import normalise as norm
from conversation_node.providers.base import LLMDelta, LLMRequest, ProviderError
from conversation_node.providers.simulated import SimulatedLLM, SimulatedTTS
from conversation_node.speculations import same_request


def test_normalise_ignores_case_punctuation_and_spacing() -> None:
    assert norm("  Yes,  book IT! ") == norm("yes book it") == "yes book it"
    assert norm("I'd like a cleaning.") == "i'd like a cleaning"
    assert norm("book it") != norm("book it now")


def test_a_stable_transcript_starts_one_speculation_and_a_match_adopts_it() -> None:
    s = Speculator()
    assert s.on_stable("I'd like a cleaning", busy=False) is Decision.START
    assert s.in_flight
    # The same words again (another pause): nothing new starts; at most one in flight.
    assert s.on_stable("i'd like a cleaning.", busy=False) is Decision.NONE
    assert s.on_speech_resumed("I'd like a cleaning") is Decision.NONE
    decision = s.on_final("I'd like a cleaning.")
    assert decision is Decision.ADOPT
    assert s.outcome(decision) is Outcome.ADOPTED
    assert (s.started, s.adopted, s.cancelled) == (1, 1, 0)
    assert not s.in_flight


def test_a_final_on_other_words_cancels() -> None:
    s = Speculator()
    assert s.on_stable("book it", busy=False) is Decision.START
    decision = s.on_final("book it for Tuesday")
    assert decision is Decision.CANCEL
    assert s.outcome(decision) is Outcome.CANCELLED
    assert (s.started, s.adopted, s.cancelled) == (1, 0, 1)


def test_the_caller_going_on_cancels_at_once_and_retries_are_bounded() -> None:
    s = Speculator(SpeculationConfig(max_per_turn=2))
    assert s.on_stable("I'd like", busy=False) is Decision.START
    assert s.on_speech_resumed("I'd like a") is Decision.CANCEL
    assert not s.in_flight
    assert s.on_stable("I'd like a cleaning", busy=False) is Decision.START
    # A third guess in the same utterance is not made.
    assert s.on_speech_resumed("I'd like a cleaning on") is Decision.CANCEL
    assert s.on_stable("I'd like a cleaning on Tuesday", busy=False) is Decision.NONE
    decision = s.on_final("I'd like a cleaning on Tuesday")
    assert decision is Decision.NONE
    # Its guesses were all wrong: the turn says so.
    assert s.outcome(decision) is Outcome.CANCELLED
    # The next utterance starts afresh.
    assert s.on_stable("Yes", busy=False) is Decision.START
    assert s.started == 3 and s.cancelled == 2


def test_a_stable_transcript_on_other_words_cancels_the_one_in_flight() -> None:
    s = Speculator()
    assert s.on_stable("I'd like", busy=False) is Decision.START
    assert s.on_stable("I'd like a cleaning", busy=False) is Decision.CANCEL
    assert s.on_stable("I'd like a cleaning", busy=False) is Decision.START


def test_no_speculation_while_busy_disabled_or_on_nothing() -> None:
    assert Speculator().on_stable("book it", busy=True) is Decision.NONE
    assert Speculator(SpeculationConfig(enabled=False)).on_stable("x y", busy=False) is (
        Decision.NONE
    )
    assert Speculator().on_stable(" ,. ", busy=False) is Decision.NONE
    s = Speculator()
    decision = s.on_final("hello")
    assert decision is Decision.NONE and s.outcome(decision) is Outcome.NONE


def test_abandon_cancels_only_what_is_in_flight() -> None:
    s = Speculator()
    assert s.abandon() is Decision.NONE
    s.on_stable("book it", busy=False)
    assert s.abandon() is Decision.CANCEL
    assert s.abandon() is Decision.NONE
    assert s.cancelled == 1


def test_config_is_bounded() -> None:
    with pytest.raises(ValueError):
        SpeculationConfig(max_per_turn=0)


def _request(text: str, history: str = "Agent: Hello! How can I help?") -> LLMRequest:
    return LLMRequest(
        messages=[
            {"role": "system", "content": f"## Recent conversation\n{history}"},
            {"role": "user", "content": text},
        ],
        user_text=text,
        seed="call:1",
    )


def test_same_request_compares_the_callers_words_normalised() -> None:
    assert same_request(_request("Yes, book it."), _request("yes book it"))
    assert not same_request(_request("yes book it"), _request("yes book it now"))
    # Same words, but the call moved on (memory, history): not the same request.
    assert not same_request(_request("yes"), _request("yes", "Agent (cut off): Hel"))


class CountingLLM:
    """The simulated model, counting the streams it starts and those cancelled."""

    name = "counting-llm"

    def __init__(self, latency: SimulatedLatency) -> None:
        self._llm = SimulatedLLM(latency)
        self.streams = 0
        self.cancelled = 0

    async def stream(self, request: LLMRequest) -> AsyncIterator[LLMDelta]:
        self.streams += 1
        try:
            async for delta in self._llm.stream(request):
                yield delta
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


def _pipeline(llm: Any) -> TurnPipeline:
    latency = SimulatedLatency().scaled(0.05)
    return TurnPipeline(llm, SimulatedTTS(latency, chunk_ms=100), None, Budgets())


async def _frames(pipeline: TurnPipeline, request: LLMRequest, **kw: Any) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = []

    async def emit(frame: dict[str, Any]) -> None:
        frames.append(frame)

    await pipeline.run(request, emit, **kw)
    return frames


async def test_an_adopted_reply_is_the_reply_the_turn_would_have_made() -> None:
    llm = CountingLLM(SimulatedLatency().scaled(0.05))
    pipeline = _pipeline(llm)
    request = _request("I'd like a cleaning")
    expected = await _frames(pipeline, request)
    prepared = pipeline.prepare(request)
    await asyncio.sleep(0.05)  # the model runs ahead while the caller is still "talking"
    assert prepared.tokens > 0
    adopted = await _frames(pipeline, request, prepared=prepared)
    assert adopted == expected
    assert llm.streams == 2  # one for the plain run, one for the prepared: none doubled


async def test_a_cancelled_reply_stops_the_model_and_counts_its_waste() -> None:
    llm = CountingLLM(SimulatedLatency(llm_first_token_ms=1.0, llm_token_ms=50.0, jitter=0.0))
    pipeline = _pipeline(llm)
    prepared = pipeline.prepare(_request("I'd like a cleaning"))
    await asyncio.sleep(0.08)
    wasted = await prepared.cancel()
    assert wasted >= 1
    assert llm.cancelled == 1
    assert await prepared.cancel() == wasted  # idempotent


async def test_a_prepared_reply_whose_model_fails_falls_back_like_any_reply() -> None:
    class Down:
        name = "down"

        async def stream(self, request: LLMRequest) -> AsyncIterator[LLMDelta]:
            raise ProviderError("down", "unavailable")
            yield LLMDelta()  # pragma: no cover

    pipeline = _pipeline(Down())
    prepared = pipeline.prepare(_request("hello"))
    frames = await _frames(pipeline, _request("hello"), prepared=prepared)
    texts = [f["text"] for f in frames if f["type"] == "agent_text"]
    assert texts and "moment" in texts[0]  # the recovery line


class CountingTTS:
    """The simulated voice, counting what it is asked to say and what was cut short."""

    name = "counting-tts"

    def __init__(self, latency: SimulatedLatency | None = None) -> None:
        self._tts = SimulatedTTS(latency or SimulatedLatency().scaled(0.05), chunk_ms=100)
        self.said: list[str] = []
        self.cancelled = 0

    async def synthesize(self, text: str) -> AsyncIterator[AudioChunk]:
        self.said.append(text)
        try:
            async for chunk in self._tts.synthesize(text):
                yield chunk
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled += 1
            raise


async def test_a_prepared_voice_says_the_first_sentence_once_and_sends_nothing_early() -> None:
    llm = CountingLLM(SimulatedLatency().scaled(0.05))
    tts = CountingTTS()
    pipeline = TurnPipeline(llm, tts, None, Budgets())
    request = _request("I'd like a cleaning")
    expected = await _frames(pipeline, request)
    sentences = [f["text"] for f in expected if f["type"] == "agent_text"]
    assert len(sentences) >= 2 and tts.said == sentences
    tts.said.clear()
    prepared = pipeline.prepare(request, voice=True)
    for _ in range(100):  # the first sentence is voiced ahead, while the caller "talks"
        if tts.said:
            break
        await asyncio.sleep(0.01)
    assert tts.said == sentences[:1]
    adopted = await _frames(pipeline, request, prepared=prepared)
    await prepared.cancel()
    # The same frames, and every sentence voiced once: the first one ahead.
    assert adopted == expected and tts.said == sentences


async def test_a_dropped_prepared_voice_stops_the_voice_too() -> None:
    # The model is still writing and the voice still thinking when the guess is dropped.
    llm = CountingLLM(SimulatedLatency(llm_first_token_ms=1.0, llm_token_ms=20.0, jitter=0.0))
    tts = CountingTTS(SimulatedLatency(tts_first_chunk_ms=5000.0, jitter=0.0))
    pipeline = TurnPipeline(llm, tts, None, Budgets())
    prepared = pipeline.prepare(_request("I'd like a cleaning"), voice=True)
    for _ in range(200):
        if tts.said:
            break
        await asyncio.sleep(0.01)
    assert len(tts.said) == 1
    await prepared.cancel()
    assert (llm.cancelled, tts.cancelled) == (1, 1)
    # A voice prepared for other words is not used.
    other = pipeline.prepare(_request("I'd like a cleaning"), voice=True)
    assert other.voiced("Not the first sentence.") is None
    await other.cancel()
