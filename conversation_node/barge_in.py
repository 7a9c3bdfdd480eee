"""Caller sound during a reply: a barge-in, or a false interruption the reply survives.

The I/O around :class:`conversation_node.interruptions.InterruptionGate` (which decides)
for one call: the window's timer, the ``clear``, stopping the reply, and amending what the
caller heard. Two ways to meet a sound, by ``clear_at_sound``:

- off: the reply is not touched until the sound yields words; noise never stops it (the
  caller heard it on);
- on: the reply is cleared at the first sound, so a real barge-in silences the agent at
  once; the frames the model and the voice go on producing are held. Words make it a
  barge-in; no words within the window (or a sound that ends without any) resume the
  reply from the first sentence whose mark the caller had not echoed
  (:meth:`conversation_node.replies.Replies.resume`).

Either way a barge-in stops the model and the voice, and memory keeps what the caller heard:
a reply still being sent commits it with its turn; one already committed is amended by a
small follow-up commit (``barge_in`` + ``memory`` records). A resume sends audio only: the
turn still commits once, and a committed turn is not amended.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine
from typing import Any

from callmesh.metric_names import BARGE_INS, FALSE_INTERRUPTIONS, REPLIES_RESUMED
from conversation_node.interruptions import Action, InterruptionGate
from conversation_node.replies import Replies
from conversation_node.turn_close import Counters

__all__ = ["BargeIns"]

Amend = Callable[[int, str], Coroutine[Any, Any, None]]


class BargeIns:
    def __init__(
        self,
        replies: Replies,
        *,
        window_ms: float,
        clear_at_sound: bool,
        counters: Counters,
        amend: Amend,
        name: str,
    ) -> None:
        self._replies = replies
        self._gate = InterruptionGate(window_ms)
        self._clear_at_sound = clear_at_sound and window_ms > 0
        self._counters = counters
        self._amend = amend
        self._name = name
        self._timer: asyncio.TimerHandle | None = None
        self._amend_task: asyncio.Task[None] | None = None
        self._barge_task: asyncio.Task[None] | None = None
        self._resume_task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        pending = " pending" if self._gate.pending else ""
        return f"<BargeIns {self._name} window={self._gate.window_ms:g}ms{pending}>"

    @property
    def busy(self) -> bool:
        """A barge-in or its amendment is in progress (memory is about to change)."""
        return any(t is not None and not t.done() for t in (self._amend_task, self._barge_task))

    async def on_sound(self) -> None:
        """The caller started making sound."""
        if self._replies.heard_now() is None:
            return  # nothing is being heard: the caller may speak while the agent thinks
        action = self._gate.on_sound()
        if action is Action.WAIT:
            window_s = self._gate.window_ms / 1000
            self._timer = asyncio.get_running_loop().call_later(window_s, self._no_words)
            if self._clear_at_sound:
                await self._replies.pause()
        elif action is Action.BARGE_IN:
            await self.barge_in()

    def on_interim(self, text: str) -> None:
        """Words so far of the sound: words barge in (in a task: the recognizer's reader
        does not wait)."""
        if self._gate.on_words(text) is Action.BARGE_IN:
            self._barge_task = asyncio.create_task(self.barge_in(), name=f"barge-in:{self._name}")

    async def on_final(self, text: str) -> None:
        """The sound ended with ``text`` (maybe none); returns once the barge-in it made,
        if any, has cut the reply, so what the caller heard is amended before the next
        turn is answered."""
        if not text.strip():
            self._settle(self._gate.on_silence())
        elif self._gate.on_words(text) is Action.BARGE_IN:
            await self.barge_in()
        barging = self._barge_task
        if barging is not None and not barging.done():
            await asyncio.wait({barging})

    async def barge_in(self) -> None:
        self._cancel_timer()
        replies = self._replies
        pb = await replies.cut()
        if pb is None:
            return  # the reply ended on its own meanwhile
        self._counters.inc(BARGE_INS)
        # A reply still being sent stops talking and its turn commits what was heard;
        # one already committed is amended.
        if pb.finished_sending or not replies.stop():
            heard = pb.heard(replies.marks_seen, time.monotonic())
            self._amend_task = asyncio.create_task(
                self._amend(pb.turn, heard), name=f"barge-in:{self._name}"
            )

    def _no_words(self) -> None:
        self._timer = None
        self._settle(self._gate.on_timeout())

    def _settle(self, action: Action) -> None:
        if action is not Action.FALSE:
            return
        self._cancel_timer()
        self._counters.inc(FALSE_INTERRUPTIONS)  # noise: the reply goes on
        if self._clear_at_sound:
            self._resume_task = asyncio.create_task(self._resume(), name=f"resume:{self._name}")

    async def _resume(self) -> None:
        if await self._replies.resume() is not None:
            self._counters.inc(REPLIES_RESUMED)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def settled(self) -> None:
        """Wait for the amendment a barge-in started (hang-up: it commits first)."""
        task = self._amend_task
        if task is not None and not task.done():
            await asyncio.wait({task})

    async def aclose(self) -> None:
        self._cancel_timer()
        for task in (self._amend_task, self._barge_task, self._resume_task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(asyncio.gather(task, return_exceptions=True))
