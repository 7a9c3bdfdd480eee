"""What a turn does between the caller's words and its commit, and the replies said
without the model (the greeting, a committed reply said again after a failover).

Functions of a :class:`conversation_node.session.CallSession`: the session owns the state
and the lifecycle; these compose a turn from memory, retrieval, the prompt and the pipeline
and name what it did in event-log records.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from callmesh.protocol import Out, encode
from callmesh.telemetry import TurnMetrics
from conversation_node.prompt import BOOKED_FACT, Greeting, build_request, describe_booking
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
from state_store.checkpoint import OutboxEntry

if TYPE_CHECKING:
    from conversation_node.session import CallSession

# Tool calls the model may make, and the effect kind each becomes.
EFFECT_KINDS = {"create_booking": "booking_create"}


async def answer(
    s: CallSession, seq: int, text: str, confidence: float, started: float
) -> tuple[list[dict[str, Any]], TurnMetrics, list[OutboxEntry]]:
    """One user turn up to its commit: memory → retrieval → prompt → pipeline."""
    s.turn += 1
    turn = s.turn
    mem = s.memory
    update = mem.observe_user(turn, text)
    ops: list[FactOp] = [(c.slot, c.value) for c in update.changes]
    t0 = time.monotonic()
    retrieval = await s._retriever.retrieve(text)
    retrieval_ms = (time.monotonic() - t0) * 1000
    prompt = s._svc.memory.prompts.build(mem, text, retrieval)
    request = build_request(prompt, text, seed=f"{s.call_id}:{turn}")
    pb, interrupt = s.vt.start_reply(turn)
    output = await s._svc.pipeline.run(request, s._emit, s.voice, interrupt)
    heard, interrupted = s.vt.heard(pb, output.text, output.interrupted)
    effects: list[OutboxEntry] = []
    records: list[dict[str, Any]] = [
        eventlog.record(EventType.USER_TURN, turn, seq=seq, text=text, confidence=confidence),
        retrieval_record(turn, retrieval, retrieval_ms),
        eventlog.record(
            EventType.LLM,
            turn,
            prompt_digest=prompt_digest(prompt.messages),
            prompt_tokens=prompt.tokens,
            prompt_truncated=list(prompt.truncated),
            state=request.facts,
            output=output.text,
            tool_calls=[{"name": c.name, "arguments": c.arguments} for c in output.tool_calls],
        ),
    ]
    for call in output.tool_calls:
        kind = EFFECT_KINDS.get(call.name)
        if kind is None:
            continue
        entry = effect_entry(s.tenant, s.call_id, turn, len(effects), kind, call.arguments)
        effects.append(entry)
        records.append(
            eventlog.record(
                EventType.EFFECT, turn, msg_id=entry.msg_id, kind=kind, payload=call.arguments
            )
        )
        booked = describe_booking(call.arguments) if call.name == "create_booking" else None
        if booked is not None and mem.facts.set(BOOKED_FACT, booked, turn):
            ops.append((BOOKED_FACT, booked))
    fallbacks = [*retrieval_fallbacks(retrieval), *output.fallbacks]
    records += [eventlog.record(EventType.FALLBACK, turn, kind=f, detail="") for f in fallbacks]
    mem.observe_agent(turn, heard, interrupted=interrupted)
    # Retrieval is on the critical path, like the model's first sentence and the voice.
    provider_ms = retrieval_ms + output.first_sentence_s * 1000 + output.tts_first_chunk_ms
    metrics = TurnMetrics(
        call_id=s.call_id,
        turn=turn,
        retrieval_ms=retrieval_ms,
        llm_first_token_ms=output.llm_first_token_ms,
        tts_first_chunk_ms=output.tts_first_chunk_ms,
        provider_ms=provider_ms,
        intent=update.intent,
        fallbacks=fallbacks,
        interrupted=interrupted,
        node=s._svc.node_id,
        epoch=s.epoch,
    )
    metrics.set_latency(started, output.first_audio_at)
    records += [
        eventlog.record(
            EventType.AGENT_REPLY, turn, text=output.text, heard=heard, interrupted=interrupted
        ),
        memory_record(mem, turn, ops),
    ]
    s.last_seq = max(s.last_seq, seq)
    return records, metrics, effects


async def greet(s: CallSession, greeting: Greeting, started: float, history_ms: float) -> None:
    """Speak the committed greeting, then complete turn 0 like any other turn."""
    async with s._turn_lock:
        pb, _ = s.vt.start_reply(0)
        output = await s._svc.pipeline.speak(greeting.text, s._emit, s.voice)
        pb.finished_sending = True
        metrics = TurnMetrics(
            call_id=s.call_id,
            turn=0,
            retrieval_ms=history_ms,
            tts_first_chunk_ms=output.tts_first_chunk_ms,
            provider_ms=history_ms + output.tts_first_chunk_ms,
            intent="greeting",
            fallbacks=list(output.fallbacks),
            node=s._svc.node_id,
            epoch=s.epoch,
        )
        metrics.set_latency(started, output.first_audio_at)
        records = [
            eventlog.record(EventType.FALLBACK, 0, kind=f, detail="greeting")
            for f in output.fallbacks
        ]
        await s._finish_turn(records, metrics)
    s._svc.metrics.inc("greetings_returning" if greeting.returning else "greetings")


async def respeak_last_turn(s: CallSession) -> None:
    """The previous owner committed this turn but the caller never got all of it (it
    died between its checkpoint and the end of the reply): say it again. The router
    drops the frames the caller already heard, by ``(turn, n)``."""
    last = s.memory.working.last()
    if last is None or last.turn != s.turn:
        return
    async with s._turn_lock:
        pb, _ = s.vt.start_reply(s.turn)
        output = await s._svc.pipeline.speak(last.agent, s._emit, s.voice)
        pb.finished_sending = True
        metrics = TurnMetrics(
            call_id=s.call_id,
            turn=s.turn,
            tts_first_chunk_ms=output.tts_first_chunk_ms,
            intent="replayed",
            fallbacks=output.fallbacks,
            node=s._svc.node_id,
            epoch=s.epoch,
        )
        await s._out(encode({"type": Out.TURN_METRICS.value, **metrics.to_dict()}))
    s._svc.metrics.inc("turns_respoken")
