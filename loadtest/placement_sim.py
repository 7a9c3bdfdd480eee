"""Placement at a size this machine cannot run: 1,000 nodes and 1,000,000 calls, simulated.

``python -m loadtest placement-sim``: a discrete-event simulation of call arrivals (Poisson)
and hang-ups (exponential durations) driven through the router's own placement code —
:class:`router.ring.BoundedLoadRing`, pinned calls that are never re-asked of the ring, and
the router's rule for a call whose node is gone (re-placed, never back on the node it left).
Cluster events (scale-out, node loss, drain/scale-in) happen at fixed points of the run.

Each event reports how many live calls moved, split into those that had to (their node was
lost or drained) and any other (must be 0), and how many live calls a router *without* pins
would have moved (a sample asked of the ring again). Loads are sampled through the run with
bounded loads and, on the same arrivals, with a plain ring. Placement time per call is
measured on the real ring; the pins' memory is measured in a real Redis-compatible server
when one can be started (``--redis-sample``).

The simulation is sans-I/O and deterministic for a seed, so its invariants are unit-tested
at small sizes (tests/test_placement_sim.py).
"""

from __future__ import annotations

import argparse
import heapq
import random
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loadtest.stats import percentiles, write_report
from router.ring import BoundedLoadRing, NoNodeAvailable

# ε for a plain ring: a bound no node reaches, so every call goes to its ring owner.
PLAIN_EPSILON = 1e9

# Events at these fractions of the arrivals: (kind, share of the nodes at that moment).
DEFAULT_SCHEDULE: tuple[tuple[float, str, float], ...] = (
    (0.30, "scale_out", 0.10),
    (0.45, "node_loss", 0.01),
    (0.60, "scale_in", 0.10),
    (0.80, "node_loss", 0.01),
)


@dataclass
class SimCluster:
    """One router's view of placement: routable nodes, live pins, loads.

    ``place`` mirrors the router: a call with a pin on a routable node goes there; any other
    call is chosen by the ring among routable nodes (excluding the node it just left) and
    pinned. Loads are exact here; the real router's lag by one heartbeat is not modelled.
    """

    ring: BoundedLoadRing
    routable: frozenset[str] = frozenset()
    pins: dict[str, str] = field(default_factory=dict)
    by_node: dict[str, set[str]] = field(default_factory=dict)
    loads: dict[str, int] = field(default_factory=dict)
    total: int = 0
    placement_ns: list[int] = field(default_factory=list)

    def add_nodes(self, nodes: list[str]) -> None:
        for n in nodes:
            self.by_node.setdefault(n, set())
            self.loads.setdefault(n, 0)
        self.routable = self.routable | frozenset(nodes)

    def place(self, call: str, *, exclude: str | None = None, timed: bool = False) -> str:
        t0 = time.perf_counter_ns() if timed else 0
        pinned = self.pins.get(call)
        if pinned is not None and pinned != exclude and pinned in self.routable:
            node = pinned
        else:
            candidates = self.routable - {exclude} if exclude in self.routable else self.routable
            node = self.ring.choose(call, candidates, self.loads)
            self._pin(call, node)
        if timed:
            self.placement_ns.append(time.perf_counter_ns() - t0)
        return node

    def _pin(self, call: str, node: str) -> None:
        old = self.pins.get(call)
        if old is not None:
            self.by_node[old].discard(call)
            self.loads[old] -= 1
            self.total -= 1
        self.pins[call] = node
        self.by_node[node].add(call)
        self.loads[node] += 1
        self.total += 1

    def hang_up(self, call: str) -> None:
        node = self.pins.pop(call, None)
        if node is not None:
            self.by_node[node].discard(call)
            self.loads[node] -= 1
            self.total -= 1

    def remove(self, nodes: list[str]) -> int:
        """Nodes lost or drained: each of their calls is re-placed elsewhere."""
        self.routable = self.routable - frozenset(nodes)
        moved = 0
        for n in nodes:
            for call in sorted(self.by_node.get(n, ())):
                self.place(call, exclude=n)
                moved += 1
            self.by_node.pop(n, None)
            self.loads.pop(n, None)
        return moved

    def load_stats(self) -> tuple[int, float]:
        values = [self.loads[n] for n in self.routable]
        return max(values, default=0), (sum(values) / len(values) if values else 0.0)


