"""How long a pause ends the caller's turn: adaptive endpointing.

A fixed trailing silence is too long after "Yes." and too short after "I'd like to book
a …". :class:`Endpointer` picks the wait from what has been heard so far (no I/O, no
clock: the recognizer asks it as transcripts change and counts the silence itself):

- the shortest wait (``min_ms``) when the transcript is a complete sentence (it ends in
  terminal punctuation, as punctuating recognizers write) or a short yes/no answer just
  after the agent asked a yes/no question;
- the longest (``max_ms``) mid-phrase: the transcript ends on a word that cannot end a
  sentence (a conjunction, an article, a preposition, a filler) or on a comma;
- otherwise ``base_ms`` (the configured endpointing silence, kept within min and max).

Where a provider supplies the probability that speech is still going on (a real VAD such
as Silero, or a turn-detection model), :meth:`Endpointer.wait_ms` takes it and moves the
wait between min and max with it: the hook for such providers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Endpointer", "EndpointingConfig", "is_yes_no_question"]

_WORD = re.compile(r"[\w']+")
# Words a sentence does not end on: the caller is mid-phrase.
_OPEN_ENDED = frozenset(
    str.split(
        """a an the and or but so because if then to of for with at from by my your our
        their his her its um uh er erm which who whose than as would could should will
        can i i'm we're"""
    )
)
# Not in it although they often come mid-phrase: words that also end sentences ("thank
# you", "I like that", "that's what it is"): waiting long after them delays many turns.
_ANSWERS = frozenset(
    str.split(
        """yes yeah yep yup no nope nah sure ok okay correct right absolutely definitely
    please fine"""
    )
)
_YES_NO_OPENERS = frozenset(
    str.split(
        """do does did is are was were can could would will should shall have has had
    may might am isn't aren't don't doesn't didn't won't wouldn't can't couldn't"""
    )
)


def is_yes_no_question(reply: str) -> bool:
    """Whether the agent's ``reply`` ends by asking a yes/no question ("… Shall I book
    it?"): its last sentence is a question that opens with an auxiliary verb."""
    text = reply.strip()
    if not text.endswith("?"):
        return False
    last = re.split(r"(?<=[.!?])\s+", text)[-1]
    words = _WORD.findall(last.lower())
    return bool(words) and words[0] in _YES_NO_OPENERS


@dataclass(frozen=True, slots=True)
class EndpointingConfig:
    min_ms: int = 150
    max_ms: int = 800
    base_ms: int = 300
    adaptive: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.min_ms <= self.max_ms:
            raise ValueError("endpointing needs 0 < min_ms <= max_ms")
        if self.base_ms <= 0:
            raise ValueError("base_ms must be > 0")


class Endpointer:
    """The end-of-utterance wait for one recognition stream."""

    def __init__(self, config: EndpointingConfig | None = None) -> None:
        self.config = config or EndpointingConfig()
        self.expect_yes_no = False

    @property
    def base_ms(self) -> int:
        c = self.config
        return min(c.max_ms, max(c.min_ms, c.base_ms)) if c.adaptive else c.base_ms

    def wait_ms(self, text: str, speech_probability: float | None = None) -> int:
        """Silence (ms) after which the utterance heard so far (``text``) is over."""
        c = self.config
        if not c.adaptive:
            return c.base_ms
        if speech_probability is not None:
            p = min(1.0, max(0.0, speech_probability))
            return round(c.min_ms + (c.max_ms - c.min_ms) * p)
        stripped = text.strip()
        words = _WORD.findall(stripped.lower())
        if not words:
            return self.base_ms
        if stripped.endswith((",", "-", "…", "...")) or words[-1] in _OPEN_ENDED:
            return c.max_ms
        if stripped.endswith((".", "!", "?")):
            return c.min_ms
        if self.expect_yes_no and len(words) <= 4 and words[0] in _ANSWERS:
            return c.min_ms
        return self.base_ms
