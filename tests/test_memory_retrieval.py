"""The retrieval orchestrator: parallel sources, per-source timeouts, stale-while-revalidate
caches, partial results marked as such, and prefetch on interim transcripts.

Sources are scripted fakes implementing the real ``KnowledgeSource`` Protocol; they block
on events instead of sleeping, so outcomes never depend on how fast the machine is."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

import pytest

from memory.errors import SourceError
from memory.extract import parse_tool_arguments
from memory.knowledge import DEMO_KB_DIR, KnowledgeBase
from memory.retrieval import (
    RetrievalOrchestrator,
    RetrievalResult,
    SourcePolicy,
    SourceStatus,
)
from memory.session import SessionMemory
from memory.sources import KnowledgeBaseSource, Query, SimulatedBookingSlots, Snippet

# Long enough never to fire on a working machine; only a blocked source reaches it.
SAFETY_MS = 2000.0


class FakeSource:
    """Answers ``"{name} v{n}: {text}"``; can be made to wait on an event or to fail."""

    def __init__(
        self,
        name: str,
        *,
        gate: asyncio.Event | None = None,
        started: asyncio.Event | None = None,
        error: Exception | None = None,
    ) -> None:
        self.name = name
        self.gate = gate
        self.started = started
        self.error = error
        self.calls: list[Query] = []

    def cache_key(self, query: Query) -> Hashable:
        return (query.text, query.facts)

    async def fetch(self, query: Query) -> list[Snippet]:
        self.calls.append(query)
        version = len(self.calls)
        if self.started is not None:
            self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        return [Snippet(self.name, f"{self.name} v{version}: {query.text}")]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def settle() -> None:
    """Let already-runnable tasks (background fetches whose gate opened) finish."""
    for _ in range(5):
        await asyncio.sleep(0)


def q(text: str, tenant: str = "acme", caller: str = "alice") -> Query:
    return Query(text, tenant, caller)


async def test_sources_are_queried_in_parallel() -> None:
    # Each source waits until the other has started: only parallel queries both answer.
    a_started, b_started = asyncio.Event(), asyncio.Event()
    a = FakeSource("a", gate=b_started, started=a_started)
    b = FakeSource("b", gate=a_started, started=b_started)
    policy = SourcePolicy(timeout_ms=SAFETY_MS)
    async with RetrievalOrchestrator([(a, policy), (b, policy)]) as orch:
        result = await orch.retrieve(q("hello"))
    assert result.status == {"a": SourceStatus.ANSWERED, "b": SourceStatus.ANSWERED}
    assert result.answered == ("a", "b") and not result.partial
    assert [s.source for s in result.snippets] == ["a", "b"]


async def test_timeout_is_marked_partial_and_the_late_answer_warms_the_cache() -> None:
    gate = asyncio.Event()
    slow, fast = FakeSource("slow", gate=gate), FakeSource("fast")
    async with RetrievalOrchestrator(
        [(slow, SourcePolicy(timeout_ms=20)), (fast, SourcePolicy(timeout_ms=SAFETY_MS))]
    ) as orch:
        result = await orch.retrieve(q("slots on Tuesday"))
        assert result.timed_out == ("slow",) and result.answered == ("fast",)
        assert result.partial
        assert [s.source for s in result.snippets] == ["fast"]  # nothing invented for "slow"
        assert "slow" in result.errors
        assert "1 in flight" in repr(orch)  # the fetch goes on in the background

        gate.set()
        await settle()
        again = await orch.retrieve(q("slots on Tuesday"))
        assert again.status["slow"] is SourceStatus.CACHED
        assert again.from_cache == ("slow", "fast") and not again.partial
        assert len(slow.calls) == 1


async def test_failed_source_is_reported_not_raised() -> None:
    broken = FakeSource("crm", error=SourceError("crm", "503 from upstream"))
    async with RetrievalOrchestrator(
        [(broken, SourcePolicy()), (FakeSource("kb"), SourcePolicy())]
    ) as orch:
        result = await orch.retrieve(q("my last booking"))
    assert result.failed == ("crm",) and result.partial
    assert "503 from upstream" in result.errors["crm"]
    assert [s.source for s in result.snippets] == ["kb"]


async def test_stale_while_revalidate() -> None:
    clock = FakeClock()
    source = FakeSource("kb")
    policy = SourcePolicy(timeout_ms=SAFETY_MS, fresh_ms=1000, stale_ms=5000)
    async with RetrievalOrchestrator([(source, policy)], clock=clock) as orch:
        first = await orch.retrieve(q("hours"))
        assert first.answered == ("kb",) and first.snippets[0].text == "kb v1: hours"

        clock.now += 0.5
        fresh = await orch.retrieve(q("hours"))
        assert fresh.status["kb"] is SourceStatus.CACHED and len(source.calls) == 1

        clock.now += 1.0  # 1.5 s old: past fresh, within stale
        stale = await orch.retrieve(q("hours"))
        assert stale.status["kb"] is SourceStatus.STALE and stale.stale == ("kb",)
        assert stale.snippets[0].text == "kb v1: hours"  # served at once, old value
        assert not stale.partial
        await settle()
        assert len(source.calls) == 2  # revalidated in the background

        revalidated = await orch.retrieve(q("hours"))
        assert revalidated.status["kb"] is SourceStatus.CACHED
        assert revalidated.snippets[0].text == "kb v2: hours"


async def test_entries_past_the_stale_window_are_never_served() -> None:
    clock = FakeClock()
    gate = asyncio.Event()
    gate.set()
    source = FakeSource("slots", gate=gate)
    policy = SourcePolicy(timeout_ms=20, fresh_ms=1000, stale_ms=2000)
    async with RetrievalOrchestrator([(source, policy)], clock=clock) as orch:
        await orch.retrieve(q("Tuesday"))
        clock.now += 10
        gate.clear()  # the source is now down
        result = await orch.retrieve(q("Tuesday"))
    assert result.status["slots"] is SourceStatus.TIMED_OUT and result.snippets == ()


async def test_cache_is_per_tenant() -> None:
    source = FakeSource("kb")
    async with RetrievalOrchestrator([(source, SourcePolicy())]) as orch:
        await orch.retrieve(q("prices", tenant="acme"))
        other = await orch.retrieve(q("prices", tenant="globex"))
    assert other.status["kb"] is SourceStatus.ANSWERED
    assert [c.tenant for c in source.calls] == ["acme", "globex"]


async def test_knowledge_base_source_never_answers_from_another_tenants_kb() -> None:
    kb = KnowledgeBase.from_directory(DEMO_KB_DIR)
    source = KnowledgeBaseSource(by_tenant={"acme": kb})
    async with RetrievalOrchestrator([(source, SourcePolicy())]) as orch:
        mine = await orch.retrieve(q("price of a cleaning", tenant="acme"))
        theirs = await orch.retrieve(q("price of a cleaning", tenant="globex"))
    assert mine.snippets and "$120" in mine.snippets[0].text
    assert theirs.snippets == () and theirs.answered == ("knowledge_base",)


async def test_too_many_fetches_in_flight_fail_fast() -> None:
    gate = asyncio.Event()
    source = FakeSource("slow", gate=gate)
    async with RetrievalOrchestrator(
        [(source, SourcePolicy(timeout_ms=10, max_inflight=1))]
    ) as orch:
        assert (await orch.retrieve(q("one"))).timed_out == ("slow",)
        second = await orch.retrieve(q("two"))
    assert second.failed == ("slow",) and "in flight" in second.errors["slow"]
    assert len(source.calls) == 1


async def test_concurrent_identical_queries_share_one_fetch() -> None:
    gate = asyncio.Event()
    source = FakeSource("kb", gate=gate)
    async with RetrievalOrchestrator([(source, SourcePolicy(timeout_ms=SAFETY_MS))]) as orch:
        first = asyncio.create_task(orch.retrieve(q("hours")))
        second = asyncio.create_task(orch.retrieve(q("hours")))
        await settle()
        gate.set()
        results = await asyncio.gather(first, second)
    assert len(source.calls) == 1
    assert results[0].snippets == results[1].snippets


async def test_close_cancels_background_fetches() -> None:
    source = FakeSource("slow", gate=asyncio.Event())
    orch = RetrievalOrchestrator([(source, SourcePolicy(timeout_ms=10))])
    await orch.retrieve(q("x"))
    assert "1 in flight" in repr(orch)
    await orch.aclose()
    await orch.aclose()  # idempotent
    assert "0 in flight" in repr(orch)
    with pytest.raises(RuntimeError):
        await orch.retrieve(q("x"))


def test_policy_is_validated() -> None:
    with pytest.raises(ValueError):
        SourcePolicy(timeout_ms=0)
    with pytest.raises(ValueError):
        SourcePolicy(fresh_ms=10, stale_ms=5)
    with pytest.raises(ValueError, match="duplicate"):
        RetrievalOrchestrator(
            [(FakeSource("a"), SourcePolicy()), (FakeSource("a"), SourcePolicy())]
        )


# ---------------------------------------------------------------- prefetch


async def test_prefetch_on_interim_is_reused_by_a_close_final() -> None:
    memory = SessionMemory("acme", "alice")
    source = FakeSource("kb")
    async with RetrievalOrchestrator([(source, SourcePolicy(timeout_ms=SAFETY_MS))]) as orch:
        retriever = orch.for_call(memory.query_for)
        try:
            retriever.prefetch("what do you charge for whitening and crowns at the")
            retriever.prefetch("what do you charge for whitening and crowns at the clinic")
            result = await retriever.retrieve(
                "what do you charge for whitening and crowns at the clinic?"
            )
        finally:
            await retriever.aclose()
    assert result.prefetched
    assert result.text == "what do you charge for whitening and crowns at the clinic?"
    assert len(source.calls) == 1  # the second interim kept the first prefetch
    assert retriever.prefetches_started == 1 and retriever.prefetches_reused == 1


async def test_prefetch_is_not_reused_for_a_different_final() -> None:
    memory = SessionMemory("acme", "alice")
    gate = asyncio.Event()
    source = FakeSource("kb", gate=gate)
    async with RetrievalOrchestrator([(source, SourcePolicy(timeout_ms=SAFETY_MS))]) as orch:
        retriever = orch.for_call(memory.query_for)
        try:
            retriever.prefetch("what are your opening hours")
            await settle()
            gate.set()
            result = await retriever.retrieve("actually I want to cancel my appointment")
        finally:
            await retriever.aclose()
    assert not result.prefetched
    assert [c.text for c in source.calls] == [
        "what are your opening hours",
        "actually I want to cancel my appointment",
    ]


async def test_prefetch_is_not_reused_when_the_facts_changed() -> None:
    # Same words, but the model's tool call found a date meanwhile: the booking system
    # must be asked for that day, not answered from the prefetch.
    memory = SessionMemory("acme", "alice")
    slots = SimulatedBookingSlots(latency_s=0)
    text = "I would like to book the whitening please"
    async with RetrievalOrchestrator([(slots, SourcePolicy(timeout_ms=SAFETY_MS))]) as orch:
        retriever = orch.for_call(memory.query_for)
        try:
            retriever.prefetch(text)
            await settle()
            memory.observe_user(1, text, parse_tool_arguments({"date": "Friday"}))
            result = await retriever.retrieve(text)
        finally:
            await retriever.aclose()
    assert not result.prefetched
    assert "Friday" in result.snippets[0].text


async def test_a_partial_prefetch_is_asked_again() -> None:
    memory = SessionMemory("acme", "alice")
    gate = asyncio.Event()
    slow = FakeSource("slow", gate=gate)
    async with RetrievalOrchestrator([(slow, SourcePolicy(timeout_ms=10))]) as orch:
        retriever = orch.for_call(memory.query_for)
        try:
            retriever.prefetch("insurance coverage details")
            # Timers fire in deadline order: the 10 ms timeout before this 50 ms wake-up.
            await asyncio.sleep(0.05)
            await settle()
            gate.set()  # the late answer arrives and is cached
            await settle()
            result = await retriever.retrieve("insurance coverage details")
        finally:
            await retriever.aclose()
    assert result.status["slow"] is SourceStatus.CACHED
    assert not result.prefetched and not result.partial
    assert len(slow.calls) == 1


async def test_closing_the_call_cancels_its_prefetch() -> None:
    memory = SessionMemory("acme", "alice")
    source = FakeSource("kb", gate=asyncio.Event())
    async with RetrievalOrchestrator([(source, SourcePolicy(timeout_ms=SAFETY_MS))]) as orch:
        retriever = orch.for_call(memory.query_for)
        retriever.prefetch("what are your opening hours")
        await settle()
        assert "prefetching" in repr(retriever)
        await retriever.aclose()
        retriever.prefetch("ignored after close")
        assert "idle" in repr(retriever)


# ---------------------------------------------------------------- per-call sources


class CallerHistory(FakeSource):
    """Keyed by caller only, as the customer history is."""

    def cache_key(self, query: Query) -> Hashable:
        return query.caller


async def test_a_per_call_source_is_asked_once_per_call() -> None:
    history = CallerHistory("history")
    policy = SourcePolicy(timeout_ms=SAFETY_MS, per_call=True)
    async with RetrievalOrchestrator([(history, policy)]) as orch:
        first = orch.for_call(SessionMemory("acme", "alice").query_for)
        try:
            answers = [await first.retrieve(f"turn {n} words") for n in range(4)]
        finally:
            await first.aclose()
        # The next call of the same caller reads the history again: it may have changed
        # when the first call ended, and nothing cached by the first call serves it.
        second = orch.for_call(SessionMemory("acme", "alice").query_for)
        try:
            later = await second.retrieve("another call")
        finally:
            await second.aclose()
    assert [a.status["history"] for a in answers] == [SourceStatus.ANSWERED] + [
        SourceStatus.CACHED
    ] * 3
    assert {a.snippets[0].text for a in answers} == {"history v1: turn 0 words"}
    assert later.status["history"] is SourceStatus.ANSWERED
    assert later.snippets[0].text == "history v2: another call"
    assert len(history.calls) == 2


async def two_turns_of_a_call(
    source: FakeSource, timeout_ms: float, between: Callable[[], Awaitable[None]]
) -> tuple[RetrievalResult, RetrievalResult]:
    """Two retrievals of one call from a per-call ``source``, ``between`` them."""
    policy = SourcePolicy(timeout_ms=timeout_ms, per_call=True)
    async with RetrievalOrchestrator([(source, policy)]) as orch:
        call = orch.for_call(SessionMemory("acme", "alice").query_for)
        try:
            first = await call.retrieve("hello")
            await between()
            return first, await call.retrieve("and then")
        finally:
            await call.aclose()


async def test_a_per_call_answer_that_came_late_serves_the_next_turn() -> None:
    gate = asyncio.Event()
    history = CallerHistory("history", gate=gate)

    async def late_answer() -> None:
        gate.set()
        await settle()

    first, second = await two_turns_of_a_call(history, 20, late_answer)
    assert first.timed_out == ("history",)
    assert second.status["history"] is SourceStatus.CACHED
    assert len(history.calls) == 1


async def test_a_failed_per_call_fetch_is_asked_again() -> None:
    history = CallerHistory("history", error=SourceError("history", "down"))

    async def back_up() -> None:
        history.error = None

    first, second = await two_turns_of_a_call(history, SAFETY_MS, back_up)
    assert first.failed == ("history",)
    assert second.status["history"] is SourceStatus.ANSWERED
    assert len(history.calls) == 2


async def test_answers_at_hand_cost_a_retrieval_no_task() -> None:
    """A retrieval served from caches (every source, or all but one) waits without tasks
    of its own: a task per source per turn was most of what retrieval cost a node."""
    a, b = FakeSource("a"), CallerHistory("b")  # b's key is the caller's alone
    policy = SourcePolicy(timeout_ms=SAFETY_MS)
    loop = asyncio.get_running_loop()
    created: list[str] = []

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        created.append(coro.__qualname__)
        return asyncio.Task(coro, loop=loop, **kwargs)

    async with RetrievalOrchestrator([(a, policy), (b, policy)]) as orch:
        await orch.retrieve(q("opening hours"))
        loop.set_task_factory(factory)
        try:
            cached = await orch.retrieve(q("opening hours"))
            one_new = await orch.retrieve(Query("opening hours", "acme", "alice", (("d", "1"),)))
        finally:
            loop.set_task_factory(None)
    assert cached.from_cache == ("a", "b")
    assert one_new.answered == ("a",) and one_new.from_cache == ("b",)
    # Only the fetch itself: no task to wait for it.
    assert created == ["RetrievalOrchestrator._run_fetch"]
