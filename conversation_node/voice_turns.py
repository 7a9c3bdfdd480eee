"""Turn-taking for calls that speak: utterances become turns, speech during a reply is a
barge-in, marks say what the caller heard.

The part of a call that only voice calls use, kept apart so the session reads as the
lifecycle of a call; its collaborators (the call core, the turn runner, the turn lock, the
recognizer, the link) come in explicitly. Rules:

- an utterance's end starts a turn in a task of its own, closed with the call (frames
  keep flowing while it runs); turns never overlap (the turn lock), a new one waits for the last;
- the caller making a sound while a reply is playing is a barge-in once it yields words,
  a false interruption if it yields none (:mod:`conversation_node.barge_in`);
- an utterance heard with low confidence is not guessed at: the caller is asked to repeat
  (fallback ``stt_low_confidence``), and nothing in it is taken as a fact;
- a DTMF key ends the utterance in progress (press # when done);
- preemptive generation: when the recognizer says the words are stable (EAGER_END), a
  reply may start on them before the utterance ends (:mod:`conversation_node.preemptive`
  decides; :meth:`TurnRunner.speculate` starts it, sending and recording nothing); the
  turn adopts it when the final words match, else it is dropped at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Callable
from typing import Protocol

from callmesh.metric_names import DTMF
from callmesh.protocol import (
    ErrorCode,
    Inbound,
    error_frame,
    transcript_frame,
)
from callmesh.weak_callbacks import weak_method
from conversation_node.barge_in import BargeIns
from conversation_node.call_core import CallCore
from conversation_node.endpointing import is_yes_no_question
from conversation_node.errors import CallDropped
from conversation_node.preemptive import Outcome, SpeculationConfig
from conversation_node.providers.base import STT
from conversation_node.replies import Replies
from conversation_node.speculations import Speculation, Speculations, started
from conversation_node.turn_close import Counters, Send
from conversation_node.voice import VoiceLane

log = logging.getLogger("callmesh.node.voice")

REPEAT_LINE = "Sorry, I didn't catch that. Could you say it again?"


class Turns(Protocol):
    """The call's turns as the voice side starts them
    (:class:`conversation_node.turn_runner.TurnRunner`); called under the turn lock."""

    async def user_turn(
        self,
        seq: int,
        text: str,
        *,
        confidence: float,
        started: float,
        stt_ms: float = 0.0,
        speculation: Speculation | None = None,
        preemptive: Outcome = Outcome.NONE,
        endpoint_ms: float = 0.0,
    ) -> None: ...

    async def speculate(self, text: str) -> Speculation: ...

    async def drop(self, speculation: Speculation) -> None: ...

    async def amend_heard(self, turn: int, heard: str) -> None: ...


class Repeats(Protocol):
    """Asks the caller to say it again (:class:`conversation_node.said_replies.SaidReplies`);
    called under the turn lock."""

    async def repeat_turn(
        self, seq: int, text: str, *, line: str, confidence: float, started: float, stt_ms: float
    ) -> None: ...


class VoiceTurns:
    """The voice side of one call (the session calls it for audio, marks and keys);
    implements the lane's :class:`conversation_node.voice.VoiceEvents`."""

    def __init__(
        self,
        core: CallCore,
        replies: Replies,
        turns: Turns,
        repeats: Repeats,
        *,
        stt: STT | None,
        turn_lock: asyncio.Lock,
        send: Send,
        counters: Counters,
        observe_lag: Callable[[float], None],
        prefetch: Callable[[str], None],
        min_confidence: float,
        speculation: SpeculationConfig | None = None,
        false_interruption_ms: float = 0.0,
        clear_at_sound: bool = False,
    ) -> None:
        self._core = core
        self.replies = replies
        self._turns = turns
        self._repeats = repeats
        self._stt = stt
        self._turn_lock = turn_lock
        self._send = send
        self._counters = counters
        self._observe_lag = observe_lag
        self._prefetch = prefetch
        self._min_confidence = min_confidence
        self.lane: VoiceLane | None = None
        self._turn_task: asyncio.Task[None] | None = None
        self._spec = Speculations(
            speculation,
            start=turns.speculate,
            drop=turns.drop,
            counters=counters,
            name=core.call_id,
        )
        # Caller sound during a reply: a barge-in, or noise the reply survives.
        self._barge = BargeIns(
            replies,
            window_ms=false_interruption_ms,
            clear_at_sound=clear_at_sound,
            counters=counters,
            amend=weak_method(self._amend_heard),  # not a cycle: callmesh.weak_callbacks
            name=core.call_id,
        )

    # ------------------------------------------------------------------ inbound

    async def on_audio(self, msg: Inbound) -> None:
        lane = self.lane
        if lane is None:
            if self._stt is None:
                self._core.applied(msg.seq)  # a node without a recognizer: accepted, unheard
                return
            fmt = self._core.audio_format
            if fmt is None:
                await self._send(
                    error_frame(
                        ErrorCode.BAD_MESSAGE,
                        "audio needs 'audio' (format) in the call's start",
                        seq=msg.seq,
                    )
                )
                return
            lane = self.lane = VoiceLane(
                self._stt,
                fmt,
                weakref.proxy(self),  # the lane is ours: not a cycle (callmesh.weak_callbacks)
                tenant=self._core.tenant,
                call_id=self._core.call_id,
                observe_lag=self._observe_lag,
            )
        try:
            await lane.feed(msg)
        except ValueError as exc:
            await self._send(error_frame(ErrorCode.BAD_MESSAGE, str(exc), seq=msg.seq))

    def on_audio_now(self, msg: Inbound) -> bool:
        """:meth:`on_audio` where it would not wait (``VoiceLane.feed_now``): True once
        applied; False, having changed nothing, otherwise."""
        lane = self.lane
        return lane is not None and lane.feed_now(msg)

    def on_mark(self, name: str) -> None:
        self.replies.on_mark(name)

    async def on_dtmf(self, msg: Inbound) -> None:
        self._counters.inc(DTMF)
        if self.lane is not None:
            await self.lane.finalize()

    # ------------------------------------------------------------------ recognizer events

    async def on_speech_started(self) -> None:
        pb = self.replies.playback
        if self.lane is not None and pb is not None:
            said = " ".join(s.text for s in pb.sentences)
            self.lane.expect_yes_no(is_yes_no_question(said))
        await self._barge.on_sound()

    def on_interim(self, text: str) -> None:
        self._prefetch(text)
        self._barge.on_interim(text)
        self._spec.on_interim(text)

    def on_eager(self, text: str) -> None:
        """The words so far are stable: maybe start the reply to them now."""
        busy = (
            not self._core.active
            or self._turn_lock.locked()
            or (self._turn_task is not None and not self._turn_task.done())
            or self._barge.busy
        )
        self._spec.on_stable(text, busy=busy)

    async def on_transcript(self, text: str, final: bool, confidence: float) -> None:
        """Show the caller what was heard (``transcript``): for display only."""
        await self._send(transcript_frame(self._core.turn, text, final, confidence))

    async def on_utterance(
        self,
        text: str,
        confidence: float,
        speech_end_at: float,
        seq: int,
        endpoint_ms: float | None = None,
    ) -> None:
        # The barge-in the words made goes first: what the caller heard of the last reply
        # is amended before the next turn is answered.
        await self._barge.on_final(text)
        answer = bool(text.strip()) and self._core.active
        spec_task, outcome = self._spec.on_final(text, answer=answer)
        if not answer:
            return  # noise: no words, no turn
        previous = self._turn_task
        if previous is not None and not previous.done():
            await asyncio.wait({previous})
        self._turn_task = asyncio.create_task(
            self._voice_turn(
                text.strip(), confidence, speech_end_at, seq, spec_task, outcome, endpoint_ms
            ),
            name=f"turn:{self._core.call_id}",
        )

    async def on_quiet_audio(self, seq: int) -> None:
        """Audio nobody spoke in, old enough to be sure: the router may forget it."""
        busy = self._turn_task is not None and not self._turn_task.done()
        if busy or self._turn_lock.locked():
            return  # an utterance is being answered: its audio is acked with its checkpoint
        ack = self._core.quiet_ack(seq)
        if ack is not None:
            await self._send(ack)

    # ------------------------------------------------------------------ turns

    async def _voice_turn(
        self,
        text: str,
        confidence: float,
        speech_end_at: float,
        seq: int,
        spec_task: asyncio.Task[Speculation] | None = None,
        preemptive: Outcome = Outcome.NONE,
        endpoint_ms: float | None = None,
    ) -> None:
        core = self._core
        speculation = None if spec_task is None else await started(spec_task)
        try:
            async with self._turn_lock:
                dropped = not core.active or confidence < self._min_confidence
                if dropped and speculation is not None:
                    await self._turns.drop(speculation)  # nothing is taken from it
                    speculation = None
                if not core.active:
                    return
                stt_ms = max(0.0, (time.monotonic() - speech_end_at) * 1000)
                if confidence < self._min_confidence:
                    await self._repeats.repeat_turn(
                        seq,
                        text,
                        line=REPEAT_LINE,
                        confidence=confidence,
                        started=speech_end_at,
                        stt_ms=stt_ms,
                    )
                else:
                    await self._turns.user_turn(
                        seq,
                        text,
                        confidence=confidence,
                        started=speech_end_at,
                        stt_ms=stt_ms,
                        speculation=speculation,
                        preemptive=preemptive,
                        endpoint_ms=endpoint_ms or 0.0,
                    )
        except CallDropped:
            return  # fenced: the next frame finds the session dropped
        except Exception:
            log.exception("voice turn failed", extra={"fields": {"call_id": core.call_id}})
            await self._send(
                error_frame(ErrorCode.INTERNAL, "internal error in this turn", turn=core.turn)
            )

    async def _amend_heard(self, turn: int, heard: str) -> None:
        with contextlib.suppress(CallDropped):
            async with self._turn_lock:
                await self._turns.amend_heard(turn, heard)

    async def end_of_audio(self) -> None:
        """The call's link ended: no more audio comes. The recognizer finishes an utterance
        the caller had finished (its turn starts, in its task, as ever) and drops one cut
        off mid-speech (:meth:`VoiceLane.end_of_audio`)."""
        if self.lane is not None:
            await self.lane.end_of_audio()

    async def turn_done(self) -> None:
        """Until the turn in flight (and an amendment after a barge-in) has finished."""
        task = self._turn_task
        if task is not None and not task.done():
            await asyncio.wait({task})
        await self._barge.settled()

    async def stop_turn(self) -> None:
        """Hang-up: stop talking; a turn not yet committed is abandoned with the call."""
        self.replies.stop()
        self._spec.abandon()
        for task in (self._turn_task, *self._spec.dropping):
            if task is not None and not task.done():
                await asyncio.wait({task})
        await self._barge.settled()

    async def aclose(self) -> None:
        await self._barge.aclose()
        self._spec.abandon()
        for task in (self._turn_task, *self._spec.dropping):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(asyncio.gather(task, return_exceptions=True))
        if self.lane is not None:
            await self.lane.aclose()
