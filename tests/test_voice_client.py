"""The simulated audio caller against a fake router that records what it is sent: Twilio's
wire format, real-time speech that decodes back to its text, playback with mark echoes,
``clear``, reply completion, and the native transport."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from callmesh.audio.tones import decode_speech
from callmesh.auth import TokenVerifier
from callmesh.auth.twilio import verify_stream_token
from callmesh.protocol import encode
from callmesh_client.voice_client import FRAME_BYTES, VoiceCaller
from tests.cluster_helpers import eventually

pytestmark = pytest.mark.timeout(60)

SILENCE = b"\xff" * FRAME_BYTES
TEST_SECRET = "voice-client-test-secret-0123456789abcdef"


class FakeRouter:
    """Plays the router: records every message; ``on_message`` may answer."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.ws: web.WebSocketResponse | None = None
        self.on_message: Callable[[dict[str, Any]], Awaitable[None]] | None = None
        app = web.Application()
        app.router.add_get("/v1/twilio/media", self._stream)
        app.router.add_get("/v1/calls/{call_id}", self._stream)
        self.server = TestServer(app)

    async def _stream(self, request: web.Request) -> web.WebSocketResponse:
        ws = self.ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            frame = json.loads(msg.data)
            self.received.append(frame)
            if frame.get("type") == "start":
                await self.send({"type": "ready", "turn": 0, "last_seq": 0})
            elif frame.get("type") == "hangup":
                await self.send({"type": "call_ended", "turn": 0})
            elif frame.get("event") == "stop":
                await ws.close()
            if self.on_message is not None:
                await self.on_message(frame)
        return ws

    async def send(self, frame: dict[str, Any]) -> None:
        assert self.ws is not None
        await self.ws.send_str(encode(frame))

    def inbound_audio(self) -> list[bytes]:
        out = []
        for f in self.received:
            payload = f["media"]["payload"] if f.get("event") == "media" else f.get("data")
            if f.get("event") == "media" or f.get("type") == "audio":
                out.append(base64.b64decode(payload))
        return out

    def of(self, key: str, value: str) -> list[dict[str, Any]]:
        return [f for f in self.received if f.get(key) == value]


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeRouter, str]]:
    router = FakeRouter()
    await router.server.start_server()
    try:
        yield router, str(router.server.make_url("")).rstrip("/")
    finally:
        await router.server.close()


def media(data: bytes, sid: str = "MZ") -> dict[str, Any]:
    return {
        "event": "media",
        "streamSid": sid,
        "media": {"payload": base64.b64encode(data).decode()},
    }


