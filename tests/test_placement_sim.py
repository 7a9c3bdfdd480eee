"""The placement simulation's invariants at a small size: sticky calls, bounded loads."""

from __future__ import annotations

import math

import pytest

from loadtest.placement_sim import PLAIN_EPSILON, SimCluster, SimConfig, simulate
from router.ring import BoundedLoadRing

SMALL = SimConfig(nodes=40, calls=20_000, mean_duration_s=60.0, calls_per_node=50.0, samples=40)


@pytest.fixture(scope="module")
def report() -> dict:
    return simulate(SMALL)


def test_only_calls_of_lost_or_drained_nodes_move(report: dict) -> None:
    events = report["bounded"]["events"]
    assert [e["kind"] for e in events] == ["scale_out", "node_loss", "scale_in", "node_loss"]
    for e in events:
        assert e["moved_other"] == 0, e
        if e["kind"] == "scale_out":
            assert e["moved_required"] == 0
            assert e["nodes_after"] > e["nodes_before"]
        else:
            assert e["moved_required"] > 0
            assert e["nodes_after"] < e["nodes_before"]
    # Without pins a router asking the ring again would move live calls on a scale-out.
    assert events[0]["without_pins_would_move_pct"] > 0


def test_bounded_loads_beat_a_plain_ring_before_any_event(report: dict) -> None:
    s = report["summary"]
    assert s["max_over_mean_bounded_before_events"] < s["max_over_mean_plain_before_events"]


def test_same_seed_same_run() -> None:
    small = SimConfig(nodes=10, calls=2_000, mean_duration_s=30.0, calls_per_node=20.0)

    def outcome(report: dict) -> list:
        # Everything but wall-clock timings.
        return [
            [{k: v for k, v in e.items() if k != "event_seconds"} for e in report[run]["events"]]
            + report[run]["load_samples"]
            + [report[run]["peak_live_calls"]]
            for run in ("bounded", "plain")
        ]

    assert outcome(simulate(small)) == outcome(simulate(small))


def test_every_placement_respects_the_bound() -> None:
    # Without events, no node ever exceeds ceil((1+ε)(calls+1)/nodes) at placement time.
    sim = SimCluster(BoundedLoadRing(0.25, vnodes=40))
    nodes = [f"n{i}" for i in range(7)]
    sim.add_nodes(nodes)
    for i in range(3000):
        node = sim.place(f"c{i}")
        assert sim.loads[node] <= math.ceil(1.25 * sim.total / len(nodes)) + 1
        if i % 3 == 0:
            sim.hang_up(f"c{i // 2}")


def test_a_pinned_call_returns_to_its_node_and_a_lost_nodes_calls_leave_it() -> None:
    sim = SimCluster(BoundedLoadRing(PLAIN_EPSILON, vnodes=20))
    sim.add_nodes(["a", "b", "c"])
    placed = {f"c{i}": sim.place(f"c{i}") for i in range(300)}
    sim.add_nodes(["d"])
    assert all(sim.place(c) == n for c, n in placed.items())  # reconnects keep their node
    victim = "a"
    moved = sim.remove([victim])
    assert moved == sum(1 for n in placed.values() if n == victim)
    assert victim not in sim.pins.values()
    assert sim.total == 300
