"""What makes a change of owner node invisible to the caller (invariant 5), without I/O.

A proxied call (:class:`router.proxy.ProxySession`, for native and Twilio callers alike)
keeps two things across a relink:

- :class:`UnackedFrames`: the caller's frames the owner has not acknowledged yet (a node
  acknowledges a ``seq`` once its checkpoint holds everything up to it), replayed in
  ``seq`` order to the next owner, which skips what its checkpoint already applied. Caller
  audio is kept apart: it is never refused, and only the oldest of it is dropped when
  more than a bound of it waits; any other frame is refused beyond a count and beyond a
  total of bytes (a count alone let 300 frames of 200 KiB each hold 60 MB of a router).
- :class:`ReplyDedup`: the reply frames of turns the caller has not heard to the end,
  remembered by ``(turn, n)``. A new owner re-saying such a turn is not heard twice; if it
  says something else, the caller is told to ``clear`` the dead node's partial reply and
  hears the new one from its start.
- :class:`DecidedText`: the reply text the owner's model finished writing for the turn in
  flight (``decided``), kept until that turn is acknowledged and given to a new owner, which
  then says it instead of asking the model again: the caller hears the same reply go on.

The first two are on the path of every frame (~50 a second per call): a frame costs what keeping
it costs (its audio's bytes, :mod:`router.unacked_audio`; a reply's ``(turn, n)`` entry),
never a wait.
"""

from __future__ import annotations

import heapq
from enum import Enum
from operator import attrgetter
from typing import Any

from callmesh.audio.format import TELEPHONY_RATE, AudioEncoding, bytes_per_ms
from callmesh.protocol import AGENT_AUDIO_TYPE, Inbound, Out, decided_reply, encode
from router.unacked_audio import ReplayedAudio, UnackedAudio

_SEQ = attrgetter("seq")

# A reply frame as it is sent: (kind, raw, parsed; None for audio routed unparsed).
ReplyFrame = tuple[str, str, dict[str, Any] | None]


class UnackedFrames:
    """The caller's frames not yet acknowledged by the owner node, kept for replay."""

    __slots__ = (
        "_audio",
        "_frames",
        "frame_bytes",
        "max_audio_bytes",
        "max_frame_bytes",
        "max_frames",
    )

    def __init__(
        self, max_frames: int, max_audio_bytes: int = 0, max_frame_bytes: int = 1 << 20
    ) -> None:
        # Beyond ``max_frames`` unacknowledged non-audio frames, or ``max_frame_bytes`` of
        # them (their raw text), more are refused.
        self.max_frames = max_frames
        self.max_frame_bytes = max_frame_bytes
        # Beyond this much unacknowledged audio the oldest goes (set once the call's
        # audio format is known: its ``start``).
        self.max_audio_bytes = max_audio_bytes
        # A list, not a deque: an empty deque is 760 bytes (a block of 64 slots), and
        # frames other than audio are few (a mark per reply sentence, a DTMF key...).
        self._frames: list[Inbound] = []
        self.frame_bytes = 0
        # The audio, compactly (the decoded bytes; its text is rebuilt on replay).
        self._audio = UnackedAudio()

    def __repr__(self) -> str:
        return (
            f"<UnackedFrames [{len(self._frames)} frames, {len(self._audio)} audio "
            f"({self._audio.bytes}/{self.max_audio_bytes} bytes)]>"
        )

    def __len__(self) -> int:
        return len(self._frames) + len(self._audio)

    @property
    def frames_waiting(self) -> int:
        """Unacknowledged frames other than audio (an utterance in text, a hangup...)."""
        return len(self._frames)

    @property
    def audio_waiting_ms(self) -> int:
        """Unacknowledged caller audio (20 ms frames)."""
        return 20 * len(self._audio)

    def bound_audio(self, max_ms: int, audio: dict[str, Any] | None) -> None:
        """Keep at most ``max_ms`` of unacknowledged audio in the format of the call's
        ``start`` (its ``audio`` object; none: mu-law at 8 kHz)."""
        audio = audio or {}
        encoding = AudioEncoding(audio.get("encoding", AudioEncoding.MULAW))
        rate = int(audio.get("sample_rate", TELEPHONY_RATE))
        self.max_audio_bytes = max_ms * max(1, int(bytes_per_ms(encoding, rate)))

    def keep_audio(self, frame: Inbound) -> int:
        """Keep caller audio for replay. Live audio is never refused, so past the bound
        the oldest unacknowledged audio goes (a new owner hears the most recent of it);
        returns how many frames went (the newest frame always stays)."""
        audio = self._audio
        audio.append(frame)
        if audio.bytes <= self.max_audio_bytes:
            return 0
        return audio.bound(self.max_audio_bytes)

    def keep(self, frame: Inbound) -> bool:
        """Keep a frame other than audio; False (not kept) when ``max_frames`` of them, or
        ``max_frame_bytes`` with this one, wait already: the caller is refused and must
        slow down."""
        size = len(frame.raw)
        if len(self._frames) >= self.max_frames or self.frame_bytes + size > self.max_frame_bytes:
            return False
        self._frames.append(frame)
        self.frame_bytes += size
        return True

    def ack(self, seq: int) -> None:
        """The owner acknowledged every frame up to ``seq``: they are no longer needed."""
        frames = self._frames
        if frames and frames[0].seq <= seq:
            n = 0
            while n < len(frames) and frames[n].seq <= seq:
                self.frame_bytes -= len(frames[n].raw)
                n += 1
            del frames[:n]
        self._audio.ack(seq)

    @property
    def audio_bytes(self) -> int:
        """Unacknowledged caller audio (bytes)."""
        return self._audio.bytes

    def replay(self) -> list[Inbound | ReplayedAudio]:
        """Every unacknowledged frame in ``seq`` order, each with its ``raw`` text, audio
        byte for byte as it came in (a copy: more may be kept while the replay is sent)."""
        frames: list[Inbound | ReplayedAudio] = list(self._frames)
        return list(heapq.merge(frames, self._audio.replay(), key=_SEQ))


