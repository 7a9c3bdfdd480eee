"""A reply under way survives its node as decided text (architecture invariant 5): once the
owner's model has written a turn's whole reply, the owner tells the router (``decided``);
a new owner re-answering that same turn says that text without retrieval or the model,
frame for frame, so the router's de-duplication lets the caller hear it go on.

In process: a CallSession against the real Redis of the test session (the end-to-end case
with a killed node is in tests/test_failover.py)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from callmesh.config import SimulatedLatency
from callmesh.protocol import MAX_DECIDED_TEXT_BYTES, parse_inbound
from conversation_node.node_services import NodeServices
from conversation_node.providers.base import LLMDelta, LLMRequest
from conversation_node.providers.simulated import SimulatedLLM
from memory.retrieval import CallRetriever, RetrievalResult
from state_store.store import StateStore
from tests.test_node_memory import Harness, unit_services

pytestmark = pytest.mark.timeout(60)

# As a router sends it (router.call_auth.sanitized_start).
START = {"type": "start", "tenant": "demo", "caller": "maya", "takes_decided": True}
REPLY_FRAMES = ("agent_text", "agent_audio")


class ScriptedLLM:
    """The simulated model, counting its requests; once ``forbidden``, a request fails
    the test (a decided reply must be said without it)."""

    name = "simulated-llm"

    def __init__(self) -> None:
        self._model = SimulatedLLM(SimulatedLatency().scaled(0))
        self.calls = 0
        self.forbidden = False

    def stream(self, request: LLMRequest) -> AsyncIterator[LLMDelta]:
        self.calls += 1
        if self.forbidden:
            pytest.fail(f"the model was asked for turn {request.seed}")
        return self._model.stream(request)


@pytest.fixture
def llm() -> ScriptedLLM:
    return ScriptedLLM()


@pytest.fixture
async def services(redis: Redis, llm: ScriptedLLM) -> AsyncIterator[NodeServices]:
    async with unit_services(redis, llm) as svc:
        yield svc


def _said(frames: list[dict[str, Any]], turn: int) -> list[tuple[Any, ...]]:
    return [
        (f["type"], f["n"], f.get("text"), f.get("data"))
        for f in frames
        if f["type"] in REPLY_FRAMES and f["turn"] == turn
    ]


def _agent(h: Harness, turn: int) -> str:
    """What the agent said in ``turn``, as its record says."""
    return next(r["text"] for r in h.records() if r["type"] == "agent_reply" and r["turn"] == turn)


def _decided(frames: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {f["turn"]: f for f in frames if f["type"] == "decided"}


async def _reference(services: NodeServices) -> Harness:
    """A call whose turn 2 is answered by the model, as the lost owner answered it."""
    ref = Harness(services, "decided-ref", "maya")
    await ref.session.open(ref.inbound(**START))
    await ref.say("Hi, my name is Maya")
    await ref.say("I'd like a cleaning")
    return ref


async def _resumed(services: NodeServices, call_id: str, decided: dict[str, Any]) -> Harness:
    """A call whose owner committed turn 1 and was lost while answering turn 2 (the
    router's replay is that turn's utterance, ``seq`` 3): its new owner, opened with
    the router's resume ``start`` carrying ``decided``."""
    first = Harness(services, call_id, "maya")
    await first.session.open(first.inbound(**START))
    await first.say("Hi, my name is Maya")
    await first.session.aclose()
    second = Harness(services, call_id, "maya")
    # The router re-sends the call's original start (seq 1), then the unacked frames.
    start = {**START, "seq": 1, "resume": "failover", "delivered_turn": 1, "decided": decided}
    await second.session.open(parse_inbound(json.dumps(start)))
    second.seq = first.seq
    return second


