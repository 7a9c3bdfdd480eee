"""The HTML report built from a synthetic JSON report: its structure (summary, charts,
fault events marked on the time charts, histogram) and that nothing from the report can
inject markup or script."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from loadtest.html_report import render_html, summary_rows, verdict, write_html
from loadtest.timeline import Timeline

EVIL_CALL = 'chaos-1"><script>alert(1)</script>'
EVIL_ERROR = "CallError: <img src=x onerror=alert(2)> & 'quoted'"
EVIL_NODE = "node-2</text><script>alert(3)</script>"


def synthetic_report() -> dict[str, Any]:
    """A chaos-shaped report, built through a Timeline with a fake clock."""
    now = [100.0]
    tl = Timeline(clock=lambda: now[0])
    for _ in range(20):
        tl.call_started()
    for second in range(30):
        now[0] = 100.0 + second + 0.5
        for k in range(5):
            tl.turn(300.0 + 40 * k + (900 if 12 <= second < 15 else 0))
        if second == 13:
            tl.error()
    tl.fault("kill", EVIL_NODE, "SIGKILL", at=112.2)
    tl.fault("drain", "node-3", "SIGTERM", at=120.0)
    for _ in range(20):
        tl.call_ended()
    return {
        "scenario": "chaos",
        "mode": "kill",
        "calls": 20,
        "completed_calls": 19,
        "turns": 150,
        "victims": [EVIL_NODE],
        "affected_calls": 7,
        "failover_gap_ms": {"n": 7.0, "p50": 410.0, "p99": 980.0, "max": 980.0},
        "lost_turns": 0,
        "duplicate_replies": 0,
        "errors": 1,
        "error_samples": [f"{EVIL_CALL}: {EVIL_ERROR}"],
        "turn_latency_ms": {"n": 150.0, "p50": 380.0, "p95": 1200.0, "p99": 1460.0},
        "elapsed_s": 30.2,
        **tl.report(),
        "meta": {
            "command": f"python -m loadtest chaos --calls 20 --label '{EVIL_CALL}'",
            "date": "2026-12-02T06:00:00Z",
            "machine": {
                "cpus": 2,
                "cpu_model": "AMD EPYC",
                "memory_gib": 23.5,
                "kernel": "6.1",
                "python": "3.11.7",
            },
            "commit": "abc1234",
        },
    }


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs += attrs


def _parse(page: str) -> _Tags:
    parser = _Tags()
    parser.feed(page)
    return parser


def test_the_report_has_the_run_the_charts_and_the_summary() -> None:
    report = synthetic_report()
    page = render_html(report)
    assert page.startswith("<!DOCTYPE html>")
    svgs = re.findall(r"<svg\b.*?</svg>", page, flags=re.S)
    titles = [ET.fromstring(svg).findtext("{http://www.w3.org/2000/svg}title") for svg in svgs]
    assert titles == [
        "Turn latency over time",
        "Throughput and live calls",
        "Errors",
        "Turn latency histogram",
    ]
    assert "python -m loadtest chaos --calls 20" in page
    assert "2 CPUs (AMD EPYC), 23.5 GiB" in page
    assert "abc1234" in page
    labels = [label for label, _ in summary_rows(report)]
    assert "failover_gap_ms" in labels and "affected_calls" in labels
    assert "timeseries" not in labels and "events" not in labels
    assert "p50 410 / p99 980" in page


def test_fault_events_are_marked_on_every_time_chart_at_their_time() -> None:
    report = synthetic_report()
    svgs = re.findall(r"<svg\b.*?</svg>", render_html(report), flags=re.S)
    ns = {"s": "http://www.w3.org/2000/svg"}
    for svg in svgs[:3]:
        root = ET.fromstring(svg)
        marks = root.findall(".//s:g[@class='event']", ns)
        assert [m.findtext("s:text", namespaces=ns) for m in marks] == [
            f"kill {EVIL_NODE}",
            "drain node-3",
        ]
        xs = [float(m.find("s:line", ns).get("x1")) for m in marks]  # type: ignore[union-attr]
        assert xs[0] < xs[1]
    assert [e["t_s"] for e in report["events"]] == [12.2, 20.0]


def test_the_histogram_has_its_bins_and_percentile_markers() -> None:
    report = synthetic_report()
    hist = report["turn_latency_histogram"]
    assert sum(hist["counts"]) == 150
    assert len(hist["edges_ms"]) == len(hist["counts"]) + 1
    svg = re.findall(r"<svg\b.*?</svg>", render_html(report), flags=re.S)[3]
    root = ET.fromstring(svg)
    ns = {"s": "http://www.w3.org/2000/svg"}
    assert len(root.findall(".//s:rect[@class='bin']", ns)) == sum(1 for c in hist["counts"] if c)
    assert [t.text for t in root.findall(".//s:g[@class='marker']/s:text", ns)] == [
        "p50 380",
        "p99 1460",
    ]


def test_nothing_from_the_report_becomes_markup() -> None:
    page = render_html(synthetic_report())
    parsed = _parse(page)
    assert "script" not in parsed.tags and "img" not in parsed.tags
    assert not [name for name, _ in parsed.attrs if name.startswith("on")]
    assert "<script" not in page and "<img" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(2)&gt; &amp; &#x27;quoted&#x27;" in page
    assert "node-2&lt;/text&gt;&lt;script&gt;alert(3)&lt;/script&gt;" in page
    # And the page would refuse to run a script even if one slipped through.
    assert "default-src 'none'" in page


def test_the_verdict_names_what_went_wrong() -> None:
    ok, problems = verdict(synthetic_report())
    assert not ok and problems == ["errors = 1"]
    ok, problems = verdict({"errors": 0, "lost_turns": 0, "pass": {"flat": True}})
    assert ok and problems == []
    assert verdict({"errors": 0, "pass": {"flat": False}}) == (False, ["flat failed"])


def test_a_saved_json_report_renders_and_a_report_without_series_still_renders(
    tmp_path: Path,
) -> None:
    path = tmp_path / "r.json"
    path.write_text(json.dumps(synthetic_report()))
    write_html(json.loads(path.read_text()), tmp_path / "out" / "r.html")
    assert "<svg" in (tmp_path / "out" / "r.html").read_text()
    bare = render_html({"scenario": "run", "calls": 1, "errors": 0})
    assert "<svg" not in bare and "No faults were injected." in bare


def test_a_malformed_report_renders_without_its_bad_numbers() -> None:
    report = synthetic_report()
    report["timeseries"]["latency_p99_ms"][3] = "<b>NaN</b>"
    report["timeseries"]["turns"] = None
    report["events"].append({"t_s": "<i>soon</i>", "kind": "kill", "target": "node-9"})
    report["turn_latency_histogram"] = {"edges_ms": [-1, 0, 1], "counts": [1, 1]}
    page = render_html(report)
    assert "<b>NaN</b>" not in page and "<i>" not in page
    assert "Turn latency histogram" not in page  # bins that cannot be drawn are left out
    svgs = re.findall(r"<svg\b.*?</svg>", page, flags=re.S)
    for svg in svgs:
        ET.fromstring(svg)  # still well-formed
    assert page.count('class="event"') == 9  # three events on each of the three time charts
