"""``loadtest chaos --fault``: new faults composed in one small run through a real local
cluster; each is marked on the report with its start and end, and the calls lose
nothing."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from loadtest import chaos

pytestmark = pytest.mark.timeout(300)

ZERO = ("lost_turns", "duplicate_replies", "duplicate_effects", "context_lost", "lost_effects")


def main(argv: list[str]) -> int:
    """The scenario's own entry point, without `python -m loadtest`'s process-wide setup."""
    parser = argparse.ArgumentParser()
    chaos.add_parser(parser.add_subparsers(dest="scenario", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


def test_slow_model_link_latency_nats_outage_and_redis_restart_in_one_run(
    tmp_path: Path,
) -> None:
    argv = ["chaos", "--calls", "4", "--nodes", "2", "--turns", "6", "--think", "0.3"]
    argv += ["--latency-scale", "0.2", "--no-progress"]
    argv += ["--fault", "llm-slow:300ms@0.5s+2s", "--fault", "link-latency:40ms~20ms@10%+3s"]
    argv += ["--fault", "nats-outage@30%+1.5s", "--fault", "redis-restart@60%+0.5s"]
    argv += ["--json", str(tmp_path / "chaos.json"), "--html", str(tmp_path / "chaos.html")]
    code = main(argv)
    report = json.loads((tmp_path / "chaos.json").read_text())
    events = {e["kind"]: e for e in report["events"]}
    assert set(events) == {"llm-slow", "link-latency", "nats-outage", "redis-restart"}
    for e in events.values():
        assert 0 <= e["t_s"] <= e["end_s"], e  # each window's start and end are marked
        assert "skipped" not in e["detail"] and "failed" not in e["detail"], e
    assert events["nats-outage"]["end_s"] - events["nats-outage"]["t_s"] >= 1.5
    assert [f["struck"] for f in report["faults"]] == [1, 1, 1, 1]
    assert report["mode"] == "faults" and report["victims"] == []  # no node was struck
    for key in ZERO:
        assert report[key] == 0, key
    assert report["errors"] == 0 and report["completed_calls"] == 4 and code == 0
    page = (tmp_path / "chaos.html").read_text()
    assert page.count('fill-opacity="0.08"') == 4 * 3  # each window shaded on three charts
    assert "nats-outage" in page and "<script" not in page
