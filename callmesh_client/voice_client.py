"""A simulated caller that speaks audio in real time, over Twilio Media Streams or native.

Used by the tests, the capacity benchmark and ``callmesh call --audio``. Like a phone:

- one clock sends a 20 ms / 160-byte mu-law frame every 20 ms (silence when not
  speaking). Frame k is due at ``t0 + k·20 ms``; a late loop sends the frames it owes at
  once, and records how late it was (:class:`SendStats`), so a benchmark can tell the
  caller's own lag from callmesh's. Each frame's timestamp is its media time (``k·20``
  ms, as Twilio sends), or with ``timestamps="sent"`` the time it actually left (ms since
  frame 0): a load generator sharing the machine is sometimes late, and the node's frame
  lag should then count only what happened after the frame left;
- speech is :func:`speech_from_text` audio, which the node's simulated STT reads back;
- agent audio is "played" at 8000 bytes/s: each outbound mark is echoed when playback
  passes the audio before it, and ``clear`` empties the buffer and echoes pending marks
  at once (as Twilio does).

``say(text)`` returns when the reply has finished playing: playback drained and no new
agent audio for ``quiet_ms`` (native: the reply's ``turn_metrics`` arrived and playback
drained). ``response_ms`` is end of speech (last speech frame sent) → first agent audio.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp

from callmesh.audio.tones import silence, speech_from_text
from callmesh.protocol import Out
from callmesh_client.voice_playback import Playback
from callmesh_client.voice_results import FRAME_BYTES, FRAME_MS, FRAME_S, SendStats, TurnResult
from callmesh_client.voice_wire import (
    HEARD_AUDIO,
    HEARD_CLEAR,
    HEARD_MARK,
    Heard,
    NativeWire,
    TwilioWire,
    Wire,
    audio_bytes,
)

_SILENT_FRAME = silence(FRAME_MS)
_SILENCE = base64.b64encode(_SILENT_FRAME).decode()

__all__ = ["FRAME_BYTES", "FRAME_MS", "SendStats", "TurnResult", "VoiceCallError", "VoiceCaller"]


class VoiceCallError(Exception):
    """The call could not start (the router or node refused it)."""


@dataclass
class _Utterance:
    result: TurnResult
    # Native: only audio of a turn after this one belongs to the reply.
    after_turn: int = -1
    done: asyncio.Event = field(default_factory=asyncio.Event)


class VoiceCaller:
    def __init__(
        self,
        router_url: str,
        call_id: str,
        tenant: str = "demo",
        caller: str = "anonymous",
        *,
        transport: Literal["twilio", "native"] = "twilio",
        timeout_s: float = 30.0,
        quiet_ms: float = 300.0,
        keep_audio: bool = False,
        twilio_parameters: dict[str, str] | None = None,
        timestamps: Literal["media", "sent"] = "media",
    ) -> None:
        self.router_url = router_url.rstrip("/")
        self.call_id = call_id
        self.transport = transport
        self.timeout_s = timeout_s
        self.quiet_s = quiet_ms / 1000
        self.keep_audio = keep_audio
        self._stamp_sent = timestamps == "sent"
        self.wire: Wire = (
            TwilioWire(call_id, tenant, caller, twilio_parameters)
            if transport == "twilio"
            else NativeWire(call_id, tenant, caller)
        )
        self.stats = SendStats()
        self.ready: dict[str, Any] | None = None
        self.errors: list[dict[str, Any]] = []
        self.clears: list[int | None] = []  # turn of each clear (None on Twilio)
        self.marks_received = 0
        self.marks_echoed = 0
        self.agent_audio_bytes = 0
        self.ended = False
        self.close_code: int | None = None
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._control: deque[str] = deque()
        self._stopping = False
        self._speech = b""
        self._speech_pos = 0
        self._speak_lock = asyncio.Lock()
        self._speech_done = asyncio.Event()
        self._speaking: _Utterance | None = None
        self._listening: _Utterance | None = None
        self._greeting: _Utterance | None = None
        self._max_turn = -1
        self._completed_turns: set[int] = set()
        self.playback = Playback()
        self._playing = asyncio.Event()
        self._ready_evt = asyncio.Event()
        self._closed_evt = asyncio.Event()

    def __repr__(self) -> str:
        return (
            f"<VoiceCaller {self.transport} {self.call_id} frames={self.stats.frames} "
            f"agent_audio={self.agent_audio_bytes}B clears={len(self.clears)} "
            f"errors={len(self.errors)} closed={self._closed_evt.is_set()}>"
        )

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> VoiceCaller:
        ws_url = self.router_url.replace("http://", "ws://").replace("https://", "wss://")
        self._http = aiohttp.ClientSession()
        try:
            # Twilio does not compress; neither does a caller that wants to be cheap.
            self._ws = await self._http.ws_connect(ws_url + self.wire.path(), compress=0)
            now = time.monotonic()
            self._greeting = self._listening = _Utterance(TurnResult("", now, speech_end_at=now))
            self._control.extend(self.wire.opening())
            loop = asyncio.get_running_loop()
            self._tasks = [
                loop.create_task(self._read(), name=f"voice-read:{self.call_id}"),
                loop.create_task(self._send_loop(), name=f"voice-send:{self.call_id}"),
            ]
            if self.transport == "native":
                await asyncio.wait_for(self._ready_evt.wait(), self.timeout_s)
                if self.ready is None:
                    raise VoiceCallError(str(self.errors[-1] if self.errors else "closed"))
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Idempotent: stop streaming and close the connection."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._ws is not None:
            await asyncio.shield(self._ws.close())
            self._ws = None
        if self._http is not None:
            await asyncio.shield(self._http.close())
            self._http = None
        self._finish_all()

    # ------------------------------------------------------------------ the caller's API

    async def wait_greeting(self) -> TurnResult:
        """The agent's greeting (turn 0), once it has finished playing."""
        if self._greeting is None:
            raise RuntimeError("not connected")
        return await self._wait(self._greeting)

    async def say(self, text: str) -> TurnResult:
        """Speak ``text`` and return when the reply to it has finished playing."""
        return await self._wait(await self._speak(text))

    async def barge_in(self, text: str, after_ms: float) -> TurnResult:
        """Speak ``text`` ``after_ms`` into the agent's reply audio (the one playing now, or
        the next one to start), and return when the reply to it has finished playing."""
        await asyncio.wait_for(self._playing.wait(), self.timeout_s)
        delay = self.playback.started_at + after_ms / 1000 - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        return await self.say(text)

    async def dtmf(self, digit: str) -> None:
        self._control.append(self.wire.dtmf(digit))

    async def hangup(self) -> None:
        """Twilio ``stop`` / native ``hangup``; returns when the call is over."""
        self._control.append(self.wire.stop())
        self._stopping = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closed_evt.wait(), self.timeout_s)

    # ------------------------------------------------------------------ speaking

    async def _speak(self, text: str) -> _Utterance:
        async with self._speak_lock:
            utt = _Utterance(TurnResult(text, time.monotonic()))
            if self._closed_evt.is_set():
                raise ConnectionError("the call is over")
            self._speech_done = done_speaking = asyncio.Event()
            self._speaking, self._speech, self._speech_pos = utt, speech_from_text(text), 0
            await asyncio.wait_for(done_speaking.wait(), self.timeout_s + len(text) * 0.1)
            return utt

    async def _wait(self, utt: _Utterance) -> TurnResult:
        await asyncio.wait_for(utt.done.wait(), self.timeout_s * 2)
        return utt.result

    def _next_payload(self, now: float) -> str:
        if self._speaking is None:
            return _SILENCE
        chunk = self._speech[self._speech_pos : self._speech_pos + FRAME_BYTES]
        self._speech_pos += FRAME_BYTES
        self.stats.speech_frames += 1
        if self._speech_pos >= len(self._speech):
            chunk += _SILENT_FRAME[len(chunk) :]
            self._speech_ended(self._speaking, now)
        return base64.b64encode(chunk).decode()

    def _speech_ended(self, utt: _Utterance, now: float) -> None:
        utt.result.speech_end_at = now
        utt.after_turn = self._max_turn
        previous, self._listening, self._speaking = self._listening, utt, None
        if previous is not None and not previous.done.is_set():
            previous.result.superseded = True
            self._finish(previous, now)
        self._speech_done.set()

    async def _send_loop(self) -> None:
        ws = self._ws
        if ws is None:
            return
        t0 = time.monotonic()
        k = 0
        try:
            while True:
                while self._control:
                    await ws.send_str(self._control.popleft())
                if self._stopping:
                    return
                now = time.monotonic()
                due = t0 + k * FRAME_S
                if now < due:
                    await asyncio.sleep(due - now)
                    continue
                self.stats.record(now - due)
                ts = int((now - t0) * 1000) if self._stamp_sent else k * FRAME_MS
                await ws.send_str(self.wire.media(self._next_payload(now), ts))
                k += 1
                self._tick(now)
        except (ConnectionError, RuntimeError):
            pass

    # ------------------------------------------------------------------ listening

    async def _read(self) -> None:
        ws = self._ws
        if ws is None:
            return
        try:
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    try:
                        heard = self.wire.decode(msg.data)
                    except (ValueError, KeyError, TypeError, AttributeError):
                        self.errors.append({"code": "undecodable", "message": msg.data[:200]})
                        continue
                    self._on_heard(heard, time.monotonic())
        finally:
            self.close_code = ws.close_code
            if self.transport == "twilio" and ws.close_code not in (None, 1000):
                self.errors.append({"code": "closed", "close_code": ws.close_code})
            self._closed_evt.set()
            self._ready_evt.set()
            self._finish_all()

    def _on_heard(self, heard: Heard, now: float) -> None:
        kind = heard.kind
        if kind == HEARD_AUDIO:
            self._on_audio(heard, now)
        elif kind == HEARD_MARK:
            self.marks_received += 1
            if self.playback.mark(heard.name, now):
                self._echo(heard.name)
        elif kind == HEARD_CLEAR:
            self.clears.append(heard.turn)
            if self._listening is not None:
                self._listening.result.cleared = True
            for name in self.playback.clear(now):
                self._echo(name)
        elif kind == Out.READY:
            self.ready = heard.frame
            self._ready_evt.set()
        elif kind == Out.TURN_METRICS and heard.turn is not None:
            self._completed_turns.add(heard.turn)
            self._max_turn = max(self._max_turn, heard.turn)
            if self._listening is not None and self._listening.result.turn == heard.turn:
                self._listening.result.metrics = heard.frame
        elif kind == Out.ERROR and heard.frame is not None:
            self.errors.append(heard.frame)
            self._ready_evt.set()
        elif kind == Out.CALL_ENDED:
            self.ended = True
            self._closed_evt.set()

    def _on_audio(self, heard: Heard, now: float) -> None:
        nbytes = audio_bytes(heard)
        self.agent_audio_bytes += nbytes
        if self.playback.audio(nbytes, now):
            self._playing.set()
        if heard.turn is not None:
            self._max_turn = max(self._max_turn, heard.turn)
        utt = self._listening
        if utt is None or utt.done.is_set():
            return
        if heard.turn is not None and heard.turn <= utt.after_turn:
            return  # the end of an earlier reply, still arriving
        r = utt.result
        if r.first_audio_at is None:
            r.first_audio_at, r.turn = now, heard.turn
        r.agent_audio_bytes += nbytes
        if self.keep_audio:
            r.audio += base64.b64decode(heard.payload)

    def _echo(self, name: str) -> None:
        self._control.append(self.wire.mark(name))
        self.marks_echoed += 1
        if self._listening is not None:
            self._listening.result.marks.append(name)

    def _tick(self, now: float) -> None:
        """Per frame: echo marks whose audio has played; see whether the reply is done."""
        for name in self.playback.due(now):
            self._echo(name)
        drained = self.playback.drained(now)
        if drained:
            self._playing.clear()
        utt = self._listening
        if utt is None or utt.done.is_set():
            return
        r = utt.result
        if r.first_audio_at is None:
            if r.speech_end_at is not None and now - r.speech_end_at > self.timeout_s:
                r.timed_out = True
                self._finish(utt, now)
            return
        if not drained:
            return
        if (r.turn is not None and r.turn in self._completed_turns) or (
            now - self.playback.last_audio_at >= self.quiet_s
        ):
            self._finish(utt, now)

    def _finish(self, utt: _Utterance, now: float) -> None:
        utt.result.done_at = now
        utt.done.set()

    def _finish_all(self) -> None:
        now = time.monotonic()
        for utt in (self._greeting, self._listening, self._speaking):
            if utt is not None and not utt.done.is_set():
                utt.result.timed_out = utt.result.first_audio_at is None
                self._finish(utt, now)
        if self._speaking is not None:
            self._speech_done.set()
