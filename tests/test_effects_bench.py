"""The ``effects`` benchmark's scenario, small: real processes, a CRM outage, a node kill.

The same function the benchmark runs (:func:`loadtest.effects_bench.run_scenario`), with
ten calls and a two-second outage; no timing assertions, only the delivery targets. Once
on single servers, once on a Redis Cluster and a NATS cluster.
"""

from __future__ import annotations

import pytest

from loadtest.effects_audit import Booking, Ledger, score
from loadtest.effects_bench import run_scenario
from loadtest.effects_run import EffectsScenario
from tests.backend_modes import MODES, cluster_kwargs

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("mode", MODES)
def test_bookings_survive_a_crm_outage_and_a_node_kill_exactly_once(mode: str) -> None:
    scenario = EffectsScenario(
        calls=10,
        crm_outage_s=2.0,
        ramp_s=3.0,
        think_s=0.3,
        latency_scale=0.5,
        settle_timeout_s=60.0,
        **cluster_kwargs(mode),
    )
    report = run_scenario(scenario)
    assert report["call_errors"] == 0, report["error_samples"]
    assert report["calls_booked"] == 10
    assert report["effects_expected"] == 10
    assert report["effects_delivered"] == report["effects_expected"]
    assert report["effects_duplicated"] == 0
    assert report["effects_unexpected"] == 0
    assert report["effects_dead_lettered"] == 0
    # The scenario did what it claims: the CRM went down and a node was killed.
    assert report["outage"]["start_s"] is not None
    assert report["kill"] is not None and report["kill"]["node"].startswith("node-")
    assert report["worker_exit_codes"] == [0, 0]
    assert all(report["pass"].values()), report["pass"]


def test_score_counts_duplicates_losses_and_strays() -> None:
    """The audit would see a failure: a key applied twice, an expected key never applied
    (published, or only confirmed to the caller), and a key nobody expected."""
    ledger = Ledger(
        published={"c1:5:0": 100.0, "c2:5:0": 100.0, "c3:5:0": 101.0},
        applied={
            "c1:5:0": {"applied": 2, "first_applied_at": 100.5},
            "c3:5:0": {"applied": 1, "first_applied_at": 103.0},
            "stray:1:0": {"applied": 1, "first_applied_at": 104.0},
        },
        dead_lettered=1,
    )
    bookings = [
        Booking("c1:5:0", True, 100.2),
        Booking("c4:5:0", True, 100.0),  # told "booked", never published: an outbox loss
    ]
    figures = score(ledger, bookings, outage=(100.5, 102.0))
    assert figures["effects_expected"] == 4
    assert figures["effects_delivered"] == 2
    assert figures["effects_duplicated"] == 1
    assert figures["effects_unexpected"] == 1
    assert figures["effects_dead_lettered"] == 1
    assert figures["confirmed_not_published"] == 1
    assert figures["effects_missing_sample"] == ["c2:5:0", "c4:5:0"]
    assert figures["effects_published_during_outage"] == 1
    assert figures["delivery_lag_ms"]["max"] == 2000.0
    assert figures["delivery_lag_from_reply_ms"]["n"] == 1
