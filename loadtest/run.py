"""``python -m loadtest run``: N concurrent text-mode calls at human pacing, through several
routers and nodes, with the callers in processes of their own.

A run has three phases, each started once every caller process finished the one before,
so that all ``--calls`` calls are live together:

1. **open**: calls connect (through the routers in turn), ``start`` and hear their greeting,
   ``--ramp`` new calls a second;
2. **talk**: every call says ``--turns`` scripted lines, a line every ``--think`` x
   uniform(0.5, 1.5) seconds (5-15 s by default: human pacing), the first within
   ``--think`` seconds of the phase's start; the calls stay up afterwards;
3. **hang up**: every call hangs up, ``--ramp`` calls a second (calls leave as they came).

The cluster is measured with no call (baseline), with every call open and idle (after
phase 1) and with every call open after its turns (after phase 2): RSS per call of the
routers and the nodes, open file descriptors of every process, and the Valkey's memory
and keys per call. Every turn checkpoints (the node's contract); turn latency is measured
by the caller (line sent → first reply audio), ``overhead_ms`` is the node's own share of
it (its latency minus time in providers), ``end_to_end_overhead_ms`` the caller's latency
minus time in providers (routers, links and the callers' own lateness included).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from loadtest.html_report import write_html
from loadtest.progress import LiveProgress, add_progress_flag, progress_wanted
from loadtest.run_cluster import ClusterProbe, Responsiveness, cluster_env, per_call
from loadtest.stats import percentiles, run_meta, write_report
from loadtest.timeline import Timeline
from localcluster.cluster import LocalCluster

# Calls per caller process: each holds one WebSocket per call on one event loop.
CALLS_PER_PROCESS = 2500
PHASE_TIMEOUT_S = 3600.0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("run", help="concurrent text-mode calls at human pacing; JSON report")
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--nodes", type=int, help="conversation nodes (default: by --calls)")
    p.add_argument("--routers", type=int, help="routers (default: by --calls)")
    p.add_argument("--router", help="use a running cluster (router URLs, comma-separated)")
    p.add_argument(
        "--latency-scale",
        type=float,
        default=1.0,
        help="scale of the simulated providers' latency (local cluster only)",
    )
    p.add_argument(
        "--think",
        type=float,
        default=10.0,
        help="mean pause between a reply and the next line, s (x uniform 0.5-1.5)",
    )
    p.add_argument("--ramp", type=float, default=100.0, help="new calls a second")
    p.add_argument("--settle", type=float, default=5.0, help="pause before measuring, s")
    p.add_argument(
        "--caller-processes", type=int, help=f"default: one per {CALLS_PER_PROCESS} calls"
    )
    p.add_argument(
        "--tts-chunk-ms", type=int, default=500, help="simulated voice audio per frame, ms"
    )
    p.add_argument("--log-dir", type=Path, help="keep every process's log here")
    p.add_argument("--json", dest="json_path", help="write the report here")
    p.add_argument("--html", dest="html_path", help="write a self-contained HTML report here")
    add_progress_flag(p)
    p.set_defaults(func=main)


def default_nodes(calls: int) -> int:
    """Enough nodes that none holds more than 2,500 calls; at least two."""
    return max(2, math.ceil(calls / 2500))


def default_routers(calls: int) -> int:
    """Enough routers that none holds more than 5,000 client connections; at least two
    from 1,000 calls on (the router's default cap is 10,000 connections)."""
    return max(1 if calls < 1000 else 2, math.ceil(calls / 5000))


class CallerChild:
    """One ``python -m loadtest.run_callers`` process: JSON commands in, JSON lines out."""

    def __init__(self, routers: list[str], first: int, calls: int, log_path: Path) -> None:
        self.argv = [
            sys.executable,
            "-m",
            "loadtest.run_callers",
            "--routers",
            ",".join(routers),
            "--first",
            str(first),
            "--calls",
            str(calls),
        ]
        self.calls = calls
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None
        self.pid = 0
        self._answers: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None

    async def start(self, timeline: Timeline) -> None:
        with open(self.log_path, "ab") as log:  # noqa: ASYNC230 (opened once, before the load)
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                limit=64 * 1024 * 1024,  # the final report holds every latency
            )
        self._reader = asyncio.create_task(self._read(timeline), name=f"callers:{self.argv[6]}")
        self.pid = int((await self.expect("hello", 60.0))["pid"])

    async def _read(self, timeline: Timeline) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            msg: dict[str, Any] = json.loads(line)
            if msg.get("event") == "tick":
                for at, latency in msg["turns"]:
                    timeline.turn(latency, at=at)
                for at in msg["errors"]:
                    timeline.error(at=at)
                for at in msg["up"]:
                    timeline.call_started(at=at)
                for at in msg["down"]:
                    timeline.call_ended(at=at)
            else:
                self._answers.put_nowait(msg)
        self._answers.put_nowait({"event": "exited"})

    async def expect(self, event: str, timeout_s: float) -> dict[str, Any]:
        async with asyncio.timeout(timeout_s):
            while True:
                msg = await self._answers.get()
                if msg.get("event") == event:
                    return msg
                if msg.get("event") == "exited":
                    tail = self.log_path.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"a caller process exited:\n{tail}")

    async def command(self, cmd: dict[str, Any]) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        await self.proc.stdin.drain()

    async def aclose(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(30):
                    await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)


