"""The memory package wired into the conversation node: the greeting from customer history
(and its isolation), retrieval from the knowledge base, a bounded checkpoint and a flat
prompt over a long call, and ``memory`` event-log records that rebuild the checkpointed
memory exactly. Cluster tests run real processes; the last tests drive a CallSession in
process against the real Redis of the test session."""

from __future__ import annotations

import json
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import msgpack
import pytest
from redis.asyncio import Redis

from callmesh.config import NodeConfig, SimulatedLatency
from callmesh.protocol import Inbound, parse_inbound
from callmesh_client.client import CallClient, Reply
from conversation_node.node_services import MemoryServices, NodeServices
from conversation_node.pipeline import Budgets, TurnPipeline
from conversation_node.prompt import STANDARD_GREETING
from conversation_node.providers.base import LLM
from conversation_node.providers.simulated import SimulatedLLM, SimulatedTTS
from conversation_node.session import CallDropped, CallSession
from events import eventlog, subjects
from localcluster.cluster import LocalCluster
from memory.errors import HistoryUnavailable
from memory.facts import SessionFacts
from memory.history import CallRecord, InMemoryHistoryStore
from memory.prompt import PromptBudget
from memory.session import STATE_VERSION, MemoryConfig, MemoryState
from memory.working import Exchange, WorkingMemory
from state_store.checkpoint import Checkpoint
from state_store.client import connect
from state_store.store import StateStore
from tests.cluster_helpers import BOOKING_SCRIPT, call_records

pytestmark = pytest.mark.timeout(180)

WELCOME_BACK = (
    "Welcome back, Alice! Last time we booked a cleaning for Tuesday at 3:00 pm. "
    "How can I help today?"
)
# A booking, a price question, a correction that withdraws the confirmation, a new yes.
CHANGE_SCRIPT = [
    "Hi, my name is Maya",
    "I'd like a cleaning",
    "How much is a cleaning?",
    "Tuesday works",
    "How about 3pm",
    "Yes, book it",
    "What time do you open?",
    "Actually make it Wednesday",
    "Yes",
    "Thanks, that's great",
]


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(
        nodes=2, force_embedded=True, env={"CALLMESH_SIM_LATENCY_SCALE": "0.05"}
    ) as c:
        yield c


async def _call(
    cluster: LocalCluster,
    call_id: str,
    tenant: str,
    caller: str,
    script: list[str],
    *,
    hangup: bool = True,
) -> tuple[str, list[Reply]]:
    async with CallClient(cluster.router_url, call_id) as client:
        await client.start(tenant, caller)
        greeting = await client.wait_greeting()
        replies = [await client.say(line) for line in script]
        if hangup:
            await client.hangup()
        assert client.errors == [] and client.duplicates == 0
    return greeting, replies


async def _checkpoint(cluster: LocalCluster, tenant: str, call_id: str) -> Checkpoint:
    redis = connect(cluster.redis_url)
    try:
        ckpt = await StateStore(redis).load(tenant, call_id)
    finally:
        await redis.aclose()
    assert ckpt is not None
    return ckpt


def rebuild_memory(records: list[dict[str, Any]], working_turns: int = 8) -> MemoryState:
    """What a replayer does with the ``memory`` records (the format the node documents in
    ``CallSession._memory_record``): the memory part of the last checkpoint, exactly."""
    config = MemoryConfig(working_turns=working_turns)
    facts = SessionFacts(config.max_slots)
    working = WorkingMemory(working_turns)
    notes: deque[tuple[int, str]] = deque(maxlen=config.max_notes)
    last_user_turn = 0
    for rec in records:
        if rec["type"] != eventlog.EventType.MEMORY:
            continue
        turn = int(rec["turn"])
        for slot in rec["facts_cleared"]:
            facts.clear(slot)
        for slot, value in rec["facts_set"].items():
            facts.set(slot, value, turn)
        if rec["exchange"]:
            working.add(Exchange(*rec["exchange"]))
        notes.extend((int(t), str(s)) for t, s in rec["notes"])
        if turn >= 1:
            last_user_turn = turn
    extra = {
        "v": STATE_VERSION,
        "notes": [[t, s] for t, s in notes],
        "last_user_turn": last_user_turn,
        "pending_user": None,
    }
    return MemoryState(working.to_state(), facts.to_state(), extra)