async def test_twilio_caller_sends_what_twilio_sends(
    fake: tuple[FakeRouter, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The simulated Twilio passes the stream token the webhook would have minted.
    monkeypatch.setenv("CALLMESH_AUTH_SECRET", TEST_SECRET)
    router, url = fake
    async with VoiceCaller(url, "CA42", "acme", "bob") as caller:
        await eventually(lambda: len(router.of("event", "media")) >= 10)
        await caller.dtmf("7")
        await eventually(lambda: bool(router.of("event", "dtmf")))
        await caller.hangup()
    connected, start, *rest = router.received
    assert connected == {"event": "connected", "protocol": "Call", "version": "1.0.0"}
    sid = start["streamSid"]
    assert start["sequenceNumber"] == "1" and start["start"]["streamSid"] == sid
    assert start["start"]["callSid"] == "CA42"
    params = dict(start["start"]["customParameters"])
    grant = verify_stream_token(TEST_SECRET, params.pop("token"), "CA42")
    assert (grant.tenant, grant.caller) == ("acme", "bob")
    assert params == {"tenant": "acme", "caller": "bob"}
    assert start["start"]["mediaFormat"] == {
        "encoding": "audio/x-mulaw",
        "sampleRate": 8000,
        "channels": 1,
    }
    assert [m["sequenceNumber"] for m in rest] == [str(n) for n in range(2, len(rest) + 2)]
    frames = router.of("event", "media")
    assert [m["media"]["chunk"] for m in frames] == [str(k + 1) for k in range(len(frames))]
    assert [m["media"]["timestamp"] for m in frames] == [str(20 * k) for k in range(len(frames))]
    assert all(m["streamSid"] == sid and m["media"]["track"] == "inbound" for m in frames)
    assert set(router.inbound_audio()) == {SILENCE}  # nothing said: silence, 160 bytes a frame
    assert router.of("event", "dtmf")[0]["dtmf"] == {"track": "inbound_track", "digit": "7"}
    assert rest[-1]["event"] == "stop" and rest[-1]["stop"]["callSid"] == "CA42"
    assert caller.stats.frames == len(frames)


async def test_speech_decodes_and_the_reply_is_measured(fake: tuple[FakeRouter, str]) -> None:
    router, url = fake
    spoke = {"started": False, "answered": False}

    async def answer_after_speech(frame: dict[str, Any]) -> None:
        if frame.get("event") != "media" or spoke["answered"]:
            return
        silent = base64.b64decode(frame["media"]["payload"]) == SILENCE
        if not silent:
            spoke["started"] = True
        elif spoke["started"]:  # the first silent frame after speech: answer
            spoke["answered"] = True
            for _ in range(5):
                await router.send(media(b"\x55" * 160))
            await router.send({"event": "mark", "streamSid": "MZ", "mark": {"name": "1.5"}})

    router.on_message = answer_after_speech
    async with VoiceCaller(url, "CA43", "acme", "bob", quiet_ms=100) as caller:
        result = await caller.say("book me in")
        await caller.hangup()
    assert decode_speech(b"".join(router.inbound_audio())) == "book me in"
    assert result.text == "book me in" and result.response_ms is not None
    assert result.agent_audio_bytes == 800 and result.marks == ["1.5"]
    assert not result.cleared and not result.timed_out
    assert [m["mark"]["name"] for m in router.of("event", "mark")] == ["1.5"]


async def test_marks_echo_after_playback_and_clear_echoes_the_rest(
    fake: tuple[FakeRouter, str],
) -> None:
    router, url = fake
    async with VoiceCaller(url, "CA44", "acme", "bob") as caller:
        await eventually(lambda: router.ws is not None)
        await router.send(media(b"\x55" * 800))  # 100 ms
        await router.send({"event": "mark", "streamSid": "MZ", "mark": {"name": "a"}})
        await eventually(lambda: len(router.of("event", "mark")) == 1)
        for _ in range(10):  # 30 s of audio: its mark is not due for a long while
            await router.send(media(b"\x55" * 24000))
        await router.send({"event": "mark", "streamSid": "MZ", "mark": {"name": "b"}})
        await router.send({"event": "mark", "streamSid": "MZ", "mark": {"name": "c"}})
        await asyncio.sleep(0.2)
        assert len(router.of("event", "mark")) == 1  # still playing
        await router.send({"event": "clear", "streamSid": "MZ"})
        await eventually(lambda: len(router.of("event", "mark")) == 3, timeout_s=5)
        assert caller.clears == [None] and caller.marks_echoed == 3
        await caller.hangup()
    assert [m["mark"]["name"] for m in router.of("event", "mark")] == ["a", "b", "c"]


async def test_native_caller_uses_turns_and_seq(
    fake: tuple[FakeRouter, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The caller mints its call token with the development secret.
    monkeypatch.setenv("CALLMESH_AUTH_SECRET", TEST_SECRET)
    router, url = fake
    audio = base64.b64encode(b"\x55" * 400).decode()
    heard: list[bool] = []  # per audio frame: was it speech?

    async def reply(frame: dict[str, Any]) -> None:
        if frame.get("type") == "audio":
            heard.append(base64.b64decode(frame["data"]) != SILENCE)
            if heard[-2:] == [True, False]:  # speech just ended: answer
                await router.send({"type": "agent_audio", "turn": 1, "n": 0, "data": audio})
                await router.send({"type": "mark", "turn": 1, "n": 1, "name": "1.1"})
                await router.send({"type": "turn_metrics", "turn": 1})

    async with VoiceCaller(url, "native-7", "acme", "bob", transport="native") as caller:
        assert caller.ready is not None
        router.on_message = reply
        result = await caller.say("hi")
        await caller.hangup()
        assert caller.ended
    start = dict(router.received[0])
    grant = await TokenVerifier(hs256_secret=TEST_SECRET).verify(start.pop("token"))
    assert (grant.tenant, grant.caller, grant.call_id) == ("acme", "bob", "native-7")
    assert start == {
        "type": "start",
        "seq": 1,
        "tenant": "acme",
        "caller": "bob",
        "audio": {"encoding": "mulaw", "sample_rate": 8000},
    }
    frames = [f for f in router.received if "seq" in f]
    assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1))
    audio_frames = router.of("type", "audio")
    assert [f["ts"] for f in audio_frames] == [20 * k for k in range(len(audio_frames))]
    assert (result.turn, result.agent_audio_bytes, result.marks) == (1, 400, ["1.1"])
    assert result.metrics == {"type": "turn_metrics", "turn": 1}
    assert router.of("type", "mark")[0]["name"] == "1.1"
    assert frames[-1]["type"] == "hangup"


async def test_a_caller_can_stamp_frames_with_when_they_were_sent(
    fake: tuple[FakeRouter, str],
) -> None:
    """``timestamps="sent"``: a frame sent late carries the time it left, not its due time
    (the capacity benchmark's callers, so their own lateness is not counted as the node's)."""
    router, url = fake
    async with VoiceCaller(url, "native-8", "acme", "bob", transport="native", timestamps="sent"):
        await eventually(lambda: len(router.of("type", "audio")) >= 5, timeout_s=5)
        # Block the loop on purpose: the frames due meanwhile go out late, at once.
        time.sleep(0.1)  # noqa: ASYNC251
        await eventually(lambda: len(router.of("type", "audio")) >= 15, timeout_s=5)
    stamps = [f["ts"] for f in router.of("type", "audio")]
    assert stamps == sorted(stamps)
    assert all(ts >= 20 * k for k, ts in enumerate(stamps))  # never before it was due
    # The frames owed after the block left together, stamped alike, past their due times.
    assert any(ts - 20 * k >= 40 for k, ts in enumerate(stamps))
