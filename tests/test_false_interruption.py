"""False interruptions: caller sound without words during a reply does not stop it; words
still barge in. The decision, a real node, and the whole cluster (Twilio and native)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Literal

import pytest
from cluster_helpers import eventually, node_metric, owner_of
from node_harness import node_call, running_node, simulated_providers
from redis.asyncio import Redis

from callmesh.audio.tones import noise, silence
from callmesh.metric_names import BARGE_INS, FALSE_INTERRUPTIONS
from callmesh_client.voice_client import VoiceCaller
from conversation_node.interruptions import Action, InterruptionGate
from localcluster.cluster import LocalCluster


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


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    env = {"CALLMESH_SIM_LATENCY_SCALE": "0.05", "CALLMESH_FALSE_INTERRUPTION_MS": "300"}
    with LocalCluster(nodes=1, force_embedded=True, env=env) as c:
        yield c


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
