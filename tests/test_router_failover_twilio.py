"""Router failover for Twilio calls, with real processes: Twilio (simulated as it documents
``<Connect action>``: callmesh_client.twilio_phone) dials the voice webhook, streams the
call, and when a router is SIGKILLed or drained the stream's end makes it request the
action, whose TwiML opens a new stream through another router; the call goes on with its
context, every utterance answered once. A call that ended gets ``<Hangup/>``."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Iterator

import aiohttp
import pytest

from callmesh_client.twilio_phone import TwilioPhone, parse_twiml
from callmesh_client.voice_client import VoiceCaller
from localcluster.cluster import LocalCluster
from tests.cluster_helpers import load_checkpoint, routers_cluster

pytestmark = pytest.mark.timeout(180)


# The TwiML names the public URL (the "load balancer": nothing listens there, so the
# simulated Twilio sends each request to a router of its list); development mode takes
# unsigned webhooks (no TWILIO_AUTH_TOKEN here).
TWILIO_ENV = {"CALLMESH_PUBLIC_URL": "http://127.0.0.1:9", "CALLMESH_DEV_MODE": "1"}


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    with routers_cluster(routers=2, nodes=2, latency_scale=0.05, env=TWILIO_ENV) as c:
        yield c


async def _action(cluster: LocalCluster, call_sid: str, router: int = 1) -> str:
    url = f"{cluster.router_urls[router]}/v1/twilio/action?tenant=demo"
    form = {"CallSid": call_sid, "From": "+14155550100", "CallStatus": "in-progress"}
    async with aiohttp.ClientSession() as http, http.post(url, data=form) as resp:
        assert resp.status == 200
        return await resp.text()


@pytest.mark.parametrize("how", ["kill", "drain"])
async def test_twilio_call_survives_its_router(cluster: LocalCluster, how: str) -> None:
    victim = cluster.router
    assert victim is not None
    call_sid = f"CArouter{how}"
    phone = TwilioPhone(cluster.router_urls, call_sid, "demo")
    async with VoiceCaller(victim.url, call_sid, "demo", phone=phone) as c:
        await c.wait_greeting()
        first = await c.say("Hi, my name is Priya")
        victim.signal(signal.SIGKILL if how == "kill" else signal.SIGTERM)
        second = await c.say("I need a cleaning")
        third = await c.say("Tuesday please")
        await c.hangup()
    for reply in (first, second, third):
        assert reply.response_ms is not None and reply.agent_audio_bytes > 0
    assert c.reopens == 1 and phone.streams == 2
    assert c.errors == []
    ckpt = await load_checkpoint(cluster, call_sid)
    # Three utterances, three turns: none lost, none answered twice; the name survived.
    assert (ckpt.turn, ckpt.status) == (3, "ended")
    assert ckpt.facts["name"][0] == "Priya"
    if how == "drain":
        assert victim.popen is not None and victim.popen.wait(30) == 0
    # The call is over: its action (were Twilio to ask) hangs up.
    assert parse_twiml(await _action(cluster, call_sid)) is None


async def test_action_of_a_live_call_opens_a_new_stream(cluster: LocalCluster) -> None:
    phone = TwilioPhone(cluster.router_urls, "CAlive", "demo")
    async with VoiceCaller(cluster.router_url, "CAlive", "demo", phone=phone) as c:
        await c.wait_greeting()
        connect_ = parse_twiml(await _action(cluster, "CAlive"))
        assert connect_ is not None
        assert connect_.stream_url.endswith("/v1/twilio/media")
        assert connect_.action.endswith("/v1/twilio/action?tenant=demo")
        # The new stream's token is a resume bound to the call (its claims are checked
        # by tests/test_router_failover_units.py).
        assert connect_.parameters["token"]
        assert int(connect_.parameters["seq_base"]) > 0
        await c.hangup()


async def _until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():  # noqa: ASYNC110 (bounded poll of the caller's state)
            await asyncio.sleep(0.005)


@pytest.mark.parametrize("cut", ["after_speech", "mid_speech"])
async def test_an_utterance_in_flight_when_the_router_dies_is_answered_once(
    cluster: LocalCluster, cut: str
) -> None:
    """The caller (a person: it cannot know the stream was replaced, and says an utterance
    again when no answer comes) is talking when its router is SIGKILLed. An utterance whose
    audio reached the node whole is answered by the node, and the reply the caller missed
    is said on the new stream: no repeat needed. One cut off mid-speech is dropped by the
    node; the caller, hearing nothing, says it again, and it is answered once."""
    victim = cluster.router
    assert victim is not None
    call_sid = f"CAinflight{cut.replace('_', '')}"
    phone = TwilioPhone(cluster.router_urls, call_sid, "demo")
    async with VoiceCaller(victim.url, call_sid, "demo", phone=phone, repeat_after_s=2.0) as c:
        await c.wait_greeting()
        await c.say("Hi, my name is Priya")
        say = asyncio.create_task(c.say("I need a cleaning"))
        await _until(lambda: c.speaking)
        if cut == "after_speech":
            await _until(lambda: not c.speaking)
            await asyncio.sleep(0.06)  # a few frames of silence: the speech is over
        else:
            await asyncio.sleep(0.3)  # a third of the way into the utterance
        victim.signal(signal.SIGKILL)
        second = await say
        third = await c.say("Tuesday please")
        await c.hangup()
    assert second.response_ms is not None and second.agent_audio_bytes > 0
    assert third.response_ms is not None
    assert second.repeats == (0 if cut == "after_speech" else 1)
    assert c.reopens == 1 and c.errors == []
    ckpt = await load_checkpoint(cluster, call_sid)
    # Three utterances, three turns: the one in flight neither lost nor answered twice.
    assert (ckpt.turn, ckpt.status) == (3, "ended")
    assert ckpt.facts["name"][0] == "Priya"
    assert "cleaning" in str(ckpt.facts)
