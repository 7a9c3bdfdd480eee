"""The router routes a node's ``agent_audio`` frames in their template spelling without
parsing them (protocol.read_agent_audio), and decides exactly what it decides when it
parses them: the same frames reach the caller, de-duplicated and cleared alike across a
relink (router.upstream, router.failover_buffer)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from callmesh.protocol import agent_audio_frame, encode, read_agent_audio
from callmesh.telemetry import Metrics
from router import twilio, upstream
from router.failover_buffer import CLEAR, DROP, HOLD, SEND, DecidedText, ReplyDedup, UnackedFrames
from router.twilio import TwilioLink
from router.upstream import NodeFrames, Outcome


def audio(turn: int, n: int, data: str, *, fast: bool) -> str:
    if fast:
        return agent_audio_frame(turn, n, "pcm_s16le", 16000, data)
    # The same frame in another spelling (keys reordered): the router parses it.
    frame = {"type": "agent_audio", "data": data, "turn": turn, "n": n}
    return encode({**frame, "encoding": "pcm_s16le", "sample_rate": 16000})


def text(turn: int, n: int, words: str) -> str:
    return encode({"type": "agent_text", "turn": turn, "n": n, "text": words})


def metrics_of(turn: int) -> str:
    return encode({"type": "turn_metrics", "turn": turn})


class Channel:
    """One link's frames, as the node sent them."""

    def __init__(self, frames: list[str]) -> None:
        self._frames = list(frames)

    async def receive(self) -> str | None:
        return self._frames.pop(0) if self._frames else None


async def pump_until_lost(frames: NodeFrames, said: list[str]) -> None:
    """Route one owner link's frames; the link then ends as a lost node's does."""
    outcome = await frames.pump(
        Channel(said),  # type: ignore[arg-type]
        node_id="n1",
        resume_secret=None,
        relink_reason="node_lost",
        client_gone=lambda: False,
    )
    assert outcome is Outcome.LOST


async def route(links: list[list[str]]) -> list[tuple[str, Any]]:
    """What the caller is sent of these owner links, one after another: each frame's
    type and its content (audio data, or its text)."""
    sent: list[tuple[str, Any]] = []

    async def send_client(
        kind: str, raw: str, frame: dict[str, Any] | None = None, data: str | None = None
    ) -> None:
        body = json.loads(raw)  # the test's own reading of what the caller gets
        if frame is not None:
            assert frame == body
        if data is not None:
            assert data == body["data"]
        sent.append((kind, body.get("data", body.get("text", body.get("turn")))))

    async def ended() -> None:
        return None

    replies = ReplyDedup()
    frames = NodeFrames(
        UnackedFrames(max_frames=8), replies, DecidedText(), Metrics("t"), send_client, ended
    )
    for link in links:
        await pump_until_lost(frames, link)
        replies.relink()
    return sent


def scripted(fast: bool) -> list[list[str]]:
    """A turn, its owner lost mid-reply; the new owner says it again the same, then a
    third owner says it differently; then a complete turn said again."""
    first = [
        text(1, 0, "Sure"),
        audio(1, 1, "AAAA", fast=fast),
        audio(1, 2, "BBBB", fast=fast),
    ]
    second = [*first, audio(1, 3, "CCCC", fast=fast)]
    third = [
        text(1, 0, "Sure"),
        audio(1, 1, "AAAA", fast=fast),
        audio(1, 2, "XXXX", fast=fast),  # said differently: clear, held, this
        audio(1, 3, "YYYY", fast=fast),
        metrics_of(1),
        audio(1, 4, "ZZZZ", fast=fast),  # of a complete turn: dropped
        audio(2, 0, "", fast=fast),
    ]
    return [first, second, third]


