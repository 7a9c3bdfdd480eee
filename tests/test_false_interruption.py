"""False interruptions: caller sound without words during a reply does not stop it, or
(cleared at the first sound) resumes it where the caller last heard it; words still barge
in. The decision, a real node, and the whole cluster (Twilio and native)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any, Literal

import nats
import pytest
from cluster_helpers import eventually, load_checkpoint, node_metric, owner_of
from node_harness import NodeCall, node_call, running_node, simulated_providers
from redis.asyncio import Redis

from callmesh.audio.tones import noise, silence
from callmesh.metric_names import BARGE_INS, FALSE_INTERRUPTIONS, REPLIES_RESUMED
from callmesh_client.voice_client import VoiceCaller
from conversation_node.app import ConversationNode
from conversation_node.interruptions import Action, InterruptionGate
from conversation_node.providers.base import LLMDelta, LLMRequest
from events.replay import build_report, read_records
from localcluster.cluster import LocalCluster
from state_store.store import StateStore


def test_sound_waits_for_words_and_words_barge_in() -> None:
    g = InterruptionGate(300)
    assert g.on_sound() is Action.WAIT
    assert g.on_sound() is Action.NONE  # the same sound
    assert g.on_words("") is Action.NONE
    assert g.on_words("wait") is Action.BARGE_IN
    assert g.false_interruptions == 0


def test_sound_without_words_is_a_false_interruption_once() -> None:
    g = InterruptionGate(300)
    g.on_sound()
    assert g.on_timeout() is Action.FALSE
    assert g.on_silence() is Action.NONE  # the same sound ends: counted once
    g.on_sound()
    assert g.on_silence() is Action.FALSE
    assert g.false_interruptions == 2


def test_words_after_the_window_still_barge_in() -> None:
    g = InterruptionGate(300)
    g.on_sound()
    assert g.on_timeout() is Action.FALSE
    assert g.on_words("hold on") is Action.BARGE_IN


def test_no_window_barges_in_at_the_first_sound() -> None:
    g = InterruptionGate(0)
    assert g.on_sound() is Action.BARGE_IN
    assert g.on_timeout() is Action.NONE
    with pytest.raises(ValueError):
        InterruptionGate(-1)


async def test_noise_during_a_reply_does_not_stop_it(
    redis: Redis, redis_url: str, nats_url: str
) -> None:
    async with (
        running_node(redis_url, nats_url, simulated_providers(), false_interruption_ms=300) as (
            node,
            url,
        ),
        node_call(url, "noise-1") as call,
    ):
        metrics = node.services.metrics
        await call.start(caller="eve")
        await call.echo_marks(0)
        await call.speak("Hi, my name is Eve")
        await call.turn(1)
        # Turn 1 is playing (its marks not echoed yet): a door slams.
        await call.audio(silence(100) + noise(300) + silence(500))
        await eventually(lambda: metrics.get(FALSE_INTERRUPTIONS) == 1)
        assert not [f for f in call.frames if f["type"] == "clear"]
        assert metrics.get(BARGE_INS) == 0
        # Words do barge in.
        await call.speak("Sorry, one more thing")
        clear = await call.wait_for(lambda f: f["type"] == "clear")
        assert clear["turn"] == 1 and metrics.get(BARGE_INS) == 1
        await call.echo_marks(1)
        await call.turn(2)


def _one_node_cluster(**env: str) -> Iterator[LocalCluster]:
    env = {"CALLMESH_SIM_LATENCY_SCALE": "0.05", "CALLMESH_FALSE_INTERRUPTION_MS": "300", **env}
    with LocalCluster(nodes=1, force_embedded=True, env=env) as c:
        yield c


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    yield from _one_node_cluster()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("transport", ["twilio", "native"])
async def test_noise_through_the_router_leaves_the_reply_playing(
    cluster: LocalCluster, transport: Literal["twilio", "native"]
) -> None:
    call_id = f"CAnoise{transport}"
    async with VoiceCaller(cluster.router_url, call_id, "demo", "bob", transport=transport) as c:
        await c.wait_greeting()
        node = await owner_of(cluster, call_id)
        before = await asyncio.to_thread(node_metric, node.url, FALSE_INTERRUPTIONS)
        reply = asyncio.create_task(c.say("Hi, my name is Priya. What services do you offer?"))
        await c.noise(300, after_ms=200)
        first = await reply
        await eventually(lambda: node_metric(node.url, FALSE_INTERRUPTIONS) > before)
        second = await c.say("Tuesday please")
        await c.hangup()
    assert not c.clears and not first.cleared
    assert first.agent_audio_bytes > 0 and second.agent_audio_bytes > 0
    assert c.errors == []


# ---------------------------------------------------------------- cleared at the first sound

NOISE = silence(100) + noise(300) + silence(500)


def _after(call: NodeCall, start: int, kind: str, turn: int) -> list[dict[str, Any]]:
    return [f for f in call.frames[start:] if f["type"] == kind and f.get("turn") == turn]


async def _records(nats_url: str, call_id: str) -> list[dict[str, Any]]:
    nc = await nats.connect(nats_url)
    try:
        return await read_records(nc.jetstream(), "demo", call_id)
    finally:
        await nc.drain()


async def _verified(redis: Redis, nats_url: str, call_id: str) -> tuple[Any, list[Any]]:
    """The call's checkpoint and event log, which replay must explain exactly."""
    ckpt = await StateStore(redis).load("demo", call_id)
    records = await _records(nats_url, call_id)
    report = build_report("demo", call_id, records, ckpt)
    assert report.verified is True, report.divergences
    return ckpt, records


