"""Spoken calls on a real node: audio in → STT → turn, marks, barge-in, fallbacks.

The node runs in the test process with chosen providers (``tests/node_harness.py``) on
the real Redis and NATS of the test session; the test plays the router's part.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Literal

import nats
import pytest
from node_harness import node_call, running_node, simulated_providers
from redis.asyncio import Redis

from callmesh.audio.tones import silence, speech_from_text
from callmesh.protocol import Inbound
from conversation_node import voice
from conversation_node.providers.base import LLMDelta, LLMRequest
from conversation_node.voice_turns import VoiceTurns
from events.replay import build_report, read_records
from state_store.store import StateStore


async def _checkpoint(redis: Redis, call_id: str) -> Any:
    ckpt = await StateStore(redis).load("demo", call_id)
    assert ckpt is not None
    return ckpt


@pytest.mark.parametrize("via", ["link", "socket"])
async def test_spoken_turn_is_answered_with_marks(
    redis: Redis, redis_url: str, nats_url: str, via: Literal["link", "socket"]
) -> None:
    async with (
        running_node(redis_url, nats_url, simulated_providers()) as (_, url),
        node_call(url, "voice-1", via=via) as call,
    ):
        await call.start(caller="ana")
        assert call.of_turn(0, "mark"), "a voice call's greeting ends sentences with marks"
        await call.echo_marks(0)
        await call.speak("Hi, my name is Ana")
        metrics = await call.turn(1)
        assert "Ana" in call.reply_text(1)
        assert metrics["stt_ms"] >= 0 and metrics["latency_ms"] > 0
        assert metrics["interrupted"] is False
        audio = call.of_turn(1, "agent_audio")
        assert audio and all(a["encoding"] == "mulaw" and a["sample_rate"] == 8000 for a in audio)
        ckpt = await _checkpoint(redis, "voice-1")
        assert ckpt.turn == 1 and ckpt.facts.get("name")


async def test_audio_on_a_link_is_taken_where_the_link_reads_it(
    redis: Redis, redis_url: str, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Audio reaches the recognizer where the link reads it, without a wake-up of the
    call's task per frame (``Channel.fast_path``): only frames that must wait go through
    the session's reader (the first opens the recognizer; quiet audio is acknowledged
    from there). The call hears and answers the same."""
    waited: list[int] = []
    on_audio = VoiceTurns.on_audio

    async def counted(self: VoiceTurns, msg: Inbound) -> None:
        waited.append(msg.seq)
        await on_audio(self, msg)

    monkeypatch.setattr(VoiceTurns, "on_audio", counted)
    audio = silence(100) + speech_from_text("Hi, my name is Eve") + silence(500)
    frames = len(audio) // 160
    async with (
        running_node(redis_url, nats_url, simulated_providers()) as (_, url),
        node_call(url, "voice-fast") as call,
    ):
        await call.start(caller="eve")
        await call.audio(audio, pace_s=0.005)
        await call.turn(1)
        assert "Eve" in call.reply_text(1)
    assert waited, "the first frame opens the recognizer, through the reader"
    assert len(waited) < frames // 4, f"{len(waited)} of {frames} frames woke the reader"


