"""When to answer before the caller has finished: speculative (preemptive) generation.

Once the recognizer's interim transcript is stable (a short silence, or the provider's own
"eager end of turn"), the node may start the model on it. When the final transcript
arrives and says the same thing (normalised: case, punctuation, whitespace), that running
generation becomes the turn's reply; otherwise it is cancelled at once and a new one
starts from the final words.

:class:`Speculator` is the decision only (no I/O, no clock of its own): the voice side
asks it whether to start, adopt or cancel, and does the work. Rules:

- at most one speculative generation per utterance is in flight;
- at most ``max_per_turn`` are started per utterance (the caller pausing and going on
  twice is enough retries: a third guess would waste more than it saves);
- nothing is started while a turn is being answered or a reply is being heard (the
  speculation would be built on memory that is about to change);
- every generation started ends in exactly one of adopted / cancelled.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from enum import StrEnum

__all__ = ["Decision", "Outcome", "SpeculationConfig", "Speculator", "normalise"]

_NOT_WORD = re.compile(r"[^\w\s']+")
_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """``text`` as compared for adoption: case, punctuation and spacing do not count."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return _SPACE.sub(" ", _NOT_WORD.sub(" ", folded)).strip()


@dataclass(frozen=True, slots=True)
class SpeculationConfig:
    enabled: bool = True
    max_per_turn: int = 2
    # Shortest transcript worth guessing on, in characters (after normalising).
    min_chars: int = 2

    def __post_init__(self) -> None:
        if self.max_per_turn < 1 or self.min_chars < 1:
            raise ValueError("max_per_turn and min_chars must be >= 1")


class Decision(StrEnum):
    NONE = "none"  # nothing to do
    START = "start"  # start a speculative generation on the stable text
    ADOPT = "adopt"  # the final matches: the running generation is the reply
    CANCEL = "cancel"  # the running generation is wrong: cancel it (and start afresh)


class Outcome(StrEnum):
    """What ``turn_metrics.preemptive`` says of a turn."""

    ADOPTED = "adopted"
    CANCELLED = "cancelled"
    NONE = "none"


class Speculator:
    """One call's speculation decisions, utterance by utterance."""

    def __init__(self, config: SpeculationConfig | None = None) -> None:
        self.config = config or SpeculationConfig()
        self._text: str | None = None  # normalised text of the generation in flight
        self._started_this_turn = 0
        self._cancelled_this_turn = False
        # Totals for the call's lifetime (the node's counters take the same increments).
        self.started = 0
        self.adopted = 0
        self.cancelled = 0

    @property
    def in_flight(self) -> bool:
        return self._text is not None

    def on_stable(self, text: str, *, busy: bool) -> Decision:
        """The interim transcript ``text`` looks stable. ``busy``: a turn is being
        answered or a reply is playing. START, CANCEL (a generation on other words is in
        flight: cancel it; ask again after) or NONE."""
        key = normalise(text)
        cfg = self.config
        if not cfg.enabled or busy or len(key) < cfg.min_chars:
            return Decision.NONE
        if self._text is not None:
            return Decision.NONE if key == self._text else self._cancel()
        if self._started_this_turn >= cfg.max_per_turn:
            return Decision.NONE
        self._text = key
        self._started_this_turn += 1
        self.started += 1
        return Decision.START

    def on_speech_resumed(self, text: str) -> Decision:
        """An interim transcript while a generation is in flight: the caller went on.
        CANCEL when the words are no longer those guessed on."""
        if self._text is None or normalise(text) == self._text:
            return Decision.NONE
        return self._cancel()

    def on_final(self, text: str) -> Decision:
        """The utterance ended with ``text``: ADOPT the generation in flight if it was
        started on the same words, else CANCEL it (or NONE: there is none). The next
        utterance starts afresh either way."""
        guessed, self._text = self._text, None
        self._started_this_turn = 0
        if guessed is None:
            return Decision.NONE
        if normalise(text) == guessed:
            self.adopted += 1
            self._cancelled_this_turn = False
            return Decision.ADOPT
        self.cancelled += 1
        self._cancelled_this_turn = True
        return Decision.CANCEL

    def abandon(self) -> Decision:
        """The generation in flight is dropped (a barge-in, the call ending)."""
        return Decision.NONE if self._text is None else self._cancel()

    def outcome(self, decision: Decision) -> Outcome:
        """What to report for a turn that ``on_final`` answered with ``decision``: a turn
        whose guesses were all cancelled is ``cancelled`` even when none was left at the
        end."""
        if decision is Decision.ADOPT:
            return Outcome.ADOPTED
        cancelled, self._cancelled_this_turn = self._cancelled_this_turn, False
        return Outcome.CANCELLED if cancelled or decision is Decision.CANCEL else Outcome.NONE

    def _cancel(self) -> Decision:
        self._text = None
        self.cancelled += 1
        self._cancelled_this_turn = True
        return Decision.CANCEL
