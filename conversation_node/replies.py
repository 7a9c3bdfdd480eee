"""A call's replies on their way to the caller: frames out, marks back, clear, pause, resume.

:class:`Replies` is shared by the turn runner (which starts replies and emits their
frames) and the barge-in handling (:mod:`conversation_node.barge_in`: marks, ``clear``,
pause, resume, cut). It holds the reply being played (:class:`Playback`, which decides),
whether this client echoes marks, and the event that stops the reply being spoken.

One lock orders everything of the reply that reaches the client: its frames, a ``clear``,
the frames a resume sends again. So a frame sent before a pause never arrives after its
``clear``, and a resumed sentence arrives before what the model goes on to say. A turn
that finishes speaking while its reply is paused waits for the pause to be decided before
it says what was heard (:meth:`Replies.heard`): it commits once, with the right words.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from callmesh.protocol import Out, encode, parse_mark_name, reply_frame_text
from conversation_node.playback import Playback, PlayState

__all__ = ["Replies"]

Send = Callable[[str], Awaitable[None]]


class Replies:
    """One call's replies. ``retain``: keep what a resume needs (the node clears a reply
    at the caller's first sound and resumes it if the sound was noise)."""

    def __init__(self, send: Send, *, retain: bool = False) -> None:
        self._send = send
        self.retain = retain
        self.playback: Playback | None = None
        self.marks_seen = False
        self._interrupt: asyncio.Event | None = None
        self._sending = asyncio.Lock()
        # While a reply is paused: an event set once it is resumed or cut. Made by the
        # pause (rare) rather than held settled by every call: an Event is 760 bytes.
        self._paused: asyncio.Event | None = None

    def __repr__(self) -> str:
        marks = "marks" if self.marks_seen else "no marks yet"
        return f"<Replies {self.playback!r} {marks}>"

    def start_reply(self, turn: int) -> tuple[Playback, asyncio.Event]:
        """A reply is about to be spoken: follow its playback; the event stops it."""
        self._cut_paused()  # a paused reply is not resumed once another one starts
        self.playback = Playback(turn, retain=self.retain)
        self._interrupt = asyncio.Event()
        return self.playback, self._interrupt

    async def emit(self, frame: dict[str, Any], bytes_per_ms: float) -> None:
        """Send a frame of the reply being spoken (numbered, stamped with its turn), or
        hold it while the reply is paused."""
        pb = self.playback
        if pb is None:
            raise RuntimeError("a reply frame outside a reply")
        frame["turn"] = pb.turn
        # The lock's own calls rather than ``async with``: the same hold, without the two
        # coroutines the context manager adds to each of a reply's frames.
        sending = self._sending
        await sending.acquire()
        try:
            out = pb.outgoing(frame, bytes_per_ms, time.monotonic())
            if out is not None:
                await self._send(reply_frame_text(out))
        finally:
            sending.release()

    async def heard(self, pb: Playback, said: str, interrupted: bool) -> tuple[str, bool]:
        """What the caller heard of a reply that has finished sending: all of it, unless
        they barged in (then what they had played). A paused reply is decided first."""
        pb.finished_sending = True
        if self._paused is not None:
            await self._paused.wait()
        if interrupted or pb.cleared:
            return pb.heard(self.marks_seen, time.monotonic()), True
        return said, False

    def on_mark(self, name: str) -> None:
        parsed = parse_mark_name(name)
        pb = self.playback
        if parsed is None or pb is None or parsed[0] != pb.turn:
            return  # a mark of an earlier turn (replayed after a failover) or not ours
        if pb.on_mark_echoed(name):
            self.marks_seen = True

    def heard_now(self) -> Playback | None:
        """The reply the caller may be hearing now (its first audio is out), if any."""
        pb = self.playback
        if pb is None or pb.first_audio_at is None:
            return None
        return pb if pb.playing(self.marks_seen, time.monotonic()) else None

    # ------------------------------------------------------------------ interruptions

    async def pause(self) -> Playback | None:
        """The caller made a sound: clear the reply they are hearing and hold what follows
        until the sound is judged (:meth:`resume` or :meth:`cut`). None: nothing paused."""
        async with self._sending:
            pb = self.heard_now()
            if pb is None or not pb.pause(self.marks_seen, time.monotonic()):
                return None
            if self._paused is None:
                self._paused = asyncio.Event()
            await self._send(_clear(pb.turn))
        return pb

    async def resume(self) -> int | None:
        """The sound was noise: the paused reply goes on from the first sentence the caller
        had not heard. How many frames were sent again; None if nothing was paused."""
        async with self._sending:
            pb = self.playback
            try:
                if pb is None or pb.state is not PlayState.PAUSED:
                    return None
                frames = pb.resume(time.monotonic())
                for frame in frames:
                    await self._send(reply_frame_text(frame))
                return len(frames)
            finally:
                self._settle()

    async def cut(self) -> Playback | None:
        """A barge-in: the reply being heard is cleared for good (``clear``, unless a
        pause sent it already). None if no reply was being heard."""
        async with self._sending:
            pb = self.heard_now()
            if pb is None:
                return None
            paused = pb.state is PlayState.PAUSED
            pb.cut(self.marks_seen, time.monotonic())
            self._settle()
            if not paused:
                await self._send(_clear(pb.turn))
        return pb

    def stop(self) -> bool:
        """Stop the reply being spoken (a paused one is cut); False if none was ever
        started."""
        self._cut_paused()
        if self._interrupt is None:
            return False
        self._interrupt.set()
        return True

    def _cut_paused(self) -> None:
        pb = self.playback
        if pb is not None and pb.state is PlayState.PAUSED:
            pb.cut(self.marks_seen, time.monotonic())
        self._settle()

    def _settle(self) -> None:
        """No reply is paused any more: whoever waits for the pause to be decided goes on."""
        paused, self._paused = self._paused, None
        if paused is not None:
            paused.set()


def _clear(turn: int) -> str:
    return encode({"type": Out.CLEAR.value, "turn": turn, "reason": "barge_in"})
