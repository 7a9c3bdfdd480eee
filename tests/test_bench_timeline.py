"""The time series behind the reports, the live progress display, and the soak's slopes,
all driven by a fake clock or synthetic samples (no cluster)."""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools

import pytest
from rich.console import Console

from loadtest.progress import LiveProgress, progress_wanted, render
from loadtest.soak import check, fit
from loadtest.stats import percentile, percentiles, slope
from loadtest.timeline import MAX_EVENTS, MAX_TEXT, Timeline, latency_histogram


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_turns_errors_and_live_calls_fall_in_their_second() -> None:
    clock = Clock()
    tl = Timeline(clock=clock)
    for _ in range(3):
        tl.call_started()
    clock.now = 1000.2
    tl.turn(100.0)
    tl.turn(300.0)
    tl.turn(200.0)
    clock.now = 1002.7  # nothing happens in second 1
    tl.turn(50.0)
    tl.error()
    tl.call_ended()
    series = tl.series()
    assert series["t_s"] == [0, 1, 2]
    assert series["turns"] == [3, 0, 1]
    assert series["latency_p50_ms"] == [200.0, 0.0, 50.0]
    assert series["latency_p99_ms"] == [300.0, 0.0, 50.0]
    assert series["errors"] == [0, 0, 1]
    assert series["calls_up"] == [3, 3, 2]  # carried through the quiet second
    assert (tl.turns, tl.errors, tl.calls_up) == (4, 1, 2)
    assert tl.latency_p(99) == 300.0 and tl.latency_p(50) == 100.0


def test_turns_per_second_is_over_the_last_whole_seconds() -> None:
    clock = Clock()
    tl = Timeline(clock=clock)
    for second in range(10):
        clock.now = 1000.0 + second + 0.5
        for _ in range(second):
            tl.turn(1.0)
    clock.now = 1010.1
    assert tl.turns_per_s(window_s=5) == (5 + 6 + 7 + 8 + 9) / 5


def test_fault_events_are_relative_to_the_start_sorted_and_bounded() -> None:
    clock = Clock()
    tl = Timeline(clock=clock)
    tl.fault("drain", "node-2", "SIGTERM", at=1012.5)
    tl.fault("kill", "n" * 1000, at=1003.0)
    events = tl.events()
    assert [(e["kind"], e["t_s"]) for e in events] == [("kill", 3.0), ("drain", 12.5)]
    assert len(str(events[0]["target"])) == MAX_TEXT
    assert tl.last_fault() is not None and tl.last_fault().kind == "kill"  # type: ignore[union-attr]
    for _ in range(MAX_EVENTS + 5):
        tl.fault("kill", "node-1")
    assert len(tl.events()) == MAX_EVENTS


def test_the_histogram_covers_every_value_on_log_bins() -> None:
    values = [0.5, 3.0, 3.1, 40.0, 400.0, 2500.0]
    hist = latency_histogram(values)
    assert sum(hist["counts"]) == len(values)
    edges = hist["edges_ms"]
    assert edges[0] <= 0.5 and edges[-1] >= 2500.0
    ratio = 10 ** (1 / 8)
    assert all(b / a == pytest.approx(ratio, rel=1e-2) for a, b in itertools.pairwise(edges))
    assert latency_histogram([]) == {"edges_ms": [], "counts": []}


def test_percentiles_keep_the_harness_rank_rule() -> None:
    # rank = round(p/100 * n + 0.5) - 1, as every earlier report computed it.
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0 and percentile(values, 99) == 100.0
    assert percentiles(values)["p95"] == 96.0
    assert percentile([], 99) == 0.0


def test_the_progress_frame_shows_calls_rate_p99_errors_and_the_last_fault() -> None:
    clock = Clock()
    tl = Timeline(clock=clock)
    tl.call_started()
    tl.call_started()
    for latency in (100.0, 200.0, 900.0):
        tl.turn(latency)
    tl.error()
    tl.fault("kill", "node-[bold]2", at=1001.0)
    clock.now = 1065.0
    out = io.StringIO()
    Console(file=out, width=120, color_system=None).print(render(tl, "chaos", total_turns=10))
    text = out.getvalue()
    assert "chaos" in text and "3/10 turns" in text and "1:05" in text
    assert "calls up 2" in text and "p99 so far 900 ms" in text and "errors 1" in text
    assert "last fault +1.0s kill node-[bold]2" in text  # a name is never markup


def test_progress_is_off_when_stderr_is_not_a_terminal_or_when_asked() -> None:
    assert not progress_wanted(False, io.StringIO())
    assert not progress_wanted(True, io.StringIO())


async def test_the_live_display_starts_and_stops_its_task() -> None:
    stream = io.StringIO()
    async with LiveProgress(Timeline(), "run", total_turns=4, enabled=True, stream=stream):
        await asyncio.sleep(0)
        assert any(t.get_name() == "loadtest-progress" for t in asyncio.all_tasks())
    assert not any(t.get_name() == "loadtest-progress" for t in asyncio.all_tasks())
    assert "0/4 turns" in stream.getvalue()


def test_least_squares_slope() -> None:
    assert slope([0, 1, 2, 3], [10, 12, 14, 16]) == pytest.approx(2.0)
    assert slope([0, 1, 2, 3], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert slope([5, 5], [1, 2]) == 0.0 and slope([1], [1]) == 0.0


def test_soak_slopes_are_bytes_per_completed_call_after_the_warm_up() -> None:
    samples = []
    for i in range(20):
        calls = 100 * i
        samples.append(
            {
                "t_s": 5.0 * i,
                "completed_calls": calls,
                # The router jumps by 5 MB during the warm-up, then grows 1.2 KB a call.
                "router_rss_b": 50e6 + (5e6 if i >= 2 else 0) + 1200 * calls,
                "node-1_rss_b": 100e6 + 30 * calls,
                "node-2_rss_b": 100e6 + 60 * calls,
                "redis_used_memory_b": 1e6 + 1000 * calls,
                "redis_keys": 2 * calls,
            }
        )
    fitted = fit(samples, warmup_s=10.0)
    assert fitted["fitted_samples"] == 18 and fitted["fitted_calls"] == 1700
    slopes = fitted["slopes_bytes_per_call"]
    assert slopes["router"] == pytest.approx(1200)
    assert slopes["node-1"] == pytest.approx(30) and slopes["nodes_max"] == pytest.approx(60)
    assert slopes["redis"] == pytest.approx(1000)
    assert fitted["redis_keys_per_call"] == pytest.approx(2)


def test_soak_refuses_arguments_that_make_no_soak() -> None:
    good = argparse.Namespace(
        minutes=1.0,
        concurrency=5,
        sample_every=5.0,
        turns=2,
        nodes=2,
        callers=None,
        heap_probe_every=1000,
        warmup=None,
        ended_call_retention_s=None,
    )
    assert check(good) is None
    assert check(argparse.Namespace(**{**vars(good), "ended_call_retention_s": 30})) is None
    for change in (
        {"minutes": 0},
        {"concurrency": 0},
        {"sample_every": 0.0},
        {"turns": 0},
        {"callers": -1},
        {"heap_probe_every": 0},
        {"ended_call_retention_s": 0},
        {"ended_call_retention_s": 45},  # the warm-up (12 s), 45 s and 3 samples > 1 minute
    ):
        assert check(argparse.Namespace(**{**vars(good), **change})) is not None
