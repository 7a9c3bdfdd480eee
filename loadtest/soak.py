"""``python -m loadtest soak``: what an ended call leaves behind.

``--concurrency`` callers place short scripted calls back to back for ``--minutes``
through a local cluster. Every ``--sample-every`` seconds the RSS of the router and of
each node (VmRSS) and Redis's ``used_memory`` and key count are sampled against the number
of calls completed so far. The growth per completed call is the least-squares slope of
each series over the completed calls, fitted after a warm-up (``--warmup``, by default the
first fifth of the run: allocators, caches and pools fill once, and that is not a leak).

Target: no process grows more than 100 bytes per completed call (``pass``). An ended
call keeps what replay needs in Redis for the retention period, so Redis grows for that
long: it is judged only with ``--ended-call-retention-s``, which shortens the retention
for the run and fits Redis's growth over what comes after it (``redis_steady``): once
the first ended calls expire, Redis must be flat too. At the end its keys are counted by
kind, with their sizes and times to live (``redis_keys_by_kind``). ``--effects-worker``
adds an effects worker (effects logged, no CRM) whose RSS is sampled too; ``--heap-probe
DIR`` traces the processes' allocations and names what grew between 1,000-call marks
(``heap_growth``, :mod:`loadtest.soak_probes`).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import nats
import redis.asyncio as aioredis
from nats.js import JetStreamContext

from loadtest.callers import scripted_call
from loadtest.html_report import write_html
from loadtest.progress import LiveProgress, add_progress_flag, progress_wanted
from loadtest.soak_probes import HeapProbes, event_log_sizes, redis_census
from loadtest.stats import percentiles, run_meta, slope, write_report
from loadtest.timeline import Timeline
from localcluster.cluster import LocalCluster, Proc
from localcluster.servers import free_port

TARGET_BYTES_PER_CALL = 100.0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("soak", help="calls back to back for N minutes; memory slopes per call")
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--concurrency", type=int, default=50, help="callers placing calls")
    p.add_argument(
        "--callers",
        type=int,
        help="distinct caller identities the calls cycle through (default: one per calling "
        "loop, who calls back to back; 0: a new caller every call, each of whom Redis "
        "remembers for the customer history's lifetime)",
    )
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--turns", type=int, default=2, help="turns per call")
    p.add_argument("--latency-scale", type=float, default=1.0, help="simulated providers")
    p.add_argument("--sample-every", type=float, default=5.0, help="s between samples")
    p.add_argument("--warmup", type=float, help="s left out of the fit (default: a fifth)")
    p.add_argument(
        "--ended-call-retention-s",
        type=int,
        metavar="S",
        help="keep an ended call's checkpoint S s (CALLMESH_ENDED_CALL_RETENTION_S) and judge "
        "Redis's growth after the warm-up and S more seconds: ended calls must expire as fast "
        "as they come (not with --callers 0: each new caller's history is kept)",
    )
    p.add_argument("--json", dest="json_path", help="write the report here")
    p.add_argument("--html", dest="html_path", help="write a self-contained HTML report here")
    p.add_argument(
        "--effects-worker", action="store_true", help="run an effects worker and sample it too"
    )
    p.add_argument(
        "--heap-probe",
        metavar="DIR",
        help="trace allocations in every process (slow) and diff probes at call marks",
    )
    p.add_argument(
        "--heap-probe-every", type=int, default=1000, help="completed calls between probes"
    )
    p.add_argument(
        "--heap-probe-trace",
        action="store_true",
        help="trace allocations from the first probe on, to name the lines (slow)",
    )
    p.add_argument(
        "--heap-probe-of",
        default="router",
        help="comma-separated processes to probe (router, node-1, ..., effects-worker): "
        "tracing slows each one down",
    )
    add_progress_flag(p)
    p.set_defaults(func=main)


def rss_bytes(pid: int) -> int:
    """Resident set size of a live process, from /proc/PID/status (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


class Soak:
    def __init__(
        self,
        args: argparse.Namespace,
        cluster: LocalCluster,
        worker: Proc | None = None,
        probes: HeapProbes | None = None,
    ) -> None:
        self.args = args
        self.cluster = cluster
        self.worker = worker
        self.probes = probes
        self.redis_keys_by_kind: dict[str, dict[str, float]] = {}
        self.timeline = Timeline()
        self.calls = 0
        self.completed = 0
        self.errors: list[str] = []
        self.latencies: list[float] = []
        self.samples: list[dict[str, float]] = []
        self._ids = itertools.count()
        self._prefix = uuid.uuid4().hex[:6]

    def caller_of(self, n: int, i: int) -> str | None:
        """Who places call ``i``, the next of calling loop ``n`` (None: a caller of its own)."""
        if self.args.callers is None:
            return f"soak-{self._prefix}-caller-{n}"
        if self.args.callers == 0:
            return None
        return f"soak-{self._prefix}-caller-{i % self.args.callers}"

    async def caller(self, n: int, deadline: float) -> None:
        while time.monotonic() < deadline:
            i = next(self._ids)
            who = self.caller_of(n, i)
            res = await scripted_call(
                self.cluster.router_url,
                f"soak-{self._prefix}-{i}",
                self.args.turns,
                seed=i,
                timeline=self.timeline,
                caller=who,
            )
            # Figures only: this process runs for minutes and must not hold every reply.
            self.calls += 1
            self.completed += 1 if res.completed and not res.errors else 0
            self.errors += res.errors
            self.latencies += [r.latency_ms for r in res.replies]

    async def sample(self, redis: aioredis.Redis, js: JetStreamContext) -> None:
        info = await redis.info("memory")
        row: dict[str, float] = {
            "t_s": round(self.timeline.elapsed_s(), 2),
            "completed_calls": self.completed,
            "router_rss_b": rss_bytes(self.cluster.router.pid) if self.cluster.router else 0,
            "redis_used_memory_b": int(info["used_memory"]),
            "redis_keys": int(await redis.dbsize()),
        }
        row.update(await event_log_sizes(js))
        for name, pid in self.pids().items():
            row[f"{name}_rss_b"] = rss_bytes(pid)
        self.samples.append(row)
        if self.probes is not None and self.probes.due(self.completed):
            probed = set(self.args.heap_probe_of.split(","))
            pids = {name: pid for name, pid in self.pids().items() if name in probed}
            await self.probes.take(self.completed, row["t_s"], pids)

    def pids(self) -> dict[str, int]:
        """The sampled processes by name: the router, each node, the effects worker."""
        procs = [self.cluster.router, *self.cluster.nodes, self.worker]
        return {p.name: p.pid for p in procs if p is not None}

    async def sampler(self, stop: asyncio.Event) -> None:
        redis = aioredis.Redis.from_url(self.cluster.redis_url)
        nc = await nats.connect(self.cluster.nats_url)
        try:
            js = nc.jetstream()
            while True:
                await self.sample(redis, js)
                try:
                    await asyncio.wait_for(stop.wait(), self.args.sample_every)
                    await self.sample(redis, js)  # the state at the end of the run
                    self.redis_keys_by_kind = await redis_census(redis)
                    return
                except TimeoutError:
                    continue
        finally:
            await redis.aclose()
            await nc.close()

    async def run(self) -> None:
        deadline = time.monotonic() + self.args.minutes * 60
        stop = asyncio.Event()
        sampler = asyncio.create_task(self.sampler(stop), name="soak-sampler")
        show = progress_wanted(self.args.no_progress)
        try:
            async with (
                LiveProgress(self.timeline, "soak", enabled=show),
                asyncio.TaskGroup() as tg,
            ):
                for n in range(self.args.concurrency):
                    tg.create_task(self.caller(n, deadline), name=f"soak-caller-{n}")
        finally:
            stop.set()
            await asyncio.gather(sampler, return_exceptions=True)


def fit(samples: list[dict[str, float]], warmup_s: float) -> dict[str, Any]:
    """Bytes (or keys) per completed call of every sampled series, by least squares over
    the samples after ``warmup_s``."""
    kept = [s for s in samples if s["t_s"] >= warmup_s] or samples
    x = [float(s["completed_calls"]) for s in kept]
    names = [k for k in (kept[0] if kept else {}) if k not in ("t_s", "completed_calls")]
    per_call = {k: round(slope(x, [float(s[k]) for s in kept]), 2) for k in names}
    rss = {k.removesuffix("_rss_b"): v for k, v in per_call.items() if k.endswith("_rss_b")}
    nodes = [v for k, v in rss.items() if k.startswith("node")]
    return {
        "fit_from_calls": int(x[0]) if x else 0,
        "fitted_samples": len(kept),
        "fitted_calls": int(x[-1] - x[0]) if len(x) > 1 else 0,
        "slopes_bytes_per_call": {
            **rss,
            "nodes_max": max(nodes, default=0.0),
            "redis": per_call.get("redis_used_memory_b", 0.0),
        },
        "redis_keys_per_call": per_call.get("redis_keys", 0.0),
        # What a call adds to JetStream: its event log, and its side effects.
        "jetstream_per_call": {
            k: per_call.get(k, 0.0)
            for k in (
                "event_log_bytes",
                "event_log_messages",
                "effect_stream_bytes",
                "effect_stream_messages",
            )
        },
    }


def redis_steady(samples: list[dict[str, float]], from_s: float) -> dict[str, Any]:
    """Redis's growth per completed call once ended calls expire as fast as calls end:
    fitted over the samples from ``from_s`` (the warm-up and one retention period) on."""
    kept = [s for s in samples if s["t_s"] >= from_s]
    x = [float(s["completed_calls"]) for s in kept]
    if len(kept) < 3 or x[-1] <= x[0]:
        return {"from_s": round(from_s, 1), "fitted_samples": len(kept), "bytes_per_call": None}
    return {
        "from_s": round(from_s, 1),
        "fitted_samples": len(kept),
        "fitted_calls": int(x[-1] - x[0]),
        "bytes_per_call": round(slope(x, [float(s["redis_used_memory_b"]) for s in kept]), 2),
        "keys_per_call": round(slope(x, [float(s["redis_keys"]) for s in kept]), 4),
    }


def _growth_kib(samples: list[dict[str, float]], key: str) -> list[float]:
    return [round((s[key] - samples[0][key]) / 1024, 1) for s in samples]


def build_report(soak: Soak, args: argparse.Namespace, elapsed_s: float) -> dict[str, Any]:
    warmup = args.warmup if args.warmup is not None else args.minutes * 60 / 5
    fitted = fit(soak.samples, warmup)
    slopes = fitted["slopes_bytes_per_call"]
    rss = [k for k in (soak.samples[0] if soak.samples else {}) if k.endswith("_rss_b")]
    rep: dict[str, Any] = {
        "scenario": "soak",
        "minutes": args.minutes,
        "concurrency": args.concurrency,
        "nodes": args.nodes,
        "turns_per_call": args.turns,
        "callers": args.concurrency if args.callers is None else args.callers,
        "calls": soak.calls,
        "completed_calls": soak.completed,
        "calls_per_s": round(soak.completed / max(elapsed_s, 1e-9), 1),
        "errors": len(soak.errors),
        "error_samples": soak.errors[:5],
        "turn_latency_ms": percentiles(soak.latencies),
        "warmup_s": round(warmup, 1),
        **fitted,
        "slopes_kib_per_1000_calls": {k: round(v * 1000 / 1024, 2) for k, v in slopes.items()},
        "target_bytes_per_call": TARGET_BYTES_PER_CALL,
        "pass": {
            "router_flat": slopes.get("router", 0.0) <= TARGET_BYTES_PER_CALL,
            "nodes_flat": slopes["nodes_max"] <= TARGET_BYTES_PER_CALL,
            **(
                {"effects_worker_flat": slopes["effects-worker"] <= TARGET_BYTES_PER_CALL}
                if "effects-worker" in slopes
                else {}
            ),
        },
        "redis_keys_by_kind": soak.redis_keys_by_kind,
        "elapsed_s": round(elapsed_s, 2),
        "samples": soak.samples,
        # Growth since the first sample: absolute sizes (50-120 MB) would flatten a leak of
        # a few hundred KB into a straight line.
        "resource_samples": {
            "unit": "growth since the first sample, KiB",
            "completed_calls": [s["completed_calls"] for s in soak.samples],
            "marks": [{"t_s": fitted["fit_from_calls"], "kind": "fit starts", "target": ""}],
            "series": {
                **{f"{k.removesuffix('_rss_b')} RSS": _growth_kib(soak.samples, k) for k in rss},
                "Redis used_memory": _growth_kib(soak.samples, "redis_used_memory_b"),
            },
        },
    }
    if args.ended_call_retention_s is not None:
        steady = redis_steady(soak.samples, warmup + args.ended_call_retention_s)
        rep["redis_steady"] = steady
        if args.callers != 0:  # a new caller every call: each one's history stays, by design
            grew = steady["bytes_per_call"]
            rep["pass"]["redis_flat"] = grew is not None and grew <= TARGET_BYTES_PER_CALL
    if soak.probes is not None:
        rep["heap_growth"] = soak.probes.report(warmup)
    rep.update(soak.timeline.report())
    return rep


def check(args: argparse.Namespace) -> str | None:
    """Why the arguments cannot make a soak (None when they can)."""
    if not 0 < args.minutes <= 24 * 60:
        return "--minutes must be in (0, 1440]"
    if not 1 <= args.concurrency <= 10_000:
        return "--concurrency must be in [1, 10000]"
    if not 0.1 <= args.sample_every <= 600 or args.turns < 1 or args.nodes < 1:
        return "--sample-every must be in [0.1, 600] s, --turns and --nodes at least 1"
    if args.callers is not None and args.callers < 0:
        return "--callers must be at least 0"
    if args.heap_probe_every < 1:
        return "--heap-probe-every must be at least 1"
    if (retention := args.ended_call_retention_s) is not None:
        warmup = args.warmup if args.warmup is not None else args.minutes * 60 / 5
        if retention < 1:
            return "--ended-call-retention-s must be at least 1"
        if warmup + retention + 3 * args.sample_every > args.minutes * 60:
            return (
                "--ended-call-retention-s leaves too little of the run to judge Redis: the "
                "warm-up, the retention and three samples must fit in --minutes"
            )
    return None


def start_worker(cluster: LocalCluster, env: dict[str, str]) -> Proc:
    """An effects worker on the cluster's NATS, logging effects (no CRM), started before
    the first call so that its RSS is sampled from the start."""
    port = free_port()
    argv = [sys.executable, "-m", "callmesh", "effects-worker", "--nats", cluster.nats_url]
    argv += ["--host", "127.0.0.1", "--port", str(port)]
    log = (cluster.log_dir or Path("/tmp")) / "effects-worker.log"
    worker = Proc("effects-worker", argv, port, log, {**os.environ, **env})
    worker.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{worker.url}/readyz", timeout=1) as resp:
                if resp.status == 200:
                    return worker
        except OSError:
            pass
        if not worker.alive():
            break
        time.sleep(0.2)
    worker.stop()
    raise RuntimeError(f"the effects worker did not become ready; log in {log}")


def main(args: argparse.Namespace) -> int:
    problem = check(args)
    if problem is not None:
        print(f"loadtest soak: {problem}", file=sys.stderr)
        return 2
    env = {"CALLMESH_SIM_LATENCY_SCALE": str(args.latency_scale), "CALLMESH_LOG_LEVEL": "WARNING"}
    if args.ended_call_retention_s is not None:
        env["CALLMESH_ENDED_CALL_RETENTION_S"] = str(args.ended_call_retention_s)
    probes = (
        HeapProbes(
            Path(args.heap_probe).resolve(), args.heap_probe_every, traced=args.heap_probe_trace
        )
        if args.heap_probe
        else None
    )
    if probes is not None:
        env.update(probes.env())
    with LocalCluster(nodes=args.nodes, env=env) as cluster:
        worker = start_worker(cluster, env) if args.effects_worker else None
        try:
            soak = Soak(args, cluster, worker, probes)
            t0 = time.monotonic()
            asyncio.run(soak.run())
            rep = build_report(soak, args, time.monotonic() - t0)
        finally:
            if worker is not None:
                worker.stop()
    rep["meta"] = run_meta()
    write_report(rep, args.json_path)
    if args.html_path:
        write_html(rep, Path(args.html_path))
    return 0 if rep["errors"] == 0 and all(rep["pass"].values()) else 1