@asynccontextmanager
async def clearing_at_sound(
    redis_url: str, nats_url: str, call_id: str, window_ms: int = 300, **providers: Any
) -> AsyncIterator[tuple[ConversationNode, NodeCall]]:
    """A call to a node that clears replies at the caller's first sound, past its
    greeting (played to the end); its event log is published when the block ends."""
    async with (
        running_node(
            redis_url,
            nats_url,
            simulated_providers(**providers),
            false_interruption_ms=window_ms,
            barge_in_clear="at_sound",
        ) as (node, url),
        node_call(url, call_id) as call,
    ):
        await call.start(caller="eve")
        await call.echo_marks(0)
        yield node, call
        # Every record committed is in the event log before the node goes.
        session = node.sessions.get(("demo", call_id))
        await eventually(lambda: session is None or not session.outbox)


async def test_noise_clears_the_reply_and_it_resumes_from_the_first_unheard_sentence(
    redis: Redis, redis_url: str, nats_url: str
) -> None:
    async with clearing_at_sound(redis_url, nats_url, "resume-1") as (node, call):
        metrics = node.services.metrics
        await call.speak("Hi, my name is Eve")
        await call.turn(1)
        texts = [f["text"] for f in call.of_turn(1, "agent_text")]
        audio = [f["data"] for f in call.of_turn(1, "agent_audio")]
        first_n = [f["n"] for f in call.frames if f.get("turn") == 1 and "n" in f]
        assert len(texts) >= 2
        # The caller has played the first sentence; a door slams.
        await call.echo_marks(1, count=1)
        start = len(call.frames)
        await call.audio(NOISE)
        clear = await call.wait_for(lambda f: f["type"] == "clear", start=start)
        assert clear == {"type": "clear", "turn": 1, "reason": "barge_in"}
        await call.echo_marks(1)  # the client flushing its buffer: not heard
        await eventually(lambda: metrics.get(REPLIES_RESUMED) == 1)
        await call.wait_for(lambda f: f["type"] == "mark" and f.get("resumed"), start=start)
        # From the second sentence on, the same audio again, numbered anew.
        resumed = [f for f in call.frames[start:] if f.get("resumed")]
        assert [f["text"] for f in resumed if f["type"] == "agent_text"] == texts[1:]
        again = [f["data"] for f in resumed if f["type"] == "agent_audio"]
        assert again == audio[len(audio) - len(again) :] and 0 < len(again) < len(audio)
        assert min(f["n"] for f in resumed) > max(first_n)
        assert metrics.get(FALSE_INTERRUPTIONS) == 1 and metrics.get(BARGE_INS) == 0
        # The resumed reply's marks are what the caller plays now.
        await call.echo_marks(1)
        await call.speak("Thanks, that is all")
        await call.turn(2)
        # Audio only: the turn was answered and committed once.
        assert len(call.of_turn(1, "turn_metrics")) == 1
        assert not _after(call, start, "clear", 2)
    ckpt, records = await _verified(redis, nats_url, "resume-1")
    assert not [r for r in records if r["type"] == "barge_in"]
    turn1 = next(list(e) for e in ckpt.working if e[0] == 1)
    assert turn1[2] == " ".join(texts) and turn1[3] is False


class GatedLLM:
    """Says one sentence, then waits for ``go`` before the next one."""

    name = "gated-llm"

    def __init__(self) -> None:
        self.go = asyncio.Event()

    async def stream(self, request: LLMRequest) -> AsyncIterator[LLMDelta]:
        yield LLMDelta(text="Let me look into that for you right away. ")
        await self.go.wait()
        yield LLMDelta(text="Your appointment is on Tuesday at three.")


def _playback(node: ConversationNode, call_id: str) -> Any:
    return node.sessions[("demo", call_id)].vt.replies.playback


