"""What a node keeps of a call once it ended: nothing that waits for the cyclic collector.

A node collects rarely (callmesh.gc_tuning: generation-0 threshold 7,000 after a freeze),
so a call whose objects form reference cycles stays in memory, and fragments it, until a
collection comes round: in the soak benchmark that was most of a node's growth per ended
call. The real node on real Redis and NATS, text and voice calls hung up by their callers
and calls whose link went away: afterwards no session, no part of one, is freed only by the
collector. Nor does a call leave anything in what the node keeps for all its calls (its
caches) because its caller is new."""

from __future__ import annotations

import weakref
from collections import Counter

import pytest
from node_harness import node_call, running_node, simulated_providers

from callmesh.weak_callbacks import weak_method
from conversation_node.app import ConversationNode
from memory.prompt import TiktokenCounter
from tests.cluster_helpers import cyclic_garbage, eventually

pytestmark = pytest.mark.timeout(60)

CALLS = 4


def ours(garbage: list[object]) -> Counter[str]:
    names = (f"{type(o).__module__}.{type(o).__qualname__}" for o in garbage)
    return Counter(n for n in names if n.startswith(("conversation_node.", "memory.", "events.")))


async def text_call(url: str, call_id: str, *, hangup: bool, caller: str = "anonymous") -> None:
    async with node_call(url, call_id) as call:
        await call.start(audio=False, caller=caller)
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


def node_wide_entries(node: ConversationNode) -> dict[str, int]:
    """What a node keeps for all its calls, by holder: the retrieval caches of its sources
    and the prompt's line cache."""
    assert node._services is not None
    memory = node._services.memory
    held = {f"retrieval:{r.source.name}": len(r.cache) for r in memory.retrieval._sources}
    counter = memory.prompts.counter
    assert isinstance(counter, TiktokenCounter)  # the one that keeps counts
    held["prompt lines"] = counter._line_counts.cache_info().currsize
    return held


async def test_calls_of_new_callers_add_nothing_to_what_a_node_keeps(
    redis_url: str, nats_url: str
) -> None:
    """A new caller every call, saying what earlier callers said: the node's caches hold
    what calls share, and nothing per caller (a caller's history is the call's own, read
    at its first retrieval and released at hang-up). A node-wide entry per caller grew
    the node about 100 bytes per call in the soak with a new caller every call, up to
    the cache's bound (4,096 entries)."""
    async with running_node(redis_url, nats_url, simulated_providers()) as (node, url):
        for i in range(2):  # what calls share is cached once
            await text_call(url, f"warm-caller-{i}", hangup=True, caller=f"warm-caller-{i}")
        before = node_wide_entries(node)
        for i in range(CALLS):
            await text_call(url, f"new-caller-{i}", hangup=True, caller=f"new-caller-{i}")
        await eventually(lambda: not node.sessions, timeout_s=10)
        assert node_wide_entries(node) == before


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