class Verdict(Enum):
    """What to do with one reply frame of the owner node."""

    SEND = "send"  # new to the caller
    DROP = "drop"  # the caller heard the whole turn already
    HOLD = "hold"  # the caller heard this frame already; held in case the turn changes
    # The owner re-says the turn differently: send ``clear_frame(turn)``, then
    # ``take_held()``, then this frame.
    CLEAR = "clear"


SEND, DROP, HOLD, CLEAR = Verdict.SEND, Verdict.DROP, Verdict.HOLD, Verdict.CLEAR


def clear_frame(turn: int) -> tuple[str, dict[str, Any]]:
    """The ``clear`` that makes the caller drop a turn's partial reply: (raw, parsed)."""
    clear = {"type": Out.CLEAR.value, "turn": turn, "reason": "failover"}
    return encode(clear), clear


class ReplyDedup:
    """Reply frames the caller heard, by ``(turn, n)``, for the turns it has not heard to
    the end: so a turn that a new owner says again reaches the caller once."""

    __slots__ = ("_delivered", "_held", "completed_turn")

    def __init__(self) -> None:
        # Highest turn whose ``turn_metrics`` the caller received: its reply is complete.
        # -1: not even turn 0 (the greeting) is complete yet.
        self.completed_turn = -1
        self._delivered: dict[tuple[int, int], int] = {}  # (turn, n) → digest of its content
        # Frames the caller has already, re-said by the current owner:
        # ((turn, n), digest, kind, raw, parsed).
        self._held: list[tuple[tuple[int, int], int, str, str, dict[str, Any] | None]] = []

    def __repr__(self) -> str:
        return (
            f"<ReplyDedup [turn {self.completed_turn} complete, "
            f"{len(self._delivered)} delivered, {len(self._held)} held]>"
        )

    def offer(self, kind: str, raw: str, frame: dict[str, Any]) -> Verdict:
        """Judge one reply frame (``agent_text``, ``agent_audio``, ``mark``) of the owner."""
        turn = int(frame.get("turn", 0))
        if turn <= self.completed_turn:
            # A reply resumed after a false interruption may go on after its turn is
            # complete (it was committed while the caller still played it): its frames are
            # new, with numbers never sent before. Anything else of a complete turn is a
            # new owner saying it again.
            return SEND if frame.get("resumed") is True else DROP
        digest = hash(frame.get("text") or frame.get("data") or frame.get("name") or "")
        return self._judge((turn, int(frame.get("n", 0))), digest, kind, raw, frame)

    def offer_audio(self, raw: str, turn: int, n: int, data: str) -> Verdict:
        """:meth:`offer` of an ``agent_audio`` frame read without parsing it
        (``protocol.read_agent_audio``): the same verdict. That spelling carries no
        ``resumed``, so of a complete turn it is a new owner saying it again."""
        if turn <= self.completed_turn:
            return DROP
        return self._judge((turn, n), hash(data), AGENT_AUDIO_TYPE, raw, None)

    def _judge(
        self,
        key: tuple[int, int],
        digest: int,
        kind: str,
        raw: str,
        frame: dict[str, Any] | None,
    ) -> Verdict:
        turn = key[0]
        seen = self._delivered.get(key)
        if seen is None:
            self._delivered[key] = digest
            return SEND
        if seen == digest:
            self._held.append((key, digest, kind, raw, frame))
            return HOLD
        # The caller drops what it heard of this turn and hears it anew: the held frames
        # (sent again) and this one are what it has of it, should yet another owner say
        # the turn again.
        delivered = {k: v for k, v in self._delivered.items() if k[0] != turn}
        for held_key, held_digest, *_ in self._held:
            delivered[held_key] = held_digest
        delivered[key] = digest
        self._delivered = delivered
        return CLEAR

    def take_held(self) -> list[ReplyFrame]:
        """The held frames, to send after a ``clear`` (they are no longer held)."""
        held, self._held = self._held, []
        return [(kind, raw, frame) for _, _, kind, raw, frame in held]

    def complete(self, turn: int) -> bool:
        """The owner says ``turn`` is over (``turn_metrics``); True when that is news, and
        the caller should get the ``turn_metrics``."""
        if turn <= self.completed_turn:
            return False
        self.completed_turn = turn
        self._delivered = {k: v for k, v in self._delivered.items() if k[0] > turn}
        self._held.clear()
        return True

    def relink(self) -> None:
        """A new link: what the previous one re-said and held is moot, since the new owner
        starts its reply over."""
        self._held.clear()


