"""``python -m loadtest capacity``: how many real-time voice calls one core of callmesh holds.

One router and one node as OS processes (embedded Valkey and NATS, simulated providers),
and the callers in a process of their own (:mod:`loadtest.capacity_callers`), each
streaming real-time 20 ms mu-law frames through the router over Twilio Media Streams
(``--transport twilio``) or the native protocol. The number of live calls is raised step
by step (``--steps``); each step is held ``--step-seconds`` after a ``--settle`` pause, and
measured over that window only:

- CPU of the router and the node: utime + stime from ``/proc/PID/stat``; RSS (VmRSS);
- from the node's ``/v1/status`` before and after the window, the difference of the
  histograms ``inbound_frame_lag_ms`` (how far behind the caller's own clock each frame
  was processed) and ``turn_overhead_ms`` (turn latency minus time inside providers),
  and the counter ``turns_over_budget_by_callmesh``;
- from the callers: turns, response times, errors, and their own send lateness.

A step passes when frame lag p99 < 20 ms, no turn went over budget because of callmesh,
and no caller saw an error. Raising stops after the first failing step, or when the load
generator itself fell behind real time (a limit of this machine, not of callmesh: the
callers share its cores with the router, the node, Valkey and NATS).

``calls_per_core`` is the highest passing number of calls divided by the cores the router
and the node consumed together at that load. A step measured while the callers were behind
real time is shown but not counted: callmesh did not get the load it names. Exit status 0
when it is >= 200 and the turn overhead p99 at that load is <= 5 ms; the report is written
either way.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from loadtest.capacity_callers import CallerProcess
from loadtest.capacity_report import (
    Snapshot,
    build_report,
    measure_step,
    summary_table,
    write_svg,
)
from loadtest.progress import add_progress_flag, progress_wanted
from loadtest.stats import percentiles
from localcluster.cluster import LocalCluster

DEFAULT_STEPS = (25, 50, 100, 150, 200, 250, 300, 350, 400)
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CapacityConfig:
    transport: str = "twilio"
    steps: tuple[int, ...] = DEFAULT_STEPS
    step_seconds: float = 20.0
    settle_s: float = 8.0
    ramp_s: float = 2.0
    latency_scale: float = 1.0
    seed: int = 0
    keep_going: bool = False
    # Extra environment for the router and node (e.g. OPENBLAS_NUM_THREADS=1).
    env: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.transport not in ("twilio", "native"):
            raise ValueError(f"transport must be twilio or native, not {self.transport!r}")
        if (
            not self.steps
            or any(n <= 0 for n in self.steps)
            or list(self.steps) != sorted(set(self.steps))
        ):
            raise ValueError("steps must be positive and strictly increasing")
        if self.step_seconds <= 0 or self.settle_s < 0 or self.ramp_s < 0:
            raise ValueError("step-seconds must be > 0, settle and ramp >= 0")
        if self.latency_scale < 0:
            raise ValueError("latency-scale must be >= 0")


def _env_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"not NAME=VALUE: {text!r}")
    return name, value


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of call counts: {text!r}") from None


def add_parser(sub: Any) -> None:
    d = CapacityConfig()
    p = sub.add_parser("capacity", help="calls per core: raise real-time calls until lag")
    p.add_argument("--transport", choices=("twilio", "native"), default=d.transport)
    p.add_argument("--steps", type=_int_list, default=d.steps, help="e.g. 25,50,100")
    p.add_argument("--start", type=int, help="with --step/--max instead of --steps")
    p.add_argument("--step", type=int, help="increment between --start and --max")
    p.add_argument("--max", type=int, help="last number of calls")
    p.add_argument("--step-seconds", type=float, default=d.step_seconds, help="window, s")
    p.add_argument("--settle", type=float, default=d.settle_s, help="pause before a window")
    p.add_argument("--ramp", type=float, default=d.ramp_s, help="new calls arrive over this")
    p.add_argument("--latency-scale", type=float, default=d.latency_scale)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--keep-going", action="store_true", help="do not stop at a failing step")
    p.add_argument(
        "--env",
        type=_env_pair,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the router and node processes (repeatable)",
    )
    p.add_argument("--log-dir", type=Path, help="keep every process's log here")
    p.add_argument("--json", dest="json_path", metavar="PATH", help="write the report here")
    p.add_argument("--plot", dest="plot_path", metavar="PATH", help="an SVG of lag and CPU")
    add_progress_flag(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    steps = args.steps
    if args.max is not None:
        start = args.start or args.step or args.max
        steps = tuple(range(start, args.max + 1, args.step or start))
    try:
        config = CapacityConfig(
            transport=args.transport,
            steps=steps,
            step_seconds=args.step_seconds,
            settle_s=args.settle,
            ramp_s=args.ramp,
            latency_scale=args.latency_scale,
            seed=args.seed,
            keep_going=args.keep_going,
            env=tuple(args.env),
        )
    except ValueError as exc:
        print(f"loadtest capacity: {exc}", file=sys.stderr)
        return 2
    show = progress_wanted(args.no_progress)
    report = run_capacity(config, log_dir=args.log_dir, show=show)
    report["command"] = " ".join(["python -m loadtest", *sys.argv[1:]])
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(report, indent=2) + "\n")
        print(f"report written to {args.json_path}", file=sys.stderr)
    if args.plot_path:
        write_svg(report, Path(args.plot_path))
        print(f"plot written to {args.plot_path}", file=sys.stderr)
    print(summary_table(report))
    return 0 if report["targets_met"] else 1


# ---------------------------------------------------------------- measuring processes


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _status_number(pid: int, field_name: str) -> int:
    """A numeric field of /proc/PID/status (0 if absent)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


