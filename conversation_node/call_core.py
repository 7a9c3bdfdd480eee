"""The call core: one live call's state, and what each step of it emits and records.

Synchronous and free of I/O, in the manner of h11's connection object: every method takes
what happened and returns what to do (a frame for the router, event-log records for the
turn's checkpoint) without awaiting anything. The session
(:mod:`conversation_node.session`) does the I/O around it and the turn runner
(:mod:`conversation_node.turn_runner`) runs the pipeline and hands its results back here.

It owns:

- the call's lifecycle, :class:`CallState`; a transition not in the table raises
  :class:`IllegalTransition`;
- the sequence accounting that makes the router's replay safe: :attr:`CallCore.last_seq`
  is the last inbound ``seq`` applied; a frame at or below it was applied before a failover
  and is skipped (:meth:`CallCore.receive`). It moves with the checkpoint of the turn that
  applied it, never ahead of it;
- the turn accounting: :attr:`CallCore.turn` is the last turn answered (0: the greeting);
  a turn that fails before its commit goes back to the savepoint taken before it;
- the call's memory (:class:`memory.session.SessionMemory`), restored from and written
  into the checkpoint (:meth:`CallCore.snapshot`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, StrEnum

from callmesh.protocol import (
    MAX_DECIDED_TEXT_BYTES,
    Ctl,
    ErrorCode,
    In,
    Inbound,
    Out,
    encode,
    error_frame,
)
from callmesh.telemetry import TurnMetrics
from conversation_node import turn_outcomes
from conversation_node.errors import CallDropped
from conversation_node.prompt import Greeting
from conversation_node.turn_outcomes import Answer, Record, Reply, UserTurn
from conversation_node.voice import AudioFormat
from events import eventlog
from events.eventlog import EventType
from memory.session import MemoryConfig, MemoryState, SessionMemory
from state_store.checkpoint import Checkpoint, OutboxEntry


class CallState(StrEnum):
    NEW = "new"
    ACTIVE = "active"
    # The caller hung up (or never came back): the final checkpoint is being written. A
    # newer owner can still fence that write out; then the end did not happen here.
    ENDED = "ended"
    FENCED = "fenced"  # a newer owner took the call; we dropped it
    HANDED_OFF = "handed_off"  # drained to another node at a turn boundary
    CLOSED = "closed"


_ALLOWED: dict[CallState, frozenset[CallState]] = {
    CallState.NEW: frozenset({CallState.ACTIVE, CallState.FENCED, CallState.CLOSED}),
    CallState.ACTIVE: frozenset(
        {CallState.ENDED, CallState.FENCED, CallState.HANDED_OFF, CallState.CLOSED}
    ),
    CallState.ENDED: frozenset({CallState.FENCED, CallState.CLOSED}),
    CallState.FENCED: frozenset({CallState.CLOSED}),
    CallState.HANDED_OFF: frozenset({CallState.CLOSED}),
    CallState.CLOSED: frozenset(),
}


class IllegalTransition(RuntimeError):
    pass


class Step(Enum):
    """What the session does with an inbound frame (:meth:`CallCore.receive`)."""

    SKIP = "skip"  # applied before a failover: the router's replay, nothing to do
    AUDIO = "audio"
    MARK = "mark"
    DTMF = "dtmf"
    USER_TEXT = "user_text"  # a turn, under the turn lock
    HANGUP = "hangup"
    REFUSE_START = "refuse_start"  # the call is already started


_STEPS = {
    In.AUDIO: Step.AUDIO,
    In.MARK: Step.MARK,
    In.DTMF: Step.DTMF,
    In.USER_TEXT: Step.USER_TEXT,
    In.HANGUP: Step.HANGUP,
    In.START: Step.REFUSE_START,
}


@dataclass(frozen=True)
class Opening:
    """What taking ownership decided: the records to commit before ``ready``; for a call
    that has ended, the error frame to send instead (the core is then closed)."""

    resumed: bool
    records: list[Record]
    refusal: str | None = None


@dataclass(frozen=True)
class Savepoint:
    turn: int
    memory: MemoryState


class CallCore:
    """One call's state on its owner node; see the module's docstring. Not thread-safe,
    and not task-safe across an await of its caller: the session's turn lock orders turns."""

    def __init__(
        self,
        tenant: str,
        call_id: str,
        caller: str,
        *,
        node_id: str,
        memory_config: MemoryConfig,
        created_ms: int,
    ) -> None:
        self.tenant = tenant
        self.call_id = call_id
        self.caller = caller
        self.node_id = node_id
        self._memory_config = memory_config
        self.state = CallState.NEW
        # ``state is ACTIVE``, kept as a plain attribute: read for every audio frame.
        self.active = False
        self.epoch = 0
        self.turn = 0
        self.last_seq = 0
        self.created_ms = created_ms
        self.memory = SessionMemory(tenant, caller, memory_config)
        # The caller's audio, when its start declared one (text mode otherwise).
        self.audio_format: AudioFormat | None = None

    def __repr__(self) -> str:
        return (
            f"<CallCore {self.tenant}/{self.call_id} [{self.state}] epoch={self.epoch} "
            f"turn={self.turn} seq={self.last_seq}>"
        )

    # ------------------------------------------------------------------ state

    def to(self, new: CallState) -> None:
        if new not in _ALLOWED[self.state]:
            raise IllegalTransition(f"{self.call_id}: {self.state} → {new}")
        self.state = new
        self.active = new is CallState.ACTIVE

    def fence(self) -> None:
        """A newer owner holds the call."""
        if self.state is not CallState.FENCED:
            self.to(CallState.FENCED)

    def close(self) -> None:
        if self.state is not CallState.CLOSED:
            self.to(CallState.CLOSED)

    @property
    def bytes_per_ms(self) -> float:
        return self.audio_format.bytes_per_ms if self.audio_format else 8.0

    # ------------------------------------------------------------------ ownership

    def owned(
        self, start: Inbound, epoch: int, ckpt: Checkpoint | None, *, working_memory_turns: int
    ) -> Opening:
        """Ownership taken at ``epoch``; ``ckpt`` is the call's last checkpoint (None: a
        new call). A resumed call continues from it."""
        if self.state is not CallState.NEW:
            raise IllegalTransition(f"{self.call_id}: {self.state} cannot be opened")
        self.epoch = epoch
        reason = str(start.body.get("resume") or "start")
        records: list[Record] = []
        if ckpt is not None:
            if ckpt.status == "ended":
                self.to(CallState.CLOSED)
                return Opening(True, [], error_frame(ErrorCode.CALL_ENDED, "this call has ended"))
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
                    node=self.node_id,
                    epoch=epoch,
                    resumed=False,
                    working_memory_turns=working_memory_turns,
                    audio=start.body.get("audio"),
                )
            )
        records.append(
            eventlog.record(
                EventType.OWNERSHIP, self.turn, node=self.node_id, epoch=epoch, reason=reason
            )
        )
        return Opening(ckpt is not None, records)

    def _restore(self, ckpt: Checkpoint) -> None:
        self.turn = ckpt.turn
        self.last_seq = ckpt.last_seq
        self.created_ms = ckpt.created_ms
        # The call's caller is the one it started with (its history key, its memory scope).
        self.caller = ckpt.caller or self.caller
        self.memory = self._memory_from(MemoryState(ckpt.working, ckpt.facts, ckpt.extra))

    def greet(self, greeting: Greeting) -> list[Record]:
        """Turn 0 of a new call in memory and its records. Decided and committed before it
        is spoken: a node dying mid-greeting leaves it in the checkpoint, and the new owner
        says it again (de-duplicated)."""
        return turn_outcomes.greeting(self.memory, greeting)

    def ready(self, *, resumed: bool) -> str:
        """The ``ready`` frame, once the opening is committed."""
        return encode(
            {
                "type": Out.READY.value,
                "turn": self.turn,
                "call_id": self.call_id,
                "node": self.node_id,
                "epoch": self.epoch,
                "resumed": resumed,
                # A reconnecting client continues its numbering after this.
                "last_seq": self.last_seq,
            }
        )

    def reply_to_repeat(self, delivered_turn: object) -> str | None:
        """A resumed call whose client says it got replies only up to ``delivered_turn``:
        the committed reply of the last turn to say again, if the previous owner died
        between its checkpoint and the end of that reply. The router drops the frames the
        caller already heard, by ``(turn, n)``."""
        if not isinstance(delivered_turn, int) or delivered_turn >= self.turn:
            return None
        last = self.memory.working.last()
        if last is None or last.turn != self.turn:
            return None
        return last.agent

    # ------------------------------------------------------------------ inbound

    def receive(self, msg: Inbound) -> Step:
        """What to do with one inbound frame. Frames at or below ``last_seq`` were applied
        before a failover and are skipped: that is what makes a replay by the router safe."""
        if self.state is not CallState.ACTIVE:
            raise CallDropped(f"session is {self.state}")
        if msg.seq <= self.last_seq:
            return Step.SKIP
        return _STEPS[msg.type]

    def applied(self, seq: int) -> None:
        """An inbound frame applied outside a turn (audio a node without a recognizer
        accepts unheard): the router may forget it with the next acknowledgement."""
        self.last_seq = max(self.last_seq, seq)

    def refuse_start(self, seq: int) -> str:
        return error_frame(
            ErrorCode.ALREADY_STARTED, "call already started", seq=seq, turn=self.turn
        )

    # ------------------------------------------------------------------ outbound

    def ack(self) -> str:
        """Everything up to ``last_seq`` is durable (sent after each checkpoint)."""
        return encode({"type": Ctl.ACK.value, "seq": self.last_seq, "turn": self.turn})

    def quiet_ack(self, seq: int) -> str | None:
        """Audio nobody spoke in, up to ``seq``: acknowledged on its own, unless a turn's
        checkpoint acknowledged it already."""
        if seq <= self.last_seq:
            return None
        return encode({"type": Ctl.ACK.value, "seq": seq, "turn": self.turn})

    def decided(self, t: UserTurn, text: str, llm: tuple[str, str]) -> str | None:
        """The ``decided`` frame of turn ``t``, whose reply the model ``llm`` finished
        writing as ``text``; None for a text over the bound (a new owner then asks its own
        model, as it would without one)."""
        if not text.strip() or len(text.encode()) > MAX_DECIDED_TEXT_BYTES:
            return None
        return encode(
            {
                "type": Ctl.DECIDED.value,
                "turn": t.turn,
                "seq": t.seq,
                "text": text,
                "llm": list(llm),
                "node": self.node_id,
            }
        )

    # ------------------------------------------------------------------ turns

    def savepoint(self) -> Savepoint:
        return Savepoint(self.turn, self.memory.to_state())

    def rollback(self, savepoint: Savepoint) -> None:
        """A turn that fails before its commit leaves no trace: memory and turn number go
        back to the last committed state, so the checkpoint stays what the log explains."""
        self.turn = savepoint.turn
        self.memory = self._memory_from(savepoint.memory)

    def begin_user_turn(self, seq: int, text: str, confidence: float) -> UserTurn:
        self.turn += 1
        update = self.memory.observe_user(self.turn, text)
        ops = [(c.slot, c.value) for c in update.changes]
        return UserTurn(self.turn, seq, text, confidence, ops, update.intent)

    def answered(self, t: UserTurn, reply: Reply) -> Answer:
        """The model answered turn ``t``; its frames are applied with its checkpoint."""
        answer = turn_outcomes.answer(self.memory, self.tenant, self.call_id, t, reply)
        self.last_seq = max(self.last_seq, t.seq)
        return answer

    def begin_repeat_turn(self, seq: int, text: str, confidence: float) -> UserTurn:
        """A turn heard with too little confidence: nothing in it is taken as said."""
        self.turn += 1
        self.memory.observe_user(self.turn, "")
        return UserTurn(self.turn, seq, text, confidence, [], "repeat")

    def repeated(
        self, t: UserTurn, *, line: str, heard: str, interrupted: bool, fallbacks: list[str]
    ) -> list[Record]:
        """The caller was asked to say turn ``t`` again (``line``) and heard ``heard``."""
        records = turn_outcomes.repeat(
            self.memory, t, line=line, heard=heard, interrupted=interrupted, fallbacks=fallbacks
        )
        self.last_seq = max(self.last_seq, t.seq)
        return records

    def close_turn(
        self, records: list[Record], metrics: TurnMetrics, *, effects_waiting: bool
    ) -> None:
        """Append a turn's last records (its metrics) before its checkpoint."""
        turn_outcomes.closing(records, metrics, self.turn, effects_waiting=effects_waiting)

    def greeted(self, fallbacks: list[str]) -> list[Record]:
        """The greeting was spoken (with these fallbacks): its records."""
        return turn_outcomes.greeting_fallbacks(fallbacks)

    def amend_heard(self, turn: int, heard: str) -> list[Record] | None:
        """A barge-in after ``turn`` was committed: the records amending it, or None when
        nothing changes (or the call is no longer active)."""
        if not self.active:
            return None
        return turn_outcomes.barge_in(self.memory, turn, heard)

    # ------------------------------------------------------------------ the end

    def hangup(self, seq: int) -> list[Record]:
        """The caller hung up: the call ends with this frame (its final checkpoint)."""
        self.last_seq = seq
        self.to(CallState.ENDED)
        return [eventlog.record(EventType.CALL_ENDED, self.turn, seq=seq, reason="hangup")]

    def abandon(self) -> list[Record]:
        """The caller left without hanging up and did not come back within the reconnect
        grace: the call ends as if they had hung up after their last frame."""
        self.to(CallState.ENDED)
        return [
            eventlog.record(EventType.CALL_ENDED, self.turn, seq=self.last_seq, reason="abandoned")
        ]

    def ended(self) -> str:
        return encode({"type": Out.CALL_ENDED.value, "turn": self.turn})

    def hand_off(self) -> str:
        """Drained at a turn boundary (the last turn saved): the router moves the call."""
        self.to(CallState.HANDED_OFF)
        return encode({"type": Ctl.HANDOFF.value, "turn": self.turn})

    # ------------------------------------------------------------------ checkpoint

    def snapshot(self, outbox: list[OutboxEntry], event_cursor: int, now_ms: int) -> Checkpoint:
        mem = self.memory.to_state()
        return Checkpoint(
            tenant=self.tenant,
            call_id=self.call_id,
            caller=self.caller,
            epoch=self.epoch,
            node=self.node_id,
            last_seq=self.last_seq,
            turn=self.turn,
            status="ended" if self.state is CallState.ENDED else "active",
            working=mem.working,
            facts=mem.facts,
            outbox=list(outbox),
            event_cursor=event_cursor,
            extra=mem.extra,
            created_ms=self.created_ms,
            updated_ms=now_ms,
        )

    def _memory_from(self, state: MemoryState) -> SessionMemory:
        return SessionMemory.from_state(
            self.tenant,
            self.caller,
            state.working,
            state.facts,
            state.extra,
            self._memory_config,
        )
