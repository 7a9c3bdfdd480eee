"""``python -m loadtest effects``: bookings through a CRM outage and a node kill.

A real local cluster (router + ``--nodes`` nodes as processes, embedded Valkey and NATS),
the fake CRM as its own process, applying every request (no de-duplication, so an effect
applied twice is counted, not hidden behind a 409), and ``--workers`` ``callmesh
effects-worker`` processes with their default delivery policy pointed at it.

``--calls`` callers arrive over ``--ramp`` seconds and each books a cleaning (the
loadtest booking script: name, service, day, time, "Yes, book it"). When ``--outage-at``
of all turns are done the CRM goes down (503s, or dropped connections with
``--outage-mode abort``) for ``--crm-outage``; halfway through the outage the node with
the most live calls is SIGKILLed. After the last call the benchmark waits (at most
``--settle-timeout``) until the CRM has applied every expected effect and the workers'
consumer holds nothing more that could be delivered, then audits the result
(:mod:`loadtest.effects_audit`). Target: delivered == expected, none duplicated, none
dead-lettered, every call booked; exit status 0 only then.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

from events.worker_config import WorkerConfig
from loadtest.effects_procs import start_crm_and_workers
from loadtest.effects_run import EffectsRun, EffectsScenario, say
from loadtest.stats import write_report
from localcluster.cluster import LocalCluster

_POLICY_SHOWN = ("max_deliveries", "backoff_base_s", "backoff_max_s", "ack_wait_s", "deadline_s")


def duration(text: str) -> float:
    """``10s``, ``500ms``, ``2m`` or plain seconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|m)?\s*", text)
    if m is None:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 10s, 500ms)")
    return float(m[1]) * {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[m[2]]


def add_parser(sub: Any) -> None:
    d = EffectsScenario()
    p = sub.add_parser("effects", help="bookings through a CRM outage and a node kill")
    p.add_argument("--calls", type=int, default=d.calls)
    p.add_argument("--nodes", type=int, default=d.nodes)
    p.add_argument("--workers", type=int, default=d.workers, help="effects-worker processes")
    p.add_argument("--crm-outage", type=duration, default=d.crm_outage_s, metavar="DURATION")
    p.add_argument("--outage-mode", choices=("503", "abort"), default=d.outage_mode)
    p.add_argument("--outage-at", type=float, default=d.outage_at, help="fraction of turns")
    p.add_argument("--no-kill", dest="kill", action="store_false", help="keep every node")
    p.add_argument("--ramp", type=duration, default=d.ramp_s, help="callers arrive over this")
    p.add_argument("--think", type=float, default=d.think_s, help="mean pause between turns, s")
    p.add_argument("--latency-scale", type=float, default=d.latency_scale)
    p.add_argument("--tts-chunk-ms", type=int, default=d.tts_chunk_ms)
    p.add_argument("--settle-timeout", type=duration, default=d.settle_timeout_s)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--log-dir", type=Path, help="keep every process's log here")
    p.add_argument("--json", dest="json_path", metavar="PATH", help="write the report here")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        scenario = EffectsScenario(
            calls=args.calls,
            nodes=args.nodes,
            workers=args.workers,
            crm_outage_s=args.crm_outage,
            outage_mode=args.outage_mode,
            outage_at=args.outage_at,
            kill=args.kill,
            ramp_s=args.ramp,
            think_s=args.think,
            latency_scale=args.latency_scale,
            tts_chunk_ms=args.tts_chunk_ms,
            settle_timeout_s=args.settle_timeout,
            seed=args.seed,
        )
    except ValueError as exc:
        print(f"loadtest effects: {exc}", file=sys.stderr)
        return 2
    report = run_scenario(scenario, log_dir=args.log_dir)
    write_report(report, args.json_path)
    print(summary(report), file=sys.stderr)
    return 0 if all(report["pass"].values()) else 1


def run_scenario(scenario: EffectsScenario, *, log_dir: Path | None = None) -> dict[str, Any]:
    """Start everything, run the calls, audit; the whole benchmark as one function (the
    test runs it small). Every process is stopped on return, also on failure."""
    started = time.monotonic()
    env = {
        "CALLMESH_SIM_LATENCY_SCALE": str(scenario.latency_scale),
        "CALLMESH_TTS_CHUNK_MS": str(scenario.tts_chunk_ms),
        "CALLMESH_LOG_LEVEL": "WARNING",
    }
    say(f"starting Valkey, NATS, a router and {scenario.nodes} nodes")
    # force_embedded: the benchmark never touches the machine's own Redis or NATS.
    with ExitStack() as stack:
        cluster = stack.enter_context(
            LocalCluster(
                nodes=scenario.nodes,
                env=env,
                force_embedded=True,
                log_dir=log_dir,
                redis_cluster=scenario.redis_cluster,
                nats_cluster=scenario.nats_cluster,
            )
        )
        logs = cluster.log_dir
        if logs is None:
            raise RuntimeError("the local cluster has no log directory")
        crm, workers = start_crm_and_workers(
            stack, cluster, scenario.workers, nats_cluster=scenario.nats_cluster
        )
        setup_s = time.monotonic() - started
        say(f"cluster, fake CRM and {len(workers)} workers up in {setup_s:.1f}s; logs in {logs}")
        report = asyncio.run(EffectsRun(scenario, cluster, crm, workers).go())
        report["durations_s"]["setup"] = round(setup_s, 2)
        # The workers run the production defaults: the lag is what an operator would see.
        policy = asdict(WorkerConfig())
        report["worker_policy"] = {k: policy[k] for k in _POLICY_SHOWN}
        # A worker must drain and exit 0 on SIGTERM; a crash would also explain lost effects.
        report["worker_exit_codes"] = [w.stop() for w in workers]
        report["logs"] = str(logs) if log_dir is not None else None
    report["durations_s"]["total"] = round(time.monotonic() - started, 2)
    return report


def summary(rep: dict[str, Any]) -> str:
    lag, lag_r = rep["delivery_lag_ms"], rep["delivery_lag_from_reply_ms"]
    kill = rep["kill"] or {}
    return "\n".join(
        [
            f"effects bench: {rep['calls']} calls, {rep['calls_booked']} booked, "
            f"{rep['call_errors']} call errors; CRM {rep['outage']['mode']} "
            f"+{rep['outage']['start_s']}s..+{rep['outage']['end_s']}s; killed "
            f"{kill.get('node', '-')} at +{kill.get('at_s', '-')}s "
            f"({kill.get('calls_failed_over', 0)} calls failed over)",
            f"effects: expected {rep['effects_expected']}, delivered {rep['effects_delivered']}, "
            f"duplicated {rep['effects_duplicated']}, dead-lettered "
            f"{rep['effects_dead_lettered']} ({rep['effects_published_during_outage']} "
            "published during the outage)",
            f"delivery lag ms (from publish): p50 {lag['p50']:.0f}, p99 {lag['p99']:.0f}, "
            f"max {lag['max']:.0f}; from the caller's reply: p50 {lag_r['p50']:.0f}, "
            f"p99 {lag_r['p99']:.0f}",
            f"durations s: {rep['durations_s']}",
            "pass: " + ", ".join(f"{k}={v}" for k, v in rep["pass"].items()),
        ]
    )