def _memory_of(ckpt: Checkpoint) -> MemoryState:
    return MemoryState(ckpt.working, ckpt.facts, ckpt.extra)


# ---------------------------------------------------------------- customer history


async def test_second_call_is_greeted_with_what_the_first_established(
    cluster: LocalCluster,
) -> None:
    script = [line.format(name="Alice") for line in BOOKING_SCRIPT]
    greeting, replies = await _call(cluster, "hist-1", "demo", "cust-42", script)
    assert greeting == STANDARD_GREETING
    assert "booked" in replies[-1].text and "Tuesday" in replies[-1].text

    async with CallClient(cluster.router_url, "hist-2") as client:
        ready = await client.start("demo", "cust-42")
        assert ready["turn"] == 0 and not ready["resumed"]
        assert await client.wait_greeting() == WELCOME_BACK
        # The name is carried into the new session: no need to ask for it again.
        reply = await client.say("I'd like a checkup")
        assert reply.turn == 1 and "Alice" in reply.text and "name" not in reply.text
        secret = client.resume_secret
        # A reconnect resumes the call: no second greeting, the greeting is in its memory.
    async with CallClient(cluster.router_url, "hist-2") as client:
        ready = await client.start("demo", "cust-42", resume=secret)
        assert ready["resumed"] and ready["turn"] == 1
        reply = await client.say("Friday")
        assert reply.turn == 2 and "Alice" in reply.text and client.greeting == ""
        await client.hangup()

    ckpt = await _checkpoint(cluster, "demo", "hist-2")
    assert ckpt.working[0] == [0, "", WELCOME_BACK, False]
    assert ckpt.facts["name"] == ["Alice", 0, None]
    records = await call_records(cluster, "demo", "hist-2")
    turn0 = [r for r in records if r["turn"] == 0]
    assert [r["type"] for r in turn0] == [
        "call_started", "ownership", "agent_reply", "memory", "turn_metrics",
    ]  # fmt: skip
    reply0, memory0 = turn0[2], turn0[3]
    assert reply0["text"] == reply0["heard"] == WELCOME_BACK
    assert memory0["facts_set"] == {"name": "Alice"} and memory0["history"] == ["hist-1"]
    assert turn0[4]["metrics"]["intent"] == "greeting"


async def test_history_never_crosses_tenants_or_callers(cluster: LocalCluster) -> None:
    script = [line.format(name="Alice") for line in BOOKING_SCRIPT]
    await _call(cluster, "iso-1", "demo", "cust-77", script)
    await _call(cluster, "iso-anon-1", "demo", "anonymous", script)
    # The same caller id under another tenant, another caller of the same tenant, and
    # another anonymous caller: none of them is greeted with Alice's booking.
    for call_id, tenant, caller in [
        ("iso-2", "acme", "cust-77"),
        ("iso-3", "demo", "cust-78"),
        ("iso-anon-2", "demo", "anonymous"),
    ]:
        greeting, replies = await _call(cluster, call_id, tenant, caller, ["I'd like a checkup"])
        assert greeting == STANDARD_GREETING, (tenant, caller)
        assert "Alice" not in replies[0].text
        ckpt = await _checkpoint(cluster, tenant, call_id)
        assert "name" not in ckpt.facts
    # And the retrieval side: the other tenant's prompts never carried Alice's history.
    records = await call_records(cluster, "acme", "iso-2")
    retrieval = next(r for r in records if r["type"] == "retrieval")
    assert "iso-1" not in retrieval["snippets"]
    greeting, _ = await _call(cluster, "iso-4", "demo", "cust-77", [])
    assert greeting == WELCOME_BACK


# ---------------------------------------------------------------- knowledge base