def wakeups(pid: int) -> int:
    """Voluntary context switches of a process's main thread (its event loop's sleeps)."""
    return _status_number(pid, "voluntary_ctxt_switches")


def rss_kb(pid: int) -> int:
    return _status_number(pid, "VmRSS")


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return float(sum(values) - idle), float(sum(values))


def _get(url: str, timeout_s: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        data: bytes = resp.read()
        return data


def router_counters(url: str) -> dict[str, float]:
    """The router's counters and gauges, from its Prometheus text, by series key as the
    node's /v1/status names them (``relinks{outcome="failover"}``: no prefix, no
    ``_total``); histograms are left out."""
    return counters_from_exposition(_get(url + "/metrics").decode(), "callmesh_router")


def counters_from_exposition(text: str, prefix: str) -> dict[str, float]:
    out: dict[str, float] = {}
    scalar: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(" ")
            if kind in ("counter", "gauge"):
                scalar.add(family)
        elif line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            family = series.partition("{")[0]
            if family in scalar:
                key = series.removeprefix(prefix + "_").replace("_total{", "{", 1)
                with contextlib.suppress(ValueError):
                    out[key.removesuffix("_total")] = float(value)
    return out


@dataclass
class Watched:
    """The processes whose CPU is accounted, by role."""

    urls: tuple[str, str]  # the node's and the router's
    pids: dict[str, int] = field(default_factory=dict)

    def snapshot(self) -> Snapshot:
        node_url, router_url = self.urls
        node = json.loads(_get(node_url + "/v1/status"))
        router = router_counters(router_url)
        return Snapshot(
            at=time.monotonic(),
            cpu={role: cpu_seconds(pid) for role, pid in self.pids.items()},
            rss={role: rss_kb(pid) for role, pid in self.pids.items()},
            wakeups={role: wakeups(pid) for role, pid in self.pids.items()},
            machine=machine_busy(),
            node=node,
            router=router,
        )


# ---------------------------------------------------------------- the benchmark


def _probe(url: str) -> float:
    t0 = time.monotonic()
    try:
        _get(url + "/healthz", timeout_s=5.0)
    except OSError:
        pass  # a timeout is still a measurement: how long the process did not answer
    return (time.monotonic() - t0) * 1000


def _hold(
    seconds: float, desc: str, probe: dict[str, str] | None = None, *, show: bool = True
) -> dict[str, Any]:
    """Wait ``seconds`` (a progress bar on stderr if ``show``); with ``probe`` ({role:
    url}), meanwhile time a ``/healthz`` round trip to each every 100 ms: how responsive
    each process's event loop is, which tells the router's share of frame lag from the
    node's."""
    fmt = "{desc}: {n:.0f}/{total:.0f} s |{bar}|"
    samples: dict[str, list[float]] = {role: [] for role in probe or {}}
    with tqdm(
        total=seconds, desc=desc, bar_format=fmt, leave=False, file=sys.stderr, disable=not show
    ) as bar:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for role, url in (probe or {}).items():
                samples[role].append(_probe(url))
            time.sleep(min(0.1 if probe else 0.5, max(0.0, end - time.monotonic())))
            bar.n = round(seconds - max(0.0, end - time.monotonic()), 1)
            bar.refresh()
    return {role: percentiles(v, (50, 99)) for role, v in samples.items()}


def _idle(watched: Watched, show: bool) -> dict[str, Any]:
    """CPU and RSS of the router and the node with no call: the baseline of RSS growth."""
    _hold(1.0, "idle", show=show)
    s0 = watched.snapshot()
    _hold(2.0, "idle", show=show)
    s1 = watched.snapshot()
    wall = s1.at - s0.at
    return {
        "router_cpu_cores": round((s1.cpu["router"] - s0.cpu["router"]) / wall, 4),
        "node_cpu_cores": round((s1.cpu["node"] - s0.cpu["node"]) / wall, 4),
        "rss_kb": {"router": s1.rss["router"], "node": s1.rss["node"]},
    }


def _step(
    n: int,
    config: CapacityConfig,
    callers: CallerProcess,
    watched: Watched,
    idle_rss: Any,
    show: bool,
) -> dict[str, Any]:
    """Grow to ``n`` calls, settle, and measure one window."""
    print(f"capacity: {n} calls ({config.transport})", file=sys.stderr)
    grow = {"cmd": "grow", "calls": n, "ramp_s": config.ramp_s}
    grown = callers.command(grow, "grown", timeout_s=60.0 + 10 * config.ramp_s)
    _hold(config.settle_s, f"{n} calls: settle", show=show)
    s0 = watched.snapshot()
    callers.command({"cmd": "window"}, "window")
    node_url, router_url = watched.urls
    probes = _hold(
        config.step_seconds,
        f"{n} calls: measure",
        {"router": router_url, "node": node_url},
        show=show,
    )
    s1 = watched.snapshot()
    seen = callers.command({"cmd": "report"}, "report")
    step = measure_step(n, s0, s1, seen, idle_rss)
    step["healthz_ms"] = probes
    step["calls_failed_to_start"] = grown["failed"]
    return step


def run_capacity(
    config: CapacityConfig, *, log_dir: Path | None = None, show: bool = True
) -> dict[str, Any]:
    """The whole benchmark as one function (the test runs it small); every process is
    stopped on return, also on failure. ``show``: the progress bars of the waits on
    stderr (the per-step lines and tables are printed either way)."""
    steps: list[dict[str, Any]] = []
    env = {
        "CALLMESH_SIM_LATENCY_SCALE": str(config.latency_scale),
        "CALLMESH_LOG_LEVEL": "WARNING",
        **dict(config.env),
    }
    # force_embedded: the benchmark never touches the machine's own Redis or NATS.
    with LocalCluster(nodes=1, env=env, force_embedded=True, log_dir=log_dir) as cluster:
        router, node, logs = cluster.router, cluster.nodes[0], cluster.log_dir
        if router is None or logs is None:
            raise RuntimeError("the local cluster did not start")
        with CallerProcess(
            cluster.router_url, config.transport, config.seed, logs / "callers.log"
        ) as callers:
            watched = Watched((node.url, router.url), {"router": router.pid, "node": node.pid})
            watched.pids["callers"] = callers.pid
            for role in ("redis", "nats"):
                server = getattr(cluster.backends, role, None)
                if server is not None and server.proc is not None:
                    watched.pids[role] = server.proc.pid
            idle = _idle(watched, show)
            for n in config.steps:
                step = _step(n, config, callers, watched, idle["rss_kb"], show)
                steps.append(step)
                print(summary_table({"steps": [step]}, header=False), file=sys.stderr)
                if not config.keep_going and (not step["pass"] or step["generator_behind"]):
                    break
            final = callers.close()
    settings = {
        "steps": list(config.steps),
        "step_seconds": config.step_seconds,
        "settle_s": config.settle_s,
        "ramp_s": config.ramp_s,
        "latency_scale": config.latency_scale,
        "env": dict(config.env),
    }
    return build_report(config.transport, settings, steps, idle, final)
