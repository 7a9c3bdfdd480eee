"""The capacity benchmark's figures: a step's from two snapshots and the callers' report,
the verdict over all steps, a table and an SVG."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

from callmesh.metric_names import (
    BARGE_INS,
    ENDPOINT_MS_SUM,
    GC_PAUSE_MS,
    INBOUND_FRAME_LAG_MS,
    PREEMPTIVE_ADOPTED,
    PREEMPTIVE_CANCELLED,
    PREEMPTIVE_SAVED_MS_SUM,
    PREEMPTIVE_STARTED,
    PREEMPTIVE_WASTED_TOKENS,
    TURN_OVERHEAD_MS,
    TURNS,
    TURNS_OVER_BUDGET,
    TURNS_OVER_BUDGET_BY_CALLMESH,
)
from callmesh.telemetry import histogram_quantile

FRAME_LAG_P99_LIMIT_MS = 20.0
TARGET_CALLS_PER_CORE = 200.0
TARGET_OVERHEAD_P99_MS = 5.0
# The load generator is behind real time when its own lateness would eat a material part
# of callmesh's frame-lag budget: event-loop lag p99 >= 10 ms, or >= 1% of frames late.
GENERATOR_LAG_P99_LIMIT_MS = 10.0
GENERATOR_LATE_PCT_LIMIT = 1.0


# ---------------------------------------------------------------- one step


@dataclass
class Snapshot:
    """The benchmark's processes and the node at one moment."""

    at: float
    cpu: dict[str, float]
    rss: dict[str, int]
    machine: tuple[float, float]
    node: dict[str, Any]
    router: dict[str, float]
    # Times each process's event-loop thread went to sleep and was woken (voluntary context
    # switches). On a virtual machine each wake-up can be charged far more CPU than the
    # work it does (bench/wakeup_cost.py measures it), so the report shows the rate.
    wakeups: dict[str, int] = field(default_factory=dict)


def hist_delta(
    before: dict[str, Any], after: dict[str, Any], name: str
) -> tuple[list[float], list[int]]:
    """(buckets, counts) of a node histogram observed between two /v1/status snapshots."""
    a = after.get("histograms", {}).get(name)
    if a is None:
        return [], []
    b = before.get("histograms", {}).get(name) or {"counts": [0] * len(a["counts"])}
    return list(a["buckets"]), [x - y for x, y in zip(a["counts"], b["counts"], strict=True)]


def quantiles(buckets: list[float], counts: list[int]) -> dict[str, float]:
    return {
        "p50": round(histogram_quantile(buckets, counts, 0.50), 3),
        "p99": round(histogram_quantile(buckets, counts, 0.99), 3),
        "n": sum(counts),
    }


def _counter(snap: Snapshot, name: str) -> float:
    return float(snap.node.get("metrics", {}).get(name, 0.0))


def _hist_sum(s1: Snapshot, s0: Snapshot, name: str) -> float:
    def total(snap: Snapshot) -> float:
        return float(snap.node.get("histograms", {}).get(name, {}).get("sum", 0.0))

    return total(s1) - total(s0)


_PREEMPTIVE = (
    PREEMPTIVE_STARTED,
    PREEMPTIVE_ADOPTED,
    PREEMPTIVE_CANCELLED,
    PREEMPTIVE_WASTED_TOKENS,
    PREEMPTIVE_SAVED_MS_SUM,
    ENDPOINT_MS_SUM,
)


