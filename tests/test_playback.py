"""What the caller heard of a reply, and where it goes on after a pause: the playback (no
I/O) and the replies' outlet around it (ordering, and a turn waiting for a pause's verdict)."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

from callmesh.protocol import agent_audio_frame, read_agent_audio
from conversation_node.playback import UNMARKED_GRACE_S, Playback, PlayState
from conversation_node.replies import Replies

BYTES_PER_MS = 8.0  # mu-law 8 kHz


def _audio(tag: str, ms: int = 100) -> dict[str, Any]:
    data = base64.b64encode(tag.encode().ljust(int(ms * BYTES_PER_MS), b"."))
    return {"type": "agent_audio", "encoding": "mulaw", "sample_rate": 8000, "data": data.decode()}


def _sentence(text: str, chunks: int = 2) -> list[dict[str, Any]]:
    return [
        {"type": "agent_text", "text": text},
        *(_audio(f"{text}/{i}") for i in range(chunks)),
        {"type": "mark"},
    ]


def _play(pb: Playback, frames: list[dict[str, Any]], now: float = 0.0) -> list[dict[str, Any]]:
    out = []
    for f in frames:
        sent = pb.outgoing({**f, "turn": pb.turn}, BYTES_PER_MS, now)
        if sent is not None:
            out.append(dict(sent))
    return out


def test_frames_are_numbered_in_order_and_marks_named_by_turn_and_number() -> None:
    pb = Playback(3)
    sent = _play(pb, _sentence("One.") + _sentence("Two."))
    assert [f["n"] for f in sent] == list(range(8))
    assert [f["name"] for f in sent if f["type"] == "mark"] == ["3.3", "3.7"]
    assert pb.first_audio_at == 0.0 and not pb.cleared


def test_a_mark_echo_means_its_sentence_and_those_before_it_were_heard() -> None:
    pb = Playback(1, retain=True)
    _play(pb, _sentence("One.") + _sentence("Two.") + _sentence("Three."))
    assert pb.on_mark_echoed("1.7")  # the second sentence's mark
    assert pb.heard(True, 0.0) == "One. Two."
    assert not pb.on_mark_echoed("9.9")
    # Heard sentences are never sent again: their audio is let go.
    assert [len(s.frames) for s in pb.sentences] == [0, 0, 4]


def test_resume_sends_from_the_first_unheard_sentence_renumbered_then_goes_on_live() -> None:
    pb = Playback(1, retain=True)
    first = _play(pb, _sentence("One.") + _sentence("Two."))
    assert pb.on_mark_echoed("1.3")
    assert pb.pause(True, 1.0) and pb.state is PlayState.PAUSED
    # The client flushes its pending marks on the clear: not heard.
    assert not pb.on_mark_echoed("1.7")
    # The model goes on while paused: held, not sent.
    assert _play(pb, _sentence("Three.")) == []
    again = pb.resume(2.0)
    assert [f["type"] for f in again] == ["agent_text", "agent_audio", "agent_audio", "mark"] * 2
    assert [f.get("text") for f in again if f["type"] == "agent_text"] == ["Two.", "Three."]
    assert [f["data"] for f in again if f["type"] == "agent_audio"] == [
        f["data"] for f in first[4:] if f["type"] == "agent_audio"
    ] + [_audio(f"Three./{i}")["data"] for i in range(2)]
    assert [f["n"] for f in again] == list(range(8, 16)) and all(f["resumed"] for f in again)
    assert [f["name"] for f in again if f["type"] == "mark"] == ["1.11", "1.15"]
    # Live again: the rest of the reply follows the resumed frames.
    assert [f["n"] for f in _play(pb, _sentence("Four."))] == [16, 17, 18, 19]
    # The old mark of "Two." is gone; its new one counts.
    assert not pb.on_mark_echoed("1.7") and pb.on_mark_echoed("1.11")
    pb.finished_sending = True
    assert pb.heard(True, 3.0) == "One. Two." and pb.playing(True, 3.0)
    assert pb.resumes == 1


def test_cut_freezes_what_was_heard_and_drops_what_follows() -> None:
    pb = Playback(2, retain=True)
    _play(pb, _sentence("One.") + _sentence("Two."))
    pb.on_mark_echoed("2.3")
    pb.cut(True, 1.0)
    assert pb.state is PlayState.CUT and not pb.playing(True, 1.0)
    assert _play(pb, _sentence("Three.")) == []
    assert not pb.on_mark_echoed("2.7")
    assert pb.heard(True, 5.0) == "One."
    assert pb.resume(5.0) == [] and all(not s.frames for s in pb.sentences)


def test_without_retain_nothing_is_kept_and_a_resume_sends_nothing() -> None:
    pb = Playback(1)
    _play(pb, _sentence("One."))
    assert pb.pause(True, 0.5)
    assert pb.resume(0.6) == [] and pb.state is PlayState.PLAYING
    assert all(not s.frames for s in pb.sentences)


def test_a_client_without_marks_is_heard_by_the_clock_and_resumed_from_there() -> None:
    pb = Playback(1, retain=True)
    _play(pb, _sentence("One.") + _sentence("Two."), now=10.0)  # 200 ms of audio each
    pb.finished_sending = True
    assert pb.heard(False, 10.1) == ""
    assert pb.pause(False, 10.25)  # "One." has played, "Two." has not
    assert pb.heard(False, 99.0) == "One."  # frozen while paused
    again = pb.resume(11.0)
    assert [f.get("text") for f in again if f["type"] == "agent_text"] == ["Two."]
    # The clock restarts with the resumed sentence.
    assert pb.playing(False, 11.0 + 0.2 + UNMARKED_GRACE_S - 0.01)
    assert not pb.playing(False, 11.0 + 0.2 + UNMARKED_GRACE_S + 0.01)
    assert pb.heard(False, 11.25) == "One. Two."


def test_only_a_playing_reply_pauses() -> None:
    pb = Playback(1)
    pb.cut(True, 0.0)
    assert not pb.pause(True, 0.0)


class _Wire:
    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.raw: list[str] = []

    async def send(self, raw: str) -> None:
        await asyncio.sleep(0)  # a send yields, as the link's does
        self.raw.append(raw)
        self.frames.append(json.loads(raw))


async def _replying(*sentences: str) -> tuple[_Wire, Replies, Playback, asyncio.Event]:
    """Replies (kept for a resume) that have sent turn 1's ``sentences``."""
    wire = _Wire()
    replies = Replies(wire.send, retain=True)
    pb, interrupt = replies.start_reply(1)
    for text in sentences:
        for f in _sentence(text):
            await replies.emit(f, BYTES_PER_MS)
    return wire, replies, pb, interrupt


