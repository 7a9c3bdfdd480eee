"""What a turn does between the caller's words and its commit, and the replies said
without the model (the greeting, a committed reply said again after a failover).

A :class:`TurnRunner` composes a turn from memory, retrieval, the prompt and the pipeline;
the call core (:class:`conversation_node.call_core.CallCore`) keeps the accounting and
names what the turn did in event-log records. Its collaborators come in explicitly, each
behind the narrow interface below; the caller (the session, or the voice side for a
spoken turn) holds the turn lock around every method.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from opentelemetry.trace import Span

from callmesh import tracing
from callmesh.metric_names import (
    ENDPOINT_MS_SUM,
    GREETINGS,
    GREETINGS_RETURNING,
    PREEMPTIVE_ADOPTED,
    PREEMPTIVE_CANCELLED,
    PREEMPTIVE_SAVED_MS_SUM,
    PREEMPTIVE_WASTED_TOKENS,
    TURNS_RESPOKEN,
)
from callmesh.protocol import Out, encode
from callmesh.telemetry import TurnMetrics
from conversation_node.call_core import CallCore
from conversation_node.model_reply import PreparedReply
from conversation_node.pipeline import TEXT_MODE, Emit, TurnOutput, Voice
from conversation_node.playback import Playback
from conversation_node.preemptive import Outcome, normalise
from conversation_node.prompt import Greeting, build_request
from conversation_node.providers.base import LLMRequest
from conversation_node.sensitive import Refusal, review
from conversation_node.turn_outcomes import Answer, Record, Reply
from memory.prompt import Prompt, default_counter
from memory.retrieval import RetrievalResult
from memory.session import SessionMemory
from state_store.checkpoint import OutboxEntry

# The per-turn log record keeps the logger it always had: log pipelines select on it.
log = logging.getLogger("callmesh.node.session")

Send = Callable[[str], Awaitable[None]]


class Pipeline(Protocol):
    """Speaks replies (:class:`conversation_node.pipeline.TurnPipeline`)."""

    async def run(
        self,
        request: LLMRequest,
        emit: Emit,
        voice: Voice,
        interrupt: asyncio.Event | None,
        prepared: PreparedReply | None = None,
    ) -> TurnOutput: ...

    def prepare(self, request: LLMRequest) -> PreparedReply: ...

    async def speak(
        self, text: str, emit: Emit, voice: Voice, interrupt: asyncio.Event | None = None
    ) -> TurnOutput: ...


class Retrieval(Protocol):
    """The call's retrieval (:class:`memory.retrieval.CallRetriever`)."""

    async def retrieve(self, final_text: str) -> RetrievalResult: ...


class Prompts(Protocol):
    """Builds a turn's prompt (:class:`memory.prompt.PromptBuilder`)."""

    def build(
        self, memory: SessionMemory, user_text: str, retrieval: RetrievalResult | None = None
    ) -> Prompt: ...


class Durability(Protocol):
    """The call's checkpoint as turns use it (the session, over its checkpointer)."""

    def effects_waiting(self, before_turn: int) -> bool:
        """Effects of turns before this one are still unpublished."""
        ...

    def queue_effects(self, effects: list[OutboxEntry]) -> None:
        """Side effects to publish with the next commit."""
        ...

    async def commit(self, records: list[Record]) -> None:
        """Write the checkpoint with these records (CAS); raises CallDropped if fenced."""
        ...


class Replies(Protocol):
    """Sends replies and follows them as the caller plays them (:class:`replies.Replies`)."""

    def start_reply(self, turn: int) -> tuple[Playback, asyncio.Event]: ...

    async def emit(self, frame: dict[str, Any], bytes_per_ms: float) -> None: ...

    async def heard(self, pb: Playback, said: str, interrupted: bool) -> tuple[str, bool]: ...


class Counters(Protocol):
    """The node's counters (:class:`callmesh.telemetry.Metrics`)."""

    def inc(self, name: str, value: float = 1.0) -> None: ...


@dataclass
class Speculation:
    """A reply started before its turn was confirmed (:meth:`TurnRunner.speculate`): for
    turn ``turn``, on ``retrieval``; ``outcome`` says what became of it."""

    turn: int
    retrieval: RetrievalResult
    reply: PreparedReply
    outcome: Outcome = Outcome.NONE  # not decided yet