@dataclass
class SimConfig:
    nodes: int = 1000
    calls: int = 1_000_000
    mean_duration_s: float = 180.0
    calls_per_node: float = 200.0  # steady-state live calls per node at the start
    epsilon: float = 0.25
    vnodes: int = 160
    seed: int = 1
    samples: int = 100
    rebalance_sample: int = 5000  # live calls asked of the ring again at each event
    schedule: tuple[tuple[float, str, float], ...] = DEFAULT_SCHEDULE


def _node_names(start: int, count: int) -> list[str]:
    return [f"node-{i:05d}" for i in range(start, start + count)]


def _run_one(
    cfg: SimConfig, epsilon: float, *, timed: bool, progress: Callable[[int], None] | None
) -> dict[str, Any]:
    rng = random.Random(cfg.seed)
    sim = SimCluster(BoundedLoadRing(epsilon, cfg.vnodes))
    next_node = cfg.nodes
    sim.add_nodes(_node_names(0, cfg.nodes))
    rate = cfg.nodes * cfg.calls_per_node / cfg.mean_duration_s  # arrivals per second
    events = sorted(cfg.schedule)
    hangups: list[tuple[float, str]] = []
    now = 0.0
    sample_every = max(1, cfg.calls // cfg.samples)
    load_samples: list[dict[str, float]] = []
    reports: list[dict[str, Any]] = []
    peak_live = 0
    for i in range(cfg.calls):
        now += rng.expovariate(rate)
        while hangups and hangups[0][0] <= now:
            sim.hang_up(heapq.heappop(hangups)[1])
        while events and i >= events[0][0] * cfg.calls:
            _, kind, share = events.pop(0)
            reports.append(_event(sim, kind, share, now, next_node, rng, cfg.rebalance_sample))
            if kind == "scale_out":
                next_node += max(1, round(share * len(sim.routable)))
        call = f"demo/call-{i:07d}"
        try:
            sim.place(call, timed=timed)
        except NoNodeAvailable:
            continue
        heapq.heappush(hangups, (now + rng.expovariate(1 / cfg.mean_duration_s), call))
        peak_live = max(peak_live, sim.total)
        if i % sample_every == 0:
            mx, mean = sim.load_stats()
            load_samples.append({"t_s": round(now, 1), "live": sim.total, "max": mx, "mean": mean})
        if progress is not None and i % 10_000 == 0:
            progress(10_000 if i else 0)
    state_bytes = _state_bytes_per_call(sim) if timed else None
    return {
        "events": reports,
        "load_samples": load_samples,
        "peak_live_calls": peak_live,
        "sim_seconds": round(now, 1),
        "placement_us": (
            percentiles([ns / 1000 for ns in sim.placement_ns]) if sim.placement_ns else None
        ),
        "ring_rebuilds": sim.ring.rebuilds,
        "placement_state_bytes_per_call": state_bytes,
    }


def _event(
    sim: SimCluster,
    kind: str,
    share: float,
    now: float,
    next_node: int,
    rng: random.Random,
    sample: int,
) -> dict[str, Any]:
    before = dict(sim.pins)
    nodes_before = len(sim.routable)
    count = max(1, round(share * nodes_before))
    affected: list[str] = []
    t0 = time.perf_counter()
    if kind == "scale_out":
        sim.add_nodes(_node_names(next_node, count))
    elif kind in ("node_loss", "scale_in"):
        affected = rng.sample(sorted(sim.routable), count)
        sim.remove(affected)
    else:
        raise ValueError(f"unknown event {kind!r}")
    elapsed = time.perf_counter() - t0
    gone = set(affected)
    moved_required = sum(1 for c, n in before.items() if n in gone)
    moved_other = sum(1 for c, n in before.items() if n not in gone and sim.pins.get(c) != n)
    # What a router without pins would do to live calls on unaffected nodes: ask the ring.
    others = [c for c, n in before.items() if n not in gone]
    probe = rng.sample(others, min(sample, len(others)))
    ring_would_move = sum(
        1 for c in probe if sim.ring.choose(c, sim.routable, sim.loads) != before[c]
    )
    return {
        "t_s": round(now, 1),
        "kind": kind,
        "nodes_before": nodes_before,
        "nodes_after": len(sim.routable),
        "live_calls": len(before),
        "moved_required": moved_required,
        "moved_other": moved_other,
        "without_pins_would_move_pct": round(100 * ring_would_move / max(1, len(probe)), 2),
        "event_seconds": round(elapsed, 3),
    }


def _state_bytes_per_call(sim: SimCluster) -> float:
    """Bytes the placement index (pin and per-node set entries) takes per live call."""
    tracemalloc.start()
    try:
        snap0 = tracemalloc.take_snapshot()
        copy = SimCluster(sim.ring)
        copy.add_nodes(sorted(sim.routable))
        for call, node in sim.pins.items():
            copy._pin(call, node)
        snap1 = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(s.size_diff for s in snap1.compare_to(snap0, "filename"))
    return round(grown / max(1, copy.total), 1)


def simulate(cfg: SimConfig, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run bounded loads and a plain ring on the same arrivals; one report."""
    bounded = _run_one(cfg, cfg.epsilon, timed=True, progress=progress)
    plain = _run_one(cfg, PLAIN_EPSILON, timed=False, progress=progress)
    return {
        "config": {
            "nodes": cfg.nodes,
            "calls": cfg.calls,
            "mean_duration_s": cfg.mean_duration_s,
            "calls_per_node": cfg.calls_per_node,
            "epsilon": cfg.epsilon,
            "vnodes": cfg.vnodes,
            "seed": cfg.seed,
        },
        "bounded": bounded,
        "plain": plain,
        "summary": _summary(bounded, plain),
    }


def _summary(bounded: dict[str, Any], plain: dict[str, Any]) -> dict[str, Any]:
    first_event = min((e["t_s"] for e in bounded["events"]), default=float("inf"))

    def worst_ratio(run: dict[str, Any], *, before_events: bool) -> float:
        ratios = [
            s["max"] / s["mean"]
            for s in run["load_samples"]
            if s["mean"] >= 1 and (not before_events or s["t_s"] < first_event)
        ]
        return round(max(ratios, default=0.0), 3)

    # Before the first event the bound holds for every node; after a scale-out the old nodes
    # stay above it until their calls end, since live calls are never moved to new nodes.
    return {
        "moved_other_total": sum(e["moved_other"] for e in bounded["events"]),
        "max_over_mean_bounded": worst_ratio(bounded, before_events=False),
        "max_over_mean_plain": worst_ratio(plain, before_events=False),
        "max_over_mean_bounded_before_events": worst_ratio(bounded, before_events=True),
        "max_over_mean_plain_before_events": worst_ratio(plain, before_events=True),
        "placement_us_p50": (bounded["placement_us"] or {}).get("p50"),
        "placement_us_p99": (bounded["placement_us"] or {}).get("p99"),
    }


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "placement-sim", help="1,000 nodes and 1,000,000 calls through the router's placement"
    )
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--calls", type=int, default=1_000_000)
    p.add_argument("--mean-duration", type=float, default=180.0, help="s per call")
    p.add_argument("--calls-per-node", type=float, default=200.0)
    p.add_argument("--epsilon", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--redis-sample", type=int, default=20_000, help="pins written; 0: skip")
    p.add_argument("--json", dest="json_path")
    p.add_argument("--svg", dest="svg_path", help="load over time, bounded vs plain")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from loadtest.placement_sim_report import pins_in_redis, progress_bar, write_svg

    cfg = SimConfig(
        nodes=args.nodes,
        calls=args.calls,
        mean_duration_s=args.mean_duration,
        calls_per_node=args.calls_per_node,
        epsilon=args.epsilon,
        seed=args.seed,
    )
    with progress_bar(2 * cfg.calls) as advance:
        report = simulate(cfg, progress=advance)
    if args.redis_sample:
        report["pins_in_redis"] = pins_in_redis(
            args.redis_sample, report["bounded"]["peak_live_calls"]
        )
    if args.svg_path:
        write_svg(report, args.svg_path)
    write_report(report, args.json_path)
    return 0 if report["summary"]["moved_other_total"] == 0 else 1
