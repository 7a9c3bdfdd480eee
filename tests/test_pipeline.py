"""The turn pipeline on its own, with scripted models and voices: what is said, in what
order, under which budget, and how soon the voice is asked for the first sentence."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from callmesh.audio.format import AudioChunk
from conversation_node.model_reply import RECOVERY_LINE
from conversation_node.pipeline import Budgets, TurnOutput, TurnPipeline
from conversation_node.providers.base import LLMDelta, LLMRequest, ProviderError, ToolCall

REQUEST = LLMRequest(messages=[{"role": "user", "content": "hi"}])
FIRST = "Thanks for calling us today."
SECOND = "What day would suit you best?"


class ScriptedLLM:
    """Yields each step's text after its delay; an exception in the script is raised."""

    name = "scripted-llm"

    def __init__(self, script: list[tuple[float, Any]]) -> None:
        self.script = script
        self.finished_at: float | None = None
        self.closed = False

    async def stream(self, request: LLMRequest) -> AsyncIterator[LLMDelta]:
        loop = asyncio.get_running_loop()
        try:
            for delay, step in self.script:
                await asyncio.sleep(delay)
                if isinstance(step, Exception):
                    raise step
                yield step if isinstance(step, LLMDelta) else LLMDelta(text=step)
            self.finished_at = loop.time()
        finally:
            self.closed = True


class RecordingTTS:
    """One 20 ms chunk per sentence after ``delay_s``; remembers what it was asked."""

    name = "recording-tts"

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.asked: list[str] = []
        self.done_at: list[float] = []

    async def synthesize(self, text: str) -> AsyncIterator[AudioChunk]:
        self.asked.append(text)
        await asyncio.sleep(self.delay_s)
        yield AudioChunk(b"\xff" * 160)
        self.done_at.append(asyncio.get_running_loop().time())


class Frames:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def __call__(self, frame: dict[str, Any]) -> None:
        self.sent.append(frame)

    def texts(self) -> list[str]:
        return [f["text"] for f in self.sent if f["type"] == "agent_text"]


async def _run(
    llm: ScriptedLLM,
    tts: RecordingTTS,
    budgets: Budgets | None = None,
    interrupt: asyncio.Event | None = None,
) -> tuple[TurnOutput, Frames]:
    frames = Frames()
    pipeline = TurnPipeline(llm, tts, None, budgets or Budgets())
    out = await pipeline.run(REQUEST, frames, interrupt=interrupt)
    return out, frames


async def test_sentences_are_spoken_in_order_while_the_model_writes_on() -> None:
    llm = ScriptedLLM([(0.01, FIRST + " "), (0.05, SECOND)])
    tts = RecordingTTS(delay_s=0.2)
    out, frames = await _run(llm, tts)
    assert tts.asked == [FIRST, SECOND]
    assert frames.texts() == [FIRST, SECOND]
    assert [f["n"] for f in frames.sent] == list(range(len(frames.sent)))
    assert out.text == f"{FIRST} {SECOND}" and out.fallbacks == []
    # The model finished its reply while the first sentence was still being voiced.
    assert llm.finished_at is not None and llm.finished_at < tts.done_at[0]


async def test_the_voice_is_asked_in_the_same_loop_turn_the_first_sentence_ends() -> None:
    """No hand-over between tasks between the model's first sentence and the request for
    its voice: a callback scheduled as the sentence is completed has not run yet when the
    voice is asked (a hand-over would let the event loop turn, and on a loaded node a turn
    is milliseconds)."""
    turned: list[bool] = []
    asked_before_turn: list[bool] = []

    class MarkingLLM(ScriptedLLM):
        async def stream(self, request: LLMRequest) -> AsyncIterator[LLMDelta]:
            await asyncio.sleep(0.01)
            asyncio.get_running_loop().call_soon(turned.append, True)
            yield LLMDelta(text=FIRST + " ")
            await asyncio.sleep(0.01)

    class WatchingTTS(RecordingTTS):
        async def synthesize(self, text: str) -> AsyncIterator[AudioChunk]:
            asked_before_turn.append(not turned)
            yield AudioChunk(b"\xff" * 160)

    out, _ = await _run(MarkingLLM([]), WatchingTTS())
    assert out.text == FIRST
    assert asked_before_turn == [True]


async def test_a_model_failing_after_its_first_sentence_ends_the_reply_there() -> None:
    failure = ProviderError("scripted-llm", "stream reset")
    llm = ScriptedLLM([(0.0, FIRST + " "), (0.01, failure)])
    tts = RecordingTTS()
    out, frames = await _run(llm, tts)
    assert frames.texts() == [FIRST]
    assert out.fallbacks == ["llm_error"]
    assert tts.asked == [FIRST] and out.text == FIRST


async def test_the_total_budget_cuts_a_model_that_stalls_mid_reply() -> None:
    llm = ScriptedLLM([(0.0, FIRST + " "), (0.0, "And "), (30.0, "never")])
    tts = RecordingTTS()
    out, _ = await _run(llm, tts, Budgets(llm_total_ms=100))
    assert out.fallbacks == ["llm_timeout"]
    # What the model had written is said: the first sentence, then the unfinished rest.
    assert tts.asked == [FIRST, "And"]
    assert llm.closed


async def test_a_model_that_fails_before_writing_is_replaced_by_the_recovery_line() -> None:
    llm = ScriptedLLM([(0.0, ProviderError("scripted-llm", "503"))])
    tts = RecordingTTS()
    out, _ = await _run(llm, tts)
    assert out.fallbacks == ["llm_error"]
    assert tts.asked == [RECOVERY_LINE] and out.text == RECOVERY_LINE
    assert out.first_sentence_s > 0


async def test_a_reply_without_a_sentence_end_is_said_whole() -> None:
    tool = ToolCall("c1", "create_booking", {"date": "Tuesday"})
    llm = ScriptedLLM([(0.0, "Okay"), (0.0, LLMDelta(tool_call=tool))])
    tts = RecordingTTS()
    out, _ = await _run(llm, tts)
    assert tts.asked == ["Okay"] and out.text == "Okay"
    assert out.tool_calls == [tool]


async def test_barge_in_while_the_model_thinks_stops_it_before_anything_is_said() -> None:
    llm = ScriptedLLM([(30.0, FIRST)])
    tts = RecordingTTS()
    interrupt = asyncio.Event()
    asyncio.get_running_loop().call_later(0.05, interrupt.set)
    out, frames = await _run(llm, tts, interrupt=interrupt)
    assert out.interrupted and out.text == ""
    assert frames.sent == [] and tts.asked == []


async def test_barge_in_while_the_first_sentence_plays_stops_the_model_too() -> None:
    llm = ScriptedLLM([(0.0, FIRST + " "), (0.05, "Then "), (30.0, SECOND)])
    tts = RecordingTTS(delay_s=0.2)
    interrupt = asyncio.Event()
    asyncio.get_running_loop().call_later(0.1, interrupt.set)
    out, _ = await _run(llm, tts, interrupt=interrupt)
    assert out.interrupted
    assert tts.asked == [FIRST]
    assert out.text == f"{FIRST} Then"
    assert llm.closed
