"""Whether caller sound during a reply is a barge-in or a false interruption.

A cough, a door or line noise starts the recognizer's speech detection like words do.
Clearing the reply at the first sound makes every such noise cut the agent off. With a
window (``window_ms`` > 0) the reply is not stopped until the sound yields words: words
(an interim or final transcript) make it a barge-in at once; a sound that ends without
words, or yields none within the window, is a false interruption — the reply was never
stopped, the caller heard it on. Words later in the same sound still barge in: the
window only decides when the sound is written off as noise (and counted).

:class:`InterruptionGate` is that decision, without I/O or a clock (the caller runs the
timer): one per call, one sound at a time.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Action", "InterruptionGate"]


class Action(StrEnum):
    NONE = "none"
    BARGE_IN = "barge_in"  # stop the reply now (clear, stop the model and the voice)
    WAIT = "wait"  # hold on: start the window's timer
    FALSE = "false_interruption"  # the sound was noise: count it; the reply goes on


class InterruptionGate:
    def __init__(self, window_ms: float) -> None:
        if window_ms < 0:
            raise ValueError("window_ms must be >= 0")
        self.window_ms = window_ms
        self._pending = False  # a sound is in its window
        self._sound = False  # a sound is going on (in its window or written off)
        self.false_interruptions = 0

    @property
    def pending(self) -> bool:
        return self._pending

    def on_sound(self) -> Action:
        """The caller started making sound while a reply is being heard."""
        if self.window_ms == 0:
            return Action.BARGE_IN
        if self._sound:
            return Action.NONE
        self._pending = self._sound = True
        return Action.WAIT

    def on_words(self, text: str) -> Action:
        """A transcript of the sound: words barge in."""
        if not self._sound or not text.strip():
            return Action.NONE
        self._pending = self._sound = False
        return Action.BARGE_IN

    def on_silence(self) -> Action:
        """The sound ended without words (an empty utterance)."""
        action = self._false()
        self._sound = False
        return action

    def on_timeout(self) -> Action:
        """The window passed without words."""
        return self._false()

    def reset(self) -> None:
        """The reply ended (or was stopped otherwise): nothing is pending."""
        self._pending = self._sound = False

    def _false(self) -> Action:
        if not self._pending:
            return Action.NONE
        self._pending = False
        self.false_interruptions += 1
        return Action.FALSE
