"""``python -m loadtest run``: N concurrent scripted calls through the router."""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from loadtest.callers import CallResult, scripted_call
from loadtest.html_report import write_html
from loadtest.progress import LiveProgress, add_progress_flag, progress_wanted
from loadtest.stats import percentiles, run_meta, write_report
from loadtest.timeline import Timeline
from localcluster.cluster import LocalCluster


def add_parser(sub: Any) -> None:
    p = sub.add_parser("run", help="concurrent scripted calls; JSON report")
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--router", help="use a running cluster instead of starting one")
    p.add_argument(
        "--latency-scale",
        type=float,
        default=1.0,
        help="scale of the simulated providers' latency (local cluster only)",
    )
    p.add_argument("--think", type=float, default=0.0, help="mean pause between turns, s")
    p.add_argument("--json", dest="json_path", help="write the report here")
    p.add_argument("--html", dest="html_path", help="write a self-contained HTML report here")
    add_progress_flag(p)
    p.set_defaults(func=main)


async def drive(
    router_url: str,
    calls: int,
    turns: int,
    think_s: float,
    timeline: Timeline | None = None,
    progress: bool = False,
) -> list[CallResult]:
    prefix = uuid.uuid4().hex[:6]
    timeline = Timeline() if timeline is None else timeline

    async def one(i: int) -> CallResult:
        return await scripted_call(
            router_url, f"lt-{prefix}-{i}", turns, seed=i, think_s=think_s, timeline=timeline
        )

    async with LiveProgress(timeline, "run", total_turns=calls * turns, enabled=progress):
        return list(await asyncio.gather(*(one(i) for i in range(calls))))


def report(results: list[CallResult], elapsed_s: float) -> dict[str, Any]:
    replies = [r for res in results for r in res.replies]
    return {
        "scenario": "run",
        "calls": len(results),
        "completed_calls": sum(1 for r in results if r.completed and not r.errors),
        "turns": len(replies),
        "errors": sum(len(r.errors) for r in results),
        "error_samples": [e for r in results for e in r.errors][:5],
        "duplicate_replies": sum(r.duplicates for r in results),
        "turn_latency_ms": percentiles([r.latency_ms for r in replies]),
        "node_overhead_ms": percentiles([float(r.metrics.get("overhead_ms", 0)) for r in replies]),
        "elapsed_s": round(elapsed_s, 2),
    }


def main(args: argparse.Namespace) -> int:
    env = {"CALLMESH_SIM_LATENCY_SCALE": str(args.latency_scale), "CALLMESH_LOG_LEVEL": "WARNING"}
    ctx = nullcontext(None) if args.router else LocalCluster(nodes=args.nodes, env=env)
    with ctx as cluster:
        url = args.router or cluster.router_url  # type: ignore[union-attr]
        t0 = time.monotonic()
        timeline = Timeline()
        show = progress_wanted(args.no_progress)
        results = asyncio.run(drive(url, args.calls, args.turns, args.think, timeline, show))
        rep = report(results, time.monotonic() - t0)
    rep.update(timeline.report())
    rep["meta"] = run_meta()
    write_report(rep, args.json_path)
    if args.html_path:
        write_html(rep, Path(args.html_path))
    return 0 if rep["errors"] == 0 else 1
