"""Session memory: structured facts (slots) extracted every turn, with provenance.

A later value of a slot overrides an earlier one ("no, Tuesday"), and the fact records
which turn set it and what it replaced, so replay and the prompt can show both.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Fact:
    value: str
    turn: int
    # The value this one corrected, if any (one level: enough to explain a correction
    # without letting state grow with call length).
    replaced: str | None = None


class SessionFacts:
    """Slots of one call. Bounded: one entry per slot name, at most ``max_slots`` slots."""

    def __init__(self, max_slots: int = 64) -> None:
        if max_slots < 1:
            raise ValueError("max_slots must be >= 1")
        self._facts: dict[str, Fact] = {}
        self._max_slots = max_slots

    def set(self, slot: str, value: str, turn: int) -> bool:
        """Record a value; returns True when it changed the slot."""
        old = self._facts.get(slot)
        if old is not None and old.value == value:
            return False
        if old is None and len(self._facts) >= self._max_slots:
            return False
        self._facts[slot] = Fact(value, turn, old.value if old else None)
        return True

    def clear(self, slot: str) -> Fact | None:
        """Forget a slot (a withdrawn confirmation); returns what it held."""
        return self._facts.pop(slot, None)

    def get(self, slot: str) -> str | None:
        """The slot's current value."""
        fact = self._facts.get(slot)
        return fact.value if fact else None

    def fact(self, slot: str) -> Fact | None:
        return self._facts.get(slot)

    def values(self) -> dict[str, str]:
        return {k: f.value for k, f in self._facts.items()}

    def __iter__(self) -> Iterator[tuple[str, Fact]]:
        return iter(self._facts.items())

    def __len__(self) -> int:
        return len(self._facts)

    def to_state(self) -> dict[str, list[Any]]:
        return {k: [f.value, f.turn, f.replaced] for k, f in self._facts.items()}

    @classmethod
    def from_state(cls, state: dict[str, list[Any]], max_slots: int = 64) -> SessionFacts:
        sf = cls(max_slots)
        for slot, (value, turn, replaced) in list(state.items())[:max_slots]:
            sf._facts[slot] = Fact(str(value), int(turn), replaced)
        return sf

    def __repr__(self) -> str:
        return f"<SessionFacts {self.values()!r}>"
