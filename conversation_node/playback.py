"""One reply as the caller plays it: what they heard, and where to go on after a pause.

A reply goes out as sentences: ``agent_text``, the sentence's ``agent_audio`` chunks, then
a ``mark`` the client echoes once it has played everything before it. :class:`Playback`
follows those frames (no I/O, no clock of its own: times come in):

- it numbers them as they go out (``n``, the frame's ordinal in the turn on the wire; a
  mark's name is ``turn.n``), so frames sent again after a pause are new to the router's
  de-duplication and their marks are told from the old ones;
- what the caller heard is the sentences whose marks came back (from a client that never
  echoes a mark: what real-time playback has reached). After the reply is cleared, marks
  echoed are the client flushing its buffer (Twilio echoes pending marks on ``clear``)
  and do not count;
- ``pause``: the reply was cleared at the caller's first sound, before it is known whether
  the sound is words. Frames the model and the voice go on producing are held. ``resume``
  (the sound was noise): every frame from the first sentence the caller had not heard to
  the end of what exists is sent again, renumbered, and the reply goes on live. ``cut``
  (the sound was words: a barge-in): the rest is never heard.

Frames are kept for a resume only with ``retain`` (a node that clears at the first sound),
and only those of sentences not yet heard: a mark's echo lets go of its sentence's audio.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from callmesh.protocol import Out, mark_name

__all__ = ["UNMARKED_GRACE_S", "PlayState", "Playback"]

# A client that never echoes marks: a reply counts as played this long after its audio
# would have finished at real-time speed.
UNMARKED_GRACE_S = 0.3

_AGENT_TEXT, _AGENT_AUDIO, _MARK = Out.AGENT_TEXT.value, Out.AGENT_AUDIO.value, Out.MARK.value


class PlayState(StrEnum):
    PLAYING = "playing"
    PAUSED = "paused"  # cleared at the caller's sound; held until the sound is judged
    CUT = "cut"  # barged in: the rest of the reply is not heard


@dataclass
class _Sentence:
    text: str
    mark: str | None = None  # its mark's name on the wire, once sent
    audio_ms: float = 0.0
    played: bool = False
    # Its frames as the pipeline emitted them, kept for a resume (with ``retain``).
    frames: list[dict[str, Any]] = field(default_factory=list)


class Playback:
    """One reply (turn) as the caller plays it."""

    def __init__(self, turn: int, *, retain: bool = False) -> None:
        self.turn = turn
        self.retain = retain
        self.sentences: list[_Sentence] = []
        self.state = PlayState.PLAYING
        self.first_audio_at: float | None = None  # monotonic s; the first audio sent
        self.audio_ms = 0.0  # audio sent, replays included
        self.finished_sending = False
        self.resumes = 0
        self._next_n = 0
        # Real-time playback estimate (clients that never echo marks): sentences from
        # ``_clock_from`` on started playing at ``_clock_at``.
        self._clock_at: float | None = None
        self._clock_from = 0

    def __repr__(self) -> str:
        heard = sum(s.played for s in self.sentences)
        return (
            f"<Playback turn={self.turn} [{self.state}] {heard}/{len(self.sentences)} heard, "
            f"next n={self._next_n}{' sent' if self.finished_sending else ''}>"
        )

    @property
    def cleared(self) -> bool:
        """The caller no longer hears this reply as it was sent (paused or cut)."""
        return self.state is not PlayState.PLAYING

    # ------------------------------------------------------------------ frames out

    def outgoing(
        self, frame: dict[str, Any], bytes_per_ms: float, now: float
    ) -> dict[str, Any] | None:
        """A frame of this reply from the pipeline: the frame to send (numbered, a mark
        named), or None while paused (held) or after a cut (dropped)."""
        kind = frame["type"]
        if kind == _AGENT_TEXT or not self.sentences:
            self.sentences.append(_Sentence(frame.get("text", "")))
        sentence = self.sentences[-1]
        if kind == _AGENT_AUDIO:
            # base64: 4 characters per 3 bytes.
            sentence.audio_ms += len(frame["data"]) * 3 / 4 / bytes_per_ms
        if self.retain and self.state is not PlayState.CUT:
            sentence.frames.append(frame)
        if self.state is not PlayState.PLAYING:
            return None
        return self._send(frame, sentence, now)

    def _send(self, frame: dict[str, Any], sentence: _Sentence, now: float) -> dict[str, Any]:
        frame["n"] = n = self._next_n
        self._next_n += 1
        kind = frame["type"]
        if kind == _MARK:
            frame["name"] = sentence.mark = mark_name(self.turn, n)
        elif kind == _AGENT_AUDIO and self.first_audio_at is None:
            self.first_audio_at = self._clock_at = now
        return frame

    # ------------------------------------------------------------------ what was heard

    def on_mark_echoed(self, name: str) -> bool:
        """The client played up to the mark ``name``: True if it is one of this reply's
        (then it and every sentence before it were heard)."""
        if self.state is not PlayState.PLAYING:
            return False  # the client flushing its buffer after a clear: not heard
        for i, s in enumerate(self.sentences):
            if s.mark == name:
                for heard in self.sentences[: i + 1]:
                    heard.played = True
                    heard.frames = []  # no resume goes back before a heard sentence
                return True
        return False

    def heard(self, marks_seen: bool, now: float) -> str:
        """What the caller has heard so far: sentences whose marks came back (or, from a
        client that never echoed a mark, what real-time playback has reached)."""
        if not marks_seen and self.state is PlayState.PLAYING:
            self._played_by_clock(now)
        return " ".join(s.text for s in self.sentences if s.played)

    def playing(self, marks_seen: bool, now: float) -> bool:
        """True while the caller may still be hearing this reply (a paused one may go on)."""
        if self.state is PlayState.CUT:
            return False
        if self.state is PlayState.PAUSED or not self.finished_sending:
            return True
        if marks_seen:
            return any(s.mark is not None and not s.played for s in self.sentences)
        if self._clock_at is None:
            return False
        left_ms = sum(s.audio_ms for s in self.sentences[self._clock_from :])
        return now < self._clock_at + left_ms / 1000 + UNMARKED_GRACE_S

    def _played_by_clock(self, now: float) -> None:
        if self._clock_at is None:
            return
        played_ms, at = (now - self._clock_at) * 1000, 0.0
        for s in self.sentences[self._clock_from :]:
            at += s.audio_ms
            if at > played_ms:
                break
            s.played = True
            s.frames = []

    # ------------------------------------------------------------------ pause, resume, cut

    def pause(self, marks_seen: bool, now: float) -> bool:
        """The reply is cleared at the caller's sound; what they heard is frozen, what
        follows is held. False if it is not playing (nothing to pause)."""
        if self.state is not PlayState.PLAYING:
            return False
        if not marks_seen:
            self._played_by_clock(now)
        self.state = PlayState.PAUSED
        return True

    def resume(self, now: float) -> list[dict[str, Any]]:
        """The sound was noise: the frames to send (again), from the first sentence the
        caller had not heard to the end of what exists, renumbered and marked
        ``resumed``; the reply goes on live after them. Empty without ``retain``."""
        if self.state is not PlayState.PAUSED:
            return []
        self.state = PlayState.PLAYING
        self.resumes += 1
        start = next((i for i, s in enumerate(self.sentences) if not s.played), None)
        if start is None:
            return []
        self._clock_at, self._clock_from = now, start
        out: list[dict[str, Any]] = []
        for s in self.sentences[start:]:
            for kept in s.frames:
                frame = self._send({**kept, "resumed": True}, s, now)
                out.append(frame)
        return out

    def cut(self, marks_seen: bool, now: float) -> None:
        """A barge-in: the rest is not heard (what was, is frozen)."""
        if self.state is PlayState.PLAYING and not marks_seen:
            self._played_by_clock(now)
        self.state = PlayState.CUT
        for s in self.sentences:
            s.frames = []
