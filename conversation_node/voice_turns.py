"""Turn-taking for calls that speak: utterances become turns, speech during a reply is a
barge-in, marks say what the caller heard.

The part of :class:`conversation_node.session.CallSession` that only voice calls use,
kept apart so the session reads as the lifecycle of a call. Rules:

- an utterance's end starts a turn in a task the session owns (frames keep flowing while
  it runs); turns never overlap (the turn lock), a new one waits for the last;
- the caller speaking while a reply is playing is a barge-in: ``clear`` goes out at once,
  the model and the voice are stopped, and memory keeps what the caller heard (from the
  marks they echoed before the clear). A reply already committed is amended by a small
  follow-up commit (``barge_in`` + ``memory`` records) so replay sees the same;
- an utterance heard with low confidence is not guessed at: the caller is asked to repeat
  (fallback ``stt_low_confidence``), and nothing in it is taken as a fact;
- a DTMF key ends the utterance in progress (press # when done).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from callmesh.protocol import (
    Ctl,
    ErrorCode,
    Inbound,
    Out,
    encode,
    error_frame,
    parse_mark_name,
    transcript_frame,
)
from callmesh.telemetry import TurnMetrics
from conversation_node.errors import CallDropped
from conversation_node.turn_records import memory_record
from conversation_node.voice import Playback, VoiceLane
from events import eventlog
from events.eventlog import EventType

if TYPE_CHECKING:
    from conversation_node.session import CallSession

log = logging.getLogger("callmesh.node.voice")

REPEAT_LINE = "Sorry, I didn't catch that. Could you say it again?"


class VoiceTurns:
    """The voice side of one :class:`CallSession` (which owns it and calls it for audio,
    marks and keys); implements the lane's :class:`conversation_node.voice.VoiceEvents`."""

    def __init__(self, session: CallSession) -> None:
        self.s = session
        self.lane: VoiceLane | None = None
        # The reply being played (or last played) and whether this client echoes marks.
        self.playback: Playback | None = None
        self.marks_seen = False
        self._turn_task: asyncio.Task[None] | None = None
        self._interrupt: asyncio.Event | None = None
        self._amend_task: asyncio.Task[None] | None = None

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

    # ------------------------------------------------------------------ inbound

    async def on_audio(self, msg: Inbound) -> None:
        lane = self.lane
        if lane is None:
            if self.s._svc.stt is None:
                self.s.last_seq = msg.seq  # a node without a recognizer: accepted, unheard
                return
            fmt = self.s.audio_format
            if fmt is None:
                await self.s._out(
                    error_frame(
                        ErrorCode.BAD_MESSAGE,
                        "audio needs 'audio' (format) in the call's start",
                        seq=msg.seq,
                    )
                )
                return
            lane = self.lane = VoiceLane(
                self.s._svc.stt,
                fmt,
                self,
                call_id=self.s.call_id,
                observe_lag=self.s._svc.observe_frame_lag,
            )
        try:
            await lane.feed(msg)
        except ValueError as exc:
            await self.s._out(error_frame(ErrorCode.BAD_MESSAGE, str(exc), seq=msg.seq))

    def on_audio_now(self, msg: Inbound) -> bool:
        """:meth:`on_audio` where it would not wait (``VoiceLane.feed_now``): True once
        applied; False, having changed nothing, otherwise."""
        lane = self.lane
        return lane is not None and lane.feed_now(msg)

    def on_mark(self, name: str) -> None:
        parsed = parse_mark_name(name)
        pb = self.playback
        if parsed is None or pb is None or parsed[0] != pb.turn:
            return  # a mark of an earlier turn (replayed after a failover) or not ours
        if pb.on_mark_echoed(name):
            self.marks_seen = True

    async def on_dtmf(self, msg: Inbound) -> None:
        self.s._svc.metrics.inc("dtmf")
        if self.lane is not None:
            await self.lane.finalize()

    # ------------------------------------------------------------------ recognizer events

    async def on_speech_started(self) -> None:
        pb = self.playback
        if pb is None or pb.first_audio_at is None or not pb.playing(self.marks_seen):
            return  # nothing is being heard: the caller may speak while the agent thinks
        pb.cleared = True  # from here on, marks are the client flushing: not heard
        await self.s._out(encode({"type": Out.CLEAR.value, "turn": pb.turn, "reason": "barge_in"}))
        self.s._svc.metrics.inc("barge_ins")
        if not pb.finished_sending and self._interrupt is not None:
            self._interrupt.set()  # the turn stops talking and commits what was heard
        else:
            heard = pb.heard(self.marks_seen)
            self._amend_task = asyncio.create_task(
                self._amend_heard(pb.turn, heard), name=f"barge-in:{self.s.call_id}"
            )

    def on_interim(self, text: str) -> None:
        self.s.prefetch(text)

    async def on_transcript(self, text: str, final: bool, confidence: float) -> None:
        """Show the caller what was heard (``transcript``): for display only."""
        await self.s._out(transcript_frame(self.s.turn, text, final, confidence))

    async def on_utterance(
        self, text: str, confidence: float, speech_end_at: float, seq: int
    ) -> None:
        if not text.strip() or not self.s.active:
            return  # noise: no words, no turn
        previous = self._turn_task
        if previous is not None and not previous.done():
            await asyncio.wait({previous})
        self._turn_task = asyncio.create_task(
            self._voice_turn(text.strip(), confidence, speech_end_at, seq),
            name=f"turn:{self.s.call_id}",
        )

    async def on_quiet_audio(self, seq: int) -> None:
        """Audio nobody spoke in, old enough to be sure: the router may forget it."""
        busy = self._turn_task is not None and not self._turn_task.done()
        if busy or self.s._turn_lock.locked() or seq <= self.s.last_seq:
            return  # an utterance is being answered: its audio is acked with its checkpoint
        await self.s._out(encode({"type": Ctl.ACK.value, "seq": seq, "turn": self.s.turn}))

    # ------------------------------------------------------------------ turns

    async def _voice_turn(
        self, text: str, confidence: float, speech_end_at: float, seq: int
    ) -> None:
        try:
            async with self.s._turn_lock:
                if not self.s.active:
                    return
                stt_ms = max(0.0, (time.monotonic() - speech_end_at) * 1000)
                if confidence < self.s._svc.config.stt_min_confidence:
                    await self._repeat_turn(text, confidence, speech_end_at, stt_ms, seq)
                else:
                    await self.s._user_turn(
                        seq, text, confidence=confidence, started=speech_end_at, stt_ms=stt_ms
                    )
        except CallDropped:
            return  # fenced: the next frame finds the session dropped
        except Exception:
            log.exception("voice turn failed", extra={"fields": {"call_id": self.s.call_id}})
            await self.s._out(
                error_frame(ErrorCode.INTERNAL, "internal error in this turn", turn=self.s.turn)
            )

    async def _repeat_turn(
        self,
        text: str,
        confidence: float,
        started: float,
        stt_ms: float,
        seq: int,
    ) -> None:
        """Low STT confidence: say so and ask again, taking nothing from what was heard."""
        self.s.turn += 1
        turn = self.s.turn
        self.s.memory.observe_user(turn, "")
        pb, interrupt = self.start_reply(turn)
        output = await self.s._svc.pipeline.speak(
            REPEAT_LINE, self.s._emit, self.s.voice, interrupt
        )
        heard, interrupted = self.heard(pb, REPEAT_LINE, output.interrupted)
        self.s.memory.observe_agent(turn, heard, interrupted=interrupted)
        fallbacks = ["stt_low_confidence", *output.fallbacks]
        metrics = TurnMetrics(
            call_id=self.s.call_id,
            turn=turn,
            stt_ms=stt_ms,
            tts_first_chunk_ms=output.tts_first_chunk_ms,
            provider_ms=stt_ms + output.tts_first_chunk_ms,
            intent="repeat",
            fallbacks=fallbacks,
            interrupted=interrupted,
            node=self.s._svc.node_id,
            epoch=self.s.epoch,
        )
        metrics.set_latency(started, output.first_audio_at)
        records: list[dict[str, Any]] = [
            eventlog.record(
                EventType.USER_TURN,
                turn,
                seq=seq,
                text=text,
                confidence=confidence,
                understood=False,
            ),
            *[eventlog.record(EventType.FALLBACK, turn, kind=f, detail="") for f in fallbacks],
            eventlog.record(
                EventType.AGENT_REPLY, turn, text=REPEAT_LINE, heard=heard, interrupted=interrupted
            ),
            memory_record(self.s.memory, turn, []),
        ]
        self.s.last_seq = max(self.s.last_seq, seq)
        await self.s._finish_turn(records, metrics)

    async def _amend_heard(self, turn: int, heard: str) -> None:
        """A barge-in after the turn was committed: its memory keeps only what was heard."""
        with contextlib.suppress(CallDropped):
            async with self.s._turn_lock:
                if not self.s.active or not self.s.memory.amend_heard(turn, heard):
                    return
                await self.s._commit(
                    [
                        eventlog.record(EventType.BARGE_IN, turn, heard=heard),
                        memory_record(self.s.memory, turn, []),
                    ]
                )

    async def stop_turn(self) -> None:
        """Hang-up: stop talking; a turn not yet committed is abandoned with the call."""
        if self._interrupt is not None:
            self._interrupt.set()
        for task in (self._turn_task, self._amend_task):
            if task is not None and not task.done():
                await asyncio.wait({task})

    async def aclose(self) -> None:
        for task in (self._turn_task, self._amend_task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(asyncio.gather(task, return_exceptions=True))
        if self.lane is not None:
            await self.lane.aclose()