def measure_step(
    calls: int, s0: Snapshot, s1: Snapshot, callers: dict[str, Any], idle_rss: dict[str, int]
) -> dict[str, Any]:
    wall = s1.at - s0.at
    cores = {role: (s1.cpu[role] - s0.cpu[role]) / wall for role in s1.cpu}
    busy, total = (a - b for a, b in zip(s1.machine, s0.machine, strict=True))
    lag = quantiles(*hist_delta(s0.node, s1.node, INBOUND_FRAME_LAG_MS))
    overhead = quantiles(*hist_delta(s0.node, s1.node, TURN_OVERHEAD_MS))
    gc_pauses = quantiles(*hist_delta(s0.node, s1.node, GC_PAUSE_MS))
    turns = int(_counter(s1, TURNS) - _counter(s0, TURNS))
    by_callmesh = int(
        _counter(s1, TURNS_OVER_BUDGET_BY_CALLMESH) - _counter(s0, TURNS_OVER_BUDGET_BY_CALLMESH)
    )
    errors = int(callers["errors"])
    behind = (
        callers["loop_lag_ms"]["p99"] >= GENERATOR_LAG_P99_LIMIT_MS
        or callers["send_late_pct"] >= GENERATOR_LATE_PCT_LIMIT
    )
    reasons = []
    if lag["n"] == 0:
        reasons.append("no audio frames reached the node")
    elif lag["p99"] >= FRAME_LAG_P99_LIMIT_MS:
        reasons.append(f"frame lag p99 {lag['p99']} ms >= {FRAME_LAG_P99_LIMIT_MS:g}")
    if by_callmesh:
        reasons.append(f"{by_callmesh} turns over budget because of callmesh")
    if errors or callers["live"] < calls:
        reasons.append(f"{errors} caller errors, {callers['live']}/{calls} calls live")
    router_deltas = {
        k: round(v - s0.router.get(k, 0.0), 3)
        for k, v in s1.router.items()
        if v != s0.router.get(k, 0.0) and not k.startswith("live_")
    }
    return {
        "calls": calls,
        "window_s": round(wall, 2),
        "router_cpu_cores": round(cores["router"], 4),
        "node_cpu_cores": round(cores["node"], 4),
        "cores": round(cores["router"] + cores["node"], 4),
        "other_cpu_cores": {
            k: round(v, 4) for k, v in cores.items() if k not in ("router", "node")
        },
        "wakeups_per_s": {
            role: round((s1.wakeups[role] - s0.wakeups.get(role, 0)) / wall) for role in s1.wakeups
        },
        "machine_busy_pct": round(100 * busy / total, 1) if total else 0.0,
        # Busy cores of the machine that none of the watched processes used (other work
        # on a shared machine competes with the benchmark).
        "machine_other_cores": max(
            0.0,
            round(
                (busy / total * (os.cpu_count() or 1) if total else 0.0) - sum(cores.values()), 3
            ),
        ),
        "frame_lag_ms": lag,
        "overhead_ms": overhead,
        # The node's garbage collections in the window (callmesh.gc_tuning): pause
        # quantiles, how many, and the wall time they stopped the event loop for in all.
        "node_gc_pause_ms": {**gc_pauses, "total": round(_hist_sum(s1, s0, GC_PAUSE_MS), 1)},
        "turns": turns,
        "over_budget": int(_counter(s1, TURNS_OVER_BUDGET) - _counter(s0, TURNS_OVER_BUDGET)),
        "over_budget_by_callmesh": by_callmesh,
        "barge_ins": int(_counter(s1, BARGE_INS) - _counter(s0, BARGE_INS)),
        "caller_turns": callers["turns"],
        "response_ms": {k: callers["response_ms"][k] for k in ("p50", "p95", "p99", "n")},
        # Preemptive generation and endpointing at the node (turns: TURNS above).
        "preemptive": {
            name: round(_counter(s1, name) - _counter(s0, name), 3) for name in _PREEMPTIVE
        },
        "caller_send_lag_ms": {
            "p50": callers["loop_lag_ms"]["p50"],
            "p99": callers["loop_lag_ms"]["p99"],
            "mean": callers["send_lag_ms_mean"],
            "late_pct": callers["send_late_pct"],
        },
        "caller_errors": errors,
        "caller_error_samples": callers["error_samples"],
        "caller_timed_out": callers["timed_out"],
        "caller_cleared_turns": callers["cleared_turns"],
        "node_turn_metrics_check_ms": {
            "overhead_ms": callers["node_overhead_ms"],
            "latency_minus_provider_ms": callers["node_latency_minus_provider_ms"],
            "over_budget_by_callmesh_turns": callers["over_budget_by_callmesh_turns"],
        },
        "rss_kb": {"router": s1.rss["router"], "node": s1.rss["node"]},
        "rss_growth_kb": s1.rss["router"] + s1.rss["node"] - idle_rss["router"] - idle_rss["node"],
        "router_counters": router_deltas,
        "generator_behind": behind,
        "pass": not reasons,
        "fail_reasons": reasons,
    }


