"""A live call on its owner node: ownership, restore, greeting, turns, memory, hand-off.

The session is the I/O shell of a call: its link to the router, its turn lock, its tasks,
and the wiring of the parts that decide. State changes are synchronous and guarded, in the
call core (:mod:`conversation_node.call_core`, no I/O); a turn is run by
:mod:`conversation_node.turn_runner`, and a call's audio turn-taking by
:mod:`conversation_node.voice_turns`; each gets its collaborators explicitly.

Every turn ends in one compare-and-set checkpoint that also records the turn's side
effects and event-log records (:mod:`conversation_node.checkpointing`); only after it
succeeds is the router told (``ack``). If a newer owner fenced us out, the call is dropped.

A turn starts from a ``user_text`` frame (text mode) or from the end of an utterance in the
call's audio (:mod:`conversation_node.voice`, :mod:`conversation_node.voice_turns`).

Memory: a :class:`memory.session.SessionMemory` per call, restored from the checkpoint and
written back into it every turn; every turn's ``memory`` event-log record says exactly
what the turn changed in it (:func:`conversation_node.turn_records.memory_record`), so
replay can rebuild the checkpointed memory from the log. A new call is greeted (turn 0)
with what the caller's earlier calls established; at hang-up the call's facts and summary
go to the customer history for the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from opentelemetry.trace import Span

from callmesh import tracing
from callmesh.metric_names import (
    CALLS_ABANDONED,
    CALLS_ENDED,
    CALLS_HANDED_OFF,
    CALLS_RESUMED,
    CALLS_STARTED,
)
from callmesh.protocol import TAKES_DECIDED, In, Inbound
from callmesh.telemetry import now_ms
from callmesh.weak_callbacks import weak_method
from conversation_node.audio.convert import Transcoder
from conversation_node.call_core import CallCore, CallState, IllegalTransition, Step
from conversation_node.call_durability import CallDurability
from conversation_node.errors import CallDropped
from conversation_node.greeting import load_history, save_history
from conversation_node.link_end import LinkEnd
from conversation_node.model_reply import DecidedReply
from conversation_node.node_services import NodeServices
from conversation_node.pipeline import Voice
from conversation_node.prompt import Greeting, greeting_for
from conversation_node.replies import Replies
from conversation_node.turn_close import Send
from conversation_node.turn_outcomes import Record
from conversation_node.turn_runner import TurnRunner
from conversation_node.voice import AudioFormat
from conversation_node.voice_turns import VoiceTurns
from memory.session import SessionMemory
from memory.sources import Query
from state_store.checkpoint import Checkpoint, OutboxEntry
from state_store.errors import StoreUnavailable

log = logging.getLogger("callmesh.node.session")

__all__ = ["CallDropped", "CallSession", "CallState", "IllegalTransition"]

# Why a router moved a call here (router.proxy); anything else a client sends in ``resume``
# (a resume secret, per the protocol) is a reconnect and never becomes a label or attribute.
_RELINK_REASONS = frozenset({"failover", "handoff", "reconnect"})


def _resume_reason(start: Inbound) -> str:
    reason = start.body.get("resume")
    return reason if isinstance(reason, str) and reason in _RELINK_REASONS else "reconnect"


class CallSession:
    """One live call: the I/O around its :class:`CallCore` (link, turn lock, tasks,
    checkpoint writes). ``open`` once, ``handle`` each inbound frame, ``aclose`` at the end."""

    def __init__(
        self, services: NodeServices, tenant: str, call_id: str, caller: str, send: Send
    ) -> None:
        self._svc = services
        self._send = send
        self.core = CallCore(
            tenant,
            call_id,
            caller,
            node_id=services.node_id,
            memory_config=services.memory.config,
            created_ms=now_ms(),
        )
        # The parts call back into the session through weak references: bound methods
        # would make the call a web of reference cycles (callmesh.weak_callbacks).
        out = weak_method(self._out)
        # Queries go through the core's memory, which a restore replaces.
        self._retriever = services.memory.retrieval.for_call(weak_method(self._query_for))
        self._turn_lock = asyncio.Lock()
        self.durable = CallDurability(
            services, self.core, acknowledge=weak_method(self._ack), turn_lock=self._turn_lock
        )
        self.ckpt = self.durable.ckpt
        self._link_lost = False
        # A committed reply said again after a resume (open), under the turn lock.
        self._respeaking: asyncio.Task[None] | None = None
        # Set by aclose for an ended call whose final checkpoint is unsaved or outbox
        # unpublished (saved?): the node's drainer takes it over (conversation_node.outbox_drain).
        self.leftover: tuple[Checkpoint, bool] | None = None
        # The call's span on this owner.
        self._span: Span | None = None
        config = services.config
        # Clearing at the caller's first sound keeps the unheard rest of a reply, to resume it.
        clear_at_sound = config.barge_in_clear == "at_sound"
        replies = Replies(out, retain=clear_at_sound and config.false_interruption_ms > 0)
        self.turns = TurnRunner(
            self.core,
            pipeline=services.pipeline,
            retrieval=self._retriever,
            prompts=services.memory.prompts,
            durability=self.durable,
            replies=replies,
            send=out,
            counters=services.metrics,
            observe_turn=services.observe_turn,
            prepare_voice=config.preemptive_voice == "on",
        )
        self.vt = VoiceTurns(
            self.core,
            replies,
            self.turns,
            self.turns.said,
            stt=services.stt,
            turn_lock=self._turn_lock,
            send=out,
            counters=services.metrics,
            observe_lag=services.observe_frame_lag,
            prefetch=weak_method(self._prefetch),
            min_confidence=config.stt_min_confidence,
            false_interruption_ms=config.false_interruption_ms,
            clear_at_sound=clear_at_sound,
        )
        # What becomes of the last utterance when the link ends without a hangup.
        self.link_end = LinkEnd(self.core, self.vt, self._turn_lock)

    def __repr__(self) -> str:
        core = self.core
        return (
            f"<CallSession {core.tenant}/{core.call_id} [{core.state}] epoch={core.epoch} "
            f"turn={core.turn} seq={core.last_seq} {self.ckpt!r}>"
        )

    @property
    def tenant(self) -> str:
        return self.core.tenant

    @property
    def call_id(self) -> str:
        return self.core.call_id

    @property
    def state(self) -> CallState:
        return self.core.state

    @property
    def turn(self) -> int:
        return self.core.turn

    @property
    def memory(self) -> SessionMemory:
        return self.core.memory

    @property
    def unsaved(self) -> bool:
        return self.ckpt.dirty

    @property
    def outbox(self) -> list[OutboxEntry]:
        return self.ckpt.outbox

    async def _out(self, frame: str) -> None:
        """Send to the router. A lost link does not abort the turn: the turn still tries
        to commit, so a stale owner always meets the fence, and a legitimate one keeps its
        work (the next owner re-speaks a committed reply the caller did not get)."""
        if self._link_lost:
            return
        try:
            await self._send(frame)
        except (ConnectionError, RuntimeError):
            self._link_lost = True

    async def _ack(self) -> None:
        await self._out(self.core.ack())

    # ------------------------------------------------------------------ lifecycle

    async def open(self, start: Inbound, heard_turn: int | None = None) -> None:
        """Take ownership (epoch + 1), restore the last checkpoint, log the ownership. A new
        call is greeted (turn 0); a resumed one is not, but a committed reply the caller
        did not fully receive is said again: the last turn the caller received is the
        start's ``delivered_turn`` (a native client knows it), else ``heard_turn`` (what the
        session this link replaces on this node saw of its marks: a Twilio stream)."""
        started = time.monotonic()
        core = self.core
        if "audio" in start.body:
            fmt = AudioFormat.from_start(start.body)
            core.audio_format = fmt
            self.turns.said.voice = Voice(Transcoder(fmt.encoding, fmt.sample_rate), marks=True)
        # Decided replies go only to a router that keeps them (never to the caller).
        self.turns.announce_decided = start.body.get(TAKES_DECIDED) is True
        epoch, ckpt = await self._svc.store.take_ownership(
            core.tenant, core.call_id, self._svc.node_id
        )
        opening = core.owned(
            start, epoch, ckpt, working_memory_turns=self._svc.config.working_memory_turns
        )
        resume = _resume_reason(start) if opening.resumed else ""
        self._start_span(resume, ckpt.trace if ckpt is not None else "")
        if opening.refusal is not None:
            await self._out(opening.refusal)
            raise CallDropped("call already ended")
        records = opening.records
        greeting: Greeting | None = None
        history_ms = 0.0
        if ckpt is not None:
            # Whatever the previous owner committed but JetStream never acknowledged.
            self.ckpt.restore(ckpt.outbox, ckpt.event_cursor)
        else:
            t0 = time.monotonic()
            history = await load_history(self._svc, core.tenant, core.caller, core.call_id)
            greeting = greeting_for(history)
            history_ms = (time.monotonic() - t0) * 1000
            records += core.greet(greeting)
        core.to(CallState.ACTIVE)
        await self.durable.commit(records)
        await self._out(core.ready(resumed=opening.resumed))
        if opening.resumed:
            self._svc.metrics.inc(CALLS_RESUMED, reason=resume)
        else:
            self._svc.metrics.inc(CALLS_STARTED)
        if greeting is not None:
            async with self._turn_lock:
                await self.turns.said.greet(greeting, started, history_ms)
            return
        decided = DecidedReply.from_start(start.body.get("decided"))
        if decided is not None and decided.turn == core.turn + 1:
            # The previous owner's model had written the reply of the turn in flight: the
            # replayed frames begin that turn again, and it is said as written.
            self.turns.decided = decided
        delivered = start.body.get("delivered_turn")
        again = core.reply_to_repeat(delivered if isinstance(delivered, int) else heard_turn)
        if again is not None:
            # Said while this link's frames are read, so the caller can talk over it; the
            # turn lock, taken here, keeps the next turn's reply after it.
            # (Released when the task is done, even one cancelled before it ran.)
            await self._turn_lock.acquire()
            self._respeaking = asyncio.get_running_loop().create_task(
                self._respeak(again), name=f"respeak:{self.call_id}"
            )
            self._respeaking.add_done_callback(lambda _: self._turn_lock.release())

    async def _respeak(self, text: str) -> None:
        try:
            await self.turns.said.respeak(text)
        except CallDropped:
            pass  # fenced: the next frame finds the session dropped
        except Exception:
            # As a turn's: a bug in saying it must not take the call down.
            log.exception("reply said again failed", extra={"fields": {"call_id": self.call_id}})

    async def reply_said_again(self) -> None:
        """Until the committed reply said again by :meth:`open` (if any) is out."""
        if self._respeaking is not None and not self._respeaking.done():
            await asyncio.wait({self._respeaking})

    async def handle(self, msg: Inbound) -> None:
        """Apply one inbound frame (:meth:`CallCore.receive` says how; a replayed one is
        skipped). Audio, marks and keys never wait for a turn: the caller must be able to
        interrupt."""
        if self._link_lost:
            raise CallDropped("router link lost")
        step = self.core.receive(msg)
        if step is Step.AUDIO:
            await self.vt.on_audio(msg)
        elif step is Step.MARK:
            self.vt.on_mark(str(msg.body["name"]))
        elif step is Step.DTMF:
            await self.vt.on_dtmf(msg)
        elif step is not Step.SKIP:
            if step is Step.HANGUP:
                await self.vt.stop_turn()
            async with self._turn_lock:
                await self._apply(step, msg)
        if self._link_lost:
            raise CallDropped("router link lost")
        if self.core.state is CallState.FENCED:
            raise CallDropped("fenced out")

    def handle_audio_now(self, msg: Inbound) -> bool:
        """:meth:`handle` for an ``audio`` frame it would apply without waiting (the
        recognizer takes audio at once, no acknowledgement is due): True once applied.
        False, having changed nothing, for any other frame or case; the frame then goes
        through :meth:`handle` as usual."""
        # 50 frames a second per call: the core's checks inline, no call, no allocation.
        core = self.core
        if msg.type is not In.AUDIO or not core.active or self._link_lost:
            return False
        return msg.seq > core.last_seq and self.vt.on_audio_now(msg)

    async def _apply(self, step: Step, msg: Inbound) -> None:
        if step is Step.USER_TEXT:
            await self.turns.user_turn(
                msg.seq, str(msg.body["text"]).strip(), confidence=1.0, started=time.monotonic()
            )
        elif step is Step.HANGUP:
            await self._hangup(msg.seq)
        elif step is Step.REFUSE_START:
            await self._out(self.core.refuse_start(msg.seq))

    async def handoff(self) -> None:
        """Drain: at a turn boundary, make sure the last turn is saved and tell the router
        to move the call (it re-pins to another node, which restores the checkpoint)."""
        async with self._turn_lock:
            if self.core.state is not CallState.ACTIVE:
                return
            if self.ckpt.dirty and not await self.durable.persist():
                return  # cannot hand off unsaved state; the drain bound decides what next
            await self._out(self.core.hand_off())
            self._svc.metrics.inc(CALLS_HANDED_OFF)

    def _prefetch(self, interim_text: str) -> None:
        """Start retrieval on an interim transcript; the turn's final transcript reuses it
        when close enough (the audio pipeline calls this while the caller speaks)."""
        if self.core.state is CallState.ACTIVE and interim_text.strip():
            self._retriever.prefetch(interim_text)

    # ------------------------------------------------------------------ the link ends

    def link_ended(self) -> None:
        """The call's link ended without a hangup, or a new link is taking the call over:
        nothing more comes in or goes out here (:meth:`LinkEnd.ended`). Idempotent."""
        self._link_lost = True
        self.link_end.ended()

    async def settle(self) -> int | None:
        """A new link takes this call over: the turn in flight commits first, bounded
        (:meth:`LinkEnd.settle`); the last turn the caller heard whole. The session is
        closed afterwards by its successor."""
        self._link_lost = True
        return await self.link_end.settle()

    async def aclose(self) -> None:
        """Idempotent; stops the turn, the recognizer, retries and any prefetch. State
        already committed stays in Redis. A settling turn (:meth:`settle`) is waited for."""
        await self.link_end.aclose()
        if self._respeaking is not None and not self._respeaking.done():
            self._respeaking.cancel()
            await asyncio.gather(self._respeaking, return_exceptions=True)
        await self.vt.aclose()
        await self.ckpt.aclose()
        if self.core.state is CallState.ENDED and (self.ckpt.dirty or self.ckpt.outbox):
            self.leftover = (self.durable.snapshot(), not self.ckpt.dirty)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(self._retriever.aclose())
        self.core.close()
        if self._span is not None:
            self._span.set_attribute("callmesh.call.state", str(self.core.state))
            self._span.end()
            self._span = None

    def _start_span(self, resume: str, previous: str) -> None:
        if not tracing.enabled():
            return
        core = self.core
        span = tracing.start_call(
            call_id=core.call_id,
            tenant=core.tenant,
            node=self._svc.node_id,
            resume=resume,
            previous=previous,
        )
        span.set_attribute(tracing.EPOCH, core.epoch)
        self._span = self.turns.call_span = span
        self.ckpt.trace_parent = tracing.call_context(span)
        self.durable.trace = previous or tracing.traceparent(span)

    def _query_for(self, text: str) -> Query:
        return self.core.memory.query_for(text)

    @property
    def detached(self) -> bool:
        """The call is live but its link ended without a hangup: it may be resumed."""
        return self.core.state is CallState.ACTIVE

    async def abandon(self) -> None:
        """End a detached call whose client did not come back in time, like a hangup."""
        await self.vt.stop_turn()
        async with self._turn_lock:
            if self.core.state is not CallState.ACTIVE:
                return
            await self._end(self.core.abandon())
        self._svc.metrics.inc(CALLS_ABANDONED)

    async def _hangup(self, seq: int) -> None:
        await self._end(self.core.hangup(seq))
        await self._out(self.core.ended())
        self._svc.metrics.inc(CALLS_ENDED)

    async def _end(self, records: list[Record]) -> None:
        core = self.core
        await self.durable.commit(records)
        # The final checkpoint should show what is left to republish, if anything.
        await self.ckpt.settle()
        if not self.ckpt.dirty:
            await self.durable.persist()
        # Everything but what replay needs goes now; with effects still to publish, the
        # lease stays for the drainer, which ends the call again once they are out.
        final = not self.ckpt.dirty and not self.ckpt.outbox
        with contextlib.suppress(StoreUnavailable):
            await self._svc.store.end(core.tenant, core.call_id, core.epoch, final=final)
        await save_history(self._svc, core.memory, core.caller, core.call_id)
