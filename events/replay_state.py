"""A call's state rebuilt from its event log, record by record.

Working memory and facts are rebuilt with the memory package's own classes, from the
MEMORY records alone, so :mod:`events.replay_verify` can hold them against the last
checkpoint: the log must explain the state the call continued from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from events.eventlog import EventType
from memory.facts import SessionFacts
from memory.working import Exchange, WorkingMemory

DEFAULT_WORKING_TURNS = 8


@dataclass
class EffectView:
    msg_id: str
    kind: str
    turn: int
    payload: dict[str, Any]
    outcome: str = "pending"  # pending | delivered | dead_lettered
    attempts: int = 0
    status: int = 0
    lag_ms: int | None = None


@dataclass
class CallState:
    """A call's state as rebuilt from its log."""

    tenant: str
    call_id: str
    caller: str = ""
    node: str = ""
    epoch: int = 0
    turn: int = 0
    last_seq: int = 0
    status: str = "active"
    ended_reason: str = ""
    working_turns: int = DEFAULT_WORKING_TURNS
    working: WorkingMemory = field(default_factory=lambda: WorkingMemory(DEFAULT_WORKING_TURNS))
    facts: SessionFacts = field(default_factory=SessionFacts)
    effects: dict[str, EffectView] = field(default_factory=dict)
    ownership: list[dict[str, Any]] = field(default_factory=list)
    _deliveries: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)

    def _settle(self, msg_id: str) -> None:
        view, rec = self.effects.get(msg_id), self._deliveries.get(msg_id)
        if view is not None and rec is not None:
            view.outcome, view.attempts = rec.get("outcome", "?"), int(rec.get("attempts", 0))
            view.status, view.lag_ms = int(rec.get("status", 0)), rec.get("lag_ms")

    def apply(self, rec: dict[str, Any]) -> None:
        """Fold one record into the state."""
        kind, turn = rec.get("type"), int(rec.get("turn", 0))
        if kind == EventType.EFFECT_DELIVERY:
            # Written by the effects worker; it settles an effect, not a turn. It can land
            # before the EFFECT record (the effect is published first), so keep it.
            self._deliveries[rec.get("msg_id", "")] = rec
            self._settle(rec.get("msg_id", ""))
            return
        self.turn = max(self.turn, turn)
        if "seq" in rec:
            # Any record that applied an inbound frame says so (user turns, hang-up).
            self.last_seq = max(self.last_seq, int(rec["seq"]))
        if kind == EventType.CALL_STARTED:
            self.caller = rec.get("caller", self.caller)
            size = int(rec.get("working_memory_turns") or DEFAULT_WORKING_TURNS)
            if size != self.working_turns:
                # The node's window size; a resumed call keeps what it has, re-windowed.
                self.working = WorkingMemory.from_state(size, self.working.to_state()[-size:])
                self.working_turns = size
        elif kind == EventType.OWNERSHIP:
            self.node, self.epoch = rec.get("node", ""), int(rec.get("epoch", 0))
            self.ownership.append({k: rec.get(k) for k in ("turn", "node", "epoch", "reason")})
        elif kind == EventType.EFFECT:
            msg_id = rec.get("msg_id", "")
            self.effects[msg_id] = EffectView(
                msg_id, rec.get("kind", ""), turn, rec.get("payload") or {}
            )
            self._settle(msg_id)
        elif kind == EventType.MEMORY:
            # Clears first: within a turn a slot is only cleared before it is set again
            # (a withdrawn confirmation), so this order reproduces the node's facts exactly.
            for slot in rec.get("facts_cleared") or []:
                self.facts.clear(str(slot))
            for slot, value in (rec.get("facts_set") or {}).items():
                self.facts.set(slot, value, turn)
            if rec.get("exchange"):
                t, user, agent, interrupted = rec["exchange"]
                self.working.add(Exchange(int(t), str(user), str(agent), bool(interrupted)))
        elif kind == EventType.CALL_ENDED:
            self.status, self.ended_reason = "ended", rec.get("reason", "")

    def verified_fields(self) -> dict[str, Any]:
        return {
            "turn": self.turn,
            "last_seq": self.last_seq,
            "status": self.status,
            "working": self.working.to_state(),
            "facts": self.facts.to_state(),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.verified_fields(),
            "caller": self.caller,
            "node": self.node,
            "epoch": self.epoch,
            "ended_reason": self.ended_reason,
            "ownership": self.ownership,
            "effects": [vars(e) for e in self.effects.values()],
        }


def rebuild(
    tenant: str, call_id: str, records: list[dict[str, Any]], at: int | None = None
) -> CallState:
    """The state after every record (or every record of turns ``<= at``), in log order."""
    state = CallState(tenant, call_id)
    for rec in records:
        if at is None or int(rec.get("turn", 0)) <= at:
            state.apply(rec)
    return state