async def test_the_owner_tells_the_router_each_reply_once_the_model_wrote_it(
    services: NodeServices,
) -> None:
    h = Harness(services, "decided-1", "maya")
    try:
        await h.session.open(h.inbound(**START))
        for text in ["Hi, my name is Maya", "I'd like a cleaning", "Tuesday", "3pm"]:
            await h.say(text)
        await h.say("Yes, book it")  # the model books: a tool call, not decided
        decided = _decided(h.frames)
        assert sorted(decided) == [1, 2, 3, 4]
        for turn, frame in decided.items():
            sentences = [f[2] for f in _said(h.frames, turn) if f[0] == "agent_text"]
            assert frame["text"] == _agent(h, turn) == " ".join(sentences)  # told whole
            assert frame["seq"] == turn + 1 and frame["node"] == h.session.core.node_id
            assert frame["llm"] == ["simulated-llm", "simulated-llm"]
            # Told before the turn ends (its metrics follow its checkpoint).
            ends = next(
                i
                for i, f in enumerate(h.frames)
                if f["type"] == "turn_metrics" and f["turn"] == turn
            )
            assert h.frames.index(frame) < ends
        records = [r for r in h.records() if r["type"] == "llm" and r["turn"] == 5]
        assert records[0]["tool_calls"] and "resumed" not in records[0]
    finally:
        await h.session.aclose()


async def test_no_decided_reply_goes_to_a_router_that_does_not_take_them(
    services: NodeServices,
) -> None:
    # An older router (a rolling update) would forward an unknown frame to the caller.
    h = Harness(services, "decided-old-router", "maya")
    try:
        await h.session.open(h.inbound(**{**START, "takes_decided": False}))
        assert "Maya" in await h.say("Hi, my name is Maya")
        assert _decided(h.frames) == {}
    finally:
        await h.session.aclose()


async def test_a_new_owner_says_the_decided_reply_without_retrieval_or_the_model(
    services: NodeServices, llm: ScriptedLLM, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = await _reference(services)
    decided = {k: v for k, v in _decided(ref.frames)[2].items() if k != "type"}
    second = await _resumed(services, "decided-2", {**decided, "node": "node-lost"})
    try:

        async def no_retrieval(self: CallRetriever, text: str) -> RetrievalResult:
            pytest.fail("retrieval was asked for a decided reply")

        monkeypatch.setattr(CallRetriever, "retrieve", no_retrieval)
        llm.forbidden = True
        said = await second.say("I'd like a cleaning")
        assert said == " ".join(f[2] for f in _said(ref.frames, 2) if f[0] == "agent_text")
        # Frame for frame what the lost owner was saying: the router drops what the
        # caller has and sends the rest.
        assert _said(second.frames, 2) == _said(ref.frames, 2)
        metrics = next(f for f in second.frames if f["type"] == "turn_metrics" and f["turn"] == 2)
        assert metrics["retrieval_ms"] == 0
        assert services.metrics.get("decided_replies_resumed") == 1
        # Committed like any answer; the record names the model that wrote it and says
        # the reply was resumed.
        ckpt = await StateStore(redis).load("demo", "decided-2")
        assert ckpt is not None and ckpt.turn == 2
        assert _agent(second, 2) == decided["text"]
        turn2 = [r for r in second.records() if r["turn"] == 2]
        assert "retrieval" not in [r["type"] for r in turn2]
        llm_record = next(r for r in turn2 if r["type"] == "llm")
        assert llm_record["output"] == decided["text"]
        assert llm_record["model"] == ["simulated-llm", "simulated-llm"]
        assert llm_record["resumed"] == {"from": "decided_text", "node": "node-lost"}
        # The next turn is the model's again.
        llm.forbidden = False
        monkeypatch.undo()
        assert "Maya" in await second.say("Tuesday")
    finally:
        await ref.session.aclose()
        await second.session.aclose()


@pytest.mark.parametrize(
    "other",
    [
        {"turn": 3},  # not the turn in flight
        {"seq": 9},  # not the utterance the new owner answers
        {"text": "x" * (MAX_DECIDED_TEXT_BYTES + 1)},
        {"llm": "simulated-llm"},
    ],
)
async def test_a_decided_text_for_another_turn_or_malformed_is_ignored(
    services: NodeServices, llm: ScriptedLLM, other: dict[str, Any]
) -> None:
    ref = await _reference(services)
    decided = {k: v for k, v in _decided(ref.frames)[2].items() if k != "type"}
    second = await _resumed(services, "decided-3", {**decided, "text": "Not this.", **other})
    try:
        before = llm.calls
        await second.say("I'd like a cleaning")
        assert llm.calls == before + 1  # answered by the model
        assert _said(second.frames, 2) == _said(ref.frames, 2)
        assert services.metrics.get("decided_replies_resumed") == 0
        assert not any(r.get("resumed") for r in second.records())
    finally:
        await ref.session.aclose()
        await second.session.aclose()