async def test_audio_in_the_template_spelling_is_routed_without_parsing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parsed: list[str] = []
    real_parse = upstream.parse

    def counting_parse(raw: str) -> dict[str, Any] | None:
        parsed.append(json.loads(raw)["type"])
        return real_parse(raw)

    monkeypatch.setattr(upstream, "parse", counting_parse)
    fast = await route(scripted(fast=True))
    assert "agent_audio" not in parsed
    assert parsed  # the text and metrics frames still are
    parsed.clear()
    slow = await route(scripted(fast=False))
    assert "agent_audio" in parsed
    assert fast == slow
    assert fast == [
        ("agent_text", "Sure"),
        ("agent_audio", "AAAA"),
        ("agent_audio", "BBBB"),
        ("agent_audio", "CCCC"),
        ("clear", 1),
        ("agent_text", "Sure"),
        ("agent_audio", "AAAA"),
        ("agent_audio", "XXXX"),
        ("agent_audio", "YYYY"),
        ("turn_metrics", 1),
        ("agent_audio", ""),
    ]


def test_offer_audio_judges_as_offer_does() -> None:
    cases = [(1, 0, "a"), (1, 1, "b"), (1, 0, "a"), (1, 1, "c"), (0, 0, "a"), (1, 2, "")]
    parsed, unparsed = ReplyDedup(), ReplyDedup()
    parsed.completed_turn = unparsed.completed_turn = 0
    verdicts = []
    for turn, n, data in cases:
        raw = agent_audio_frame(turn, n, "pcm_s16le", 16000, data)
        frame = json.loads(raw)
        a, b = parsed.offer("agent_audio", raw, frame), unparsed.offer_audio(raw, turn, n, data)
        assert a is b
        verdicts.append(a)
        if a is CLEAR:
            assert [h[:2] for h in parsed.take_held()] == [h[:2] for h in unparsed.take_held()]
    assert verdicts == [SEND, SEND, HOLD, CLEAR, DROP, SEND]
    assert repr(parsed) == repr(unparsed)


class Ws:
    """A Twilio connection that keeps what it is sent."""

    closed = False

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send_str(self, data: str) -> None:
        self.sent.append(data)


async def test_twilio_plays_audio_routed_unparsed() -> None:
    link = TwilioLink(Ws(), Metrics("t"), 65536)  # type: ignore[arg-type]
    link.stream_sid = "MZ1"
    link._media_prefix = '{"event":"media","streamSid":"MZ1","media":{"payload":"'
    payload = "f39/fw=="
    for raw in (
        agent_audio_frame(1, 0, "mulaw", 8000, payload),
        audio(1, 1, payload, fast=False),
    ):
        await link.send("agent_audio", raw, None)
    ws: Ws = link.ws  # type: ignore[assignment]
    assert [json.loads(s)["media"]["payload"] for s in ws.sent] == [payload, payload]


async def test_twilio_plays_audio_routed_unparsed_without_reading_it_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The router reads a template-spelled ``agent_audio`` frame once: the Twilio link
    plays the data the router read."""
    reads: list[str] = []

    def counting_read(raw: str) -> tuple[int, int, str] | None:
        reads.append(raw)
        return read_agent_audio(raw)

    monkeypatch.setattr(upstream, "read_agent_audio", counting_read)
    monkeypatch.setattr(twilio, "read_agent_audio", counting_read)
    link = TwilioLink(Ws(), Metrics("t"), 65536)  # type: ignore[arg-type]
    link._media_prefix = '{"event":"media","streamSid":"MZ1","media":{"payload":"'

    async def ended() -> None:
        return None

    frames = NodeFrames(
        UnackedFrames(max_frames=8), ReplyDedup(), DecidedText(), Metrics("t"), link.send, ended
    )
    said = [audio(1, n, data, fast=True) for n, data in enumerate(("AAAA", "BBBB", "CCCC"))]
    await pump_until_lost(frames, said)
    assert reads == said
    ws: Ws = link.ws  # type: ignore[assignment]
    assert [json.loads(s)["media"]["payload"] for s in ws.sent] == ["AAAA", "BBBB", "CCCC"]