async def test_a_turn_ending_while_paused_waits_for_the_verdict() -> None:
    wire, replies, pb, _ = await _replying("One.", "Two.")
    replies.on_mark("1.3")
    assert replies.marks_seen and replies.heard_now() is pb
    assert await replies.pause() is pb
    assert wire.frames[-1] == {"type": "clear", "turn": 1, "reason": "barge_in"}
    heard = asyncio.create_task(replies.heard(pb, "One. Two.", False))
    await asyncio.sleep(0.01)
    assert not heard.done()  # the turn does not commit before the sound is judged
    assert await replies.resume() == 4
    assert await heard == ("One. Two.", False)
    assert await replies.resume() is None  # nothing is paused any more


async def test_a_barge_in_while_paused_sends_no_second_clear_and_keeps_what_was_heard() -> None:
    wire, replies, pb, interrupt = await _replying("One.", "Two.")
    replies.on_mark("1.3")
    await replies.pause()
    heard = asyncio.create_task(replies.heard(pb, "One. Two.", False))
    assert await replies.cut() is pb
    assert [f["type"] for f in wire.frames].count("clear") == 1
    assert await heard == ("One.", True)
    assert replies.stop() and interrupt.is_set()


async def test_hanging_up_while_paused_releases_the_turn() -> None:
    _, replies, pb, _ = await _replying("One.")
    await replies.pause()
    heard = asyncio.create_task(replies.heard(pb, "One.", False))
    replies.stop()
    assert await asyncio.wait_for(heard, 1) == ("", True)


async def test_frames_emitted_during_a_resume_follow_the_resumed_ones() -> None:
    wire, replies, _, _ = await _replying("One.")
    await replies.pause()
    resume = asyncio.create_task(replies.resume())
    await asyncio.sleep(0)  # the resume holds the outlet, mid-way through its frames
    await replies.emit({"type": "agent_text", "text": "Two."}, BYTES_PER_MS)
    await resume
    numbers = [f["n"] for f in wire.frames if f["type"] != "clear"]
    assert numbers == sorted(numbers) == list(range(9))
    assert wire.frames[-1]["text"] == "Two." and "resumed" not in wire.frames[-1]


async def test_audio_goes_out_in_the_template_and_a_resumed_chunk_as_json() -> None:
    wire, replies, _, _ = await _replying("One.")
    sent = zip(wire.raw, wire.frames, strict=True)
    audio = [(raw, f) for raw, f in sent if f["type"] == "agent_audio"]
    # What the router reads without parsing, byte for byte what the template writes.
    assert [read_agent_audio(raw) for raw, _ in audio] == [(1, f["n"], f["data"]) for _, f in audio]
    assert [raw for raw, _ in audio] == [
        agent_audio_frame(1, f["n"], "mulaw", 8000, f["data"]) for _, f in audio
    ]
    await replies.pause()
    assert await replies.resume() == 4
    resumed = [raw for raw in wire.raw[-4:] if '"agent_audio"' in raw]
    # A resumed chunk carries its flag: another spelling, parsed by the router.
    assert len(resumed) == 2 and all(read_agent_audio(raw) is None for raw in resumed)
    assert [json.loads(raw)["data"] for raw in resumed] == [f["data"] for _, f in audio]
    assert all(json.loads(raw)["resumed"] is True for raw in resumed)
