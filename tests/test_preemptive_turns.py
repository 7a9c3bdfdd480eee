"""Preemptive generation on a real node: a reply started on a stable transcript is adopted
when the final one matches, dropped when it does not, and nothing of it reaches the
caller, the checkpoint or the event log before the turn is confirmed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
from node_harness import node_call, running_node, simulated_providers
from redis.asyncio import Redis

from callmesh.audio.tones import silence, speech_from_text
from callmesh.config import SimulatedLatency
from callmesh.metric_names import (
    PREEMPTIVE_ADOPTED,
    PREEMPTIVE_CANCELLED,
    PREEMPTIVE_STARTED,
)
from conversation_node.endpointing import EndpointingConfig
from conversation_node.providers.base import LLMDelta, LLMRequest
from conversation_node.providers.simulated import SimulatedLLM
from conversation_node.providers.simulated_audio import SimulatedSTT
from events.eventlog import EventType
from events.replay import build_report, read_records
from state_store.store import StateStore

REPLY_FRAMES = ("agent_text", "agent_audio", "mark", "turn_metrics")


class CountingLLM:
    """The simulated model, keeping the requests it was asked."""

    name = "counting-llm"

    def __init__(self) -> None:
        self._llm = SimulatedLLM(SimulatedLatency().scaled(0.05))
        self.requests: list[LLMRequest] = []

    async def stream(self, request: LLMRequest) -> AsyncIterator[LLMDelta]:
        self.requests.append(request)
        async for delta in self._llm.stream(request):
            yield delta


def _providers(llm: CountingLLM, stt_latency_ms: float = 0.0) -> Any:
    stt = SimulatedSTT(
        latency_ms=stt_latency_ms,
        endpointing=EndpointingConfig(min_ms=150, max_ms=800, base_ms=300),
        eager_ms=100,
    )
    return simulated_providers(stt=stt, llm=llm)


async def _until(pred: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def _hang_up(call: Any) -> None:
    """End the call: its records are all published by the time it has ended."""
    await call.send(type="hangup")
    await call.wait_for(lambda f: f["type"] == "call_ended")


async def _verified(redis: Redis, nats_url: str, call_id: str) -> tuple[Any, list[Any]]:
    ckpt = await StateStore(redis).load("demo", call_id)
    assert ckpt is not None
    nc = await nats.connect(nats_url)
    try:
        records = await read_records(nc.jetstream(), "demo", call_id)
    finally:
        await nc.drain()
    report = build_report("demo", call_id, records, ckpt)
    assert report.verified is True, report.divergences
    return ckpt, records


@pytest.mark.parametrize("voice", ["off", "on"])
async def test_a_matching_final_adopts_the_reply_started_before_it(
    redis: Redis, redis_url: str, nats_url: str, voice: str
) -> None:
    """With ``voice`` on, the first sentence is voiced ahead too; still nothing is sent."""
    llm = CountingLLM()
    # The recognizer takes 700 ms to confirm the words: the speculative reply is ready
    # long before, and must wait for the confirmation.
    providers = _providers(llm, stt_latency_ms=700)
    async with (
        running_node(redis_url, nats_url, providers, preemptive_voice=voice) as (node, url),
        node_call(url, "pre-1") as call,
    ):
        metrics = node.services.metrics
        await call.start(caller="ana")
        await call.echo_marks(0)
        await call.audio(silence(100) + speech_from_text("Hi, my name is Ana.") + silence(400))
        await _until(lambda: metrics.get(PREEMPTIVE_STARTED) == 1)
        await _until(lambda: len(llm.requests) == 1)
        await asyncio.sleep(0.2)  # the model has answered by now; the turn is not confirmed
        assert not [f for f in call.frames if f.get("turn") == 1 and f["type"] in REPLY_FRAMES]
        ckpt = await StateStore(redis).load("demo", "pre-1")
        assert ckpt is not None and ckpt.turn == 0
        turn = await call.turn(1)
        assert turn["preemptive"] == "adopted" and turn["preemptive_saved_ms"] > 0
        assert turn["endpoint_ms"] == 150  # a complete sentence: the shortest wait
        assert "Ana" in call.reply_text(1)
        assert len(llm.requests) == 1, "the adopted generation is the only one"
        assert metrics.get(PREEMPTIVE_ADOPTED) == 1 and metrics.get(PREEMPTIVE_CANCELLED) == 0
        await _hang_up(call)
    ckpt, records = await _verified(redis, nats_url, "pre-1")
    assert ckpt.turn == 1 and ckpt.facts.get("name")
    for kind in (EventType.USER_TURN, EventType.LLM):
        assert len([r for r in records if r["turn"] == 1 and r["type"] == kind]) == 1


async def test_the_caller_going_on_drops_the_guess_and_the_final_words_are_answered(
    redis: Redis, redis_url: str, nats_url: str
) -> None:
    llm = CountingLLM()
    async with (
        running_node(redis_url, nats_url, _providers(llm)) as (node, url),
        node_call(url, "pre-2") as call,
    ):
        metrics = node.services.metrics
        await call.start(caller="ben")
        await call.echo_marks(0)
        # A pause mid-phrase: "I'd like to" looks stable for a moment, then goes on.
        await call.audio(
            silence(100)
            + speech_from_text("I'd like to")
            + silence(400)
            + speech_from_text("book a cleaning.")
            + silence(400)
        )
        turn = await call.turn(1)
        assert turn["preemptive"] == "adopted"
        assert metrics.get(PREEMPTIVE_STARTED) == 2
        assert metrics.get(PREEMPTIVE_CANCELLED) == 1 and metrics.get(PREEMPTIVE_ADOPTED) == 1
        # The stale guess was stopped before or while its model ran; the reply is to
        # the final words.
        assert llm.requests[-1].user_text == "I'd like to book a cleaning."
        assert {r.user_text for r in llm.requests} <= {"I'd like to", llm.requests[-1].user_text}
        assert len([f for f in call.frames if f["type"] == "turn_metrics"]) == 2
        await _hang_up(call)
    ckpt, records = await _verified(redis, nats_url, "pre-2")
    assert ckpt.turn == 1 and ckpt.facts["service"][0] == "cleaning"
    # The dropped guess left no record: one transcript and one model output.
    llm_records = [r for r in records if r["type"] == EventType.LLM and r["turn"] == 1]
    assert len(llm_records) == 1
    user = [r for r in records if r["type"] == EventType.USER_TURN and r["turn"] == 1]
    assert [r["text"] for r in user] == ["I'd like to book a cleaning."]


async def test_guesses_are_bounded_and_a_turn_without_a_match_says_cancelled(
    redis: Redis, redis_url: str, nats_url: str
) -> None:
    llm = CountingLLM()
    async with (
        running_node(redis_url, nats_url, _providers(llm)) as (node, url),
        node_call(url, "pre-3") as call,
    ):
        metrics = node.services.metrics
        await call.start(caller="cy")
        await call.echo_marks(0)
        await call.audio(
            silence(100)
            + speech_from_text("I'd like to")
            + silence(400)
            + speech_from_text("book a")
            + silence(400)
            + speech_from_text("cleaning.")
            + silence(400)
        )
        turn = await call.turn(1)
        assert turn["preemptive"] == "cancelled"
        assert metrics.get(PREEMPTIVE_STARTED) == 2  # at most two guesses per utterance
        assert metrics.get(PREEMPTIVE_CANCELLED) == 2 and metrics.get(PREEMPTIVE_ADOPTED) == 0
        assert llm.requests[-1].user_text == "I'd like to book a cleaning."
        await _hang_up(call)
    ckpt, _ = await _verified(redis, nats_url, "pre-3")
    assert ckpt.turn == 1


async def test_barge_in_during_speculation_answers_the_new_words_once(
    redis: Redis, redis_url: str, nats_url: str
) -> None:
    llm = CountingLLM()
    async with (
        running_node(redis_url, nats_url, _providers(llm)) as (node, url),
        node_call(url, "pre-4") as call,
    ):
        metrics = node.services.metrics
        await call.start(caller="dee")
        await call.echo_marks(0)
        await call.audio(silence(100) + speech_from_text("Hi, my name is Dee.") + silence(400))
        await call.turn(1)
        # Turn 1's reply is playing (no marks echoed): the caller talks over it.
        await call.echo_marks(1, count=1)
        await call.audio(silence(100) + speech_from_text("Sorry, one more thing.") + silence(400))
        clear = await call.wait_for(lambda f: f["type"] == "clear")
        assert clear["turn"] == 1
        await call.echo_marks(1)
        await call.turn(2)
        await asyncio.sleep(0.1)
        assert len([f for f in call.frames if f["type"] == "turn_metrics"]) == 3
        settled = metrics.get(PREEMPTIVE_ADOPTED) + metrics.get(PREEMPTIVE_CANCELLED)
        assert settled == metrics.get(PREEMPTIVE_STARTED)
        await _hang_up(call)
    ckpt, records = await _verified(redis, nats_url, "pre-4")
    assert ckpt.turn == 2
    assert any(r["type"] == "barge_in" and r["turn"] == 1 for r in records)