def _limit(steps: list[dict[str, Any]]) -> tuple[str, str]:
    """What stopped the raising: ``callmesh``, ``load generator`` or ``max step``."""
    first_fail = next((s for s in steps if not s["pass"]), None)
    behind = next((s for s in steps if s["generator_behind"]), None)
    if first_fail is not None:
        lag = first_fail["caller_send_lag_ms"]
        where = (
            f"at {first_fail['calls']} calls: {'; '.join(first_fail['fail_reasons'])} "
            f"(machine {first_fail['machine_busy_pct']}% busy; callers' own loop lag p99 "
            f"{lag['p99']} ms, {lag['late_pct']}% of their frames sent late)"
        )
        if first_fail["generator_behind"]:
            return "load generator", "the callers could not keep real time " + where
        return "callmesh", where
    if behind is not None:
        lag = behind["caller_send_lag_ms"]
        return "load generator", (
            f"stopped at {behind['calls']} calls although callmesh passed: the callers' own "
            f"loop lag p99 was {lag['p99']} ms ({lag['late_pct']}% of frames late)"
        )
    return "max step", f"every step passed, up to {steps[-1]['calls'] if steps else 0} calls"


def build_report(
    transport: str,
    config: dict[str, Any],
    steps: list[dict[str, Any]],
    idle: dict[str, Any],
    final: dict[str, Any] | None,
) -> dict[str, Any]:
    """The figures at the highest counted step, and whether they meet the targets.

    A step counts when it passed and the callers kept real time. One measured while the
    load generator was behind is reported but not counted, whichever way it went: callmesh
    did not get the real-time load the step names, so neither its CPU nor its latencies
    are those of that load."""
    counted = [s for s in steps if s["pass"] and not s["generator_behind"]]
    best = max(counted, key=lambda s: s["calls"]) if counted else None
    uncounted = [s["calls"] for s in steps if s["pass"] and s["generator_behind"]]
    limited_by, detail = _limit(steps)
    calls_per_core = cpu_per_call = rss_per_call = 0.0
    overhead = {"p50": 0.0, "p99": 0.0}
    overhead_check: dict[str, float] | None = None
    if best is not None and best["cores"] > 0:
        calls_per_core = best["calls"] / best["cores"]
        cpu_per_call = 100 * best["cores"] / best["calls"]
        rss_per_call = best["rss_growth_kb"] / best["calls"]
        overhead = {k: best["overhead_ms"][k] for k in ("p50", "p99")}
        check = best["node_turn_metrics_check_ms"]["latency_minus_provider_ms"]
        if check["n"]:
            overhead_check = {k: check[k] for k in ("p50", "p99", "n")}
    met = {
        "calls_per_core": calls_per_core >= TARGET_CALLS_PER_CORE,
        "overhead_p99": best is not None and overhead["p99"] <= TARGET_OVERHEAD_P99_MS,
    }
    return {
        "scenario": "capacity",
        "transport": transport,
        "config": {**config, "machine_cores": os.cpu_count()},
        "idle": idle,
        "steps": steps,
        "max_calls_passing": best["calls"] if best else 0,
        # Steps that passed while the callers were behind real time (not counted above).
        "passed_with_generator_behind": uncounted,
        "calls_per_core": round(calls_per_core, 1),
        "cpu_per_call_pct": round(cpu_per_call, 3),
        "rss_per_call_kb": round(rss_per_call, 1),
        "overhead_ms": overhead,
        # Native only: latency_ms - provider_ms of each turn_metrics frame the callers got,
        # a cross-check of the node's turn_overhead_ms histogram.
        "overhead_ms_from_turn_metrics": overhead_check,
        "limited_by": limited_by,
        "limit_detail": detail,
        "targets": {
            "calls_per_core": TARGET_CALLS_PER_CORE,
            "overhead_p99_ms": TARGET_OVERHEAD_P99_MS,
            "met": met,
        },
        "targets_met": all(met.values()),
        "callers_final": final,
        "command": "",
    }


# ---------------------------------------------------------------- table

_COLUMNS = (
    ("calls", 6),
    ("router", 7),
    ("node", 7),
    ("cores", 7),
    ("calls/core", 10),
    ("lag p50/p99", 13),
    ("ovh p50/p99", 13),
    ("turns", 6),
    ("over(cm)", 9),
    ("resp p50/p99", 13),
    ("gen p99/late%", 14),
    ("hz p99 r/n", 11),
    ("rss MB r/n", 11),
    ("wake/s r/n", 11),
    ("busy%", 6),
    ("other", 6),
    ("pass", 5),
)