class DecidedText:
    """The decided reply of the turn in flight (one at most, bounded by
    :func:`callmesh.protocol.decided_reply`), from the owner's ``decided`` frame until the
    owner acknowledges that turn, the way :class:`UnackedFrames` keeps the caller's frames.
    Only the current owner's link is read, so a node that lost the call cannot make the
    router hold more than one bounded text for it."""

    __slots__ = ("kept",)

    def __init__(self) -> None:
        self.kept: dict[str, Any] | None = None

    def __repr__(self) -> str:
        kept = self.kept
        what = f"turn {kept['turn']} seq {kept['seq']}" if kept is not None else "nothing"
        return f"<DecidedText [{what}]>"

    def offer(self, frame: dict[str, Any], completed_turn: int) -> bool:
        """Keep the ``decided`` frame of the owner; False (not kept) when it is malformed or
        over its bound, or its turn is complete or older than the one kept."""
        decided = decided_reply(frame)
        if decided is None or decided["turn"] <= completed_turn:
            return False
        if self.kept is not None and self.kept["turn"] > decided["turn"]:
            return False
        self.kept = decided
        return True

    def ack(self, seq: int, turn: int) -> None:
        """The owner checkpointed everything up to ``seq``, up to ``turn``: the decided turn,
        if that covers it, no longer needs its text."""
        kept = self.kept
        if kept is not None and seq >= kept["seq"] and turn >= kept["turn"]:
            self.kept = None

    def complete(self, turn: int) -> None:
        """The caller has ``turn`` whole (its ``turn_metrics``)."""
        if self.kept is not None and self.kept["turn"] <= turn:
            self.kept = None
