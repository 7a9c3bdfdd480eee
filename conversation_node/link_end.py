"""What becomes of a live call's last utterance when its link ends without a hangup.

A link ends under a call when its router dies or moves it (a drain), or when a new link
takes the call over (the caller reconnected, a Twilio ``<Connect action>`` opened a new
stream). Twilio cannot replay audio, so the node keeps what reached it:

- an utterance the caller had finished (their speech had stopped) is answered at once, its
  turn committed while no link is up; one cut off mid-speech is dropped, as the caller
  never finished it (:meth:`LinkEnd.ended`);
- when a new link takes the call over, the turn in flight gets to commit first, bounded by
  :data:`SETTLE_S`, so that the new owner restores it instead of losing it; the new owner
  then says again the last committed reply the caller did not hear whole
  (:meth:`LinkEnd.settle`, :meth:`LinkEnd.heard_turn`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from conversation_node.call_core import CallCore
from conversation_node.replies import Replies

log = logging.getLogger("callmesh.node.session")

# How long a call superseded by a new link gets to finish the turn its caller had finished
# speaking before the old link ended. Past it the turn is dropped and the caller, hearing
# nothing, says it again.
SETTLE_S = 5.0


class Voice(Protocol):
    """The call's voice side (:class:`conversation_node.voice_turns.VoiceTurns`)."""

    replies: Replies

    async def end_of_audio(self) -> None: ...

    async def turn_done(self) -> None: ...


class LinkEnd:
    """Owns the two tasks of a call's link ending; ``aclose()`` is idempotent."""

    def __init__(self, core: CallCore, voice: Voice, turn_lock: asyncio.Lock) -> None:
        self._core = core
        self._voice = voice
        self._turn_lock = turn_lock
        self._ending: asyncio.Task[None] | None = None
        self._settling: asyncio.Task[None] | None = None

    def ended(self) -> None:
        """No more audio comes: the recognizer finishes an utterance the caller had
        finished (its turn starts) and drops one cut off mid-speech. Idempotent."""
        if self._ending is None and self._core.active:
            self._ending = asyncio.get_running_loop().create_task(
                self._voice.end_of_audio(), name=f"end-of-audio:{self._core.call_id}"
            )

    async def settle(self) -> int | None:
        """A new link takes the call over: until the turn in flight has committed (or
        :data:`SETTLE_S` passed); then :meth:`heard_turn`."""
        self.ended()
        if self._settling is None:
            self._settling = asyncio.get_running_loop().create_task(
                self._settle(), name=f"settle:{self._core.call_id}"
            )
        # Shielded: whoever else closes the call waits for the same settling (aclose).
        await asyncio.shield(self._settling)
        return self.heard_turn()

    async def _settle(self) -> None:
        try:
            async with asyncio.timeout(SETTLE_S):
                if self._ending is not None:
                    await asyncio.gather(self._ending, return_exceptions=True)
                await self._voice.turn_done()
                async with self._turn_lock:  # a text turn runs under the lock, not a task
                    pass
        except TimeoutError:
            log.warning(
                "turn in flight not settled before its call's new link: dropped",
                extra={"fields": {"call_id": self._core.call_id, "turn": self._core.turn}},
            )

    def heard_turn(self) -> int | None:
        """The last turn whose reply the caller heard whole, as far as the node can tell
        from the marks they echoed (None for a client that echoes none). A reply with a
        mark not yet echoed when the link ended was cut off: Twilio drops what it was
        playing with the stream."""
        replies, turn = self._voice.replies, self._core.turn
        if not replies.marks_seen:
            return None
        pb = replies.playback
        if pb is None or pb.turn != turn or pb.cleared:
            return turn  # not replied to yet (or rolled back), or cut short by the caller
        heard = pb.finished_sending and not pb.playing(True, time.monotonic())
        return turn if heard else turn - 1

    async def aclose(self) -> None:
        """Waits for a settling turn; stops the end of the audio if it still runs."""
        if self._settling is not None:
            await asyncio.gather(self._settling, return_exceptions=True)
        if self._ending is not None and not self._ending.done():
            self._ending.cancel()
            await asyncio.gather(self._ending, return_exceptions=True)
