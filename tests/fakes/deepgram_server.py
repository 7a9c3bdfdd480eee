"""A local Deepgram: the ``/v1/listen`` and ``/v1/speak`` websockets, on the real wire format.

Listen: query parameters as the SDK sends them; binary audio in; JSON ``Results``
(interim and final, ``speech_final``, ``from_finalize``), ``SpeechStarted``,
``UtteranceEnd`` and ``Metadata`` out; ``KeepAlive``/``Finalize``/``CloseStream`` text
messages handled. Transcripts are deterministic: the audio is decoded as simulated speech
(:mod:`callmesh.audio.tones`) and endpointed with the energy VAD,
using the session's own ``endpointing`` and ``utterance_end_ms`` in audio time.

Speak: ``Speak``/``Flush``/``Clear``/``Close`` text messages in; ``Metadata``, binary
audio (simulated speech of the flushed text), ``Flushed`` and ``Cleared`` out.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiohttp import WSMsgType, web

from callmesh.audio.codec import mulaw_decode, mulaw_decode_array, pcm16_to_array
from callmesh.audio.tones import SpeechDecoder, speech_from_text
from conversation_node.audio.vad import EnergyVAD, VadConfig, VadEventKind
from conversation_node.providers.deepgram_stt import DeepgramClientEnvironment

from . import LocalServer

API_KEY = "test-deepgram-key"
_MODEL_INFO = {"name": "2-general-nova", "version": "2024-01-18.26916", "arch": "nova-3"}


@dataclass
class ListenRecord:
    """What one listen connection saw (for assertions)."""

    params: dict[str, str]
    audio_bytes: int = 0
    keepalives: int = 0
    finalizes: int = 0
    close_stream: bool = False
    sent: list[dict[str, Any]] = field(default_factory=list)
    keepalive_received: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class SpeakRecord:
    params: dict[str, str]
    flushed_texts: list[str] = field(default_factory=list)
    clears: int = 0
    closed_by_client: bool = False


class FakeDeepgram(LocalServer):
    """Deepgram's live STT and TTS websockets. Knobs for failure tests:

    * ``reject_status``: answer the websocket handshake with this HTTP status;
    * ``drop_listen_after_bytes``: close a listen socket with code 1011 after this much audio;
    * ``speak_chunk_bytes``/``speak_chunk_pause_s``: how TTS audio is paced (a pause lets a
      ``Clear`` arrive mid-sentence);
    * ``confidence``: override the reported transcript confidence.
    """

    def __init__(self, *, api_key: str = API_KEY) -> None:
        super().__init__()
        self.api_key = api_key
        self.reject_status: int | None = None
        self.drop_listen_after_bytes: int | None = None
        self.speak_chunk_bytes = 800
        self.speak_chunk_pause_s = 0.0
        self.confidence: float | None = None
        self.interim_interval_ms = 200
        self.listens: list[ListenRecord] = []
        self.speaks: list[SpeakRecord] = []
        self.app.router.add_get("/v1/listen", self._listen)
        self.app.router.add_get("/v1/speak", self._speak)

    @property
    def environment(self) -> DeepgramClientEnvironment:
        return DeepgramClientEnvironment(
            base=self.http_url, production=self.ws_url, agent=self.ws_url, agent_rest=self.http_url
        )

    def _check(self, request: web.Request) -> web.Response | None:
        if self.reject_status is not None:
            return web.json_response({"err_msg": "rejected"}, status=self.reject_status)
        if request.headers.get("Authorization") != f"Token {self.api_key}":
            return web.json_response({"err_msg": "Invalid credentials."}, status=401)
        return None

    async def _listen(self, request: web.Request) -> web.StreamResponse:
        rejected = self._check(request)
        if rejected is not None:
            return rejected
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        record = ListenRecord(params=dict(request.query))
        self.listens.append(record)
        self.track(ws)
        session = _ListenSession(self, ws, record)
        try:
            await session.run()
        finally:
            self.untrack(ws)
        return ws

    async def _speak(self, request: web.Request) -> web.StreamResponse:
        rejected = self._check(request)
        if rejected is not None:
            return rejected
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        record = SpeakRecord(params=dict(request.query))
        self.speaks.append(record)
        self.track(ws)
        try:
            await _SpeakSession(self, ws, record).run()
        finally:
            self.untrack(ws)
        return ws


class _ListenSession:
    def __init__(self, server: FakeDeepgram, ws: web.WebSocketResponse, record: ListenRecord):
        self.server, self.ws, self.record = server, ws, record
        q = record.params
        self.mulaw = q.get("encoding", "linear16") == "mulaw"
        self.interim = q.get("interim_results") == "true"
        self.vad_events = q.get("vad_events") == "true"
        endpointing = q.get("endpointing", "10")
        self.endpointing_ms = 10 if endpointing == "false" else int(endpointing)
        self.utterance_end_ms = int(q["utterance_end_ms"]) if "utterance_end_ms" in q else None
        self.vad = EnergyVAD(VadConfig(end_silence_ms=max(20, self.endpointing_ms)))
        self.decoder = SpeechDecoder()
        self.request_id = str(uuid.uuid4())
        self.pending = np.zeros(0, dtype=np.int16)
        self.segment_start = 0.0  # audio seconds where the unfinalized segment began
        self.last_interim = ("", -1e9)
        self.awaiting_utterance_end: float | None = None  # last_word_end (s)

    async def run(self) -> None:
        if self.record.params.get("sample_rate", "8000") != "8000":
            await self.ws.close(code=1008, message=b"fake supports 8000 Hz only")
            return
        async for msg in self.ws:
            if msg.type is WSMsgType.BINARY:
                await self._audio(msg.data)
            elif msg.type is WSMsgType.TEXT:
                kind = json.loads(msg.data).get("type")
                if kind == "KeepAlive":
                    self.record.keepalives += 1
                    self.record.keepalive_received.set()
                elif kind == "Finalize":
                    self.record.finalizes += 1
                    await self._finalize(from_finalize=True)
                elif kind == "CloseStream":
                    self.record.close_stream = True
                    await self._finalize(from_finalize=False)
                    await self._send(self._metadata())
                    await self.ws.close()
                    return

    async def _audio(self, data: bytes) -> None:
        self.record.audio_bytes += len(data)
        drop = self.server.drop_listen_after_bytes
        if drop is not None and self.record.audio_bytes >= drop:
            await self.ws.close(code=1011, message=b"NET-0001 simulated failure")
            return
        samples = mulaw_decode_array(data) if self.mulaw else pcm16_to_array(data)
        buf = np.concatenate([self.pending, samples])
        whole = len(buf) - len(buf) % 160
        self.pending = buf[whole:]
        for start in range(0, whole, 160):
            await self._frame(buf[start : start + 160])

    async def _frame(self, frame: np.ndarray) -> None:
        self.decoder.push_samples(frame)
        now = self.vad.position_ms / 1000 + 0.02
        for event in self.vad.push_samples(frame):
            if event.kind is VadEventKind.SPEECH_START:
                self.segment_start = event.at_ms / 1000
                if self.vad_events:
                    await self._send(
                        {
                            "type": "SpeechStarted",
                            "channel": [0, 1],
                            "timestamp": event.at_ms / 1000,
                        }
                    )
            else:
                text, confidence = self.decoder.take()
                end = event.at_ms / 1000
                await self._send(
                    self._results(text, confidence, end, final=True, speech_final=True)
                )
                self.segment_start = end
                if text:
                    self.awaiting_utterance_end = end
        if self.interim and self.vad.in_speech:
            text = self.decoder.text
            interval = self.server.interim_interval_ms / 1000
            if text and text != self.last_interim[0] and now - self.last_interim[1] >= interval:
                self.last_interim = (text, now)
                await self._send(self._results(text, 1.0, now, final=False))
        pending, gap_ms = self.awaiting_utterance_end, self.utterance_end_ms
        if pending is None or gap_ms is None or self.vad.in_speech:
            return
        if now - pending >= gap_ms / 1000:
            self.awaiting_utterance_end = None
            message = {"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": pending}
            await self._send(message)

    async def _finalize(self, *, from_finalize: bool) -> None:
        end = self.vad.position_ms / 1000
        self.vad.flush()
        text, confidence = self.decoder.take()
        message = self._results(text, confidence, end, final=True, speech_final=False)
        message["from_finalize"] = from_finalize
        await self._send(message)
        self.segment_start = end

    def _results(
        self, text: str, confidence: float, end: float, *, final: bool, speech_final: bool = False
    ) -> dict[str, Any]:
        if self.server.confidence is not None:
            confidence = self.server.confidence
        start = self.segment_start
        tokens = text.split()
        step = (end - start) / max(1, len(tokens))
        words = [
            {
                "word": w.lower().strip(".,!?"),
                "start": round(start + i * step, 3),
                "end": round(start + (i + 1) * step, 3),
                "confidence": confidence,
                "punctuated_word": w,
            }
            for i, w in enumerate(tokens)
        ]
        return {
            "type": "Results",
            "channel_index": [0, 1],
            "duration": round(end - start, 3),
            "start": round(start, 3),
            "is_final": final,
            "speech_final": speech_final,
            "from_finalize": False,
            "channel": {
                "alternatives": [{"transcript": text, "confidence": confidence, "words": words}]
            },
            "metadata": {
                "request_id": self.request_id,
                "model_info": _MODEL_INFO,
                "model_uuid": "00000000-0000-0000-0000-000000000003",
            },
        }

    def _metadata(self) -> dict[str, Any]:
        return {
            "type": "Metadata",
            "transaction_key": "deprecated",
            "request_id": self.request_id,
            "sha256": "0" * 64,
            "created": "2026-01-01T00:00:00.000Z",
            "duration": self.vad.position_ms / 1000,
            "channels": 1,
        }

    async def _send(self, message: dict[str, Any]) -> None:
        if not self.ws.closed:
            self.record.sent.append(message)
            await self.ws.send_str(json.dumps(message))


class _SpeakSession:
    def __init__(self, server: FakeDeepgram, ws: web.WebSocketResponse, record: SpeakRecord):
        self.server, self.ws, self.record = server, ws, record
        self.mulaw = record.params.get("encoding", "linear16") == "mulaw"
        self.buffer = ""
        self.sequence = 0
        self.jobs: asyncio.Queue[str] = asyncio.Queue()
        self.current: asyncio.Task[None] | None = None

    async def run(self) -> None:
        await self.ws.send_str(
            json.dumps(
                {
                    "type": "Metadata",
                    "request_id": str(uuid.uuid4()),
                    "model_name": self.record.params.get("model", "aura-2-thalia-en"),
                    "model_version": "2025-04-07.0",
                    "model_uuid": "00000000-0000-0000-0000-00000000aura",
                }
            )
        )
        speaker = self.server.spawn(self._speaker(), name="fake-deepgram-speaker")
        try:
            async for msg in self.ws:
                if msg.type is not WSMsgType.TEXT:
                    continue
                data = json.loads(msg.data)
                kind = data.get("type")
                if kind == "Speak":
                    self.buffer += data["text"]
                elif kind == "Flush":
                    self.record.flushed_texts.append(self.buffer)
                    self.jobs.put_nowait(self.buffer)
                    self.buffer = ""
                elif kind == "Clear":
                    self.record.clears += 1
                    await self._clear()
                elif kind == "Close":
                    self.record.closed_by_client = True
                    break
        finally:
            speaker.cancel()
            await asyncio.gather(speaker, return_exceptions=True)
            await self.ws.close()

    async def _clear(self) -> None:
        self.buffer = ""
        while not self.jobs.empty():
            self.jobs.get_nowait()
        if self.current is not None:
            self.current.cancel()
            await asyncio.gather(self.current, return_exceptions=True)
        await self.ws.send_str(json.dumps({"type": "Cleared", "sequence_id": self.sequence}))

    async def _speaker(self) -> None:
        while True:
            text = await self.jobs.get()
            self.current = asyncio.create_task(self._say(text), name="fake-deepgram-say")
            try:
                await asyncio.shield(self.current)
            except asyncio.CancelledError:
                if not self.current.cancelled():  # we were cancelled, not the utterance
                    self.current.cancel()
                    await asyncio.gather(self.current, return_exceptions=True)
                    raise
            finally:
                self.current = None

    async def _say(self, text: str) -> None:
        audio = speech_from_text(text) if text else b""
        if not self.mulaw:
            audio = mulaw_decode(audio)
        size = self.server.speak_chunk_bytes
        for i in range(0, len(audio), size):
            await self.ws.send_bytes(audio[i : i + size])
            await asyncio.sleep(self.server.speak_chunk_pause_s)
        await self.ws.send_str(json.dumps({"type": "Flushed", "sequence_id": self.sequence}))
        self.sequence += 1
