"""Traces: a call's span, its turns and their stages on a real node (through the node
harness), a failover that links the new owner's span to the call's trace, the router's
placement and relinks (with the fake node of tests/test_twilio_router.py), and nothing at
all while tracing is off."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from node_harness import node_call, running_node, simulated_providers
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from callmesh import tracing
from callmesh.telemetry import TurnMetrics
from callmesh_client.voice_wire import TwilioWire
from tests.cluster_helpers import eventually
from tests.exposition import assert_dashboards_use_only, parse_exposition
from tests.test_twilio_router import (  # the fake node and the router, with their fixtures
    FakeNode,
    RouterFactory,
    node,
    start_router,
    twilio_stream,
)

__all__ = ["node", "start_router"]

STAGES = ("stt", "retrieval", "llm", "tts", "callmesh")


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    try:
        yield exporter
    finally:
        tracing.install(None)
        provider.shutdown()


# A call whose client left without hanging up ends at once (its span too), instead of
# waiting out the reconnect grace.
NO_GRACE = {"reconnect_grace_ms": 0}


def _named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


async def _ended_calls(exporter: InMemorySpanExporter, n: int) -> list[ReadableSpan]:
    """The call spans, once ``n`` have ended (a call's span ends when its session closes)."""
    async with asyncio.timeout(10):
        while len(calls := _named(exporter, tracing.CALL)) < n:  # noqa: ASYNC110 (bounded poll)
            await asyncio.sleep(0.02)
    return calls


def _children(exporter: InMemorySpanExporter, parent: ReadableSpan) -> list[ReadableSpan]:
    pid = parent.context.span_id  # type: ignore[union-attr]
    return [s for s in exporter.get_finished_spans() if s.parent and s.parent.span_id == pid]


def _ms(span: ReadableSpan) -> float:
    return (span.end_time - span.start_time) / 1e6  # type: ignore[operator]


def _attr(span: ReadableSpan, key: str) -> Any:
    return (span.attributes or {})[key]


async def test_a_call_its_turns_and_stages_that_add_up_to_the_turn_latency(
    redis_url: str, nats_url: str, spans: InMemorySpanExporter
) -> None:
    # No reconnect grace: the call ends when its client leaves, and its span with it.
    async with running_node(redis_url, nats_url, simulated_providers(), **NO_GRACE) as (
        owner,
        url,
    ):
        async with node_call(url, "tr-1") as call:
            await call.start()
            await call.speak("What are your opening hours?")
            frame = await call.turn(1)
        (call_span,) = await _ended_calls(spans, 1)
        # The node's /metrics, scraped: the stage histograms and the dashboards' metrics.
        async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as resp:
            exposed = parse_exposition(await resp.text())
    assert call_span.kind is SpanKind.SERVER
    assert _attr(call_span, tracing.CALL_ID) == "tr-1"
    assert _attr(call_span, tracing.TENANT) == "demo"
    assert _attr(call_span, tracing.NODE) == owner.config.node_id
    assert _attr(call_span, tracing.EPOCH) == 1
    assert not call_span.links and tracing.RESUME_REASON not in (call_span.attributes or {})

    turns = {
        _attr(s, tracing.TURN_NUMBER): s
        for s in _children(spans, call_span)
        if s.name == tracing.TURN
    }
    assert set(turns) == {0, 1}  # the greeting and the caller's turn
    turn = turns[1]
    assert turn.context.trace_id == call_span.context.trace_id  # type: ignore[union-attr]
    stages = {s.name.removeprefix(tracing.STAGE): s for s in _children(spans, turn)}
    assert set(stages) == {*STAGES, "checkpoint"}
    for s in stages.values():
        assert _attr(s, tracing.CALL_ID) == "tr-1" and _attr(s, tracing.EPOCH) == 1
    # The critical path's stages, end to end, add up to the latency the client was told.
    on_path = [stages[name] for name in STAGES]
    assert sum(_ms(s) for s in on_path) == pytest.approx(frame["latency_ms"], abs=0.01)
    assert _attr(turn, "callmesh.turn.latency_ms") == pytest.approx(frame["latency_ms"], abs=0.01)
    for before, after in itertools.pairwise(on_path):
        assert before.end_time == after.start_time
    assert on_path[0].start_time == turn.start_time
    assert stages["checkpoint"].start_time >= on_path[-1].end_time  # after the first audio
    assert _ms(stages["stt"]) == pytest.approx(frame["stt_ms"], abs=0.01)

    llm = stages["llm"].attributes or {}
    assert llm["gen_ai.system"] == "simulated-llm"
    assert llm["gen_ai.request.model"] == "simulated-llm"
    assert llm["gen_ai.usage.input_tokens"] > 0 and llm["gen_ai.usage.output_tokens"] > 0
    sources = _children(spans, stages["retrieval"])
    assert sources and all(s.name == tracing.RETRIEVAL_SOURCE for s in sources)

    published = _named(spans, tracing.OUTBOX_PUBLISH)
    assert published, "the turns' event-log records were published"
    assert all(s.parent and s.parent.span_id == call_span.context.span_id for s in published)  # type: ignore[union-attr]

    stage_count = exposed["callmesh_node_turn_stage_ms"]
    for name in (*STAGES, "checkpoint"):
        assert stage_count[(("__part__", "_count"), ("stage", name))] >= 1, name
    assert exposed["callmesh_node_turn_latency_ms"][(("__part__", "_count"),)] == 2
    assert exposed["callmesh_node_checkpoint_write_ms"][(("__part__", "_count"),)] >= 2
    assert_dashboards_use_only(exposed, "callmesh_node")


async def test_the_new_owner_links_to_the_calls_trace_with_the_resume_reason(
    redis_url: str, nats_url: str, spans: InMemorySpanExporter
) -> None:
    providers = simulated_providers()
    async with (
        running_node(redis_url, nats_url, providers, **NO_GRACE) as (_, url_a),
        running_node(redis_url, nats_url, simulated_providers(), **NO_GRACE) as (node_b, url_b),
    ):
        async with node_call(url_a, "tr-fo") as first:
            await first.start(audio=False)
            await first.send(type="user_text", text="What are your opening hours?")
            await first.turn(1)
            # The router's relink: the same call's start, saying why, to another node.
            async with node_call(url_b, "tr-fo") as second:
                second.seq = first.seq
                await second.send(
                    type="start",
                    tenant="demo",
                    caller="anonymous",
                    resume="failover",
                    delivered_turn=1,
                )
                await second.wait_for(lambda f: f["type"] == "ready")
                await second.send(type="user_text", text="Thanks, bye")
                await second.turn(2)
        calls = await _ended_calls(spans, 2)
    by_node = {_attr(s, tracing.NODE): s for s in calls}
    old = next(s for n, s in by_node.items() if n != node_b.config.node_id)
    new = by_node[node_b.config.node_id]
    assert _attr(new, tracing.RESUME_REASON) == "failover"
    assert _attr(new, tracing.EPOCH) == 2 and _attr(old, tracing.EPOCH) == 1
    (link,) = new.links
    assert link.context.trace_id == old.context.trace_id  # type: ignore[union-attr]
    assert link.context.span_id == old.context.span_id  # type: ignore[union-attr]
    # One trace per call: the new owner continues the first owner's.
    assert new.parent is not None and new.parent.span_id == old.context.span_id  # type: ignore[union-attr]
    assert new.context.trace_id == old.context.trace_id  # type: ignore[union-attr]
    turns = [s for s in _children(spans, new) if s.name == tracing.TURN]
    assert [_attr(s, tracing.TURN_NUMBER) for s in turns] == [2]
    assert _attr(turns[0], tracing.EPOCH) == 2


async def test_the_routers_placement_is_a_span(spans: InMemorySpanExporter) -> None:
    from router.placement import Placement
    from router.ring import BoundedLoadRing

    class Nodes:
        def routable(self) -> list[str]:
            return ["node-a"]

        def loads(self) -> dict[str, int]:
            return {"node-a": 0}

    class Pins:
        async def get(self, tenant: str, call_id: str) -> str | None:
            return None

        async def set(self, tenant: str, call_id: str, node: str) -> None:
            return None

    async def probe(url: str) -> bool:
        return True

    placement = Placement(Nodes(), Pins(), probe, BoundedLoadRing(0.25))  # type: ignore[arg-type]
    assert await placement.place("demo", "tr-p", prefer_pin=True) == "node-a"
    (span,) = _named(spans, tracing.PLACEMENT)
    assert _attr(span, tracing.NODE) == "node-a" and _attr(span, tracing.CALL_ID) == "tr-p"


def test_turn_spans_are_not_built_while_tracing_is_off() -> None:
    tracing.install(None)
    assert not tracing.enabled()
    m = TurnMetrics("c", 1, stt_ms=5.0, provider_ms=5.0)
    m.set_latency(started=0.0, first_audio_at=0.01)
    span = tracing.start_call(call_id="c", tenant="t", node="n")
    assert not span.is_recording()
    tracing.record_turn(span, m, started=0.0)  # returns at once: nothing to record
    assert tracing.traceparent(span) == ""
    assert not tracing.configure("callmesh-node", "n", "", 1.0)  # no endpoint: stays off


def test_an_endpoint_turns_on_otlp_export_with_a_parent_based_ratio() -> None:
    try:
        assert tracing.configure("callmesh-node", "n", "http://127.0.0.1:9", 0.05)
        assert tracing.enabled()
        sampler = tracing._provider.sampler  # type: ignore[union-attr]
        assert "ParentBased" in type(sampler).__name__ and "0.05" in sampler.get_description()
    finally:
        provider = tracing._provider
        tracing.install(None)
        if provider is not None:
            provider.shutdown()


async def test_the_routers_relink_is_a_span_and_counted_by_outcome(
    start_router: RouterFactory,
    node: FakeNode,
    spans: InMemorySpanExporter,
) -> None:
    router, url = await start_router()
    wire = TwilioWire("CA0T01", "acme", "bob")
    async with aiohttp.ClientSession() as http:
        ws = await twilio_stream(http, url, wire)
        await eventually(lambda: len(node.received("CA0T01")) == 1)
        await node.links["CA0T01"][0].close()  # the link breaks; the node is fine
        await eventually(lambda: len(node.frames["CA0T01"]) == 2)
        await ws.close()
    (relink,) = _named(spans, tracing.RELINK)
    assert _attr(relink, tracing.CALL_ID) == "CA0T01"
    assert _attr(relink, "callmesh.relink.outcome") == "lost"
    assert _attr(relink, tracing.RESUME_REASON) == "reconnect"  # confirmed ready: same node
    assert _attr(relink, "callmesh.relink.to") == "fake-1"
    placements = _named(spans, tracing.PLACEMENT)
    assert placements and _attr(placements[0], tracing.NODE) == "fake-1"
    assert router.metrics.get("relinks", outcome="lost") == 1
    assert sum(router.metrics.histograms["failover_gap_ms"].counts) == 1
