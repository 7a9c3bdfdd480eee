"""Adaptive endpointing: the policy, and the simulated recognizer that follows it (the
pause that ends an utterance, the stable transcript reported at a shorter pause)."""

from __future__ import annotations

import asyncio

import pytest

from callmesh.audio.format import AudioChunk, AudioEncoding
from callmesh.audio.tones import silence, speech_from_text
from conversation_node.endpointing import Endpointer, EndpointingConfig, is_yes_no_question
from conversation_node.providers.base import STTEvent, STTEventKind
from conversation_node.providers.simulated_audio import SimulatedSTT

CFG = EndpointingConfig(min_ms=150, max_ms=800, base_ms=300)


def test_a_complete_sentence_ends_soonest_and_mid_phrase_waits_longest() -> None:
    e = Endpointer(CFG)
    assert e.wait_ms("I'd like a cleaning.") == 150
    assert e.wait_ms("Can you call me back?") == 150
    assert e.wait_ms("I'd like to book a") == 800
    assert e.wait_ms("Tuesday, and") == 800
    assert e.wait_ms("my name is um") == 800
    assert e.wait_ms("Tuesday,") == 800
    assert e.wait_ms("Tuesday works") == 300
    # Words that end sentences as often as not do not make it mid-phrase.
    assert e.wait_ms("Perfect, thank you") == 300
    assert e.wait_ms("I like that") == 300
    assert e.wait_ms("") == 300


def test_a_short_answer_to_a_yes_no_question_ends_soon() -> None:
    e = Endpointer(CFG)
    assert e.wait_ms("yes book it") == 300
    e.expect_yes_no = True
    assert e.wait_ms("yes book it") == 150
    assert e.wait_ms("no") == 150
    # A longer sentence is not "an answer" any more; mid-phrase still waits.
    assert e.wait_ms("yes but I would rather go on Friday") == 300
    assert e.wait_ms("yes and") == 800


def test_yes_no_questions_are_told_from_other_questions() -> None:
    assert is_yes_no_question("So that's Tuesday at 3pm. Shall I book it?")
    assert is_yes_no_question("Do you have a preferred time?")
    assert not is_yes_no_question("What day works for you?")
    assert not is_yes_no_question("Your cleaning is booked.")


def test_a_supplied_speech_probability_decides_the_wait() -> None:
    e = Endpointer(CFG)
    assert e.wait_ms("I'd like to book a", speech_probability=0.0) == 150
    assert e.wait_ms("Yes.", speech_probability=1.0) == 800
    assert e.wait_ms("x", speech_probability=0.5) == 475
    assert e.wait_ms("x", speech_probability=7.0) == 800  # clamped


def test_fixed_endpointing_ignores_the_words() -> None:
    e = Endpointer(EndpointingConfig(base_ms=300, adaptive=False))
    assert e.wait_ms("Yes.") == e.wait_ms("I'd like a") == 300


def test_config_is_checked() -> None:
    with pytest.raises(ValueError):
        EndpointingConfig(min_ms=900, max_ms=800)
    with pytest.raises(ValueError):
        EndpointingConfig(min_ms=0)


async def _events(stt: SimulatedSTT, audio: bytes) -> list[STTEvent]:
    stream = await stt.open(AudioEncoding.MULAW, 8000)
    for i in range(0, len(audio), 160):
        stream.send_audio_nowait(AudioChunk(audio[i : i + 160], AudioEncoding.MULAW, 8000))
    await stream.aclose()
    return [ev async for ev in stream.events()]


def _kinds(events: list[STTEvent]) -> list[STTEventKind]:
    return [e.kind for e in events if e.kind is not STTEventKind.INTERIM]


async def test_a_sentence_ends_after_the_short_wait_and_is_reported_stable_first() -> None:
    stt = SimulatedSTT(endpointing=CFG, eager_ms=100)
    events = await _events(stt, silence(100) + speech_from_text("Yes, book it.") + silence(400))
    K = STTEventKind
    assert _kinds(events) == [K.SPEECH_STARTED, K.EAGER_END, K.FINAL, K.UTTERANCE_END]
    eager = next(e for e in events if e.kind is K.EAGER_END)
    end = events[-1]
    assert eager.text == end.text == "Yes, book it."
    assert end.endpoint_ms == 150


async def test_mid_phrase_pauses_do_not_end_the_utterance() -> None:
    """A 400 ms pause after "I'd like to" would end a fixed 300 ms endpoint; here it is
    a pause, reported as a stable transcript that then changes."""
    stt = SimulatedSTT(endpointing=CFG, eager_ms=100)
    audio = (
        silence(100)
        + speech_from_text("I'd like to")
        + silence(400)
        + speech_from_text("book.")
        + silence(400)
    )
    events = await _events(stt, audio)
    K = STTEventKind
    ends = [e for e in events if e.kind is K.UTTERANCE_END]
    assert len(ends) == 1 and ends[0].text == "I'd like to book."
    eager = [e.text for e in events if e.kind is K.EAGER_END]
    assert eager == ["I'd like to", "I'd like to book."]

    fixed = await _events(SimulatedSTT(), audio)
    assert len([e for e in fixed if e.kind is K.UTTERANCE_END]) == 2
    assert not [e for e in fixed if e.kind is K.EAGER_END]


async def test_the_yes_no_hint_shortens_the_wait_for_an_answer() -> None:
    stt = SimulatedSTT(endpointing=CFG)
    stream = await stt.open(AudioEncoding.MULAW, 8000)
    stream.expect_yes_no(True)
    audio = silence(100) + speech_from_text("yes") + silence(400)
    for i in range(0, len(audio), 160):
        stream.send_audio_nowait(AudioChunk(audio[i : i + 160], AudioEncoding.MULAW, 8000))
    await stream.aclose()
    events = [ev async for ev in stream.events()]
    end = next(e for e in events if e.kind is STTEventKind.UTTERANCE_END)
    assert end.endpoint_ms == 150


async def test_speech_probability_hook_reaches_the_stream() -> None:
    stt = SimulatedSTT(endpointing=CFG)
    stream = await stt.open(AudioEncoding.MULAW, 8000)
    stream.speech_probability(1.0)  # a VAD sure that speech goes on: the longest wait
    audio = silence(100) + speech_from_text("Yes.") + silence(700) + speech_from_text("no")
    for i in range(0, len(audio), 160):
        stream.send_audio_nowait(AudioChunk(audio[i : i + 160], AudioEncoding.MULAW, 8000))
    await asyncio.sleep(0)
    await stream.finalize()
    await stream.aclose()
    events = [ev async for ev in stream.events()]
    ends = [e for e in events if e.kind is STTEventKind.UTTERANCE_END]
    assert len(ends) == 1 and ends[0].text == "Yes. no"
