"""The Grafana dashboard and the Prometheus alert rules query only exported metrics."""

from __future__ import annotations

import re

from callmesh import metric_names
from callmesh.metric_names import EFFECTS, NODE, ROUTER, Kind
from callmesh.telemetry import Metrics
from tests.exposition import (
    alert_exprs,
    assert_dashboards_use_only,
    dashboard_exprs,
    parse_exposition,
    used_metrics,
)

PREFIXES = (ROUTER, NODE, EFFECTS)


def _exported() -> dict[str, metric_names.Spec]:
    return {s.exposed(p): s for p in PREFIXES for s in metric_names.of_process(p)}


def test_every_metric_the_dashboard_and_alerts_use_is_declared_and_exported() -> None:
    exported = _exported()
    used = used_metrics()
    assert len(used) >= 15, used
    assert used <= set(exported), sorted(used - set(exported))
    for expr in dashboard_exprs() + alert_exprs():
        for name in re.findall(r"\bcallmesh_[a-z0-9_]+", expr):
            family = re.sub(r"_(bucket|sum|count)$", "", name)
            spec = exported[family if family in exported else name]
            # _bucket only of a histogram; a label only one the metric has.
            assert (family != name) == (spec.kind is Kind.HISTOGRAM), expr
            if spec.kind is Kind.HISTOGRAM:
                assert name.endswith("_bucket"), expr
        for label in re.findall(r"\b(kind|outcome|stage|reason|code)\b", expr):
            assert any(label in exported[m].labels for m in used_metrics() & set(exported))


def test_the_seed_signals_and_the_required_alerts_are_there() -> None:
    exprs = "\n".join(dashboard_exprs())
    for signal in (
        "calls_ended_total",  # session success rate
        "time_to_first_audio_ms_bucket",
        "deliveries_total",  # tool-call (effect) failure rate
        "barge_ins_total",  # interruption rate
        "fallbacks_total",
        "failovers_total",
        "relinks_total",
        "node_live_calls",
        "dead_letters_total",
    ):
        assert signal in exprs, signal
    alerts = "\n".join(alert_exprs())
    assert re.search(r"turn_latency_ms_bucket.*\)\s*>\s*800", alerts, re.S)
    assert "dead_letters_total" in alerts and "fenced_writes_total" in alerts
    assert "redis_up" in alerts


def test_each_process_exports_its_metrics_from_start_up_with_help_and_type() -> None:
    for prefix in PREFIXES:
        exposed = parse_exposition(Metrics(prefix).render())
        assert set(exposed) == {s.exposed(prefix) for s in metric_names.of_process(prefix)}
        assert_dashboards_use_only(exposed, prefix)


def test_labelled_series_and_histograms_render_in_the_exposition_format() -> None:
    m = Metrics(NODE)
    m.inc(metric_names.FALLBACKS, kind="llm_timeout")
    m.inc(metric_names.FALLBACKS, 2, kind='tts "failed"\n')
    bound = m.histogram(metric_names.TURN_STAGE_MS, stage="llm")
    for v in (0.1, 40.0, 9000.0):
        bound.observe(v)
    exposed = parse_exposition(m.render())
    fallbacks = exposed["callmesh_node_fallbacks_total"]
    assert fallbacks[(("kind", "llm_timeout"),)] == 1
    assert fallbacks[(("kind", 'tts \\"failed\\"\\n'),)] == 2
    stage = exposed["callmesh_node_turn_stage_ms"]
    assert stage[(("__part__", "_count"), ("stage", "llm"))] == 3
    assert stage[(("__part__", "_bucket"), ("le", "50"), ("stage", "llm"))] == 2
    assert stage[(("__part__", "_bucket"), ("le", "+Inf"), ("stage", "llm"))] == 3
    assert m.snapshot()['fallbacks{kind="llm_timeout"}'] == 1


def test_undeclared_names_and_wrong_labels_are_refused() -> None:
    import pytest

    m = Metrics("callmesh_test")  # a process of no declared metric: nothing created yet
    with pytest.raises(KeyError):
        m.inc("fallback_llm_timeout")
    with pytest.raises(ValueError):
        m.inc(metric_names.FALLBACKS)  # its label is missing
    with pytest.raises(TypeError):
        m.observe(metric_names.TURNS, 1.0)
