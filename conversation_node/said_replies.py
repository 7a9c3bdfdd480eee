"""Replies said without the model: the greeting, a committed reply said again after a
failover, and the request to repeat an utterance heard too poorly to answer; and how every
reply's frames go out (``emit``, in the call's ``voice``).

The turn runner (:mod:`conversation_node.turn_runner`) answers the caller's turns with the
model; :class:`SaidReplies` says what is already decided, through the same pipeline, the
same replies' outlet and the same end of a turn (:class:`TurnCloser`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, Protocol

from callmesh.metric_names import GREETINGS, GREETINGS_RETURNING, TURNS_RESPOKEN
from callmesh.protocol import Out, encode
from callmesh.telemetry import TurnMetrics
from conversation_node.call_core import CallCore
from conversation_node.pipeline import TEXT_MODE, Emit, TurnOutput, Voice
from conversation_node.playback import Playback
from conversation_node.prompt import Greeting
from conversation_node.turn_close import Counters, Send, TurnCloser

__all__ = ["Replies", "SaidReplies", "Speaker"]


class Speaker(Protocol):
    """Says decided text (:meth:`conversation_node.pipeline.TurnPipeline.speak`)."""

    async def speak(
        self, text: str, emit: Emit, voice: Voice, interrupt: asyncio.Event | None = None
    ) -> TurnOutput: ...


class Replies(Protocol):
    """Sends replies and follows them as the caller plays them (:class:`replies.Replies`)."""

    def start_reply(self, turn: int) -> tuple[Playback, asyncio.Event]: ...

    async def emit(self, frame: dict[str, Any], bytes_per_ms: float) -> None: ...

    async def heard(self, pb: Playback, said: str, interrupted: bool) -> tuple[str, bool]: ...


class SaidReplies:
    """One call's replies said without the model. ``voice`` is how every reply is voiced
    (text mode until the call's start declares audio)."""

    def __init__(
        self,
        core: CallCore,
        *,
        speaker: Speaker,
        replies: Replies,
        closer: TurnCloser,
        send: Send,
        counters: Counters,
    ) -> None:
        self._core = core
        self._speaker = speaker
        self._replies = replies
        self._closer = closer
        self._send = send
        self._counters = counters
        self.voice = TEXT_MODE

    def emit(self, frame: dict[str, Any]) -> Awaitable[None]:
        """Send a frame of the reply being spoken, following it in its playback. Returns
        the outlet's own coroutine: no coroutine of its own for each of a reply's frames."""
        return self._replies.emit(frame, self._core.bytes_per_ms)

    async def repeat_turn(
        self,
        seq: int,
        text: str,
        *,
        line: str,
        confidence: float,
        started: float,
        stt_ms: float,
    ) -> None:
        """Low STT confidence: say ``line`` (asking again), taking nothing from ``text``."""
        core = self._core
        t = core.begin_repeat_turn(seq, text, confidence)
        pb, interrupt = self._replies.start_reply(t.turn)
        output = await self._speaker.speak(line, self.emit, self.voice, interrupt)
        heard, interrupted = await self._replies.heard(pb, line, output.interrupted)
        fallbacks = ["stt_low_confidence", *output.fallbacks]
        records = core.repeated(
            t, line=line, heard=heard, interrupted=interrupted, fallbacks=fallbacks
        )
        metrics = TurnMetrics(
            call_id=core.call_id,
            turn=t.turn,
            stt_ms=stt_ms,
            tts_first_chunk_ms=output.tts_first_chunk_ms,
            provider_ms=stt_ms + output.tts_first_chunk_ms,
            intent=t.intent,
            fallbacks=fallbacks,
            interrupted=interrupted,
            node=core.node_id,
            epoch=core.epoch,
        )
        metrics.set_latency(started, output.first_audio_at)
        await self._closer.finish(records, metrics, started)

    async def greet(self, greeting: Greeting, started: float, history_ms: float) -> None:
        """Speak the committed greeting, then complete turn 0 like any other turn."""
        core = self._core
        pb, _ = self._replies.start_reply(0)
        output = await self._speaker.speak(greeting.text, self.emit, self.voice)
        pb.finished_sending = True
        metrics = TurnMetrics(
            call_id=core.call_id,
            turn=0,
            retrieval_ms=history_ms,
            tts_first_chunk_ms=output.tts_first_chunk_ms,
            provider_ms=history_ms + output.tts_first_chunk_ms,
            intent="greeting",
            fallbacks=list(output.fallbacks),
            node=core.node_id,
            epoch=core.epoch,
        )
        metrics.set_latency(started, output.first_audio_at)
        await self._closer.finish(core.greeted(output.fallbacks), metrics, started)
        self._counters.inc(GREETINGS_RETURNING if greeting.returning else GREETINGS)

    async def respeak(self, text: str) -> None:
        """Say the last committed reply again (:meth:`CallCore.reply_to_repeat`), frame for
        frame as the first time; nothing is committed."""
        core = self._core
        # Interruptible like any reply: the caller may talk over it.
        pb, interrupt = self._replies.start_reply(core.turn)
        output = await self._speaker.speak(text, self.emit, self.voice, interrupt)
        pb.finished_sending = True
        metrics = TurnMetrics(
            call_id=core.call_id,
            turn=core.turn,
            tts_first_chunk_ms=output.tts_first_chunk_ms,
            intent="replayed",
            fallbacks=output.fallbacks,
            node=core.node_id,
            epoch=core.epoch,
        )
        await self._send(encode({"type": Out.TURN_METRICS.value, **metrics.to_dict()}))
        self._counters.inc(TURNS_RESPOKEN)
