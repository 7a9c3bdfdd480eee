"""Working memory: the last K exchanges of a call, as the caller heard them."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Exchange:
    turn: int
    user: str
    # What the caller actually heard: after a barge-in this is the played prefix, not the
    # whole generated reply.
    agent: str
    interrupted: bool = False


class WorkingMemory:
    """A bounded window of recent exchanges; its size never grows with call length."""

    def __init__(self, max_turns: int) -> None:
        if max_turns < 1:
            raise ValueError("max_turns must be >= 1")
        self._items: deque[Exchange] = deque(maxlen=max_turns)

    def add(self, exchange: Exchange) -> None:
        """Append an exchange. One for the turn that is already last amends it: the caller
        barged in after the turn was committed, and heard less than was said."""
        if self._items and self._items[-1].turn == exchange.turn:
            self._items[-1] = exchange
            return
        self._items.append(exchange)

    def __iter__(self) -> Iterator[Exchange]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def last(self) -> Exchange | None:
        return self._items[-1] if self._items else None

    def to_state(self) -> list[list[Any]]:
        return [[e.turn, e.user, e.agent, e.interrupted] for e in self._items]

    @classmethod
    def from_state(cls, max_turns: int, state: list[list[Any]]) -> WorkingMemory:
        wm = cls(max_turns)
        for turn, user, agent, interrupted in state:
            wm.add(Exchange(int(turn), str(user), str(agent), bool(interrupted)))
        return wm

    def __repr__(self) -> str:
        return f"<WorkingMemory [{len(self._items)}/{self._items.maxlen} turns]>"
