"""`loadtest run`, `chaos` and `soak` at their smallest, through a real local cluster: the
JSON report keeps its keys and gains the time series, and the HTML report is written."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from loadtest import chaos, run, soak

pytestmark = pytest.mark.timeout(300)

RUN_KEYS = {
    "scenario", "calls", "completed_calls", "turns", "errors", "error_samples",
    "duplicate_replies", "turn_latency_ms", "node_overhead_ms", "elapsed_s",
}  # fmt: skip
SERIES = {"interval_s", "t_s", "turns", "latency_p50_ms", "latency_p99_ms", "errors", "calls_up"}


def main(argv: list[str]) -> int:
    """The scenario's own entry point, without `python -m loadtest`'s process-wide setup
    (its uvloop policy and logging would outlive this test)."""
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="scenario", required=True)
    for module in (run, chaos, soak):
        module.add_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


def _reports(tmp_path: Path, name: str) -> tuple[dict[str, object], str]:
    report = json.loads((tmp_path / f"{name}.json").read_text())
    return report, (tmp_path / f"{name}.html").read_text()


def test_run_writes_the_series_and_the_html_report(tmp_path: Path) -> None:
    argv = ["run", "--calls", "3", "--turns", "2", "--think", "0.5", "--no-progress"]
    argv += ["--json", str(tmp_path / "run.json"), "--html", str(tmp_path / "run.html")]
    assert main(argv) == 0
    report, page = _reports(tmp_path, "run")
    assert set(report) >= RUN_KEYS
    series = report["timeseries"]
    assert isinstance(series, dict) and set(series) >= SERIES
    assert sum(series["turns"]) == report["turns"] == 6
    assert max(series["calls_up"]) <= 3 and report["events"] == []
    assert "Turn latency over time" in page and "<script" not in page


def test_chaos_marks_the_kill_on_its_time_line(tmp_path: Path) -> None:
    argv = ["chaos", "--calls", "4", "--nodes", "2", "--turns", "5", "--think", "0.3"]
    argv += ["--kill", "1", "--no-progress", "--json", str(tmp_path / "chaos.json")]
    argv += ["--html", str(tmp_path / "chaos.html")]
    main(argv)  # its exit status scores the failover, which is not what is tested here
    report, page = _reports(tmp_path, "chaos")
    assert {"affected_calls", "failover_gap_ms", "lost_turns", "victims"} <= set(report)
    events = report["events"]
    assert isinstance(events, list) and [e["kind"] for e in events] == ["kill"]
    assert events[0]["target"] == report["victims"][0]  # type: ignore[index]
    assert 0 < events[0]["t_s"] < report["elapsed_s"]  # type: ignore[operator]
    assert page.count('class="event"') == 3  # on each of the three time charts


def test_chaos_strikes_a_router_and_a_node_in_one_moment(tmp_path: Path) -> None:
    argv = ["chaos", "--calls", "6", "--routers", "2", "--nodes", "3", "--turns", "5"]
    argv += ["--think", "0.3", "--kill-router", "1", "--kill", "1", "--no-progress"]
    argv += ["--json", str(tmp_path / "chaos.json"), "--html", str(tmp_path / "chaos.html")]
    code = main(argv)
    report, _ = _reports(tmp_path, "chaos")
    events = report["events"]
    assert isinstance(events, list)
    assert sorted(e["kind"] for e in events) == ["kill", "kill-router"]
    assert len({e["t_s"] for e in events}) == 1  # one moment
    assert len(report["victims"]) == len(report["node_victims"]) == 1  # type: ignore[arg-type]
    affected = report["affected_calls"]
    assert isinstance(affected, int) and 0 < affected <= 6
    assert affected >= max(report["affected_by_router"], report["affected_by_node"])  # type: ignore[type-var]
    # Every call survives both: nothing lost, nothing twice, no context forgotten.
    for key in ("lost_turns", "duplicate_replies", "duplicate_effects", "context_lost"):
        assert report[key] == 0, key
    assert report["completed_calls"] == 6 and code == 0


def test_soak_samples_memory_against_completed_calls(tmp_path: Path) -> None:
    argv = ["soak", "--minutes", "0.1", "--concurrency", "2", "--sample-every", "1"]
    argv += ["--no-progress", "--json", str(tmp_path / "soak.json")]
    argv += ["--html", str(tmp_path / "soak.html")]
    main(argv)  # a 6 s soak is all warm-up: its slopes, and so its exit status, mean nothing
    report, page = _reports(tmp_path, "soak")
    assert report["errors"] == 0 and report["completed_calls"] > 0  # type: ignore[operator]
    samples = report["samples"]
    assert isinstance(samples, list) and len(samples) >= 3
    assert {"router_rss_b", "node-1_rss_b", "node-2_rss_b", "redis_used_memory_b"} <= set(
        samples[0]
    )
    assert samples[-1]["completed_calls"] == report["completed_calls"]
    assert {"router", "nodes_max", "redis"} <= set(report["slopes_bytes_per_call"])  # type: ignore[arg-type]
    assert "Memory over completed calls" in page
    # An ended call keeps its checkpoint only, and its event log is in JetStream.
    assert "ckpt" in report["redis_keys_by_kind"]  # type: ignore[operator]
    assert not {"lease", "pin", "resume"} & set(report["redis_keys_by_kind"])  # type: ignore[arg-type]
    assert set(report["jetstream_per_call"]) >= {"event_log_bytes", "event_log_messages"}  # type: ignore[arg-type]
    assert samples[-1]["event_log_messages"] > 0


def test_soak_probes_the_heaps_and_samples_the_effects_worker(tmp_path: Path) -> None:
    argv = ["soak", "--minutes", "0.1", "--concurrency", "2", "--sample-every", "1"]
    argv += ["--warmup", "0", "--effects-worker", "--heap-probe", str(tmp_path / "probes")]
    argv += ["--heap-probe-every", "2", "--heap-probe-of", "router,effects-worker"]
    argv += ["--no-progress", "--json", str(tmp_path / "soak.json")]
    main(argv)
    report = json.loads((tmp_path / "soak.json").read_text())
    assert "effects-worker_rss_b" in report["samples"][0]
    assert "effects_worker_flat" in report["pass"]
    probed = report["heap_growth"]["processes"]
    assert set(probed) == {"router", "effects-worker"}
    for figures in probed.values():
        assert {"objects_per_call", "objects_grown", "allocators_bytes_per_call"} <= set(figures)
        assert "sites" not in figures  # light probes: no tracing


def test_soak_judges_redis_once_ended_calls_expire(tmp_path: Path) -> None:
    """With a short retention, ended calls' checkpoints expire during the run: past the
    warm-up and one retention period Redis is fitted again, and judged."""
    argv = ["soak", "--minutes", "0.25", "--concurrency", "2", "--sample-every", "1"]
    argv += ["--warmup", "3", "--ended-call-retention-s", "4"]
    argv += ["--no-progress", "--json", str(tmp_path / "soak.json")]
    main(argv)  # a 15 s soak's slopes are noise: what is tested is that Redis is judged
    report = json.loads((tmp_path / "soak.json").read_text())
    steady = report["redis_steady"]
    assert steady["from_s"] == 7 and steady["fitted_samples"] >= 3
    assert isinstance(steady["bytes_per_call"], float) and "redis_flat" in report["pass"]
    # The checkpoints kept are only the calls of the last retention period, not all of them.
    kept = report["redis_keys_by_kind"]["ckpt"]["count"]
    assert 0 < kept < report["completed_calls"]


def test_soak_refuses_a_retention_the_run_cannot_outlast() -> None:
    argv = ["soak", "--minutes", "0.1", "--ended-call-retention-s", "60", "--no-progress"]
    assert main(argv) == 2
