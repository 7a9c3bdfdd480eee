"""What a turn changes in the call's memory and what it records, from what it saw and did.

Pure but for the memory they are given: the call core (:mod:`conversation_node.call_core`)
calls these with its memory and keeps the accounting (turn, ``last_seq``) itself; the
records go to the turn's checkpoint (event log through the outbox), the effects to its
outbox. Replay rebuilds the checkpointed memory from these records
(:func:`conversation_node.turn_records.memory_record`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from callmesh.telemetry import TurnMetrics
from conversation_node.booking import BOOKED_FACT, describe_booking
from conversation_node.model_reply import DecidedReply
from conversation_node.pipeline import TurnOutput
from conversation_node.prompt import Greeting
from conversation_node.providers.base import LLMRequest
from conversation_node.sensitive import SENSITIVE_UNCONFIRMED, Refusal
from conversation_node.turn_records import (
    FactOp,
    memory_record,
    prompt_digest,
    retrieval_fallbacks,
    retrieval_record,
)
from events import eventlog
from events.eventlog import EventType
from events.outbox import effect_entry
from memory.prompt import Prompt
from memory.retrieval import RetrievalResult
from memory.session import SessionMemory
from state_store.checkpoint import OutboxEntry

Record = dict[str, Any]

# Tool calls the model may make, and the effect kind each becomes. Those that are
# sensitive (conversation_node.sensitive.READ_BACKS: bookings) become effects only when
# the caller confirmed them.
EFFECT_KINDS = {"create_booking": "booking_create"}


@dataclass(frozen=True)
class UserTurn:
    """A user turn begun: what the caller said and what it changed in memory."""

    turn: int
    seq: int
    text: str
    confidence: float
    ops: list[FactOp]
    intent: str


@dataclass(frozen=True)
class Answer:
    """What an answered turn records, the side effects it queues and its fallbacks."""

    records: list[Record]
    effects: list[OutboxEntry]
    fallbacks: list[str]


@dataclass(frozen=True)
class Reply:
    """What answering a user turn saw and did: retrieval, prompt, the model's output and
    what the caller heard of it."""

    retrieval: RetrievalResult
    retrieval_ms: float
    prompt: Prompt
    request: LLMRequest
    output: TurnOutput
    heard: str
    interrupted: bool
    # Sensitive tool calls refused by the gate, by their index in output.tool_calls, and
    # what the agent said after the model's reply to ask for a confirmation instead.
    refused: dict[int, Refusal] = field(default_factory=dict)
    asked: str = ""
    # The reply was said from a previous owner's decided text: no retrieval, no model.
    resumed: DecidedReply | None = None


def greeting(memory: SessionMemory, g: Greeting) -> list[Record]:
    """Turn 0 of a new call: the name carried over, the greeting as heard."""
    ops: list[FactOp] = [
        (slot, value) for slot, value in g.facts.items() if memory.facts.set(slot, value, 0)
    ]
    memory.observe_agent(0, g.text)
    return [
        eventlog.record(EventType.AGENT_REPLY, 0, text=g.text, heard=g.text, interrupted=False),
        memory_record(memory, 0, ops, history=list(g.from_calls)),
    ]


def greeting_fallbacks(fallbacks: list[str]) -> list[Record]:
    return [eventlog.record(EventType.FALLBACK, 0, kind=f, detail="greeting") for f in fallbacks]


def answer(memory: SessionMemory, tenant: str, call_id: str, t: UserTurn, r: Reply) -> Answer:
    """The model answered: memory takes what was heard and what was booked."""
    turn, output = t.turn, r.output
    ops = list(t.ops)
    effects: list[OutboxEntry] = []
    llm = eventlog.record(
        EventType.LLM,
        turn,
        prompt_digest=prompt_digest(r.prompt.messages),
        prompt_tokens=r.prompt.tokens,
        prompt_truncated=list(r.prompt.truncated),
        state=r.request.facts,
        output=output.text,
        tool_calls=[{"name": c.name, "arguments": c.arguments} for c in output.tool_calls],
        # The model that wrote the reply (provider, model).
        model=list(output.llm),
    )
    records: list[Record] = [
        eventlog.record(EventType.USER_TURN, turn, seq=t.seq, text=t.text, confidence=t.confidence)
    ]
    if r.resumed is None:
        records.append(retrieval_record(turn, r.retrieval, r.retrieval_ms))
    else:
        # Nothing was retrieved and no model asked: the reply is the one the previous
        # owner's model wrote (``model``) before that node was lost.
        llm["resumed"] = {"from": "decided_text", "node": r.resumed.node}
    records.append(llm)
    fallbacks = [*retrieval_fallbacks(r.retrieval), *output.fallbacks]
    for i, call in enumerate(output.tool_calls):
        kind = EFFECT_KINDS.get(call.name)
        if kind is None:
            continue
        refusal = r.refused.get(i)
        if refusal is not None:
            if SENSITIVE_UNCONFIRMED not in fallbacks:
                fallbacks.append(SENSITIVE_UNCONFIRMED)
            records.append(
                eventlog.record(
                    EventType.FALLBACK,
                    turn,
                    kind=SENSITIVE_UNCONFIRMED,
                    detail=f"{call.name}: {refusal.reason}",
                )
            )
            continue
        entry = effect_entry(tenant, call_id, turn, len(effects), kind, call.arguments)
        effects.append(entry)
        records.append(
            eventlog.record(
                EventType.EFFECT, turn, msg_id=entry.msg_id, kind=kind, payload=call.arguments
            )
        )
        booked = describe_booking(call.arguments) if call.name == "create_booking" else None
        if booked is not None and memory.facts.set(BOOKED_FACT, booked, turn):
            ops.append((BOOKED_FACT, booked))
    records += [
        eventlog.record(EventType.FALLBACK, turn, kind=f, detail="")
        for f in fallbacks
        if f != SENSITIVE_UNCONFIRMED
    ]
    memory.observe_agent(turn, r.heard, interrupted=r.interrupted)
    records += [
        eventlog.record(
            EventType.AGENT_REPLY,
            turn,
            text=f"{output.text} {r.asked}" if r.asked else output.text,
            heard=r.heard,
            interrupted=r.interrupted,
        ),
        memory_record(memory, turn, ops),
    ]
    return Answer(records, effects, fallbacks)


def repeat(
    memory: SessionMemory,
    t: UserTurn,
    *,
    line: str,
    heard: str,
    interrupted: bool,
    fallbacks: list[str],
) -> list[Record]:
    """A turn heard with too little confidence: the caller was asked to say it again."""
    memory.observe_agent(t.turn, heard, interrupted=interrupted)
    return [
        eventlog.record(
            EventType.USER_TURN,
            t.turn,
            seq=t.seq,
            text=t.text,
            confidence=t.confidence,
            understood=False,
        ),
        *[eventlog.record(EventType.FALLBACK, t.turn, kind=f, detail="") for f in fallbacks],
        eventlog.record(
            EventType.AGENT_REPLY, t.turn, text=line, heard=heard, interrupted=interrupted
        ),
        memory_record(memory, t.turn, []),
    ]


def closing(
    records: list[Record], metrics: TurnMetrics, turn: int, *, effects_waiting: bool
) -> None:
    """The last records of a turn's checkpoint. ``effects_waiting``: effects of earlier
    turns are still unpublished (the effect sink is down); the call keeps talking."""
    if effects_waiting:
        metrics.fallbacks.append("effects_deferred")
        records.append(
            eventlog.record(EventType.FALLBACK, metrics.turn, kind="effects_deferred", detail="")
        )
    records.append(eventlog.record(EventType.TURN_METRICS, turn, metrics=metrics.to_dict()))


def barge_in(memory: SessionMemory, turn: int, heard: str) -> list[Record] | None:
    """A barge-in after ``turn`` was committed: its memory keeps only what was heard.
    None when that changes nothing."""
    if not memory.amend_heard(turn, heard):
        return None
    return [
        eventlog.record(EventType.BARGE_IN, turn, heard=heard),
        memory_record(memory, turn, []),
    ]
