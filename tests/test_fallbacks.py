"""Every degradation of the pipeline, injected one at a time on a real node: the call
keeps talking, and the fallback is named in the turn's telemetry (``turn_metrics``).

| failure | fallback |
|---|---|
| the model misses its first-token budget | ``llm_timeout``: a short recovery line |
| the voice fails | ``tts_backup``: the backup voice says it |
| the recognizer is unsure | ``stt_low_confidence``: ask the caller to repeat |
| the knowledge base is slow | ``knowledge_cached``: answer from its cache |
| the effect stream (JetStream) is down | ``effects_deferred``: effects wait in the outbox |
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import nats
from node_harness import node_call, running_node, simulated_providers
from redis.asyncio import Redis

from conversation_node.model_reply import RECOVERY_LINE
from conversation_node.node_services import MemoryServices
from conversation_node.prompt import INSTRUCTIONS
from conversation_node.providers.base import LLMDelta, LLMRequest
from conversation_node.providers.simulated import SimulatedTTS
from conversation_node.providers.simulated_audio import LOW_CONFIDENCE_MARKER
from conversation_node.voice_turns import REPEAT_LINE
from events import subjects
from localcluster.servers import nats_server
from memory.history import InMemoryHistoryStore
from memory.knowledge import DEMO_KB_DIR, KnowledgeBase
from memory.prompt import PromptBuilder
from memory.retrieval import RetrievalOrchestrator, SourcePolicy
from memory.session import MemoryConfig
from memory.sources import KnowledgeBaseSource, Query, Snippet
from state_store.store import StateStore


class SilentLLM:
    name = "silent-llm"

    async def stream(self, request: LLMRequest) -> AsyncIterator[LLMDelta]:
        await asyncio.sleep(30)
        yield LLMDelta(text="too late")


async def test_llm_timeout_says_a_recovery_line(
    redis_url: str, nats_url: str, redis: Redis
) -> None:
    providers = simulated_providers(llm=SilentLLM())
    async with (
        running_node(redis_url, nats_url, providers, llm_first_token_budget_ms=150) as (_, url),
        node_call(url, "fb-llm") as call,
    ):
        await call.start(audio=False)
        await call.send(type="user_text", text="What are your opening hours?")
        metrics = await call.turn(1)
        assert metrics["fallbacks"] == ["llm_timeout"]
        assert call.reply_text(1) == RECOVERY_LINE
        assert call.of_turn(1, "agent_audio"), "the recovery line is spoken"


async def test_failing_voice_switches_to_the_backup(
    redis_url: str, nats_url: str, redis: Redis
) -> None:
    providers = simulated_providers()
    providers.tts = SimulatedTTS(providers.backup_tts._latency, fail=True)  # type: ignore[attr-defined]
    async with (
        running_node(redis_url, nats_url, providers) as (_, url),
        node_call(url, "fb-tts") as call,
    ):
        await call.start()
        await call.speak("Hi, my name is Dee")
        metrics = await call.turn(1)
        assert "tts_backup" in metrics["fallbacks"]
        assert call.of_turn(1, "agent_audio"), "the backup voice was heard"


async def test_low_confidence_asks_to_repeat_and_takes_nothing(
    redis_url: str, nats_url: str, redis: Redis
) -> None:
    async with (
        running_node(redis_url, nats_url, simulated_providers()) as (_, url),
        node_call(url, "fb-stt") as call,
    ):
        await call.start()
        await call.speak(f"{LOW_CONFIDENCE_MARKER} my name is Eve")
        metrics = await call.turn(1)
        assert metrics["fallbacks"] == ["stt_low_confidence"]
        assert metrics["intent"] == "repeat"
        assert call.reply_text(1) == REPEAT_LINE
        ckpt = await StateStore(redis).load("demo", "fb-stt")
        assert ckpt is not None and "name" not in ckpt.facts
        # Said clearly, it is understood.
        await call.speak("my name is Eve")
        await call.turn(2)
        ckpt = await StateStore(redis).load("demo", "fb-stt")
        assert ckpt is not None and "name" in ckpt.facts


class SlowKnowledge:
    """The demo knowledge base behind a delay the test controls."""

    name = "knowledge_base"

    def __init__(self) -> None:
        self.inner = KnowledgeBaseSource(default=KnowledgeBase.from_directory(DEMO_KB_DIR))
        self.delay_s = 0.0

    def cache_key(self, query: Query) -> object:
        return self.inner.cache_key(query)

    async def fetch(self, query: Query) -> list[Snippet]:
        await asyncio.sleep(self.delay_s)
        return await self.inner.fetch(query)


async def test_slow_knowledge_is_answered_from_cache(
    redis_url: str, nats_url: str, redis: Redis
) -> None:
    kb = SlowKnowledge()
    memory = MemoryServices(
        MemoryConfig(),
        kb.inner.default,  # type: ignore[arg-type]
        InMemoryHistoryStore(),
        # Never fresh: every later query revalidates, serving the cache meanwhile.
        RetrievalOrchestrator([(kb, SourcePolicy(timeout_ms=30, fresh_ms=0, stale_ms=60_000))]),
        PromptBuilder(INSTRUCTIONS),
    )
    async with (
        running_node(redis_url, nats_url, simulated_providers(), memory) as (_, url),
        node_call(url, "fb-kb") as call,
    ):
        await call.start(audio=False)
        await call.send(type="user_text", text="How much is a cleaning?")
        first = await call.turn(1)
        assert "knowledge_cached" not in first["fallbacks"]
        kb.delay_s = 1.0  # the knowledge base is now far slower than its 30 ms budget
        await call.send(type="user_text", text="How much is a cleaning?")
        second = await call.turn(2)
        assert "knowledge_cached" in second["fallbacks"]
        assert "retrieval_partial" not in second["fallbacks"]
        assert call.reply_text(2), "the call kept talking"


async def test_effects_wait_while_jetstream_is_down(
    redis_url: str, redis: Redis, tmp_path: Path
) -> None:
    server = nats_server(tmp_path)
    server.start()
    try:
        async with (
            running_node(redis_url, server.url, simulated_providers()) as (_, url),
            node_call(url, "fb-fx") as call,
        ):
            await call.start(audio=False)
            for i, line in enumerate(
                ["Hi, my name is Fay", "I'd like a cleaning", "Tuesday works"], start=1
            ):
                await call.send(type="user_text", text=line)
                await call.turn(i)
            server.stop()
            await call.send(type="user_text", text="How about 3pm")
            await call.turn(4)
            await call.send(type="user_text", text="Yes, book it")
            booked = await call.turn(5, timeout_s=20)
            assert call.reply_text(5), "the call kept talking"
            await call.send(type="user_text", text="Thanks, that's great")
            after = await call.turn(6, timeout_s=20)
            assert "effects_deferred" in booked["fallbacks"] + after["fallbacks"]
            ckpt = await StateStore(redis).load("demo", "fb-fx")
            assert ckpt is not None
            assert any(e.subject.startswith("effects.") for e in ckpt.outbox)
            server.start()
            # Once JetStream is back, the booking is published (once).
            nc = await nats.connect(server.url)
            try:
                js = nc.jetstream()
                stream = subjects.EFFECTS_STREAM
                for _ in range(200):
                    try:
                        info = await js.stream_info(stream)
                        if info.state.messages >= 1:
                            break
                    except Exception:
                        pass
                    await asyncio.sleep(0.05)
                msg = await js.get_msg(stream, seq=1)
                assert json.loads(msg.data)["call_id"] == "fb-fx"
                assert (await js.stream_info(stream)).state.messages == 1
            finally:
                await nc.drain()
    finally:
        server.stop()
