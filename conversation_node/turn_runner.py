"""What a turn does between the caller's words and its commit (the replies said without
the model are :mod:`conversation_node.said_replies`).

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
from collections.abc import Callable
from typing import Any, Protocol

from opentelemetry.trace import Span

from callmesh import tracing
from callmesh.metric_names import (
    DECIDED_REPLIES_RESUMED,
    ENDPOINT_MS_SUM,
    PREEMPTIVE_ADOPTED,
    PREEMPTIVE_CANCELLED,
    PREEMPTIVE_SAVED_MS_SUM,
    PREEMPTIVE_WASTED_TOKENS,
)
from callmesh.telemetry import TurnMetrics
from conversation_node.call_core import CallCore
from conversation_node.model_reply import DecidedReply, PreparedReply
from conversation_node.pipeline import Emit, TurnOutput, Voice, Written
from conversation_node.preemptive import Outcome
from conversation_node.prompt import build_request
from conversation_node.providers.base import LLMRequest
from conversation_node.said_replies import Replies, SaidReplies
from conversation_node.sensitive import Refusal, review
from conversation_node.speculations import Speculation, same_request
from conversation_node.turn_close import Counters, Durability, Send, TurnCloser
from conversation_node.turn_outcomes import Answer, Reply, UserTurn
from memory.prompt import Prompt, default_counter
from memory.retrieval import RetrievalResult
from memory.session import SessionMemory

# Refused tool calls are logged where turns always were: log pipelines select on it.
log = logging.getLogger("callmesh.node.session")


class Pipeline(Protocol):
    """Speaks replies (:class:`conversation_node.pipeline.TurnPipeline`)."""

    async def run(
        self,
        request: LLMRequest,
        emit: Emit,
        voice: Voice,
        interrupt: asyncio.Event | None,
        prepared: PreparedReply | None = None,
        *,
        decided: DecidedReply | None = None,
        written: Written | None = None,
    ) -> TurnOutput: ...

    def prepare(self, request: LLMRequest, *, voice: bool = False) -> PreparedReply: ...

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


class TurnRunner:
    """Runs one call's turns; ``said`` says its replies decided without the model.
    ``prepare_voice``: a speculative reply voices its first sentence ahead too."""

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
        prepare_voice: bool = False,
    ) -> None:
        self._core = core
        self._pipeline = pipeline
        self._retrieval = retrieval
        self._prompts = prompts
        self._durability = durability
        self._replies = replies
        self._counters = counters
        self._send = send
        self._prepare_voice = prepare_voice
        # The reply a previous owner's model wrote for the turn in flight (the resume
        # ``start``'s ``decided``): said instead of asking the model, if the first turn
        # begun here is that turn; forgotten either way.
        self.decided: DecidedReply | None = None
        # Whether the router takes ``decided`` frames (its start says so).
        self.announce_decided = False
        self._closer = TurnCloser(core, durability=durability, send=send, observe_turn=observe_turn)
        self.said = SaidReplies(
            core,
            speaker=pipeline,
            replies=replies,
            closer=self._closer,
            send=send,
            counters=counters,
        )

    @property
    def call_span(self) -> Span | None:
        """The call's span on this owner (set by the session; None while tracing is off)."""
        return self._closer.call_span

    @call_span.setter
    def call_span(self, span: Span | None) -> None:
        self._closer.call_span = span

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
        prepared = self._pipeline.prepare(request, voice=self._prepare_voice)
        return Speculation(t.turn, retrieval, prepared)

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
        await self._closer.finish(answer.records, metrics, started, **traced)

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
        decided, self.decided = self.decided, None
        if decided is not None and not decided.answers(t.turn, t.seq):
            decided = None  # another turn's: this one is answered by the model
        t0 = time.monotonic()
        if decided is not None:
            retrieval = RetrievalResult(text, (), {}, 0.0)  # the reply is written already
        elif speculation is not None and speculation.turn == t.turn:
            retrieval = speculation.retrieval  # the words are the same (normalised)
        else:
            retrieval = await self._retrieval.retrieve(text)
        retrieval_ms = 0.0 if decided is not None else (time.monotonic() - t0) * 1000
        prompt = self._prompts.build(core.memory, text, retrieval)
        request = build_request(prompt, text, seed=f"{core.call_id}:{t.turn}")
        prepared = None
        if speculation is not None:
            if (
                decided is None
                and speculation.turn == t.turn
                and same_request(speculation.reply.request, request)
            ):
                speculation.outcome = Outcome.ADOPTED
                prepared = speculation.reply
                self._counters.inc(PREEMPTIVE_ADOPTED)
            else:
                await self.drop(speculation)
        pb, interrupt = self._replies.start_reply(t.turn)
        if decided is not None:
            self._counters.inc(DECIDED_REPLIES_RESUMED)
            log.info(
                "reply resumed from its decided text",
                extra={"fields": {"call_id": core.call_id, "turn": t.turn, "from": decided.node}},
            )
        output = await self._pipeline.run(
            request,
            self.said.emit,
            self.said.voice,
            interrupt,
            prepared,
            decided=decided,
            written=self._announcer(t) if decided is None and self.announce_decided else None,
        )
        if prepared is not None:
            await prepared.cancel()  # read to the end unless a barge-in stopped the reply
        refused = self._refusals(output, t.turn, text)
        said, asked, cut = output.text, "", output.interrupted
        if refused and not cut:
            # The model's words are already out; the ask follows them in the same turn.
            asked = " ".join(r.ask() for r in refused.values())
            spoken = await self._pipeline.speak(asked, self.said.emit, self.said.voice, interrupt)
            said, cut = f"{output.text} {asked}".strip(), spoken.interrupted
        heard, interrupted = await self._replies.heard(pb, said, cut)
        reply = Reply(
            retrieval,
            retrieval_ms,
            prompt,
            request,
            output,
            heard,
            interrupted,
            refused,
            asked,
            resumed=decided,
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

    def _announcer(self, t: UserTurn) -> Written:
        """Tells the router the reply of ``t`` once the model has written all of it, so a
        new owner can say it if this node is lost before the turn's checkpoint. A reply
        with tool calls, or one the model did not finish (a fallback), is not decided:
        a new owner answers such a turn again."""

        async def written(output: TurnOutput) -> None:
            if output.tool_calls or output.fallbacks:
                return
            frame = self._core.decided(t, output.text, output.llm)
            if frame is not None:
                await self._send(frame)

        return written

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

    async def amend_heard(self, turn: int, heard: str) -> None:
        """A barge-in after ``turn`` was committed: a small follow-up commit so memory (and
        replay) keep only what was heard."""
        records = self._core.amend_heard(turn, heard)
        if records is not None:
            await self._durability.commit(records)