async def test_a_price_question_is_answered_from_the_knowledge_base(
    cluster: LocalCluster,
) -> None:
    _, replies = await _call(
        cluster,
        "kb-1",
        "demo",
        "cust-kb",
        ["How much is a cleaning?", "And what does a crown cost?", "When are you open?"],
    )
    assert "$120" in replies[0].text
    assert "$1,100" in replies[1].text
    assert "Opening hours" in replies[2].text or "open" in replies[2].text.lower()
    assert all(r.metrics["retrieval_ms"] > 0 for r in replies)
    assert all(r.metrics["provider_ms"] >= r.metrics["retrieval_ms"] for r in replies)
    records = await call_records(cluster, "demo", "kb-1")
    retrievals = [r for r in records if r["type"] == "retrieval"]
    assert "prices.yaml#0" in retrievals[0]["snippets"]
    assert "knowledge_base" in retrievals[0]["answered"] + retrievals[0]["from_cache"]


# ---------------------------------------------------------------- long call, replay


async def test_long_call_keeps_checkpoint_bounded_and_prompt_flat(cluster: LocalCluster) -> None:
    sizes: dict[int, tuple[int, int]] = {}
    async with CallClient(cluster.router_url, "long-1") as client:
        await client.start("demo", "cust-long")
        await client.wait_greeting()
        for turn in range(1, 61):
            reply = await client.say(CHANGE_SCRIPT[(turn - 1) % len(CHANGE_SCRIPT)])
            assert reply.turn == turn
            if turn in (20, 40, 60):
                ckpt = await _checkpoint(cluster, "demo", "long-1")
                assert ckpt.turn == turn
                memory_part = msgpack.packb([ckpt.working, ckpt.facts, ckpt.extra])
                sizes[turn] = (len(memory_part), len(ckpt.to_bytes()))
        await client.hangup()
    assert all(whole <= 32 * 1024 for _, whole in sizes.values())
    # Same place in the script, 40 turns later: only turn numbers grew a digit or so.
    assert sizes[60][0] <= sizes[20][0] + 64 and sizes[40][0] <= sizes[20][0] + 64

    records = await call_records(cluster, "demo", "long-1")
    tokens = {r["turn"]: r["prompt_tokens"] for r in records if r["type"] == "llm"}
    assert sorted(tokens) == list(range(1, 61))
    assert max(tokens.values()) <= PromptBudget().total
    early = [tokens[t] for t in range(11, 31)]
    late = [tokens[t] for t in range(41, 61)]
    assert max(late) <= max(early) + 40
    assert abs(sum(late) / len(late) - sum(early) / len(early)) <= 0.05 * max(early)

    # The memory records alone rebuild the checkpointed memory, withdrawn confirmations
    # included.
    assert any(r["type"] == "memory" and r["facts_cleared"] for r in records)
    ckpt = await _checkpoint(cluster, "demo", "long-1")
    assert rebuild_memory(records) == _memory_of(ckpt)


# ---------------------------------------------------------------- in process


class DownHistory:
    """A customer history whose Redis is unreachable."""

    async def save(self, record: CallRecord) -> None:
        raise HistoryUnavailable("connection refused")

    async def load(self, tenant: str, caller: str, *, limit: int = 3) -> list[CallRecord]:
        raise HistoryUnavailable("connection refused")


class Harness:
    def __init__(self, services: NodeServices, call_id: str, caller: str) -> None:
        self.services = services
        self.frames: list[dict[str, Any]] = []
        self.seq = 0
        self.session = CallSession(services, "demo", call_id, caller, self._send)

    async def _send(self, frame: str) -> None:
        self.frames.append(json.loads(frame))

    def inbound(self, **body: Any) -> Inbound:
        self.seq += 1
        return parse_inbound(json.dumps({**body, "seq": self.seq}))

    async def say(self, text: str) -> str:
        before = len(self.frames)
        await self.session.handle(self.inbound(type="user_text", text=text))
        return " ".join(f["text"] for f in self.frames[before:] if f["type"] == "agent_text")

    def records(self) -> list[dict[str, Any]]:
        log = subjects.call_events("demo", self.session.call_id)
        return [
            rec
            for e in self.session.outbox
            if e.subject == log
            for rec in eventlog.decode_message(e.data)
        ]


