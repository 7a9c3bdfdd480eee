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

When the router goes away mid-call the caller re-opens its stream and goes on: over Twilio
as Twilio does (``phone``: :class:`~callmesh_client.twilio_phone.TwilioPhone` requests the
``<Connect action>`` and opens the new stream it names), natively by reconnecting to the
next router of ``routers`` with the call's resume secret and ``delivered_turn``. What was
playing is dropped with the old stream (Twilio discards a stream's buffer with it). By
default the simulated caller knows when the line is down: it waits for it to be back before
it speaks, and says again from its start an utterance the drop cut off.

With ``repeat_after_s`` it behaves like a person instead, who cannot know that a stream
behind the phone line was replaced: it speaks on its own schedule whether or not a stream
is open (what it says while none is, nobody hears), and when no answer starts within
``repeat_after_s`` of the end of an utterance it says it again, up to ``max_repeats``
times (:attr:`TurnResult.repeats`).

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp

from callmesh.audio.tones import noise, silence, speech_from_text
from callmesh.protocol import Out
from callmesh_client.reconnect import ReconnectPolicy, RouterList, should_reconnect
from callmesh_client.twilio_phone import TwilioPhone
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
    heard: asyncio.Event = field(default_factory=asyncio.Event)  # its answer started (or done)


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
        phone: TwilioPhone | None = None,
        routers: Sequence[str] = (),
        reconnect: ReconnectPolicy | None = None,
        repeat_after_s: float | None = None,
        max_repeats: int = 2,
    ) -> None:
        self.router_url = router_url.rstrip("/")
        # Twilio through its webhook and <Connect action> (``phone``); natively, ``routers``
        # (after ``router_url``) with ``reconnect``: how the call re-opens a lost stream.
        self.phone = phone
        self.routers = RouterList([self.router_url, *(r.rstrip("/") for r in routers)])
        self.reconnect = reconnect
        self.reopens = 0  # streams re-opened after a lost one
        self.frames_in_gap = 0  # 20 ms frames due while no stream was open (not sent)
        self.utterances_repeated = 0  # said again: cut off by a lost stream, or unanswered
        # A person's patience (see the module doc); None: a caller that knows the line.
        self.repeat_after_s = repeat_after_s
        self.max_repeats = max_repeats
        self._stream_open = asyncio.Event()
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
        # At each clear: (agent audio bytes received, those before the last mark played).
        self.clear_points: list[tuple[int, int]] = []
        self._mark_at: dict[str, int] = {}  # agent audio bytes received before each mark
        self._heard_bytes = 0
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
        self._noise = b""  # sound without words being sent (see noise())
        self._noise_done: asyncio.Event | None = None
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
            if self.phone is not None:
                self._ws, self.wire = await self.phone.dial(self._http)
            else:
                # Twilio does not compress; neither does a caller that wants to be cheap.
                self._ws = await self._http.ws_connect(ws_url + self.wire.path(), compress=0)
            self._stream_open.set()
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

    @property
    def speaking(self) -> bool:
        """An utterance's audio is being sent now."""
        return self._speaking is not None

    async def wait_greeting(self) -> TurnResult:
        """The agent's greeting (turn 0), once it has finished playing."""
        if self._greeting is None:
            raise RuntimeError("not connected")
        return await self._wait(self._greeting)

    async def say(self, text: str) -> TurnResult:
        """Speak ``text`` and return when the reply to it has finished playing (with
        ``repeat_after_s``, saying it again while no answer starts in time)."""
        utt = await self._speak(text)
        if self.repeat_after_s is None:
            return await self._wait(utt)
        first_end = utt.result.speech_end_at
        repeats = 0
        while repeats < self.max_repeats and not await self._answered(utt, self.repeat_after_s):
            repeats += 1
            self.utterances_repeated += 1
            utt = await self._speak(text)
        utt.result.repeats, utt.result.first_speech_end_at = repeats, first_end
        return await self._wait(utt)

    async def _answered(self, utt: _Utterance, patience_s: float) -> bool:
        """Whether the answer to ``utt`` starts within ``patience_s`` (a call that is over
        counts as answered: there is nobody to repeat it to)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(utt.heard.wait(), patience_s)
        return utt.heard.is_set() or self._closed_evt.is_set()

    async def barge_in(self, text: str, after_ms: float) -> TurnResult:
        """Speak ``text`` ``after_ms`` into the agent's reply audio (the one playing now, or
        the next one to start), and return when the reply to it has finished playing."""
        await asyncio.wait_for(self._playing.wait(), self.timeout_s)
        delay = self.playback.started_at + after_ms / 1000 - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        return await self.say(text)

    async def noise(self, ms: float, after_ms: float = 0.0) -> None:
        """Make ``ms`` of loud sound without words (a cough, a door) ``after_ms`` into the
        agent's reply audio (the one playing now, or the next one); returns once sent.
        The node should not take it for a barge-in (a false interruption)."""
        await asyncio.wait_for(self._playing.wait(), self.timeout_s)
        delay = self.playback.started_at + after_ms / 1000 - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        self._noise_done = done = asyncio.Event()
        self._noise = noise(ms)
        await asyncio.wait_for(done.wait(), self.timeout_s + ms / 1000)

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
            if self.repeat_after_s is None:  # a person does not know the line is down
                await asyncio.wait_for(self._stream_open.wait(), self.timeout_s)
            self._speech_done = done_speaking = asyncio.Event()
            self._speaking, self._speech, self._speech_pos = utt, speech_from_text(text), 0
            await asyncio.wait_for(done_speaking.wait(), self.timeout_s + len(text) * 0.1)
            return utt

    async def _wait(self, utt: _Utterance) -> TurnResult:
        await asyncio.wait_for(utt.done.wait(), self.timeout_s * 2)
        return utt.result

    def _next_payload(self, now: float) -> str:
        if self._noise:
            chunk, self._noise = self._noise[:FRAME_BYTES], self._noise[FRAME_BYTES:]
            if not self._noise and self._noise_done is not None:
                self._noise_done.set()
            return base64.b64encode(chunk.ljust(FRAME_BYTES, _SILENT_FRAME[:1])).decode()
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
        t0 = time.monotonic()
        k = 0
        while not self._closed_evt.is_set():
            ws = self._ws
            try:
                while self._control and ws is not None:
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
                k += 1
                if ws is None or ws.closed or not self._stream_open.is_set():
                    self.frames_in_gap += 1
                    if self.repeat_after_s is not None:
                        self._next_payload(now)  # a person talks on; nobody hears it
                    # (else the caller holds its speech until the line is back)
                else:
                    await ws.send_str(self.wire.media(self._next_payload(now), ts))
                self._tick(now)
            except (ConnectionError, RuntimeError):
                if not self._can_reopen():
                    return
                await asyncio.sleep(FRAME_S)  # the reader re-opens the stream

    # ------------------------------------------------------------------ listening

    async def _read(self) -> None:
        try:
            while (ws := self._ws) is not None:
                try:
                    async for msg in ws:
                        if msg.type is aiohttp.WSMsgType.TEXT:
                            self._on_text(msg.data)
                except (aiohttp.ClientError, ConnectionError):
                    pass  # a lost stream, re-opened below when the call goes on
                self.close_code = ws.close_code
                self._stream_open.clear()
                if not (self._can_reopen() and await self._reopen()):
                    break
        finally:
            ws_code = self.close_code
            if self.transport == "twilio" and ws_code not in (None, 1000) and not self.ended:
                self.errors.append({"code": "closed", "close_code": ws_code})
            self._closed_evt.set()
            self._ready_evt.set()
            self._finish_all()

    def _on_text(self, data: str) -> None:
        try:
            heard = self.wire.decode(data)
        except (ValueError, KeyError, TypeError, AttributeError):
            self.errors.append({"code": "undecodable", "message": data[:200]})
            return
        self._on_heard(heard, time.monotonic())

    # ------------------------------------------------------------------ re-opening

    def _can_reopen(self) -> bool:
        if self.ended or self._stopping or self._closed_evt.is_set():
            return False
        if self.phone is not None:
            return True
        return (
            self.transport == "native"
            and self.reconnect is not None
            and self.ready is not None
            and should_reconnect(self.close_code)
        )

    async def _reopen(self) -> bool:
        """A new stream for the call; False when there is none (the call is over)."""
        http = self._http
        if http is None:
            return False
        old = self._ws
        try:
            if self.phone is not None:
                opened = await self.phone.after_stream(http)
                if opened is None:
                    self.ended = True  # the TwiML hung up: the call is over
                    return False
                ws, self.wire = opened
            else:
                redialed = await self._redial(http)
                if redialed is None:
                    return False
                ws = redialed
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            self.errors.append({"code": "reopen_failed", "message": str(exc)[:200]})
            return False
        if old is not None:
            await asyncio.shield(old.close())
        # The old stream's queued marks and buffered audio went with it.
        self._control.clear()
        self.playback.clear(time.monotonic())
        self._mark_at.clear()
        self._control.extend(self.wire.opening())
        if self.repeat_after_s is None and self._speaking is not None and self._speech_pos > 0:
            self._speech_pos = 0  # cut off mid-sentence: say it again from its start
            self.utterances_repeated += 1
        self._ws = ws
        self.reopens += 1
        self.close_code = None  # the call is back on a stream
        self._stream_open.set()
        return True

    async def _redial(self, http: aiohttp.ClientSession) -> aiohttp.ClientWebSocketResponse | None:
        """Native: the next router that takes the connection, within the policy's bound."""
        policy = self.reconnect
        wire = self.wire
        if policy is None or not isinstance(wire, NativeWire):
            return None
        wire.delivered_turn = max(self._completed_turns, default=0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + policy.give_up_after_s
        attempt = 0
        while loop.time() < deadline:
            await asyncio.sleep(policy.delay(attempt, self.routers.rng))
            attempt += 1
            url = self.routers.advance().replace("http://", "ws://").replace("https://", "wss://")
            try:
                return await http.ws_connect(url + wire.path(), compress=0)
            except (aiohttp.ClientError, OSError):
                continue
        return None

    def _on_heard(self, heard: Heard, now: float) -> None:
        kind = heard.kind
        if kind == HEARD_AUDIO:
            self._on_audio(heard, now)
        elif kind == HEARD_MARK:
            self.marks_received += 1
            self._mark_at[heard.name] = self.agent_audio_bytes
            if self.playback.mark(heard.name, now):
                self._played(heard.name)
        elif kind == HEARD_CLEAR:
            self.clears.append(heard.turn)
            self.clear_points.append((self.agent_audio_bytes, self._heard_bytes))
            if self._listening is not None:
                self._listening.result.cleared = True
            for name in self.playback.clear(now):
                self._mark_at.pop(name, None)  # flushed, not played
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
            utt.heard.set()
        r.agent_audio_bytes += nbytes
        if self.keep_audio:
            r.audio += base64.b64decode(heard.payload)

    def _played(self, name: str) -> None:
        self._heard_bytes = self._mark_at.pop(name, self._heard_bytes)
        self._echo(name)

    def _echo(self, name: str) -> None:
        self._control.append(self.wire.mark(name))
        self.marks_echoed += 1
        if self._listening is not None:
            self._listening.result.marks.append(name)

    def _tick(self, now: float) -> None:
        """Per frame: echo marks whose audio has played; see whether the reply is done."""
        for name in self.playback.due(now):
            self._played(name)
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
        utt.heard.set()

    def _finish_all(self) -> None:
        now = time.monotonic()
        for utt in (self._greeting, self._listening, self._speaking):
            if utt is not None and not utt.done.is_set():
                utt.result.timed_out = utt.result.first_audio_at is None
                self._finish(utt, now)
        if self._speaking is not None:
            self._speech_done.set()
