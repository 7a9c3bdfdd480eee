"""Sensitive actions are gated by the node, not by the prompt.

A model's tool call that would become a sensitive effect (a booking; later cancellations
and payments) is obeyed only when the agent's previous turn read that exact action back to
the caller, as the caller heard it, and the caller's current utterance is an explicit yes.
Anything else — a model that calls the tool unprompted, or one that follows instructions
injected into a transcript or a knowledge-base document — is refused: the effect is not
emitted, the turn takes the fallback :data:`SENSITIVE_UNCONFIRMED`, and the agent reads the
action back and asks instead, so a real confirmation can follow on the next turn.

Pure: the caller (the turn runner) passes what was heard and said; nothing here does I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from conversation_node.booking import booking_read_back

SENSITIVE_UNCONFIRMED = "sensitive_unconfirmed"

# Tool → its canonical read-back: the words that must have been said for the caller to
# have heard exactly what the call's arguments do (None: the arguments do not describe an
# action completely, which is never confirmable). Every sensitive tool is listed here.
READ_BACKS: dict[str, Callable[[Mapping[str, Any]], str | None]] = {
    "create_booking": booking_read_back,
}

# An explicit yes: the utterance begins with one of these, is short, and has no word of
# doubt or of a different instruction in it ("yes, but ...", "yes, ignore that and ...").
_YES_WORDS = frozenset(
    {"yes", "yeah", "yep", "yup", "correct", "confirm", "confirmed", "absolutely", "sure"}
)
_YES_PHRASES = ("please do", "go ahead", "book it", "that's right", "that is right")
_DOUBT_WORDS = frozenset(
    {"no", "not", "don't", "nope", "wait", "but", "change", "cancel", "instead", "ignore",
     "actually", "different", "another", "other", "later", "maybe", "unless", "if"}
)  # fmt: skip
MAX_CONFIRMATION_WORDS = 8

_NON_WORD = re.compile(r"[^a-z0-9']+")


def normalize(text: str) -> str:
    """Lower case, punctuation and spacing folded: how read-backs are compared."""
    return " ".join(_NON_WORD.sub(" ", text.lower().replace("\u2019", "'")).split())


def confirms(utterance: str) -> bool:
    """True when ``utterance`` is an explicit, unqualified yes."""
    words = normalize(utterance).split()
    if not words or len(words) > MAX_CONFIRMATION_WORDS:
        return False
    if any(w in _DOUBT_WORDS for w in words):
        return False
    said = " ".join(words)
    return words[0] in _YES_WORDS or said.startswith(_YES_PHRASES)


def is_sensitive(tool: str) -> bool:
    return tool in READ_BACKS


@dataclass(frozen=True, slots=True)
class Refusal:
    """A sensitive tool call the node did not turn into an effect, and why."""

    tool: str
    reason: str  # incomplete | not_read_back | not_confirmed
    read_back: str | None

    def ask(self) -> str:
        """What the agent says instead: the action read back, and a request for a yes."""
        if self.read_back is None:
            return "I haven't done that. I need all the details first, and your confirmation."
        return (
            f"I haven't done that yet. To confirm: {self.read_back}. "
            "Shall I go ahead? Please say yes to confirm."
        )


def review(
    tool: str, args: Mapping[str, Any], heard_before: str | None, said: str
) -> Refusal | None:
    """None when the call may become an effect; else the refusal. ``heard_before`` is the
    agent's previous turn as the caller heard it (None if there was none), ``said`` the
    caller's utterance of this turn."""
    make = READ_BACKS.get(tool)
    if make is None:
        return None
    read_back = make(args)
    if read_back is None:
        return Refusal(tool, "incomplete", None)
    if heard_before is None or normalize(read_back) not in normalize(heard_before):
        return Refusal(tool, "not_read_back", read_back)
    if not confirms(said):
        return Refusal(tool, "not_confirmed", read_back)
    return None