def _row(s: dict[str, Any]) -> list[str]:
    lag, ovh, resp, gen = (
        s["frame_lag_ms"],
        s["overhead_ms"],
        s["response_ms"],
        s["caller_send_lag_ms"],
    )
    per_core = s["calls"] / s["cores"] if s["cores"] else 0.0
    hz = s.get("healthz_ms")
    wake = s.get("wakeups_per_s", {})
    return [
        str(s["calls"]),
        f"{s['router_cpu_cores']:.3f}",
        f"{s['node_cpu_cores']:.3f}",
        f"{s['cores']:.3f}",
        f"{per_core:.0f}",
        f"{lag['p50']:.1f}/{lag['p99']:.1f}",
        f"{ovh['p50']:.1f}/{ovh['p99']:.1f}",
        str(s["turns"]),
        f"{s['over_budget']}({s['over_budget_by_callmesh']})",
        f"{resp['p50']:.0f}/{resp['p99']:.0f}",
        f"{gen['p99']:.1f}/{gen['late_pct']:.1f}",
        "/".join(f"{hz[r]['p99']:.0f}" for r in ("router", "node")) if hz else "-",
        f"{s['rss_kb']['router'] / 1024:.0f}/{s['rss_kb']['node'] / 1024:.0f}",
        "/".join(str(wake.get(r, "-")) for r in ("router", "node")),
        f"{s['machine_busy_pct']:.0f}",
        f"{s['machine_other_cores']:.2f}",
        ("yes" if s["pass"] else "NO") + ("*" if s["generator_behind"] else ""),
    ]


def summary_table(report: dict[str, Any], *, header: bool = True) -> str:
    """Steps as a fixed-width table (CPU in cores; lag, overhead, response in ms; ``gen``:
    the load generator's own loop lag p99 and % of frames sent late, ``*`` when it fell
    behind; ``hz``: /healthz round trip p99 of the router and the node during the window,
    how responsive each event loop was; ``wake/s``: how often each event loop slept and
    was woken, a cost of its own on a virtual machine; ``other``: busy cores of the machine
    used by none of the benchmark's processes); then the verdict."""
    lines = []
    if header:
        lines.append(" ".join(name.rjust(w) for name, w in _COLUMNS))
    for s in report["steps"]:
        lines.append(" ".join(v.rjust(w) for v, (_, w) in zip(_row(s), _COLUMNS, strict=True)))
    if "calls_per_core" in report:
        ovh = report["overhead_ms"]
        lines += [
            f"{report['transport']}: {report['max_calls_passing']} calls passing -> "
            f"calls_per_core {report['calls_per_core']} (target >= {TARGET_CALLS_PER_CORE:g}), "
            f"cpu_per_call {report['cpu_per_call_pct']}%, rss_per_call "
            f"{report['rss_per_call_kb']} KB, overhead p50 {ovh['p50']} / p99 {ovh['p99']} ms "
            f"(target p99 <= {TARGET_OVERHEAD_P99_MS:g})",
            *(
                [
                    "overhead from the callers' turn_metrics (latency - provider): "
                    f"p50 {chk['p50']} / p99 {chk['p99']} ms over {chk['n']:.0f} turns"
                ]
                if (chk := report.get("overhead_ms_from_turn_metrics"))
                else []
            ),
            *(
                [
                    f"not counted: passed at {', '.join(map(str, behind))} calls while the "
                    "callers were behind real time"
                ]
                if (behind := report.get("passed_with_generator_behind"))
                else []
            ),
            f"limited by {report['limited_by']}: {report['limit_detail']}",
            "targets met" if report["targets_met"] else "targets NOT met",
        ]
    return "\n".join(lines)


# ---------------------------------------------------------------- plot