def same_request(a: LLMRequest, b: LLMRequest) -> bool:
    """The same model request but for how the caller's words are written (case,
    punctuation, spacing): a reply started on ``a`` is a reply to ``b``."""

    def key(r: LLMRequest) -> LLMRequest:
        said, norm = r.user_text, normalise(r.user_text)
        messages = [
            {k: (v.replace(said, norm) if isinstance(v, str) and said else v) for k, v in m.items()}
            for m in r.messages
        ]
        return replace(r, messages=messages, user_text=norm)

    return key(a) == key(b)


class TurnRunner:
    """Runs one call's turns. ``voice`` is how replies are voiced (text mode until the
    call's start declares audio)."""

    def __init__(
        self,
        core: CallCore,
        *,
        pipeline: Pipeline,
        retrieval: Retrieval,
        prompts: Prompts,
        durability: Durability,
        replies: Replies,
        send: Send,
        counters: Counters,
        observe_turn: Callable[[TurnMetrics], None],
    ) -> None:
        self._core = core
        self._pipeline = pipeline
        self._retrieval = retrieval
        self._prompts = prompts
        self._durability = durability
        self._replies = replies
        self._send = send
        self._counters = counters
        self._observe_turn = observe_turn
        self.voice = TEXT_MODE
        # The call's span on this owner (set by the session; None while tracing is off).
        self.call_span: Span | None = None

    async def emit(self, frame: dict[str, Any]) -> None:
        """Send a frame of the reply being spoken, following it in its playback."""
        await self._replies.emit(frame, self._core.bytes_per_ms)

    # ------------------------------------------------------------------ turns

    async def speculate(self, text: str) -> Speculation:
        """Start the reply to ``text`` before the caller's turn is confirmed (preemptive
        generation): the same retrieval, prompt and request the turn would make, and the
        model running on it. The call is left as it was: no turn begun, no memory changed,
        nothing sent or recorded; only :meth:`user_turn` adopting it makes it a reply."""
        core = self._core
        retrieval = await self._retrieval.retrieve(text)
        # Built as the turn would build it, then undone; nothing awaits in between, so
        # no one else sees the call in this state.
        savepoint = core.savepoint()
        try:
            t = core.begin_user_turn(core.last_seq, text, 1.0)
            prompt = self._prompts.build(core.memory, text, retrieval)
            request = build_request(prompt, text, seed=f"{core.call_id}:{t.turn}")
        finally:
            core.rollback(savepoint)
        return Speculation(t.turn, retrieval, self._pipeline.prepare(request))

    async def drop(self, speculation: Speculation) -> None:
        """Stop a speculative reply; one that was never adopted is counted as cancelled,
        with what it generated for nothing (once, however often it is dropped)."""
        wasted = await speculation.reply.cancel()
        if speculation.outcome is Outcome.NONE:
            speculation.outcome = Outcome.CANCELLED
            self._counters.inc(PREEMPTIVE_CANCELLED)
            self._counters.inc(PREEMPTIVE_WASTED_TOKENS, wasted)

    async def user_turn(
        self,
        seq: int,
        text: str,
        *,
        confidence: float,
        started: float,
        stt_ms: float = 0.0,
        speculation: Speculation | None = None,
        preemptive: Outcome = Outcome.NONE,
        endpoint_ms: float = 0.0,
    ) -> None:
        """One user turn: memory → retrieval → prompt → pipeline, then its commit.
        ``speculation``: a reply started on the same words before the turn was confirmed,
        adopted if the request it was started on is this turn's request; ``preemptive``:
        what became of this utterance's speculation when none is passed (cancelled)."""
        savepoint = self._core.savepoint()
        try:
            answer, metrics, traced = await self._answer(
                seq, text, confidence, started, speculation
            )
        except BaseException:
            self._core.rollback(savepoint)
            if speculation is not None:
                await self.drop(speculation)
            raise
        # Speech-to-text (the endpoint wait included) is provider time too.
        metrics.stt_ms = stt_ms
        metrics.endpoint_ms = endpoint_ms
        if speculation is None:
            metrics.preemptive = preemptive.value
        self._counters.inc(ENDPOINT_MS_SUM, endpoint_ms)
        self._counters.inc(PREEMPTIVE_SAVED_MS_SUM, metrics.preemptive_saved_ms)
        metrics.provider_ms += stt_ms
        metrics.update_overhead()
        self._durability.queue_effects(answer.effects)
        await self._finish(answer.records, metrics, started, **traced)

    async def _answer(
        self,
        seq: int,
        text: str,
        confidence: float,
        started: float,
        speculation: Speculation | None = None,
    ) -> tuple[Answer, TurnMetrics, dict[str, Any]]:
        core = self._core
        t = core.begin_user_turn(seq, text, confidence)
        t0 = time.monotonic()
        if speculation is not None and speculation.turn == t.turn:
            retrieval = speculation.retrieval  # the words are the same (normalised)
        else:
            retrieval = await self._retrieval.retrieve(text)
        retrieval_ms = (time.monotonic() - t0) * 1000
        prompt = self._prompts.build(core.memory, text, retrieval)
        request = build_request(prompt, text, seed=f"{core.call_id}:{t.turn}")
        prepared = None
        if speculation is not None:
            if speculation.turn == t.turn and same_request(speculation.reply.request, request):
                speculation.outcome = Outcome.ADOPTED
                prepared = speculation.reply
                self._counters.inc(PREEMPTIVE_ADOPTED)
            else:
                await self.drop(speculation)
        pb, interrupt = self._replies.start_reply(t.turn)
        output = await self._pipeline.run(request, self.emit, self.voice, interrupt, prepared)
        if prepared is not None:
            await prepared.cancel()  # read to the end unless a barge-in stopped the reply
        refused = self._refusals(output, t.turn, text)
        said, asked, cut = output.text, "", output.interrupted
        if refused and not cut:
            # The model's words are already out; the ask follows them in the same turn.
            asked = " ".join(r.ask() for r in refused.values())
            spoken = await self._pipeline.speak(asked, self.emit, self.voice, interrupt)
            said, cut = f"{output.text} {asked}".strip(), spoken.interrupted
        heard, interrupted = await self._replies.heard(pb, said, cut)
        reply = Reply(
            retrieval, retrieval_ms, prompt, request, output, heard, interrupted, refused, asked
        )
        answer = core.answered(t, reply)
        # Retrieval is on the critical path, like the model's first sentence and the voice.
        provider_ms = retrieval_ms + output.first_sentence_s * 1000 + output.tts_first_chunk_ms
        metrics = TurnMetrics(
            call_id=core.call_id,
            turn=t.turn,
            retrieval_ms=retrieval_ms,
            llm_first_token_ms=output.llm_first_token_ms,
            llm_first_sentence_ms=output.first_sentence_s * 1000,
            tts_first_chunk_ms=output.tts_first_chunk_ms,
            provider_ms=provider_ms,
            intent=t.intent,
            fallbacks=answer.fallbacks,
            interrupted=interrupted,
            node=core.node_id,
            epoch=core.epoch,
        )
        if speculation is not None:
            metrics.preemptive = speculation.outcome.value
            if prepared is not None:
                # The model ran this long before the turn was confirmed.
                metrics.preemptive_saved_ms = max(0.0, (t0 - prepared.started) * 1000)
        metrics.set_latency(started, output.first_audio_at)
        traced: dict[str, Any] = {}
        if self.call_span is not None and self.call_span.is_recording():
            # Counted only for a sampled call: tokenizing is not free.
            out_tokens = default_counter().count(output.text)
            traced["llm"] = tracing.gen_ai_attributes(*output.llm, prompt.tokens, out_tokens)
            if prepared is not None:
                # The model's span is the adopted speculative generation's; a cancelled
                # speculation has none (its cost is in the preemptive counters).
                traced["llm"][tracing.PREEMPTIVE_SAVED_MS] = round(metrics.preemptive_saved_ms, 3)
            traced["sources"] = {name: str(s) for name, s in retrieval.status.items()}
        return answer, metrics, traced

    def _refusals(self, output: TurnOutput, turn: int, said: str) -> dict[int, Refusal]:
        """The model's sensitive tool calls the caller did not confirm (by index), logged."""
        last = self._core.memory.working.last()
        heard_before = last.agent if last is not None and last.turn == turn - 1 else None
        refused: dict[int, Refusal] = {}
        for i, call in enumerate(output.tool_calls):
            refusal = review(call.name, call.arguments, heard_before, said)
            if refusal is not None:
                refused[i] = refusal
                # Names and reasons only: the arguments and the utterance may carry PII.
                log.warning(
                    "sensitive tool call refused",
                    extra={
                        "fields": {
                            "tenant": self._core.tenant,
                            "call_id": self._core.call_id,
                            "turn": turn,
                            "tool": call.name,
                            "reason": refusal.reason,
                        }
                    },
                )
        return refused

    async def repeat_turn(
        self,
        seq: int,
        text: str,
        *,
        line: str,
        confidence: float,
        started: float,
        stt_ms: float,
    ) -> None:
        """Low STT confidence: say ``line`` (asking again), taking nothing from ``text``."""
        core = self._core
        t = core.begin_repeat_turn(seq, text, confidence)
        pb, interrupt = self._replies.start_reply(t.turn)
        output = await self._pipeline.speak(line, self.emit, self.voice, interrupt)
        heard, interrupted = await self._replies.heard(pb, line, output.interrupted)
        fallbacks = ["stt_low_confidence", *output.fallbacks]
        records = core.repeated(
            t, line=line, heard=heard, interrupted=interrupted, fallbacks=fallbacks
        )
        metrics = TurnMetrics(
            call_id=core.call_id,
            turn=t.turn,
            stt_ms=stt_ms,
            tts_first_chunk_ms=output.tts_first_chunk_ms,
            provider_ms=stt_ms + output.tts_first_chunk_ms,
            intent=t.intent,
            fallbacks=fallbacks,
            interrupted=interrupted,
            node=core.node_id,
            epoch=core.epoch,
        )
        metrics.set_latency(started, output.first_audio_at)
        await self._finish(records, metrics, started)

    async def greet(self, greeting: Greeting, started: float, history_ms: float) -> None:
        """Speak the committed greeting, then complete turn 0 like any other turn."""
        core = self._core
        pb, _ = self._replies.start_reply(0)
        output = await self._pipeline.speak(greeting.text, self.emit, self.voice)
        pb.finished_sending = True
        metrics = TurnMetrics(
            call_id=core.call_id,
            turn=0,
            retrieval_ms=history_ms,
            tts_first_chunk_ms=output.tts_first_chunk_ms,
            provider_ms=history_ms + output.tts_first_chunk_ms,
            intent="greeting",
            fallbacks=list(output.fallbacks),
            node=core.node_id,
            epoch=core.epoch,
        )
        metrics.set_latency(started, output.first_audio_at)
        await self._finish(core.greeted(output.fallbacks), metrics, started)
        self._counters.inc(GREETINGS_RETURNING if greeting.returning else GREETINGS)

    async def respeak(self, text: str) -> None:
        """Say the last committed reply again (:meth:`CallCore.reply_to_repeat`), frame for
        frame as the first time; nothing is committed."""
        core = self._core
        pb, _ = self._replies.start_reply(core.turn)
        output = await self._pipeline.speak(text, self.emit, self.voice)
        pb.finished_sending = True
        metrics = TurnMetrics(
            call_id=core.call_id,
            turn=core.turn,
            tts_first_chunk_ms=output.tts_first_chunk_ms,
            intent="replayed",
            fallbacks=output.fallbacks,
            node=core.node_id,
            epoch=core.epoch,
        )
        await self._send(encode({"type": Out.TURN_METRICS.value, **metrics.to_dict()}))
        self._counters.inc(TURNS_RESPOKEN)

    async def amend_heard(self, turn: int, heard: str) -> None:
        """A barge-in after ``turn`` was committed: a small follow-up commit so memory (and
        replay) keep only what was heard."""
        records = self._core.amend_heard(turn, heard)
        if records is not None:
            await self._durability.commit(records)

    async def _finish(
        self,
        records: list[Record],
        metrics: TurnMetrics,
        started: float,
        *,
        llm: dict[str, Any] | None = None,
        sources: dict[str, str] | None = None,
    ) -> None:
        """Commit the turn, then tell the client it is complete (``turn_metrics``)."""
        core = self._core
        effects_waiting = self._durability.effects_waiting(metrics.turn)
        t0 = time.monotonic()
        core.close_turn(records, metrics, effects_waiting=effects_waiting)
        await self._durability.commit(records)
        t1 = time.monotonic()
        metrics.checkpoint_ms = (t1 - t0) * 1000
        tracing.record_turn(
            self.call_span, metrics, started=started, checkpoint=(t0, t1), llm=llm, sources=sources
        )
        fields = metrics.to_dict()
        await self._send(encode({"type": Out.TURN_METRICS.value, "turn": metrics.turn, **fields}))
        self._observe_turn(metrics)
        # The same record in the node's log, for log pipelines (one JSON object per turn).
        log.info("turn", extra={"fields": {"tenant": core.tenant, **fields}})
