"""Session memory of one call: working memory, facts with provenance, and a short timeline.

The node calls :meth:`SessionMemory.observe_user` when the caller finishes an utterance
(facts and corrections are applied at once, so retrieval and the prompt of this very turn
see them) and :meth:`SessionMemory.observe_agent` once the reply has been played or cut off
by a barge-in (the working memory keeps what the caller heard). Everything is bounded:
``to_state()`` has the same size at turn 10 and turn 10,000.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from memory.extract import MAX_VALUE_CHARS, SLOTS, Extraction, extract
from memory.facts import SessionFacts
from memory.history import CallRecord, check_scope
from memory.sources import MAX_QUERY_CHARS, Query
from memory.working import Exchange, WorkingMemory

STATE_VERSION = 1
ACTION_INTENTS = ("booking", "cancel")
TOPIC_INTENTS = (*ACTION_INTENTS, "pricing", "hours")
# Slots a confirmed action depends on: changing one withdraws the confirmation.
ACTION_SLOTS = ("service", "date", "time", "location")
# Slots whose new value moves the conversation on rather than correcting the caller.
NOT_CORRECTIONS = ("intent", "action", "confirmed")


@dataclass(frozen=True, slots=True)
class MemoryConfig:
    working_turns: int = 8
    # Longer utterances are cut: one monologue must not blow the checkpoint or the prompt.
    max_utterance_chars: int = 400
    max_notes: int = 8
    max_slots: int = 32

    def __post_init__(self) -> None:
        for name in ("working_turns", "max_utterance_chars", "max_notes", "max_slots"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


@dataclass(frozen=True, slots=True)
class FactChange:
    """A slot set, corrected or withdrawn by a turn."""

    slot: str
    value: str | None  # None: withdrawn
    previous: str | None
    turn: int

    @property
    def correction(self) -> bool:
        """A value replaced by a different one ("no, Tuesday")."""
        return (
            self.previous is not None
            and self.value is not None
            and self.slot not in NOT_CORRECTIONS
        )


@dataclass(frozen=True, slots=True)
class TurnUpdate:
    """What a user utterance changed in the session."""

    turn: int
    intent: str
    changes: tuple[FactChange, ...] = ()
    confirmed: bool = False
    denied: bool = False
    replayed: bool = False  # the turn had already been observed (a re-answered turn)

    @property
    def corrections(self) -> tuple[FactChange, ...]:
        return tuple(c for c in self.changes if c.correction)


@dataclass(frozen=True, slots=True)
class MemoryState:
    """The msgpack-ready parts of a checkpoint: ``working`` and ``facts`` go to the
    checkpoint fields of those names, ``extra`` to ``Checkpoint.extra``."""

    working: list[list[Any]]
    facts: dict[str, list[Any]]
    extra: dict[str, Any]


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class SessionMemory:
    """Working memory + session facts + timeline of one call of one caller of one tenant."""

    def __init__(self, tenant: str, caller: str, config: MemoryConfig | None = None) -> None:
        check_scope(tenant, caller)
        self.tenant = tenant
        self.caller = caller
        self.config = config or MemoryConfig()
        self.working = WorkingMemory(self.config.working_turns)
        self.facts = SessionFacts(self.config.max_slots)
        # Notable events (topics, corrections, confirmations) of turns that may have left
        # the working window: the compressed history of a long call.
        self.notes: deque[tuple[int, str]] = deque(maxlen=self.config.max_notes)
        self._pending_user: tuple[int, str] | None = None
        self._last_user_turn = 0

    # ------------------------------------------------------------ per turn

    def observe_user(
        self, turn: int, text: str, extraction: Extraction | None = None
    ) -> TurnUpdate:
        """Apply a final user utterance: facts (later values override earlier ones, with
        provenance), topic, confirmation. ``extraction`` comes from an LLM tool call when
        there is one; without it the rules run. A turn seen before is ignored."""
        if turn <= self._last_user_turn:
            return TurnUpdate(turn, "", replayed=True)
        self._last_user_turn = turn
        text = _clip(text, self.config.max_utterance_chars)
        ex = extraction if extraction is not None else extract(text)
        changes: list[FactChange] = []
        for slot, value in ex.slots.items():
            self._set(slot, value[:MAX_VALUE_CHARS], turn, changes)
        if ex.intent in TOPIC_INTENTS:
            self._set("intent", ex.intent, turn, changes)
        if ex.intent in ACTION_INTENTS:
            # Kept apart from the topic: a price question in the middle of a booking
            # must not change what a later "yes" confirms.
            self._set("action", ex.intent, turn, changes)
        confirmed = self.facts.fact("confirmed")
        if confirmed is not None and any(c.slot in ACTION_SLOTS for c in changes):
            self.facts.clear("confirmed")
            changes.append(FactChange("confirmed", None, confirmed.value, turn))
            self.notes.append((turn, "confirmation withdrawn: details changed"))
        if ex.confirmed and self.facts.get("action") in ACTION_INTENTS:
            action = self._describe_action()
            if self._set("confirmed", action, turn, changes):
                self.notes.append((turn, f"caller confirmed {action}"))
        for c in changes:
            if c.correction and c.slot not in NOT_CORRECTIONS:
                self.notes.append((turn, f"{c.slot} corrected from {c.previous} to {c.value}"))
            elif c.slot == "intent" and c.value:
                self.notes.append((turn, f"topic: {c.value}"))
        self._pending_user = (turn, text)
        return TurnUpdate(turn, ex.intent, tuple(changes), ex.confirmed, ex.denied)

    def observe_agent(self, turn: int, heard: str, *, interrupted: bool = False) -> None:
        """Record the reply as the caller heard it: after a barge-in, only the played part."""
        last = self.working.last()
        if last is not None and last.turn >= turn:
            return  # replayed turn
        user = ""
        if self._pending_user is not None and self._pending_user[0] == turn:
            user = self._pending_user[1]
        self._pending_user = None
        heard = _clip(heard, self.config.max_utterance_chars)
        self.working.add(Exchange(turn, user, heard, interrupted))

    def amend_heard(self, turn: int, heard: str) -> bool:
        """The caller interrupted turn ``turn`` after it was recorded: keep only what they
        heard. False if that turn is no longer the last exchange (nothing to amend)."""
        last = self.working.last()
        if last is None or last.turn != turn or last.interrupted:
            return False
        heard = _clip(heard, self.config.max_utterance_chars)
        self.working.add(Exchange(turn, last.user, heard, True))
        return True

    def observe_turn(
        self,
        turn: int,
        user: str,
        heard: str,
        *,
        interrupted: bool = False,
        extraction: Extraction | None = None,
    ) -> TurnUpdate:
        """``observe_user`` and ``observe_agent`` at once, for a turn already finished."""
        update = self.observe_user(turn, user, extraction)
        self.observe_agent(turn, heard, interrupted=interrupted)
        return update

    def query_for(self, text: str) -> Query:
        """A retrieval query for a transcript (interim or final): the session's slots plus
        those the text itself states, so a prefetch on "on Tuesday" already asks for
        Tuesday. Uses the rules, also with a real model: it has to be instant."""
        text = text[:MAX_QUERY_CHARS]  # the rules, like the sources, read a bounded text
        ex = extract(text)
        slots = {k: v for k, v in self.facts.values().items() if k in SLOTS}
        slots.update((k, v[:MAX_VALUE_CHARS]) for k, v in ex.slots.items())
        intent = ex.intent if ex.intent in TOPIC_INTENTS else (self.facts.get("intent") or "")
        return Query(text, self.tenant, self.caller, tuple(sorted(slots.items())), intent)

    # ------------------------------------------------------------ call end

    def summary(self) -> str:
        """A short, rule-built summary of the call for the caller's history."""
        facts = self.facts.values()
        parts = []
        if "name" in facts:
            parts.append(f"Caller {facts['name']}.")
        if "intent" in facts:
            parts.append(f"Last topic: {facts['intent']}.")
        if "confirmed" in facts:
            parts.append(f"Confirmed {facts['confirmed']}.")
        elif "action" in facts:
            parts.append(f"Discussed {self._describe_action()}, not confirmed.")
        corrections = [text for _, text in self.notes if "corrected" in text][-2:]
        if corrections:
            joined = "; ".join(corrections)
            parts.append(joined[0].upper() + joined[1:] + ".")
        return " ".join(parts) or "No details recorded."

    def call_record(self, call_id: str, ended_ms: int) -> CallRecord:
        """What to save in the customer history when the call ends."""
        return CallRecord(
            self.tenant, self.caller, call_id, ended_ms, self.facts.values(), self.summary()
        ).bounded()

    # ------------------------------------------------------------ checkpoint

    def to_state(self) -> MemoryState:
        return MemoryState(
            self.working.to_state(),
            self.facts.to_state(),
            {
                "v": STATE_VERSION,
                "notes": [[t, s] for t, s in self.notes],
                "last_user_turn": self._last_user_turn,
                "pending_user": list(self._pending_user) if self._pending_user else None,
            },
        )

    @classmethod
    def from_state(
        cls,
        tenant: str,
        caller: str,
        working: list[list[Any]],
        facts: dict[str, list[Any]],
        extra: Mapping[str, Any],
        config: MemoryConfig | None = None,
    ) -> SessionMemory:
        """Restore from a checkpoint's ``working``, ``facts`` and ``extra`` (an empty
        ``extra`` restores a checkpoint written before memory extras existed)."""
        mem = cls(tenant, caller, config)
        mem.working = WorkingMemory.from_state(mem.config.working_turns, working)
        mem.facts = SessionFacts.from_state(facts, mem.config.max_slots)
        mem.notes.extend((int(t), str(s)) for t, s in extra.get("notes", ()))
        mem._last_user_turn = int(extra.get("last_user_turn", 0))
        if pending := extra.get("pending_user"):
            mem._pending_user = (int(pending[0]), str(pending[1]))
        return mem

    # ------------------------------------------------------------ internals

    def _set(self, slot: str, value: str, turn: int, changes: list[FactChange]) -> bool:
        previous = self.facts.get(slot)
        if not self.facts.set(slot, value, turn):
            return False
        changes.append(FactChange(slot, value, previous, turn))
        return True

    def _describe_action(self) -> str:
        details = [self.facts.get(s) for s in ACTION_SLOTS]
        listed = ", ".join(d for d in details if d)
        action = self.facts.get("action") or "action"
        return f"{action}: {listed}" if listed else action

    def __repr__(self) -> str:
        return (
            f"<SessionMemory {self.tenant}/{self.caller} [{len(self.working)} turns, "
            f"{len(self.facts)} facts, {len(self.notes)} notes]>"
        )
