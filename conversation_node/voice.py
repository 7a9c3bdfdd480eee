"""The audio side of one call: caller audio into speech-to-text.

:class:`VoiceLane` feeds every ``audio`` frame into the call's STT stream (opened on the
first frame) and turns the recognizer's events into the session's turn-taking calls:
speech started (a possible barge-in), interim transcripts (retrieval prefetch), a stable
transcript at a pause (a speculative reply may start), and the end of an utterance (a
turn, with its transcript, confidence and the moment speech ended).
It never blocks on a turn: frames keep flowing while the agent speaks, which is what lets
the caller interrupt.

Acknowledgement of audio: frames of an utterance are acknowledged with the checkpoint of
the turn that answers it (the session's ``last_seq``), so a failover replays an utterance
in flight to the new owner. Audio heard while nobody speaks is acknowledged on its own
once it is ``QUIET_ACK_AFTER_S`` old (recognizers report speech late, so younger audio may
still hold the start of an utterance); otherwise the router would keep minutes of silence.

What the caller heard of a reply is followed by :mod:`conversation_node.playback`.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from callmesh.audio.format import AudioChunk, AudioEncoding, bytes_per_ms
from callmesh.protocol import DEFAULT_AUDIO, Inbound
from conversation_node.providers.base import (
    STT,
    ProviderError,
    STTEventKind,
    STTStream,
)

log = logging.getLogger("callmesh.node.voice")

QUIET_ACK_AFTER_S = 1.0
QUIET_ACK_EVERY_S = 0.5
# Frames fed within this long of each other share one entry of the quiet-ack history
# (the time and seq of the latest of them): five 20 ms frames an entry instead of one,
# and the acknowledgement comes at most this much later.
_RECENT_BUCKET_S = 0.1


@dataclass(frozen=True)
class AudioFormat:
    encoding: AudioEncoding
    sample_rate: int

    @classmethod
    def from_start(cls, body: dict[str, object]) -> AudioFormat:
        audio = body.get("audio")
        spec: dict[str, Any] = audio if isinstance(audio, dict) else dict(DEFAULT_AUDIO)
        return cls(AudioEncoding(str(spec["encoding"])), int(spec["sample_rate"]))

    @property
    def bytes_per_ms(self) -> float:
        return bytes_per_ms(self.encoding, self.sample_rate)


class VoiceEvents(Protocol):
    """What the lane tells its session (implemented by :class:`CallSession`)."""

    async def on_speech_started(self) -> None: ...

    def on_interim(self, text: str) -> None: ...

    async def on_transcript(self, text: str, final: bool, confidence: float) -> None: ...

    def on_eager(self, text: str) -> None: ...

    async def on_utterance(
        self,
        text: str,
        confidence: float,
        speech_end_at: float,
        seq: int,
        endpoint_ms: float | None = None,
    ) -> None: ...

    async def on_quiet_audio(self, seq: int) -> None: ...


class VoiceLane:
    """One call's recognizer and the task reading its events (owned; ``aclose`` stops it)."""

    def __init__(
        self,
        stt: STT,
        fmt: AudioFormat,
        events: VoiceEvents,
        *,
        tenant: str,
        call_id: str,
        observe_lag: Callable[[float], None],
    ) -> None:
        self._stt = stt
        self.format = fmt
        self._events = events
        self.tenant = tenant  # verified by the router: the recognizer adapts to it
        self.call_id = call_id
        self._observe_lag = observe_lag
        self._stream: STTStream | None = None
        self._reader: asyncio.Task[None] | None = None
        self.fed_seq = 0
        self.in_utterance = False
        # (fed at, seq) of the latest frame of each _RECENT_BUCKET_S, oldest first. A list:
        # at most ~35 entries, dropped from the front in slices, and an empty deque is
        # 760 bytes of every call.
        self._recent: list[tuple[float, int]] = []
        self._bucket_since = 0.0
        self._last_quiet_ack = 0.0
        self._lag_base: float | None = None
        self.failed = False
        self._send_now: Callable[[AudioChunk], bool] | None = None

    async def feed(self, msg: Inbound) -> None:
        """One ``audio`` frame into the recognizer. Bad base64 is the client's error."""
        data = _audio_bytes(msg)
        now = time.monotonic()
        self._observe(now, msg)
        if self.failed:
            self.fed_seq = msg.seq
            return
        if self._stream is None:
            await self._open()
        assert self._stream is not None
        try:
            await self._stream.send_audio(
                AudioChunk(data, self.format.encoding, self.format.sample_rate)
            )
        except ProviderError as exc:
            self._fail(exc)
        self._fed(now, msg.seq)
        if now - self._last_quiet_ack >= QUIET_ACK_EVERY_S:  # checked here: 50 frames a second
            seq = self._quiet_ack_seq(now)
            if seq:
                await self._events.on_quiet_audio(seq)

    def feed_now(self, msg: Inbound) -> bool:
        """:meth:`feed` without waiting, for a frame that ``feed`` would not wait on
        either: True once fed. False, having changed nothing, when it would wait (the
        stream is not open or cannot take audio at once, a quiet ack is due) or the frame
        is bad (``feed`` answers for it): the frame then goes through ``feed``."""
        send = self._send_now
        if send is None or self.failed:
            return False
        now = time.monotonic()
        if now - self._last_quiet_ack >= QUIET_ACK_EVERY_S and self._quiet_ack_due(now):
            return False
        try:
            data = _audio_bytes(msg)
        except ValueError:
            return False
        try:
            if not send(AudioChunk(data, self.format.encoding, self.format.sample_rate)):
                return False
        except ProviderError as exc:
            self._fail(exc)
        self._observe(now, msg)
        self._fed(now, msg.seq)
        if now - self._last_quiet_ack >= QUIET_ACK_EVERY_S:
            self._quiet_ack_seq(now)  # forgets utterance audio; nothing to send (see above)
        return True

    def _observe(self, now: float, msg: Inbound) -> None:
        ts = msg.body.get("ts")
        if isinstance(ts, int):
            self._frame_lag(now, ts)

    def _fed(self, now: float, seq: int) -> None:
        self.fed_seq = seq
        recent = self._recent
        if recent and now - self._bucket_since < _RECENT_BUCKET_S:
            recent[-1] = (now, seq)
        else:
            recent.append((now, seq))
            self._bucket_since = now

    def _frame_lag(self, now: float, ts_ms: int) -> None:
        # Lag behind the caller's own clock: how much later than real time this frame is
        # processed, relative to the earliest frame of the call (clocks need not agree).
        offset = now * 1000 - ts_ms
        if self._lag_base is None or offset < self._lag_base:
            self._lag_base = offset
        self._observe_lag(offset - self._lag_base)

    async def _open(self) -> None:
        try:
            self._stream = await self._stt.open(
                self.format.encoding, self.format.sample_rate, tenant=self.tenant
            )
        except ProviderError as exc:
            self._fail(exc)
            raise
        # Streams that can take audio at once offer it (STTStream's note): cached here,
        # where the stream is known, for feed_now's 50 frames a second.
        self._send_now = getattr(self._stream, "send_audio_nowait", None)
        self._reader = asyncio.create_task(self._read(), name=f"stt:{self.call_id}")

    def _fail(self, exc: Exception) -> None:
        self.failed = True
        log.error(
            "speech recognition failed: audio is ignored for this call",
            extra={"fields": {"call_id": self.call_id, "error": str(exc)}},
        )

    async def _read(self) -> None:
        assert self._stream is not None
        try:
            async for ev in self._stream.events():
                if ev.kind is STTEventKind.SPEECH_STARTED:
                    self.in_utterance = True
                    await self._events.on_speech_started()
                elif ev.kind is STTEventKind.INTERIM:
                    self.in_utterance = True
                    self._events.on_interim(ev.text)
                    await self._events.on_transcript(ev.text, False, ev.confidence)
                elif ev.kind is STTEventKind.EAGER_END:
                    self._events.on_eager(ev.text)
                elif ev.kind is STTEventKind.UTTERANCE_END:
                    self.in_utterance = False
                    ended = ev.speech_end_at or time.monotonic()
                    if ev.text.strip():
                        await self._events.on_transcript(ev.text, True, ev.confidence)
                    await self._events.on_utterance(
                        ev.text, ev.confidence, ended, self.fed_seq, ev.endpoint_ms
                    )
        except ProviderError as exc:
            self._fail(exc)
        except Exception:
            log.exception("speech events failed", extra={"fields": {"call_id": self.call_id}})
            self.failed = True

    def expect_yes_no(self, flag: bool) -> None:
        """Tell a recognizer whose endpointing adapts that the agent asked a yes/no
        question (``STTStream``'s note); others do not need to know."""
        hint = getattr(self._stream, "expect_yes_no", None)
        if hint is not None:
            hint(flag)

    async def finalize(self) -> None:
        """End the utterance in progress now (a DTMF key, the caller hanging up)."""
        if self._stream is not None and not self.failed:
            with contextlib.suppress(ProviderError):
                await self._stream.finalize()

    async def end_of_audio(self) -> None:
        """No more audio will come (the call's link ended). The recognizer is asked to end
        an utterance whose speech had stopped and to drop one cut off mid-speech (a stream's
        ``end_of_audio``; one without it finalizes what it heard), then closed; this
        returns once its last events were handled, i.e. the turn of a finished utterance
        has started."""
        stream = self._stream
        if stream is None or self.failed:
            return
        self._send_now = None
        end = getattr(stream, "end_of_audio", None)
        with contextlib.suppress(ProviderError):
            await (end() if end is not None else stream.finalize())
        with contextlib.suppress(Exception):
            await stream.aclose()  # its events end after the ones already queued
        if self._reader is not None:
            await asyncio.gather(asyncio.shield(self._reader), return_exceptions=True)

    def _quiet_ack_due(self, now: float) -> bool:
        """Whether :meth:`_quiet_ack_seq` would now name audio to acknowledge."""
        recent = self._recent
        return not self.in_utterance and bool(recent) and now - recent[0][0] >= QUIET_ACK_AFTER_S

    def _quiet_ack_seq(self, now: float) -> int:
        """Forget audio old enough to be sure of; the last of it to acknowledge, unless an
        utterance is being heard (its audio is acknowledged with its turn), else 0."""
        recent, n = self._recent, 0
        while n < len(recent) and now - recent[n][0] >= QUIET_ACK_AFTER_S:
            n += 1
        seq = recent[n - 1][1] if n else 0
        del recent[:n]
        if seq and not self.in_utterance:
            self._last_quiet_ack = now
            return seq
        return 0

    async def aclose(self) -> None:
        stream, self._stream = self._stream, None
        self._send_now = None
        if stream is not None:
            with contextlib.suppress(Exception):
                await stream.aclose()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(asyncio.gather(self._reader, return_exceptions=True))
            self._reader = None

    def __repr__(self) -> str:
        return (
            f"<VoiceLane {self.call_id} {self.format.encoding}/{self.format.sample_rate} "
            f"fed={self.fed_seq}{' speaking' if self.in_utterance else ''}"
            f"{' failed' if self.failed else ''}>"
        )


def _audio_bytes(msg: Inbound) -> bytes:
    """An ``audio`` frame's bytes. Strict: only the base64 alphabet, padded right."""
    try:
        return binascii.a2b_base64(msg.body["data"], strict_mode=True)
    except ValueError:  # binascii.Error is one; so is non-ASCII text
        raise ValueError("'data' is not valid base64") from None
