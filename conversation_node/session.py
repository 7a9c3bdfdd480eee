"""A live call on its owner node: ownership, restore, greeting, turns, memory, checkpoints,
outbox, hand-off.

State changes are synchronous and guarded (:class:`CallState`); I/O happens around them.
Every turn ends in one compare-and-set checkpoint that also records the turn's side
effects and event-log records (the outbox); only after it succeeds is the router told
(``ack``) and the outbox published. If Redis is unreachable the call goes on from memory
and the checkpoint is retried; if a newer owner fenced us out, the call is dropped here.

Memory: a :class:`memory.session.SessionMemory` per call (working memory, facts, notes),
restored from the checkpoint and written back into it every turn; retrieval through the
node's orchestrator; the prompt from the node's :class:`memory.prompt.PromptBuilder`.
Every turn's ``memory`` event-log record says exactly what the turn changed in it, so
replay can rebuild the checkpointed memory from the log (see :meth:`_memory_record`).
A new call is greeted (turn 0) with what the caller's earlier calls established; at
hang-up the call's facts and summary go to the customer history for the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from callmesh.protocol import Ctl, ErrorCode, In, Inbound, Out, encode, error_frame
from callmesh.telemetry import TurnMetrics, now_ms
from conversation_node.node_services import NodeServices
from conversation_node.prompt import (
    BOOKED_FACT,
    Greeting,
    build_request,
    describe_booking,
    greeting_for,
)
from events import eventlog
from events.errors import EventsError
from events.eventlog import EventType
from events.outbox import effect_entry
from memory.history import CallRecord
from memory.retrieval import RetrievalResult
from memory.session import MemoryState, SessionMemory
from memory.sources import Query
from state_store.checkpoint import Checkpoint, OutboxEntry
from state_store.errors import FencedOut, StoreUnavailable

log = logging.getLogger("callmesh.node.session")

Send = Callable[[str], Awaitable[None]]

# Tool calls the model may make, and the effect kind each becomes.
EFFECT_KINDS = {"create_booking": "booking_create"}

# The protocol's default caller: not a person, so it has no customer history (one
# anonymous caller must never be greeted with what another one booked).
ANONYMOUS_CALLER = "anonymous"
# Earlier calls the greeting looks at, and how long it may wait for them (the greeting
# waits for this read; without history the caller still gets the standard greeting).
GREETING_HISTORY_CALLS = 3
HISTORY_LOAD_TIMEOUT_S = 0.2
HISTORY_SAVE_TIMEOUT_S = 1.0

FactOp = tuple[str, str | None]  # (slot, value); None: the slot was cleared


class CallState(StrEnum):
    NEW = "new"
    ACTIVE = "active"
    ENDED = "ended"  # caller hung up; final checkpoint written
    FENCED = "fenced"  # a newer owner took the call; we dropped it
    HANDED_OFF = "handed_off"  # drained to another node at a turn boundary
    CLOSED = "closed"


_ALLOWED: dict[CallState, frozenset[CallState]] = {
    CallState.NEW: frozenset({CallState.ACTIVE, CallState.FENCED, CallState.CLOSED}),
    CallState.ACTIVE: frozenset(
        {CallState.ENDED, CallState.FENCED, CallState.HANDED_OFF, CallState.CLOSED}
    ),
    CallState.ENDED: frozenset({CallState.CLOSED}),
    CallState.FENCED: frozenset({CallState.CLOSED}),
    CallState.HANDED_OFF: frozenset({CallState.CLOSED}),
    CallState.CLOSED: frozenset(),
}


class IllegalTransition(RuntimeError):
    pass


class CallDropped(Exception):
    """The session can no longer serve the call (fenced out, ended); close its link."""


@dataclass
class ResumeInfo:
    resumed: bool
    reason: str


class CallSession:
    def __init__(
        self, services: NodeServices, tenant: str, call_id: str, caller: str, send: Send
    ) -> None:
        self._svc = services
        self.tenant = tenant
        self.call_id = call_id
        self.caller = caller
        self._send = send
        self.state = CallState.NEW
        self.epoch = 0
        self.turn = 0
        self.last_seq = 0
        self.event_cursor = 0
        self.created_ms = now_ms()
        self.memory = SessionMemory(tenant, caller, services.memory.config)
        # Queries go through ``self.memory``, which a restore replaces.
        self._retriever = services.memory.retrieval.for_call(self._query_for)
        self.outbox: list[OutboxEntry] = []
        self._dirty = False
        self._save_lock = asyncio.Lock()
        self._turn_lock = asyncio.Lock()
        self._retry_task: asyncio.Task[None] | None = None
        self._link_lost = False

    def __repr__(self) -> str:
        return (
            f"<CallSession {self.tenant}/{self.call_id} [{self.state}] epoch={self.epoch} "
            f"turn={self.turn} seq={self.last_seq} outbox={len(self.outbox)}"
            f"{' unsaved' if self._dirty else ''}>"
        )

    def _to(self, new: CallState) -> None:
        if new not in _ALLOWED[self.state]:
            raise IllegalTransition(f"{self.call_id}: {self.state} → {new}")
        self.state = new

    @property
    def unsaved(self) -> bool:
        return self._dirty

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

    # ------------------------------------------------------------------ lifecycle

    async def open(self, start: Inbound) -> None:
        """Take ownership (epoch + 1), restore the last checkpoint, log the ownership. A new
        call is greeted (turn 0); a resumed one is not, but a committed reply the caller
        did not fully receive is said again."""
        started = time.monotonic()
        reason = str(start.body.get("resume") or "start")
        epoch, ckpt = await self._svc.store.take_ownership(
            self.tenant, self.call_id, self._svc.node_id
        )
        self.epoch = epoch
        records: list[dict[str, Any]] = []
        if ckpt is not None:
            if ckpt.status == "ended":
                await self._out(error_frame(ErrorCode.CALL_ENDED, "this call has ended"))
                self._to(CallState.CLOSED)
                raise CallDropped("call already ended")
            self._restore(ckpt)
            if reason == "start":
                reason = "reconnect"
        else:
            self.last_seq = start.seq
            records.append(
                eventlog.record(
                    EventType.CALL_STARTED,
                    0,
                    seq=start.seq,
                    tenant=self.tenant,
                    caller=self.caller,
                    node=self._svc.node_id,
                    epoch=epoch,
                    resumed=False,
                    working_memory_turns=self._svc.config.working_memory_turns,
                )
            )
        records.append(
            eventlog.record(
                EventType.OWNERSHIP,
                self.turn,
                node=self._svc.node_id,
                epoch=epoch,
                reason=reason,
            )
        )
        greeting: Greeting | None = None
        history_ms = 0.0
        if ckpt is None:
            # Decided and committed before it is spoken: a node dying mid-greeting leaves
            # it in the checkpoint, and the new owner says it again (de-duplicated).
            t0 = time.monotonic()
            greeting = greeting_for(await self._load_history())
            history_ms = (time.monotonic() - t0) * 1000
            records += self._apply_greeting(greeting)
        self._to(CallState.ACTIVE)
        await self._commit(records)
        await self._out(
            encode(
                {
                    "type": Out.READY.value,
                    "turn": self.turn,
                    "call_id": self.call_id,
                    "node": self._svc.node_id,
                    "epoch": epoch,
                    "resumed": ckpt is not None,
                    # A reconnecting client continues its numbering after this.
                    "last_seq": self.last_seq,
                }
            )
        )
        self._svc.metrics.inc("calls_resumed" if ckpt else "calls_started")
        if greeting is not None:
            await self._greet(greeting, started, history_ms)
            return
        delivered = start.body.get("delivered_turn")
        if ckpt is not None and isinstance(delivered, int) and delivered < self.turn:
            await self._respeak_last_turn()

    async def _load_history(self) -> list[CallRecord]:
        """The caller's earlier calls, newest first; none if they cannot be read in time."""
        if self.caller == ANONYMOUS_CALLER:
            return []
        try:
            async with asyncio.timeout(HISTORY_LOAD_TIMEOUT_S):
                return await self._svc.memory.history.load(
                    self.tenant, self.caller, limit=GREETING_HISTORY_CALLS
                )
        except Exception as exc:  # history is best effort: the standard greeting will do
            self._svc.metrics.inc("history_load_failures")
            log.warning(
                "customer history unavailable: standard greeting",
                extra={"fields": {"call_id": self.call_id, "error": repr(exc)}},
            )
            return []

    def _apply_greeting(self, greeting: Greeting) -> list[dict[str, Any]]:
        """Turn 0 in memory (the name carried over, the greeting as heard) and its records."""
        ops: list[FactOp] = [
            (slot, value)
            for slot, value in greeting.facts.items()
            if self.memory.facts.set(slot, value, 0)
        ]
        self.memory.observe_agent(0, greeting.text)
        return [
            eventlog.record(
                EventType.AGENT_REPLY, 0, text=greeting.text, heard=greeting.text, interrupted=False
            ),
            self._memory_record(0, ops, history=list(greeting.from_calls)),
        ]

    async def _greet(self, greeting: Greeting, started: float, history_ms: float) -> None:
        """Speak the committed greeting, then complete turn 0 like any other turn."""
        async with self._turn_lock:
            output = await self._svc.pipeline.speak(greeting.text, self._emit)
            first_audio = output.first_audio_at or time.monotonic()
            latency_ms = (first_audio - started) * 1000
            provider_ms = history_ms + output.tts_first_chunk_ms
            metrics = TurnMetrics(
                call_id=self.call_id,
                turn=0,
                latency_ms=latency_ms,
                retrieval_ms=history_ms,
                tts_first_chunk_ms=output.tts_first_chunk_ms,
                provider_ms=provider_ms,
                overhead_ms=max(0.0, latency_ms - provider_ms),
                intent="greeting",
                fallbacks=list(output.fallbacks),
                node=self._svc.node_id,
                epoch=self.epoch,
            )
            records = [
                eventlog.record(EventType.FALLBACK, 0, kind=f, detail="greeting")
                for f in output.fallbacks
            ]
            t0 = time.monotonic()
            await self._commit(records, metrics)
            metrics.checkpoint_ms = (time.monotonic() - t0) * 1000
            await self._out(encode({"type": Out.TURN_METRICS.value, **metrics.to_dict()}))
        self._svc.metrics.inc("greetings_returning" if greeting.returning else "greetings")

    async def _respeak_last_turn(self) -> None:
        """The previous owner committed this turn but the caller never got all of it (it
        died between its checkpoint and the end of the reply): say it again. The router
        drops the frames the caller already heard, by ``(turn, n)``."""
        last = self.memory.working.last()
        if last is None or last.turn != self.turn:
            return
        async with self._turn_lock:
            output = await self._svc.pipeline.speak(last.agent, self._emit)
            metrics = TurnMetrics(
                call_id=self.call_id,
                turn=self.turn,
                tts_first_chunk_ms=output.tts_first_chunk_ms,
                intent="replayed",
                fallbacks=output.fallbacks,
                node=self._svc.node_id,
                epoch=self.epoch,
            )
            await self._out(encode({"type": Out.TURN_METRICS.value, **metrics.to_dict()}))
        self._svc.metrics.inc("turns_respoken")

    def _restore(self, ckpt: Checkpoint) -> None:
        self.turn = ckpt.turn
        self.last_seq = ckpt.last_seq
        self.event_cursor = ckpt.event_cursor
        self.created_ms = ckpt.created_ms
        # The call's caller is the one it started with (its history key, its memory scope).
        self.caller = ckpt.caller or self.caller
        self.memory = self._memory_from(MemoryState(ckpt.working, ckpt.facts, ckpt.extra))
        # Whatever the previous owner committed but JetStream never acknowledged.
        self.outbox = list(ckpt.outbox)

    async def handle(self, msg: Inbound) -> None:
        """Apply one inbound frame. Frames at or below ``last_seq`` were applied before a
        failover and are skipped: that is what makes a replay by the router safe."""
        if self.state is not CallState.ACTIVE:
            raise CallDropped(f"session is {self.state}")
        if msg.seq <= self.last_seq:
            return
        async with self._turn_lock:
            await self._apply(msg)
        if self._link_lost:
            raise CallDropped("router link lost")

    async def _apply(self, msg: Inbound) -> None:
        if msg.type is In.USER_TEXT:
            await self._user_turn(msg, str(msg.body["text"]).strip(), confidence=1.0)
        elif msg.type is In.HANGUP:
            await self._hangup(msg)
        elif msg.type is In.START:
            await self._out(
                error_frame(
                    ErrorCode.ALREADY_STARTED,
                    "call already started",
                    seq=msg.seq,
                    turn=self.turn,
                )
            )
        else:
            # Audio is accepted; it is applied by the audio pipeline and acknowledged
            # with the next checkpoint.
            self.last_seq = msg.seq

    async def handoff(self) -> None:
        """Drain: at a turn boundary, make sure the last turn is saved and tell the router
        to move the call (it re-pins to another node, which restores the checkpoint)."""
        async with self._turn_lock:
            if self.state is not CallState.ACTIVE:
                return
            if self._dirty and not await self._persist():
                return  # cannot hand off unsaved state; the drain bound decides what next
            self._to(CallState.HANDED_OFF)
            await self._out(encode({"type": Ctl.HANDOFF.value, "turn": self.turn}))
            self._svc.metrics.inc("calls_handed_off")

    def prefetch(self, interim_text: str) -> None:
        """Start retrieval on an interim transcript; the turn's final transcript reuses it
        when close enough (the audio pipeline calls this while the caller speaks)."""
        if self.state is CallState.ACTIVE and interim_text.strip():
            self._retriever.prefetch(interim_text)

    async def aclose(self) -> None:
        """Idempotent; stops the retry task and any prefetch. State already committed
        stays in Redis."""
        if self._retry_task is not None:
            self._retry_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(asyncio.gather(self._retry_task, return_exceptions=True))
            self._retry_task = None
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(self._retriever.aclose())
        if self.state is not CallState.CLOSED:
            self._to(CallState.CLOSED)

    # ------------------------------------------------------------------ turns

    async def _emit(self, frame: dict[str, Any]) -> None:
        frame["turn"] = self.turn
        await self._out(encode(frame))

    async def _user_turn(self, msg: Inbound, text: str, *, confidence: float) -> None:
        started = time.monotonic()
        # A turn that fails before its commit leaves no trace: memory and turn number go
        # back to the last committed state, so the checkpoint stays what the log explains.
        turn_before, memory_before = self.turn, self.memory.to_state()
        try:
            records, metrics, effects = await self._answer(msg, text, confidence, started)
        except BaseException:
            self.turn, self.memory = turn_before, self._memory_from(memory_before)
            raise
        self.outbox.extend(effects)
        t0 = time.monotonic()
        await self._commit(records, metrics)
        metrics.checkpoint_ms = (time.monotonic() - t0) * 1000
        await self._out(
            encode({"type": Out.TURN_METRICS.value, "turn": metrics.turn, **metrics.to_dict()})
        )
        self._svc.observe_turn(metrics)

    async def _answer(
        self, msg: Inbound, text: str, confidence: float, started: float
    ) -> tuple[list[dict[str, Any]], TurnMetrics, list[OutboxEntry]]:
        """One user turn up to its commit: memory → retrieval → prompt → pipeline."""
        self.turn += 1
        turn = self.turn
        mem = self.memory
        update = mem.observe_user(turn, text)
        ops: list[FactOp] = [(c.slot, c.value) for c in update.changes]
        t0 = time.monotonic()
        retrieval = await self._retriever.retrieve(text)
        retrieval_ms = (time.monotonic() - t0) * 1000
        prompt = self._svc.memory.prompts.build(mem, text, retrieval)
        request = build_request(prompt, text, seed=f"{self.call_id}:{turn}")
        output = await self._svc.pipeline.run(request, self._emit)
        effects: list[OutboxEntry] = []
        records: list[dict[str, Any]] = [
            eventlog.record(
                EventType.USER_TURN, turn, seq=msg.seq, text=text, confidence=confidence
            ),
            _retrieval_record(turn, retrieval, retrieval_ms),
            eventlog.record(
                EventType.LLM,
                turn,
                prompt_digest=_digest(prompt.messages),
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
            entry = effect_entry(
                self.tenant, self.call_id, turn, len(effects), kind, call.arguments
            )
            effects.append(entry)
            records.append(
                eventlog.record(
                    EventType.EFFECT, turn, msg_id=entry.msg_id, kind=kind, payload=call.arguments
                )
            )
            booked = describe_booking(call.arguments) if call.name == "create_booking" else None
            if booked is not None and mem.facts.set(BOOKED_FACT, booked, turn):
                ops.append((BOOKED_FACT, booked))
        records += [
            eventlog.record(EventType.FALLBACK, turn, kind=f, detail="") for f in output.fallbacks
        ]
        # Text mode: the caller hears the whole reply (the audio pipeline reports barge-ins).
        mem.observe_agent(turn, output.text, interrupted=False)
        first_audio = output.first_audio_at or time.monotonic()
        latency_ms = (first_audio - started) * 1000
        # Retrieval is on the critical path, like the model's first sentence and the voice.
        provider_ms = retrieval_ms + output.first_sentence_s * 1000 + output.tts_first_chunk_ms
        metrics = TurnMetrics(
            call_id=self.call_id,
            turn=turn,
            latency_ms=latency_ms,
            retrieval_ms=retrieval_ms,
            llm_first_token_ms=output.llm_first_token_ms,
            tts_first_chunk_ms=output.tts_first_chunk_ms,
            provider_ms=provider_ms,
            overhead_ms=max(0.0, latency_ms - provider_ms),
            intent=update.intent,
            fallbacks=list(output.fallbacks),
            node=self._svc.node_id,
            epoch=self.epoch,
        )
        records += [
            eventlog.record(
                EventType.AGENT_REPLY, turn, text=output.text, heard=output.text, interrupted=False
            ),
            self._memory_record(turn, ops),
        ]
        self.last_seq = msg.seq
        return records, metrics, effects

    def _memory_record(self, turn: int, ops: list[FactOp], **extra: Any) -> dict[str, Any]:
        """The ``memory`` record of a turn: exactly what it changed in the session memory.

        Applied in this order to the memory as of the previous turn, it gives the memory
        this turn checkpointed (``SessionMemory.to_state()``):

        1. ``facts_cleared`` (slots): ``facts.clear(slot)`` each;
        2. ``facts_set`` ({slot: value}): ``facts.set(slot, value, turn)`` each;
        3. ``exchange`` ([turn, user, heard, interrupted] or null):
           ``working.add(Exchange(*exchange))``;
        4. ``notes`` ([[turn, text], ...]): appended to the notes window;
        5. a record of a turn >= 1 is a user turn: ``last_user_turn = turn``.

        Clearing first is exact: within a turn a slot is only ever cleared before it is set
        again (a withdrawn confirmation re-given), and a slot set then cleared is listed as
        cleared only.
        """
        facts_set: dict[str, str] = {}
        cleared: list[str] = []
        for slot, value in ops:
            if value is None:
                facts_set.pop(slot, None)
                if slot not in cleared:
                    cleared.append(slot)
            else:
                facts_set[slot] = value
        last = self.memory.working.last()
        exchange = (
            [last.turn, last.user, last.agent, last.interrupted]
            if last is not None and last.turn == turn
            else None
        )
        notes = [[t, note] for t, note in self.memory.notes if t == turn]
        return eventlog.record(
            EventType.MEMORY,
            turn,
            facts_set=facts_set,
            facts_cleared=cleared,
            exchange=exchange,
            notes=notes,
            **extra,
        )

    def _memory_from(self, state: MemoryState) -> SessionMemory:
        return SessionMemory.from_state(
            self.tenant,
            self.caller,
            state.working,
            state.facts,
            state.extra,
            self._svc.memory.config,
        )

    def _query_for(self, text: str) -> Query:
        return self.memory.query_for(text)

    async def _hangup(self, msg: Inbound) -> None:
        self.last_seq = msg.seq
        self._to(CallState.ENDED)
        await self._commit(
            [eventlog.record(EventType.CALL_ENDED, self.turn, seq=msg.seq, reason="hangup")]
        )
        if not self._dirty:
            # The final checkpoint should show an empty outbox: nothing left to republish.
            await self._persist()
        with contextlib.suppress(StoreUnavailable):
            await self._svc.store.release(self.tenant, self.call_id, self.epoch)
        await self._save_history()
        await self._out(encode({"type": Out.CALL_ENDED.value, "turn": self.turn}))
        self._svc.metrics.inc("calls_ended")

    async def _save_history(self) -> None:
        """The call's facts and summary, for this caller's next call. Best effort: a Redis
        outage costs the next call its "welcome back", never this call its hang-up."""
        if self.caller == ANONYMOUS_CALLER:
            return
        record = self.memory.call_record(self.call_id, now_ms())
        try:
            async with asyncio.timeout(HISTORY_SAVE_TIMEOUT_S):
                await self._svc.memory.history.save(record)
        except Exception as exc:
            self._svc.metrics.inc("history_save_failures")
            log.warning(
                "customer history not saved",
                extra={"fields": {"call_id": self.call_id, "error": repr(exc)}},
            )
            return
        self._svc.metrics.inc("history_saved")

    # ------------------------------------------------------------------ persistence

    async def _commit(
        self, records: list[dict[str, Any]], metrics: TurnMetrics | None = None
    ) -> None:
        """Record the turn's events in the outbox and write the checkpoint (CAS)."""
        if metrics is not None:
            records.append(
                eventlog.record(EventType.TURN_METRICS, self.turn, metrics=metrics.to_dict())
            )
        self.outbox.extend(
            eventlog.to_outbox(self.tenant, self.call_id, records, self.event_cursor)
        )
        self.event_cursor += len(records)
        self._dirty = True
        if await self._persist():
            await self._after_save()

    def _snapshot(self) -> Checkpoint:
        mem = self.memory.to_state()
        return Checkpoint(
            tenant=self.tenant,
            call_id=self.call_id,
            caller=self.caller,
            epoch=self.epoch,
            node=self._svc.node_id,
            last_seq=self.last_seq,
            turn=self.turn,
            status="ended" if self.state is CallState.ENDED else "active",
            working=mem.working,
            facts=mem.facts,
            outbox=list(self.outbox),
            event_cursor=self.event_cursor,
            extra=mem.extra,
            created_ms=self.created_ms,
            updated_ms=now_ms(),
        )

    async def _persist(self, *, retrying: bool = False) -> bool:
        """One CAS checkpoint write. A failure while Redis is away defers the write to the
        retry loop (which calls back with ``retrying=True`` and stays quiet until it
        succeeds); a fenced-out epoch drops the call."""
        async with self._save_lock:
            try:
                await self._svc.store.save(self._snapshot())
            except StoreUnavailable as exc:
                if retrying:
                    return False
                self._svc.metrics.inc("checkpoint_failures")
                log.warning(
                    "checkpoint deferred: redis unavailable",
                    extra={
                        "fields": {"call_id": self.call_id, "turn": self.turn, "error": str(exc)}
                    },
                )
                self._schedule_retry()
                return False
            except FencedOut as exc:
                self._fence(exc)
                raise CallDropped(str(exc)) from exc
            self._dirty = False
            if retrying:
                self._svc.metrics.inc("checkpoints_caught_up")
                log.info(
                    "checkpoint caught up",
                    extra={"fields": {"call_id": self.call_id, "turn": self.turn}},
                )
            else:
                self._svc.metrics.inc("checkpoints")
            return True

    def _fence(self, exc: FencedOut) -> None:
        if self.state is not CallState.FENCED:
            self._to(CallState.FENCED)
        self._svc.metrics.inc("fenced_out")
        log.warning(
            "fenced out: dropping call",
            extra={
                "fields": {
                    "tenant": self.tenant,
                    "call_id": self.call_id,
                    "epoch": exc.mine,
                    "current_epoch": exc.current,
                }
            },
        )

    async def _after_save(self) -> None:
        await self._out(encode({"type": Ctl.ACK.value, "seq": self.last_seq, "turn": self.turn}))
        await self._flush_outbox()

    async def _flush_outbox(self) -> None:
        publisher = self._svc.publisher
        if not self.outbox or publisher is None:
            return
        pending = list(self.outbox)
        try:
            acked = set(await publisher.publish(pending))
        except EventsError as exc:
            self._svc.metrics.inc("outbox_publish_failures")
            log.warning(
                "outbox publish deferred",
                extra={
                    "fields": {"call_id": self.call_id, "pending": len(pending), "error": str(exc)}
                },
            )
            self._schedule_retry()
            return
        # The removal is persisted with the next checkpoint; until then a takeover would
        # republish these, which JetStream de-duplicates by msg id.
        self.outbox = [e for e in self.outbox if e.msg_id not in acked]
        self._svc.metrics.inc("outbox_published", len(acked))
        if self.outbox:
            self._schedule_retry()

    def _schedule_retry(self) -> None:
        if self._retry_task is None or self._retry_task.done():
            self._retry_task = asyncio.create_task(
                self._retry_loop(), name=f"checkpoint-retry:{self.call_id}"
            )

    async def _retry_loop(self) -> None:
        delay = 0.1
        while self.state in (CallState.ACTIVE, CallState.ENDED) and (self._dirty or self.outbox):
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
            try:
                # Under the turn lock: a checkpoint must never capture a half-applied turn.
                async with self._turn_lock:
                    if self._dirty:
                        if not await self._persist(retrying=True):
                            continue
                        await self._after_save()
                    elif self.outbox:
                        await self._flush_outbox()
            except CallDropped:
                return
            except (ConnectionError, RuntimeError):
                return  # the link to the router is gone; the next owner republishes


def _digest(messages: list[dict[str, Any]]) -> str:
    h = hashlib.sha256()
    for m in messages:
        h.update(str(m.get("role")).encode())
        h.update(str(m.get("content")).encode())
    return h.hexdigest()[:16]


def _retrieval_record(turn: int, result: RetrievalResult, elapsed_ms: float) -> dict[str, Any]:
    return eventlog.record(
        EventType.RETRIEVAL,
        turn,
        answered=list(result.answered),
        timed_out=list(result.timed_out),
        from_cache=list(result.from_cache),
        stale=list(result.stale),
        failed=list(result.failed),
        partial=result.partial,
        prefetched=result.prefetched,
        elapsed_ms=round(elapsed_ms, 3),
        # Ids, not texts: the knowledge base document, the earlier call, the slot query.
        snippets=[s.ref or s.source for s in result.snippets],
    )