async def test_a_reply_still_being_spoken_is_held_while_paused_and_committed_once(
    redis: Redis, redis_url: str, nats_url: str
) -> None:
    llm = GatedLLM()
    # A window longer than the test takes: the sound's end, not the window, judges it.
    async with clearing_at_sound(redis_url, nats_url, "resume-2", 3000, llm=llm) as (node, call):
        await call.speak("When is my appointment?")
        await call.wait_for(lambda f: f["type"] == "mark" and f["turn"] == 1)
        start = len(call.frames)
        await call.audio(silence(100) + noise(300))  # a sound, still going on
        await call.wait_for(lambda f: f["type"] == "clear", start=start)
        llm.go.set()  # the model goes on while the reply is paused: held
        pb = _playback(node, "resume-2")
        await eventually(lambda: len(pb.sentences) == 2 and pb.sentences[1].mark is None)
        await eventually(lambda: pb.sentences[1].frames[-1]["type"] == "mark")
        assert not [f for f in call.frames[start:] if f["type"] != "clear"]
        await call.audio(silence(500))  # the sound ends without words
        metrics = await call.turn(1)
        resumed = [f for f in call.frames[start:] if f.get("resumed")]
        # Nothing of the reply was heard yet (no mark echoed): all of it, in order.
        assert [f["text"] for f in resumed if f["type"] == "agent_text"] == [
            "Let me look into that for you right away.",
            "Your appointment is on Tuesday at three.",
        ]
        assert metrics["interrupted"] is False and len(call.of_turn(1, "turn_metrics")) == 1
        assert node.services.metrics.get(REPLIES_RESUMED) == 1
    ckpt, records = await _verified(redis, nats_url, "resume-2")
    turn1 = next(list(e) for e in ckpt.working if e[0] == 1)
    assert turn1[2].endswith("Tuesday at three.") and turn1[3] is False
    assert len([r for r in records if r["type"] == "turn_metrics" and r["turn"] == 1]) == 1


async def test_words_while_paused_barge_in_without_a_second_clear(
    redis: Redis, redis_url: str, nats_url: str
) -> None:
    async with clearing_at_sound(redis_url, nats_url, "resume-3") as (node, call):
        metrics = node.services.metrics
        await call.speak("Hi, my name is Ben")
        await call.turn(1)
        texts = [f["text"] for f in call.of_turn(1, "agent_text")]
        await call.echo_marks(1, count=1)
        start = len(call.frames)
        await call.speak("Sorry, one more thing")
        await call.turn(2)
        assert len([f for f in call.frames[start:] if f["type"] == "clear"]) == 1
        assert not [f for f in call.frames[start:] if f.get("resumed")]
        assert metrics.get(BARGE_INS) == 1 and metrics.get(REPLIES_RESUMED) == 0
    ckpt, records = await _verified(redis, nats_url, "resume-3")
    turn1 = next(list(e) for e in ckpt.working if e[0] == 1)
    assert turn1[2] == texts[0] and turn1[3] is True
    assert [r["turn"] for r in records if r["type"] == "barge_in"] == [1]


@pytest.fixture(scope="module")
def resuming_cluster() -> Iterator[LocalCluster]:
    yield from _one_node_cluster(CALLMESH_BARGE_IN_CLEAR="at_sound")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("transport", ["twilio", "native"])
async def test_noise_through_the_router_resumes_the_reply_where_the_caller_was(
    resuming_cluster: LocalCluster, transport: Literal["twilio", "native"]
) -> None:
    cluster = resuming_cluster
    call_id = f"CAresume{transport}"
    async with VoiceCaller(cluster.router_url, call_id, "demo", "bob", transport=transport) as c:
        await c.wait_greeting()
        node = await owner_of(cluster, call_id)
        before = c.agent_audio_bytes
        # "Nice to meet you, Priya." (1.7 s) then a second sentence (2.5 s): the caller has
        # played the first when a door slams.
        reply = asyncio.create_task(c.say("Hi, my name is Priya"))
        await c.noise(300, after_ms=2200)
        await reply
        await eventually(lambda: node_metric(node.url, REPLIES_RESUMED) == 1)
        received, heard = c.clear_points[0]
        await eventually(lambda: c.agent_audio_bytes - received >= received - heard)
        await eventually(lambda: c.playback.drained(time.monotonic()))
        resumed = c.agent_audio_bytes - received
        second = await c.say("I'd like a cleaning")
        await c.hangup()
    assert len(c.clear_points) == 1 and before < heard < received
    # The unheard rest of the reply, once: not from its start, nothing lost.
    assert resumed == received - heard
    assert second.agent_audio_bytes > 0 and c.errors == []
    assert node_metric(node.url, BARGE_INS) == 0
    ckpt = await load_checkpoint(cluster, call_id)
    turn1 = next(list(e) for e in ckpt.working if e[0] == 1)
    assert turn1[2].startswith("Nice to meet you") and turn1[3] is False
