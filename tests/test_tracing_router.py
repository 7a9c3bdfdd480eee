"""Traces of the router: a relink of a call is a span, and its placement too (the fake
node and the router of tests/test_twilio_router.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from callmesh import tracing
from callmesh_client.voice_wire import TwilioWire
from tests.cluster_helpers import eventually
from tests.test_twilio_router import (  # the fake node and the router, with their fixtures
    FakeNode,
    RouterFactory,
    node,
    start_router,
    twilio_stream,
)

__all__ = ["node", "start_router"]


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


def _named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def _attr(span: ReadableSpan, key: str) -> Any:
    return (span.attributes or {})[key]


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
