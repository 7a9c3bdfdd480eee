"""Turn telemetry: latency and callmesh's overhead, and turns that never spoke."""

from __future__ import annotations

import dataclasses
from typing import Any, cast

from callmesh.config import NodeConfig
from callmesh.telemetry import TurnMetrics, histogram_quantile
from conversation_node.node_services import NodeServices


def _services() -> NodeServices:
    # observe_turn reads only the config and the metrics; the rest is never touched.
    none = cast(Any, None)
    return NodeServices(NodeConfig(), store=none, publisher=None, pipeline=none, memory=none)


def test_overhead_is_latency_minus_provider_time() -> None:
    m = TurnMetrics("c", 1, provider_ms=300.0)
    m.set_latency(started=10.0, first_audio_at=10.3042)
    assert m.spoke
    assert round(m.latency_ms, 1) == 304.2
    assert round(m.overhead_ms, 1) == 4.2
    m.provider_ms += 2.0  # speech-to-text time learned afterwards
    m.update_overhead()
    assert round(m.overhead_ms, 1) == 2.2


def test_a_turn_cut_off_before_its_first_audio_has_no_latency() -> None:
    m = TurnMetrics("c", 2, provider_ms=150.0, interrupted=True, fallbacks=["llm_timeout"])
    m.set_latency(started=10.0, first_audio_at=None)
    assert (m.spoke, m.latency_ms, m.overhead_ms) == (False, 0.0, 0.0)
    assert m.to_dict()["spoke"] is False

    svc = _services()
    svc.observe_turn(m)
    spoken = TurnMetrics("c", 3, provider_ms=900.0)
    spoken.set_latency(started=0.0, first_audio_at=0.903)
    svc.observe_turn(spoken)
    counters = svc.metrics.snapshot()
    assert counters["turns"] == 2
    assert counters["turns_cut_off_before_audio"] == 1
    assert counters['fallbacks{kind="llm_timeout"}'] == 1  # still counted
    assert counters["turns_over_budget"] == 1  # only the turn that spoke
    assert counters["turns_over_budget_by_callmesh"] == 0  # the providers took 900 ms
    h = svc.metrics.histograms["turn_overhead_ms"]
    assert sum(h.counts) == 1
    assert 2.0 < histogram_quantile(list(h.buckets), h.counts, 0.5) <= 3.0


def test_metrics_as_a_dict_are_every_field_rounded_and_copied() -> None:
    m = TurnMetrics("c", 3, provider_ms=1.23456, fallbacks=["llm_timeout"], epoch=2)
    d = m.to_dict()
    expected = dataclasses.asdict(m)
    expected["provider_ms"] = 1.235
    assert d == expected and list(d) == list(expected)
    d["fallbacks"].append("tts_timeout")
    assert m.fallbacks == ["llm_timeout"]
