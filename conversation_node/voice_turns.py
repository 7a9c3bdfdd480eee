"""Turn-taking for calls that speak: utterances become turns, speech during a reply is a
barge-in, marks say what the caller heard.

The part of a call that only voice calls use, kept apart so the session reads as the
lifecycle of a call; its collaborators (the call core, the turn runner, the turn lock, the
recognizer, the link) come in explicitly. Rules:

- an utterance's end starts a turn in a task of its own, closed with the call (frames
  keep flowing while it runs); turns never overlap (the turn lock), a new one waits for the last;
- the caller speaking while a reply is playing is a barge-in: ``clear`` goes out at once,
  the model and the voice are stopped, and memory keeps what the caller heard (from the
  marks they echoed before the clear). A reply already committed is amended by a small
  follow-up commit (``barge_in`` + ``memory`` records) so replay sees the same;
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
from collections.abc import Callable
from typing import Any, Protocol

from callmesh.metric_names import BARGE_INS, DTMF, FALSE_INTERRUPTIONS
from callmesh.protocol import (
    ErrorCode,
    Inbound,
    Out,
    encode,
    error_frame,
    parse_mark_name,
    transcript_frame,
)
from conversation_node.call_core import CallCore
from conversation_node.endpointing import is_yes_no_question
from conversation_node.errors import CallDropped
from conversation_node.interruptions import Action, InterruptionGate
from conversation_node.preemptive import Outcome, SpeculationConfig
from conversation_node.providers.base import STT
from conversation_node.speculations import Speculations, started
from conversation_node.turn_runner import Counters, Send, Speculation
from conversation_node.voice import Playback, VoiceLane

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

    async def repeat_turn(
        self, seq: int, text: str, *, line: str, confidence: float, started: float, stt_ms: float
    ) -> None: ...

    async def amend_heard(self, turn: int, heard: str) -> None: ...


class Replies:
    """The reply being played (or last played), whether this client echoes marks, and the
    event that stops the reply being spoken. Shared by the turn runner (which starts and
    follows replies) and :class:`VoiceTurns` (marks, barge-in)."""

    def __init__(self) -> None:
        self.playback: Playback | None = None
        self.marks_seen = False
        self._interrupt: asyncio.Event | None = None

    def start_reply(self, turn: int) -> tuple[Playback, asyncio.Event]:
        """A reply is about to be spoken: follow its playback; the event stops it."""
        self.playback = Playback(turn)
        self._interrupt = asyncio.Event()
        return self.playback, self._interrupt

    def heard(self, pb: Playback, said: str, interrupted: bool) -> tuple[str, bool]:
        """What the caller heard of a reply that has finished sending: all of it, unless
        they barged in (then what they had played)."""
        pb.finished_sending = True
        if interrupted or pb.cleared:
            return pb.heard(self.marks_seen), True
        return said, False

    def follow(self, frame: dict[str, Any], turn: int, bytes_per_ms: float) -> None:
        """A reply frame of ``turn`` is going out."""
        pb = self.playback
        if pb is None or pb.turn != turn:
            return
        kind = frame["type"]
        if kind == Out.AGENT_TEXT:
            pb.on_text(frame["text"])
        elif kind == Out.AGENT_AUDIO:
            # base64: 4 characters per 3 bytes.
            pb.on_audio(len(frame["data"]) * 3 / 4 / bytes_per_ms)
        elif kind == Out.MARK:
            pb.on_mark_sent(frame["name"])

    def on_mark(self, name: str) -> None:
        parsed = parse_mark_name(name)
        pb = self.playback
        if parsed is None or pb is None or parsed[0] != pb.turn:
            return  # a mark of an earlier turn (replayed after a failover) or not ours
        if pb.on_mark_echoed(name):
            self.marks_seen = True

    def stop(self) -> bool:
        """Stop the reply being spoken; False if none was ever started."""
        if self._interrupt is None:
            return False
        self._interrupt.set()
        return True


class VoiceTurns:
    """The voice side of one call (the session calls it for audio, marks and keys);
    implements the lane's :class:`conversation_node.voice.VoiceEvents`."""

    def __init__(
        self,
        core: CallCore,
        replies: Replies,
        turns: Turns,
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
    ) -> None:
        self._core = core
        self.replies = replies
        self._turns = turns
        self._stt = stt
        self._turn_lock = turn_lock
        self._send = send
        self._counters = counters
        self._observe_lag = observe_lag
        self._prefetch = prefetch
        self._min_confidence = min_confidence
        self.lane: VoiceLane | None = None
        self._turn_task: asyncio.Task[None] | None = None
        self._amend_task: asyncio.Task[None] | None = None
        self._spec = Speculations(
            speculation,
            start=turns.speculate,
            drop=turns.drop,
            counters=counters,
            name=core.call_id,
        )
        # Caller sound during a reply: barge-in or noise (conversation_node.interruptions).
        self._gate = InterruptionGate(false_interruption_ms)
        self._gate_timer: asyncio.TimerHandle | None = None
        self._barge_task: asyncio.Task[None] | None = None

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
                self,
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
        replies = self.replies
        pb = replies.playback
        if self.lane is not None and pb is not None:
            said = " ".join(s.text for s in pb.sentences)
            self.lane.expect_yes_no(is_yes_no_question(said))
        if pb is None or pb.first_audio_at is None or not pb.playing(replies.marks_seen):
            return  # nothing is being heard: the caller may speak while the agent thinks
        action = self._gate.on_sound()
        if action is Action.WAIT:  # no clear until the sound yields words
            window_s = self._gate.window_ms / 1000
            self._gate_timer = asyncio.get_running_loop().call_later(window_s, self._no_words)
        elif action is Action.BARGE_IN:
            await self._barge_in()

    async def _barge_in(self) -> None:
        if self._gate_timer is not None:
            self._gate_timer.cancel()
            self._gate_timer = None
        replies = self.replies
        pb = replies.playback
        if pb is None or pb.first_audio_at is None or not pb.playing(replies.marks_seen):
            return  # the reply ended on its own meanwhile
        pb.cleared = True  # from here on, marks are the client flushing: not heard
        await self._send(encode({"type": Out.CLEAR.value, "turn": pb.turn, "reason": "barge_in"}))
        self._counters.inc(BARGE_INS)
        # A reply still being sent stops talking and its turn commits what was heard;
        # one already committed is amended.
        if pb.finished_sending or not replies.stop():
            heard = pb.heard(replies.marks_seen)
            self._amend_task = asyncio.create_task(
                self._amend_heard(pb.turn, heard), name=f"barge-in:{self._core.call_id}"
            )

    def _no_words(self) -> None:
        self._gate_timer = None
        if self._gate.on_timeout() is Action.FALSE:
            self._counters.inc(FALSE_INTERRUPTIONS)

    def on_interim(self, text: str) -> None:
        self._prefetch(text)
        if self._gate.on_words(text) is Action.BARGE_IN:
            self._barge_task = asyncio.create_task(
                self._barge_in(), name=f"barge-in:{self._core.call_id}"
            )
        self._spec.on_interim(text)

    def on_eager(self, text: str) -> None:
        """The words so far are stable: maybe start the reply to them now."""
        busy = (
            not self._core.active
            or self._turn_lock.locked()
            or (self._turn_task is not None and not self._turn_task.done())
            or (self._amend_task is not None and not self._amend_task.done())
            or (self._barge_task is not None and not self._barge_task.done())
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
        if not text.strip():
            if self._gate.on_silence() is Action.FALSE:
                self._counters.inc(FALSE_INTERRUPTIONS)  # noise: the reply went on
        elif self._gate.on_words(text) is Action.BARGE_IN:
            await self._barge_in()
        barging = self._barge_task
        if barging is not None and not barging.done():
            # The barge-in the words made goes first: what the caller heard of the last
            # reply is amended before the next turn is answered.
            await asyncio.wait({barging})
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
                    await self._turns.repeat_turn(
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
        for task in (self._turn_task, self._amend_task):
            if task is not None and not task.done():
                await asyncio.wait({task})

    async def stop_turn(self) -> None:
        """Hang-up: stop talking; a turn not yet committed is abandoned with the call."""
        self.replies.stop()
        self._spec.abandon()
        for task in (self._turn_task, self._amend_task, *self._spec.dropping):
            if task is not None and not task.done():
                await asyncio.wait({task})

    async def aclose(self) -> None:
        if self._gate_timer is not None:
            self._gate_timer.cancel()
        self._spec.abandon()
        for task in (self._turn_task, self._amend_task, self._barge_task, *self._spec.dropping):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(asyncio.gather(task, return_exceptions=True))
        if self.lane is not None:
            await self.lane.aclose()