def write_svg(report: dict[str, Any], path: Path) -> None:
    """Frame-lag p99 (left axis) and router + node CPU cores (right axis) against calls."""
    steps = report["steps"]
    w, h, left, right, top, bottom = 760, 440, 70, 70, 50, 60
    pw, ph = w - left - right, h - top - bottom
    max_calls = max([s["calls"] for s in steps] + [1])
    max_lag = max([s["frame_lag_ms"]["p99"] for s in steps] + [2 * FRAME_LAG_P99_LIMIT_MS])
    max_cores = max([s["cores"] for s in steps] + [max_calls / TARGET_CALLS_PER_CORE, 0.5])
    max_lag, max_cores = max_lag * 1.1, max_cores * 1.1

    def x(calls: float) -> float:
        return left + pw * calls / max_calls

    def y_lag(ms: float) -> float:
        return top + ph * (1 - ms / max_lag)

    def y_cores(c: float) -> float:
        return top + ph * (1 - c / max_cores)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
        f'font-family="sans-serif" font-size="12">',
        f'<rect width="{w}" height="{h}" fill="white"/>',
        f'<text x="{w / 2}" y="22" text-anchor="middle" font-size="15">'
        f"callmesh capacity ({escape(report['transport'])}): "
        f"{report['calls_per_core']} calls/core, limited by {escape(report['limited_by'])}</text>",
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>',
    ]
    for i in range(6):
        frac = i / 5
        yy = top + ph * (1 - frac)
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{yy}" y2="{yy}" stroke="#eee"/>')
        out.append(
            f'<text x="{left - 6}" y="{yy + 4}" text-anchor="end" fill="#c0392b">'
            f"{max_lag * frac:.0f}</text>"
        )
        out.append(
            f'<text x="{left + pw + 6}" y="{yy + 4}" fill="#2c6fbb">{max_cores * frac:.2f}</text>'
        )
    for calls in [0, *(s["calls"] for s in steps)]:
        out.append(f'<text x="{x(calls)}" y="{top + ph + 18}" text-anchor="middle">{calls}</text>')
    out += [
        f'<text x="{left + pw / 2}" y="{h - 18}" text-anchor="middle">concurrent calls</text>',
        f'<text x="18" y="{top + ph / 2}" fill="#c0392b" text-anchor="middle" '
        f'transform="rotate(-90 18 {top + ph / 2})">frame lag p99 (ms)</text>',
        f'<text x="{w - 14}" y="{top + ph / 2}" fill="#2c6fbb" text-anchor="middle" '
        f'transform="rotate(90 {w - 14} {top + ph / 2})">router + node CPU (cores)</text>',
    ]
    limit = y_lag(FRAME_LAG_P99_LIMIT_MS)
    out.append(
        f'<line x1="{left}" x2="{left + pw}" y1="{limit}" y2="{limit}" stroke="#c0392b" '
        f'stroke-dasharray="6 4"/><text x="{left + 4}" y="{limit - 4}" fill="#c0392b">'
        f"{FRAME_LAG_P99_LIMIT_MS:g} ms limit</text>"
    )
    out.append(
        f'<line x1="{x(0)}" y1="{y_cores(0)}" x2="{x(max_calls)}" '
        f'y2="{y_cores(max_calls / TARGET_CALLS_PER_CORE)}" stroke="#2c6fbb" '
        f'stroke-dasharray="2 4"/><text x="{x(max_calls) - 4}" '
        f'y="{y_cores(max_calls / TARGET_CALLS_PER_CORE) - 6}" text-anchor="end" '
        f'fill="#2c6fbb">{TARGET_CALLS_PER_CORE:g} calls/core</text>'
    )
    for color, ys in (
        ("#c0392b", [y_lag(s["frame_lag_ms"]["p99"]) for s in steps]),
        ("#2c6fbb", [y_cores(s["cores"]) for s in steps]),
    ):
        pts = " ".join(f"{x(s['calls']):.1f},{yy:.1f}" for s, yy in zip(steps, ys, strict=True))
        out.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2"/>')
        for s, yy in zip(steps, ys, strict=True):
            fill = color if s["pass"] else "white"
            out.append(
                f'<circle cx="{x(s["calls"]):.1f}" cy="{yy:.1f}" r="4" fill="{fill}" '
                f'stroke="{color}" stroke-width="2"/>'
            )
    out.append(
        f'<text x="{left + pw - 4}" y="{top + 16}" text-anchor="end" fill="#555">'
        "filled: step passed; hollow: failed</text>"
    )
    out.append("</svg>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out) + "\n")