@asynccontextmanager
async def unit_services(redis: Redis, llm: LLM | None = None) -> AsyncIterator[NodeServices]:
    """A node's services on real Redis with no JetStream (the event log stays in the
    outbox, where the tests read it) and providers without latency."""
    latency = SimulatedLatency().scaled(0)
    memory = MemoryServices.build(InMemoryHistoryStore(), working_turns=4)
    svc = NodeServices(
        NodeConfig(working_memory_turns=4),
        StateStore(redis),
        None,
        TurnPipeline(llm or SimulatedLLM(latency), SimulatedTTS(latency), None, Budgets()),
        memory,
    )
    try:
        yield svc
    finally:
        await memory.aclose()


@pytest.fixture
async def services(redis: Redis) -> AsyncIterator[NodeServices]:
    async with unit_services(redis) as svc:
        yield svc


async def test_memory_records_rebuild_the_checkpoint_turn_by_turn(
    services: NodeServices, redis: Redis
) -> None:
    h = Harness(services, "unit-1", "maya")
    try:
        await h.session.open(h.inbound(type="start", tenant="demo", caller="maya"))
        for text in CHANGE_SCRIPT:
            await h.say(text)
            ckpt = await StateStore(redis).load("demo", "unit-1")
            assert ckpt is not None
            assert rebuild_memory(h.records(), working_turns=4) == _memory_of(ckpt)
        records = h.records()
        withdrawn = next(r for r in records if r["type"] == "memory" and r["turn"] == 8)
        assert withdrawn["facts_cleared"] == ["confirmed"]
        assert withdrawn["facts_set"]["date"] == "Wednesday"
        effects = [r for r in records if r["type"] == "effect"]
        assert [e["payload"]["date"] for e in effects] == ["Tuesday", "Wednesday"]
    finally:
        await h.session.aclose()


