"""A live call on its owner node: ownership, restore, greeting, turns, memory, hand-off.

State changes are synchronous and guarded (:class:`CallState`); I/O happens around them.
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
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import Any

from callmesh.protocol import Ctl, ErrorCode, In, Inbound, Out, encode, error_frame, mark_name
from callmesh.telemetry import TurnMetrics, now_ms
from conversation_node import turns
from conversation_node.audio.convert import Transcoder
from conversation_node.checkpointing import Checkpointer, Fenced
from conversation_node.errors import CallDropped
from conversation_node.greeting import load_history, save_history
from conversation_node.node_services import NodeServices
from conversation_node.pipeline import TEXT_MODE, Voice
from conversation_node.prompt import (
    Greeting,
    greeting_for,
)
from conversation_node.turn_records import (
    FactOp,
    memory_record,
)
from conversation_node.voice import AudioFormat
from conversation_node.voice_turns import VoiceTurns
from events import eventlog
from events.eventlog import EventType
from memory.session import MemoryState, SessionMemory
from memory.sources import Query
from state_store.checkpoint import Checkpoint, OutboxEntry
from state_store.errors import StoreUnavailable

log = logging.getLogger("callmesh.node.session")

Send = Callable[[str], Awaitable[None]]


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
        self.created_ms = now_ms()
        self.memory = SessionMemory(tenant, caller, services.memory.config)
        # Queries go through ``self.memory``, which a restore replaces.
        self._retriever = services.memory.retrieval.for_call(self._query_for)
        self._turn_lock = asyncio.Lock()
        self.ckpt = Checkpointer(
            services,
            tenant,
            call_id,
            snapshot=self._snapshot,
            acknowledge=self._ack,
            turn_lock=self._turn_lock,
            active=lambda: self.state in (CallState.ACTIVE, CallState.ENDED),
        )
        self._link_lost = False
        # How replies are voiced (text mode until a start declares audio) and followed.
        self.voice = TEXT_MODE
        self.audio_format: AudioFormat | None = None
        self.vt = VoiceTurns(self)

    def __repr__(self) -> str:
        return (
            f"<CallSession {self.tenant}/{self.call_id} [{self.state}] epoch={self.epoch} "
            f"turn={self.turn} seq={self.last_seq} {self.ckpt!r}>"
        )

    def _to(self, new: CallState) -> None:
        if new not in _ALLOWED[self.state]:
            raise IllegalTransition(f"{self.call_id}: {self.state} → {new}")
        self.state = new

    @property
    def unsaved(self) -> bool:
        return self.ckpt.dirty

    @property
    def outbox(self) -> list[OutboxEntry]:
        return self.ckpt.outbox

    @property
    def active(self) -> bool:
        return self.state is CallState.ACTIVE

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
        await self._out(encode({"type": Ctl.ACK.value, "seq": self.last_seq, "turn": self.turn}))

    # ------------------------------------------------------------------ lifecycle

    async def open(self, start: Inbound) -> None:
        """Take ownership (epoch + 1), restore the last checkpoint, log the ownership. A new
        call is greeted (turn 0); a resumed one is not, but a committed reply the caller
        did not fully receive is said again."""
        started = time.monotonic()
        reason = str(start.body.get("resume") or "start")
        if "audio" in start.body:
            fmt = AudioFormat.from_start(start.body)
            self.audio_format = fmt
            self.voice = Voice(Transcoder(fmt.encoding, fmt.sample_rate), marks=True)
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
                    audio=start.body.get("audio"),
                )
            )
        records.append(
            eventlog.record(
                EventType.OWNERSHIP, self.turn, node=self._svc.node_id, epoch=epoch, reason=reason
            )
        )
        greeting: Greeting | None = None
        history_ms = 0.0
        if ckpt is None:
            # Decided and committed before it is spoken: a node dying mid-greeting leaves
            # it in the checkpoint, and the new owner says it again (de-duplicated).
            t0 = time.monotonic()
            history = await load_history(self._svc, self.tenant, self.caller, self.call_id)
            greeting = greeting_for(history)
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
            await turns.greet(self, greeting, started, history_ms)
            return
        delivered = start.body.get("delivered_turn")
        if ckpt is not None and isinstance(delivered, int) and delivered < self.turn:
            await turns.respeak_last_turn(self)

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
            memory_record(self.memory, 0, ops, history=list(greeting.from_calls)),
        ]

    def _restore(self, ckpt: Checkpoint) -> None:
        self.turn = ckpt.turn
        self.last_seq = ckpt.last_seq
        self.created_ms = ckpt.created_ms
        # The call's caller is the one it started with (its history key, its memory scope).
        self.caller = ckpt.caller or self.caller
        self.memory = self._memory_from(MemoryState(ckpt.working, ckpt.facts, ckpt.extra))
        # Whatever the previous owner committed but JetStream never acknowledged.
        self.ckpt.restore(ckpt.outbox, ckpt.event_cursor)

    async def handle(self, msg: Inbound) -> None:
        """Apply one inbound frame. Frames at or below ``last_seq`` were applied before a
        failover and are skipped: that is what makes a replay by the router safe. Audio,
        marks and keys never wait for a turn: the caller must be able to interrupt."""
        if self.state is not CallState.ACTIVE:
            raise CallDropped(f"session is {self.state}")
        if msg.seq > self.last_seq:
            if msg.type is In.AUDIO:
                await self.vt.on_audio(msg)
            elif msg.type is In.MARK:
                self.vt.on_mark(str(msg.body["name"]))
            elif msg.type is In.DTMF:
                await self.vt.on_dtmf(msg)
            else:
                if msg.type is In.HANGUP:
                    await self.vt.stop_turn()
                async with self._turn_lock:
                    await self._apply(msg)
        if self._link_lost:
            raise CallDropped("router link lost")
        if self.state is CallState.FENCED:
            raise CallDropped("fenced out")

    def handle_audio_now(self, msg: Inbound) -> bool:
        """:meth:`handle` for an ``audio`` frame it would apply without waiting (the
        recognizer takes audio at once, no acknowledgement is due): True once applied.
        False, having changed nothing, for any other frame or case; the frame then goes
        through :meth:`handle` as usual."""
        if msg.type is not In.AUDIO or self.state is not CallState.ACTIVE or self._link_lost:
            return False
        return msg.seq > self.last_seq and self.vt.on_audio_now(msg)

    async def _apply(self, msg: Inbound) -> None:
        if msg.type is In.USER_TEXT:
            await self._user_turn(
                msg.seq, str(msg.body["text"]).strip(), confidence=1.0, started=time.monotonic()
            )
        elif msg.type is In.HANGUP:
            await self._hangup(msg)
        elif msg.type is In.START:
            await self._out(
                error_frame(
                    ErrorCode.ALREADY_STARTED, "call already started", seq=msg.seq, turn=self.turn
                )
            )

    async def handoff(self) -> None:
        """Drain: at a turn boundary, make sure the last turn is saved and tell the router
        to move the call (it re-pins to another node, which restores the checkpoint)."""
        async with self._turn_lock:
            if self.state is not CallState.ACTIVE:
                return
            if self.ckpt.dirty and not await self._persist():
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
        """Idempotent; stops the turn, the recognizer, retries and any prefetch. State
        already committed stays in Redis."""
        await self.vt.aclose()
        await self.ckpt.aclose()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(self._retriever.aclose())
        if self.state is not CallState.CLOSED:
            self._to(CallState.CLOSED)

    # ------------------------------------------------------------------ turns

    async def _emit(self, frame: dict[str, Any]) -> None:
        """Send a reply frame of the current turn, following it in the playback."""
        frame["turn"] = self.turn
        kind = frame["type"]
        if kind == Out.MARK:
            frame["name"] = mark_name(self.turn, frame["n"])
        pb = self.vt.playback
        if pb is not None and pb.turn == self.turn:
            if kind == Out.AGENT_TEXT:
                pb.on_text(frame["text"])
            elif kind == Out.AGENT_AUDIO:
                # base64: 4 characters per 3 bytes.
                pb.on_audio(len(frame["data"]) * 3 / 4 / self._bytes_per_ms())
            elif kind == Out.MARK:
                pb.on_mark_sent(frame["name"])
        await self._out(encode(frame))

    def _bytes_per_ms(self) -> float:
        return self.audio_format.bytes_per_ms if self.audio_format else 8.0

    async def _user_turn(
        self, seq: int, text: str, *, confidence: float, started: float, stt_ms: float = 0.0
    ) -> None:
        # A turn that fails before its commit leaves no trace: memory and turn number go
        # back to the last committed state, so the checkpoint stays what the log explains.
        turn_before, memory_before = self.turn, self.memory.to_state()
        try:
            records, metrics, effects = await turns.answer(self, seq, text, confidence, started)
        except BaseException:
            self.turn, self.memory = turn_before, self._memory_from(memory_before)
            raise
        # Speech-to-text (the endpoint wait included) is provider time too.
        metrics.stt_ms = stt_ms
        metrics.provider_ms += stt_ms
        metrics.update_overhead()
        self.ckpt.outbox.extend(effects)
        await self._finish_turn(records, metrics)

    async def _finish_turn(self, records: list[dict[str, Any]], metrics: TurnMetrics) -> None:
        """Commit the turn, then tell the client it is complete (``turn_metrics``)."""
        if self.ckpt.effects_waiting(metrics.turn):
            # The effect sink is down: the call keeps talking, the effects wait in the outbox.
            metrics.fallbacks.append("effects_deferred")
            records.append(
                eventlog.record(
                    EventType.FALLBACK, metrics.turn, kind="effects_deferred", detail=""
                )
            )
        t0 = time.monotonic()
        await self._commit(records, metrics)
        metrics.checkpoint_ms = (time.monotonic() - t0) * 1000
        fields = metrics.to_dict()
        await self._out(encode({"type": Out.TURN_METRICS.value, "turn": metrics.turn, **fields}))
        self._svc.observe_turn(metrics)
        # The same record in the node's log, for log pipelines (one JSON object per turn).
        log.info("turn", extra={"fields": {"tenant": self.tenant, **fields}})

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
        # The final checkpoint should show what is left to republish, if anything.
        await self.ckpt.settle()
        if not self.ckpt.dirty:
            await self._persist()
        with contextlib.suppress(StoreUnavailable):
            await self._svc.store.release(self.tenant, self.call_id, self.epoch)
        await save_history(self._svc, self.memory, self.caller, self.call_id)
        await self._out(encode({"type": Out.CALL_ENDED.value, "turn": self.turn}))
        self._svc.metrics.inc("calls_ended")

    # ------------------------------------------------------------------ persistence

    async def _commit(
        self, records: list[dict[str, Any]], metrics: TurnMetrics | None = None
    ) -> None:
        """Record the turn's events in the outbox and write the checkpoint (CAS)."""
        if metrics is not None:
            records.append(
                eventlog.record(EventType.TURN_METRICS, self.turn, metrics=metrics.to_dict())
            )
        try:
            await self.ckpt.commit(records, self.turn)
        except Fenced as exc:
            self._fence(exc)
            raise CallDropped(str(exc)) from exc

    async def _persist(self) -> bool:
        try:
            return await self.ckpt.persist(turn=self.turn)
        except Fenced as exc:
            self._fence(exc)
            raise CallDropped(str(exc)) from exc

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
            outbox=list(self.ckpt.outbox),
            event_cursor=self.ckpt.event_cursor,
            extra=mem.extra,
            created_ms=self.created_ms,
            updated_ms=now_ms(),
        )

    def _fence(self, exc: Fenced) -> None:
        if self.state is not CallState.FENCED:
            self._to(CallState.FENCED)
        self._svc.metrics.inc("fenced_out")
        log.warning(
            "fenced out: dropping call",
            extra={
                "fields": {
                    "tenant": self.tenant,
                    "call_id": self.call_id,
                    "epoch": exc.rejection.mine,
                    "current_epoch": exc.rejection.current,
                }
            },
        )