def split(calls: int, processes: int) -> list[tuple[int, int]]:
    """(first call, calls) of each caller process, as even as can be."""
    out, first = [], 0
    for k in range(processes):
        n = calls // processes + (1 if k < calls % processes else 0)
        if n:
            out.append((first, n))
        first += n
    return out


async def drive(
    args: argparse.Namespace,
    routers: list[str],
    probe: ClusterProbe | None,
    timeline: Timeline,
    log_dir: Path,
) -> dict[str, Any]:
    """The three phases across the caller processes; the cluster measured between them."""
    processes = args.caller_processes or math.ceil(args.calls / CALLS_PER_PROCESS)
    children = [
        CallerChild(routers, first, n, log_dir / f"callers-{k}.log")
        for k, (first, n) in enumerate(split(args.calls, max(1, processes)))
    ]
    samples: dict[str, Any] = {}
    phases: dict[str, float] = {}
    livez: dict[str, Any] = {}
    watch = Responsiveness(probe.urls) if probe is not None else None
    show = progress_wanted(args.no_progress)
    total = args.calls * args.turns
    try:
        await asyncio.gather(*(c.start(timeline) for c in children))
        if probe is not None:
            probe.pids["callers"] = [c.pid for c in children]
            samples["baseline"] = await asyncio.to_thread(probe.sample)
        async with LiveProgress(timeline, "run", total_turns=total, enabled=show):
            t0 = time.monotonic()
            if watch is not None:
                watch.start()
            for c in children:
                await c.command({"cmd": "open", "rate": args.ramp / len(children)})
            await asyncio.gather(*(c.expect("opened", PHASE_TIMEOUT_S) for c in children))
            phases["open_s"] = round(time.monotonic() - t0, 1)
            if watch is not None:
                livez["open"] = watch.stop()
            if probe is not None:
                await asyncio.sleep(args.settle)
                samples["idle"] = await asyncio.to_thread(probe.sample)
            t0 = time.monotonic()
            if watch is not None:
                watch.start()
            talk = {"cmd": "talk", "turns": args.turns, "think": args.think}
            for c in children:
                await c.command(talk)
            await asyncio.gather(*(c.expect("talked", PHASE_TIMEOUT_S) for c in children))
            phases["talk_s"] = round(time.monotonic() - t0, 1)
            if watch is not None:
                livez["talk"] = watch.stop()
            if probe is not None:
                await asyncio.sleep(args.settle)
                samples["after_turns"] = await asyncio.to_thread(probe.sample)
            t0 = time.monotonic()
            if watch is not None:
                watch.start()
            for c in children:
                await c.command({"cmd": "hangup", "rate": args.ramp / len(children)})
            ended = await asyncio.gather(*(c.expect("ended", PHASE_TIMEOUT_S) for c in children))
            phases["hangup_s"] = round(time.monotonic() - t0, 1)
            if watch is not None:
                livez["hangup"] = watch.stop()
    finally:
        if watch is not None:
            watch.stop()
        await asyncio.gather(*(c.aclose() for c in children), return_exceptions=True)
    return {
        "ended": ended,
        "samples": samples,
        "phases": phases,
        "livez_ms": livez,
        "processes": len(children),
    }


