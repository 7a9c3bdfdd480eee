"""The capacity benchmark, small: the same code path (real router and node processes, the
callers in their own process), two steps of a few calls. No timing or threshold
assertions: only that the report is complete and the measurements are real."""

from __future__ import annotations

import pytest

from loadtest.capacity import CapacityConfig, run_capacity
from loadtest.capacity_report import summary_table

pytestmark = pytest.mark.timeout(90)

STEP_FIELDS = {
    "calls",
    "router_cpu_cores",
    "node_cpu_cores",
    "cores",
    "frame_lag_ms",
    "overhead_ms",
    "turns",
    "over_budget_by_callmesh",
    "caller_send_lag_ms",
    "response_ms",
    "rss_kb",
    "wakeups_per_s",
    "node_gc_pause_ms",
    "pass",
}
REPORT_FIELDS = {
    "transport",
    "steps",
    "max_calls_passing",
    "calls_per_core",
    "cpu_per_call_pct",
    "rss_per_call_kb",
    "overhead_ms",
    "limited_by",
    "command",
}


def test_a_small_capacity_run_reports_every_figure() -> None:
    config = CapacityConfig(
        transport="twilio", steps=(2, 4), step_seconds=4.0, settle_s=1.0, ramp_s=0.5
    )
    report = run_capacity(config)
    assert report.keys() >= REPORT_FIELDS
    assert report["transport"] == "twilio"
    assert [s["calls"] for s in report["steps"]] == [2, 4] or report["limited_by"] != "max step"
    assert report["limited_by"] in ("callmesh", "load generator", "max step")
    for step in report["steps"]:
        assert step.keys() >= STEP_FIELDS
        assert step["router_cpu_cores"] > 0 and step["node_cpu_cores"] > 0
        assert step["rss_kb"]["router"] > 0 and step["rss_kb"]["node"] > 0
        # Frames arrive 50 times a second per call: both event loops sleep and wake.
        assert step["wakeups_per_s"]["router"] > 0 and step["wakeups_per_s"]["node"] > 0
        # Real-time audio reached the node through the router: its lag histogram grew.
        assert step["frame_lag_ms"]["n"] > 0
        assert {"p50", "p99"} <= step["frame_lag_ms"].keys()
    assert report["callers_final"] is not None
    assert "limited by" in summary_table(report)


def test_config_rejects_steps_that_do_not_increase() -> None:
    with pytest.raises(ValueError):
        CapacityConfig(steps=(50, 25))
    with pytest.raises(ValueError):
        CapacityConfig(transport="sip")
