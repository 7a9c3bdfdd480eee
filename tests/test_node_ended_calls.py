"""What a node keeps of a call once it ended: nothing that waits for the cyclic collector.

A node collects rarely (callmesh.gc_tuning: generation-0 threshold 7,000 after a freeze),
so a call whose objects form reference cycles stays in memory, and fragments it, until a
collection comes round: in the soak benchmark that was most of a node's growth per ended
call. The real node on real Redis and NATS, text and voice calls hung up by their callers
and calls whose link went away: afterwards no session, no part of one, is freed only by the
collector."""

from __future__ import annotations

import weakref
from collections import Counter

import pytest
from node_harness import node_call, running_node, simulated_providers

from callmesh.weak_callbacks import weak_method
from tests.cluster_helpers import cyclic_garbage, eventually

pytestmark = pytest.mark.timeout(60)

CALLS = 4


def ours(garbage: list[object]) -> Counter[str]:
    names = (f"{type(o).__module__}.{type(o).__qualname__}" for o in garbage)
    return Counter(n for n in names if n.startswith(("conversation_node.", "memory.", "events.")))


async def text_call(url: str, call_id: str, *, hangup: bool) -> None:
    async with node_call(url, call_id) as call:
        await call.start(audio=False)
        await call.send(type="user_text", text="Hi, my name is Maria")
        await call.turn(1)
        await call.send(type="user_text", text="I'd like a cleaning on Friday")
        await call.turn(2)
        if hangup:
            await call.send(type="hangup")
            await call.wait_for(lambda f: f["type"] == "call_ended")


async def voice_call(url: str, call_id: str) -> None:
    async with node_call(url, call_id) as call:
        await call.start()
        await call.speak("hello")
        await call.turn(1)
        await call.echo_marks(1)
        await call.send(type="hangup")
        await call.wait_for(lambda f: f["type"] == "call_ended")


async def test_an_ended_call_leaves_no_cyclic_garbage_in_the_node(
    redis_url: str, nats_url: str
) -> None:
    async with running_node(redis_url, nats_url, simulated_providers(), reconnect_grace_ms=100) as (
        node,
        url,
    ):
        for i in range(2):  # pools and caches fill once
            await text_call(url, f"warm-{i}", hangup=True)
        with cyclic_garbage() as garbage:
            for i in range(CALLS):
                await text_call(url, f"ended-{i}", hangup=True)
                await text_call(url, f"left-{i}", hangup=False)
                await voice_call(url, f"voice-{i}")
            await eventually(lambda: not node.sessions, timeout_s=10)
    left = ours(garbage)
    assert not left, left


class _Owner:
    def __init__(self) -> None:
        self.seen: list[str] = []

    def note(self, text: str) -> int:
        self.seen.append(text)
        return len(self.seen)

    async def send(self, text: str) -> str:
        return text.upper()


async def test_a_weak_method_calls_its_owner_and_does_not_keep_it() -> None:
    owner = _Owner()
    note, send = weak_method(owner.note), weak_method(owner.send)
    assert note("a") == 1 and owner.seen == ["a"]
    assert await send("b") == "B"
    ref = weakref.ref(owner)
    del owner  # no collection: reference counting alone must free it
    assert ref() is None
    with pytest.raises(ReferenceError, match=r"_Owner\.note"):
        note("c")