async def test_a_failed_turn_leaves_memory_as_committed(
    services: NodeServices, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = Harness(services, "unit-2", "maya")
    try:
        await h.session.open(h.inbound(type="start", tenant="demo", caller="maya"))
        await h.say("Hi, my name is Maya")
        before = (h.session.turn, h.session.memory.to_state())

        async def broken(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("bug in the pipeline")

        monkeypatch.setattr(services.pipeline, "run", broken)
        with pytest.raises(RuntimeError):
            await h.say("Actually it's Tuesday, a cleaning")
        assert (h.session.turn, h.session.memory.to_state()) == before
        monkeypatch.undo()
        assert "Maya" in await h.say("I'd like a cleaning")
        assert h.session.turn == 2
    finally:
        await h.session.aclose()


async def test_history_outage_costs_the_greeting_not_the_call(redis: Redis) -> None:
    latency = SimulatedLatency().scaled(0)
    memory = MemoryServices.build(DownHistory(), working_turns=8)
    services = NodeServices(
        NodeConfig(),
        StateStore(redis),
        None,
        TurnPipeline(SimulatedLLM(latency), SimulatedTTS(latency), None, Budgets()),
        memory,
    )
    h = Harness(services, "unit-3", "dora")
    try:
        await h.session.open(h.inbound(type="start", tenant="demo", caller="dora"))
        greeting = [f["text"] for f in h.frames if f["type"] == "agent_text" and f["turn"] == 0]
        assert " ".join(greeting) == STANDARD_GREETING
        assert "Dora" in await h.say("Hi, my name is Dora")
        await h.session.handle(h.inbound(type="hangup"))
        assert h.frames[-1]["type"] == "call_ended"
        assert services.metrics.get("history_load_failures") == 1
        assert services.metrics.get("history_save_failures") == 1
        ckpt = await StateStore(redis).load("demo", "unit-3")
        assert ckpt is not None and ckpt.status == "ended"
    finally:
        await h.session.aclose()
        await memory.aclose()


async def test_an_abandoned_call_whose_final_write_is_fenced_is_dropped_not_ended(
    services: NodeServices,
) -> None:
    """The grace of a detached call ran out on its old owner after a newer owner took it
    (a failover storm): the old owner's final checkpoint meets the fence. It drops the
    call (the newer owner has it) and leaves nothing for the outbox drainer to write; it
    used to fail with an illegal transition, ended to fenced."""
    first = Harness(services, "unit-6", "maya")
    second = Harness(services, "unit-6", "maya")
    try:
        start = {"type": "start", "tenant": "demo", "caller": "maya"}
        await first.session.open(first.inbound(**start))
        first.session.link_ended()
        await second.session.open(second.inbound(**start, resume="failover"))
        with pytest.raises(CallDropped, match="fenced"):
            await first.session.abandon()
        await first.session.aclose()
        assert first.session.leftover is None
        assert "Maya" in await second.say("Hi, my name is Maya")
    finally:
        await first.session.aclose()
        await second.session.aclose()


async def test_a_new_owner_repeats_an_undelivered_greeting_and_does_not_greet_again(
    services: NodeServices, redis: Redis
) -> None:
    first = Harness(services, "unit-4", "maya")
    second = Harness(services, "unit-4", "maya")
    try:
        await first.session.open(first.inbound(type="start", tenant="demo", caller="maya"))
        said = [f for f in first.frames if f["type"] in ("agent_text", "agent_audio")]
        # The first owner dies before the caller got the whole greeting (the router says
        # so with delivered_turn -1); the new owner restores turn 0 and says it again.
        start = {"type": "start", "tenant": "demo", "caller": "maya"}
        await second.session.open(second.inbound(**start, resume="failover", delivered_turn=-1))
        await second.session.reply_said_again()
        ready = next(f for f in second.frames if f["type"] == "ready")
        assert ready["resumed"] and ready["turn"] == 0
        again = [f for f in second.frames if f["type"] in ("agent_text", "agent_audio")]
        assert [(f["turn"], f["n"]) for f in again] == [(f["turn"], f["n"]) for f in said]
        assert [f.get("text") for f in again] == [f.get("text") for f in said]
        metrics = [f for f in second.frames if f["type"] == "turn_metrics"]
        assert [(m["turn"], m["intent"]) for m in metrics] == [(0, "replayed")]
        # Its own records (after those it restored from the outbox): the ownership only.
        restored = len(first.records())
        assert [r["type"] for r in second.records()[restored:]] == ["ownership"]
        assert "Maya" in await second.say("Hi, my name is Maya")
    finally:
        await first.session.aclose()
        await second.session.aclose()


class CountingHistory(InMemoryHistoryStore):
    """The in-memory customer history, counting its reads."""

    def __init__(self) -> None:
        super().__init__()
        self.loads = 0

    async def load(self, tenant: str, caller: str, *, limit: int = 3) -> list[CallRecord]:
        self.loads += 1
        return await super().load(tenant, caller, limit=limit)


async def test_a_call_reads_its_callers_history_once_and_the_next_call_anew(
    redis: Redis,
) -> None:
    latency = SimulatedLatency().scaled(0)
    history = CountingHistory()
    memory = MemoryServices.build(history, working_turns=4)
    services = NodeServices(
        NodeConfig(working_memory_turns=4),
        StateStore(redis),
        None,
        TurnPipeline(SimulatedLLM(latency), SimulatedTTS(latency), None, Budgets()),
        memory,
    )
    first, second = Harness(services, "unit-h1", "hana"), Harness(services, "unit-h2", "hana")
    try:
        await first.session.open(first.inbound(type="start", tenant="demo", caller="hana"))
        for text in ("Hi, my name is Hana", "I'd like a cleaning", "Tuesday works"):
            await first.say(text)
        # The greeting's read and the first turn's; none for the later turns.
        assert history.loads == 2
        await first.session.handle(first.inbound(type="hangup"))

        # Right after: the second call reads what the first one saved at its hang-up,
        # not an answer cached while the first call lived.
        await second.session.open(second.inbound(type="start", tenant="demo", caller="hana"))
        await second.say("Hello again")
        await second.say("What time do you open?")
        assert history.loads == 4
        turns = [r for r in second.records() if r["type"] == "retrieval"]
        assert [("unit-h1" in r["snippets"]) for r in turns] == [True, True]
        assert "customer_history" in turns[0]["answered"]
        assert "customer_history" in turns[1]["from_cache"] and not turns[1]["stale"]
    finally:
        await first.session.aclose()
        await second.session.aclose()
        await memory.aclose()
