"""The capacity benchmark, small: the same code path (real router and node processes, the
callers in their own process), two steps of a few calls. No timing or threshold
assertions: only that the report is complete and the measurements are real."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from loadtest import capacity
from loadtest.capacity import CapacityConfig, run_capacity
from loadtest.capacity_report import build_report, summary_table

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


def _step(calls: int, cores: float, ovh_p99: float, *, ok: bool, behind: bool) -> dict:
    return {
        "calls": calls,
        "cores": cores,
        "pass": ok,
        "generator_behind": behind,
        "fail_reasons": [] if ok else ["frame lag p99 25.0 ms >= 20"],
        "machine_busy_pct": 80.0,
        "rss_growth_kb": 200 * calls,
        "overhead_ms": {"p50": 1.0, "p99": ovh_p99},
        "caller_send_lag_ms": {"p99": 12.0, "late_pct": 0.2},
        "node_turn_metrics_check_ms": {"latency_minus_provider_ms": {"n": 0}},
    }


def test_a_step_passed_while_the_callers_were_behind_is_not_counted() -> None:
    steps = [
        _step(100, 0.5, 3.0, ok=True, behind=False),
        _step(200, 0.8, 4.0, ok=True, behind=False),
        _step(250, 1.0, 9.0, ok=True, behind=True),
    ]
    report = build_report("twilio", {}, steps, {}, None)
    assert report["max_calls_passing"] == 200
    assert report["calls_per_core"] == 250.0
    assert report["overhead_ms"]["p99"] == 4.0
    assert report["passed_with_generator_behind"] == [250]
    assert report["limited_by"] == "load generator"
    assert report["targets_met"]
    # (the verdict lines only: these steps lack the per-step columns)
    assert "not counted: passed at 250 calls" in summary_table({**report, "steps": []})


def test_the_counted_step_carries_its_own_overhead_against_the_target() -> None:
    steps = [
        _step(100, 0.4, 3.0, ok=True, behind=False),
        _step(150, 0.6, 7.5, ok=True, behind=False),
        _step(200, 1.0, 9.0, ok=False, behind=False),
    ]
    report = build_report("native", {}, steps, {}, None)
    assert report["max_calls_passing"] == 150
    assert report["calls_per_core"] == 250.0
    assert report["targets"]["met"] == {"calls_per_core": True, "overhead_p99": False}
    assert not report["targets_met"]
    assert report["limited_by"] == "callmesh"
    assert report["passed_with_generator_behind"] == []


def test_no_progress_turns_the_live_display_off(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    shown: list[bool] = []

    def fake_run(
        config: CapacityConfig, *, log_dir: Path | None = None, show: bool = True
    ) -> dict[str, Any]:
        shown.append(show)
        report = build_report("twilio", {}, [_step(100, 0.5, 3.0, ok=True, behind=False)], {}, None)
        return {**report, "steps": []}

    monkeypatch.setattr(capacity, "run_capacity", fake_run)
    # As on a terminal: only the flag turns the display off.
    monkeypatch.setattr(capacity, "progress_wanted", lambda no_progress: not no_progress)
    parser = argparse.ArgumentParser()
    capacity.add_parser(parser.add_subparsers())
    for argv, show in ((["capacity"], True), (["capacity", "--no-progress"], False)):
        args = parser.parse_args([*argv, "--steps", "100"])
        assert args.no_progress is not show
        args.func(args)
        assert shown.pop() is show
    capsys.readouterr()
    capacity._hold(0.2, "idle", show=False)
    assert capsys.readouterr().err == ""