def report(args: argparse.Namespace, run: dict[str, Any], elapsed_s: float) -> dict[str, Any]:
    ended: list[dict[str, Any]] = run["ended"]

    def cat(key: str) -> list[float]:
        return [v for e in ended for v in e[key]]

    out: dict[str, Any] = {
        "scenario": "run",
        "calls": args.calls,
        "completed_calls": sum(int(e["completed"]) for e in ended),
        "turns": sum(int(e["turns"]) for e in ended),
        "errors": sum(int(e["errors"]) for e in ended),
        "error_samples": [s for e in ended for s in e["error_samples"]][:10],
        "duplicate_replies": sum(int(e["duplicates"]) for e in ended),
        "turn_latency_ms": percentiles(cat("latency_ms")),
        "overhead_ms": percentiles(cat("node_overhead_ms")),
        "end_to_end_overhead_ms": percentiles(cat("e2e_overhead_ms")),
        # The node's share under its older name (bench/scenarios.py reads it).
        "node_overhead_ms": percentiles(cat("node_overhead_ms")),
        "elapsed_s": round(elapsed_s, 2),
        "phases_s": run["phases"],
        # /livez answer times of routers and nodes in each phase (p99; every percentile
        # under resource_samples): how far behind their event loops ran.
        "livez_p99_ms": {
            f"{phase}_{role}": p["p99"]
            for phase, roles in run["livez_ms"].items()
            for role, p in roles.items()
        },
        "settings": {
            "turns": args.turns,
            "think_s": args.think,
            "ramp_per_s": args.ramp,
            "latency_scale": args.latency_scale,
            "tts_chunk_ms": args.tts_chunk_ms,
            "nodes": args.nodes,
            "routers": args.routers,
            "caller_processes": run["processes"],
        },
    }
    samples = run["samples"]
    if "baseline" in samples:
        out.update(per_call(samples, args.calls, args.calls * args.turns))
        out["resource_samples"] = {**samples, "livez_ms": run["livez_ms"]}
    return out


def main(args: argparse.Namespace) -> int:
    args.nodes = args.nodes or default_nodes(args.calls)
    args.routers = args.routers or default_routers(args.calls)
    timeline = Timeline()
    t0 = time.monotonic()
    if args.router:
        routers = [u for u in args.router.split(",") if u]
        log_dir = args.log_dir or Path(os.environ.get("TMPDIR", "/tmp"))
        run = asyncio.run(drive(args, routers, None, timeline, log_dir))
    else:
        env = cluster_env(args.calls, args.latency_scale, args.tts_chunk_ms)
        with LocalCluster(
            nodes=args.nodes, routers=args.routers, env=env, log_dir=args.log_dir
        ) as cluster:
            assert cluster.log_dir is not None
            probe = ClusterProbe.of(cluster)
            run = asyncio.run(drive(args, cluster.router_urls, probe, timeline, cluster.log_dir))
    rep = report(args, run, time.monotonic() - t0)
    rep.update(timeline.report())
    rep["meta"] = run_meta()
    write_report(rep, args.json_path)
    if args.html_path:
        write_html(rep, Path(args.html_path))
    ok = rep["errors"] == 0 and rep["completed_calls"] == rep["calls"]
    return 0 if ok else 1