async def test_a_bug_on_the_fast_path_costs_one_frame_not_the_link(
    redis: Redis, redis_url: str, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    feed_now = voice.VoiceLane.feed_now
    failures = [RuntimeError("a bug")]

    def failing_once(self: voice.VoiceLane, msg: Inbound) -> bool:
        if self.fed_seq and failures:
            raise failures.pop()
        return feed_now(self, msg)

    monkeypatch.setattr(voice.VoiceLane, "feed_now", failing_once)
    async with (
        running_node(redis_url, nats_url, simulated_providers()) as (_, url),
        node_call(url, "voice-bug") as call,
    ):
        await call.start(caller="gil")
        await call.speak("Hi, my name is Gil", pace_s=0.005)
        error = await call.wait_for(lambda f: f["type"] == "error")
        assert error["code"] == "internal" and not failures
        await call.turn(1)
        assert "Gil" in call.reply_text(1)


@pytest.mark.parametrize("via", ["link", "socket"])
async def test_quiet_audio_is_acknowledged_on_its_own(
    redis: Redis,
    redis_url: str,
    nats_url: str,
    monkeypatch: pytest.MonkeyPatch,
    via: Literal["link", "socket"],
) -> None:
    """Silence nobody spoke in is acknowledged once it is old enough, so the router can
    forget it; on a link, those frames are the ones the fast path leaves to the reader."""
    monkeypatch.setattr(voice, "QUIET_ACK_AFTER_S", 0.1)
    monkeypatch.setattr(voice, "QUIET_ACK_EVERY_S", 0.05)
    async with (
        running_node(redis_url, nats_url, simulated_providers()) as (_, url),
        node_call(url, f"voice-quiet-{via}", via=via) as call,
    ):
        await call.start(caller="fay")
        first = call.seq + 1
        await call.audio(silence(600), pace_s=0.01)
        last = call.seq
        await call.wait_for(lambda f: f["type"] == "ack" and f["seq"] >= last - 20)
        acks = [f["seq"] for f in call.frames if f["type"] == "ack" and f["seq"] >= first]
        assert len(acks) >= 2 and acks == sorted(acks) and acks[-1] <= last


def _working(ckpt: Any) -> list[list[Any]]:
    return [list(e) for e in ckpt.working]


async def test_barge_in_after_commit_keeps_what_was_heard(
    redis: Redis, redis_url: str, nats_url: str
) -> None:
    async with (
        running_node(redis_url, nats_url, simulated_providers()) as (_, url),
        node_call(url, "voice-2") as call,
    ):
        await call.start(caller="ben")
        await call.echo_marks(0)
        await call.speak("Hi, my name is Ben")
        await call.turn(1)
        sentences = [f["text"] for f in call.of_turn(1, "agent_text")]
        marks = call.of_turn(1, "mark")
        assert len(sentences) >= 2 and len(marks) == len(sentences)
        # The caller has played the first sentence only, and starts talking.
        await call.echo_marks(1, count=1)
        await call.speak("Sorry, one more thing")
        clear = await call.wait_for(lambda f: f["type"] == "clear")
        assert clear == {"type": "clear", "turn": 1, "reason": "barge_in"}
        # Marks the client flushes on a clear (as Twilio does) do not count as heard.
        await call.echo_marks(1)
        await call.turn(2)
        await call.send(type="hangup")
        await call.wait_for(lambda f: f["type"] == "call_ended")
    ckpt = await _checkpoint(redis, "voice-2")
    turn1 = next(e for e in _working(ckpt) if e[0] == 1)
    assert turn1[2] == sentences[0] and turn1[3] is True
    # Replay rebuilds the amended memory from the log: no divergence.
    nc = await nats.connect(nats_url)
    try:
        records = await read_records(nc.jetstream(), "demo", "voice-2")
    finally:
        await nc.drain()
    assert any(r["type"] == "barge_in" and r["turn"] == 1 for r in records)
    report = build_report("demo", "voice-2", records, ckpt)
    assert report.verified is True, report.divergences


class PausingLLM:
    """Says one sentence, then thinks for a long time before the next one."""

    name = "pausing-llm"

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()

    async def stream(self, request: LLMRequest) -> AsyncIterator[LLMDelta]:
        yield LLMDelta(text="Let me look into that for you right away. ")
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        yield LLMDelta(text="Here is a second sentence nobody should hear.")


async def test_barge_in_mid_reply_stops_the_model_and_the_voice(
    redis: Redis, redis_url: str, nats_url: str
) -> None:
    llm = PausingLLM()
    async with (
        running_node(redis_url, nats_url, simulated_providers(llm=llm)) as (_, url),
        node_call(url, "voice-3") as call,
    ):
        await call.start(caller="cy")
        await call.echo_marks(0)
        await call.speak("What are your opening hours?")
        await call.wait_for(lambda f: f["type"] == "mark" and f["turn"] == 1)
        await call.echo_marks(1)  # the first sentence has been played
        await call.speak("Actually never mind")
        clear = await call.wait_for(lambda f: f["type"] == "clear")
        assert clear["turn"] == 1 and clear["reason"] == "barge_in"
        metrics = await call.turn(1)
        assert metrics["interrupted"] is True
        await asyncio.wait_for(llm.cancelled.wait(), 5)
        assert "second sentence" not in call.reply_text(1)
        ckpt = await _checkpoint(redis, "voice-3")
        turn1 = next(e for e in _working(ckpt) if e[0] == 1)
        assert turn1[2] == "Let me look into that for you right away." and turn1[3] is True


async def test_bad_audio_gets_a_clear_error_and_the_call_goes_on(
    redis: Redis, redis_url: str, nats_url: str
) -> None:
    async with (
        running_node(redis_url, nats_url, simulated_providers()) as (_, url),
        node_call(url, "voice-bad") as call,
    ):
        await call.start(caller="dee")
        seq = await call.send(type="audio", data="not base64 at all!")
        error = await call.wait_for(lambda f: f["type"] == "error")
        assert error["code"] == "bad_message" and error["seq"] == seq
        await call.send(type="mark", name="no-such-mark")  # ignored: not one of ours
        await call.speak("Hi, my name is Dee")
        await call.turn(1)
        assert "Dee" in call.reply_text(1)

    async with (
        running_node(redis_url, nats_url, simulated_providers()) as (_, url),
        node_call(url, "voice-textmode") as call,
    ):
        await call.start(audio=False)  # no audio format declared
        seq = await call.send(type="audio", data="AAAA")
        error = await call.wait_for(lambda f: f["type"] == "error")
        assert error["code"] == "bad_message" and error["seq"] == seq
