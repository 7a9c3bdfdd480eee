"""Garbage-collector tuning of service processes: thresholds set, pauses measured."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from callmesh import config as cfg
from callmesh import gc_tuning
from callmesh.telemetry import Metrics


@pytest.fixture
def restored_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.set_threshold(*thresholds)
    gc.unfreeze()


def test_tune_freezes_sets_the_threshold_and_times_each_collection(restored_gc: None) -> None:
    metrics = Metrics("test")
    pauses = gc_tuning.tune(metrics, 5000)
    try:
        assert gc.get_threshold()[0] == 5000
        assert gc.get_freeze_count() > 0  # start-up's objects are out of the collector's way
        gc.collect(0)
        gc.collect()
        hist = metrics.histograms["gc_pause_ms"]
        assert sum(hist.counts) >= 2 and hist.total > 0
        gen0, gen2 = (metrics.get("gc_collections", generation=g) for g in ("0", "2"))
        assert gen0 >= 1 and gen2 >= 1
        assert "test_gc_pause_ms_bucket" in metrics.render()
    finally:
        pauses.remove()
    before = sum(metrics.histograms["gc_pause_ms"].counts)
    gc.collect()
    assert sum(metrics.histograms["gc_pause_ms"].counts) == before  # removed: no longer timed


def test_zero_keeps_cpythons_thresholds(restored_gc: None) -> None:
    gc.set_threshold(700, 10, 10)
    gc_tuning.tune(Metrics("test"), 0).remove()
    assert gc.get_threshold() == (700, 10, 10)


def test_threshold_comes_from_the_environment_and_is_checked() -> None:
    node = cfg.build(cfg.NodeConfig, {"CALLMESH_GC_GEN0_THRESHOLD": "20000"})
    assert node.gc_gen0_threshold == 20000
    router = cfg.build(cfg.RouterConfig, {})
    assert router.gc_gen0_threshold == gc_tuning.DEFAULT_GEN0_THRESHOLD
    with pytest.raises(cfg.ConfigError):
        cfg.build(cfg.RouterConfig, {"CALLMESH_GC_GEN0_THRESHOLD": "-1"})
    with pytest.raises(cfg.ConfigError):
        cfg.build(cfg.NodeConfig, {"CALLMESH_GC_GEN0_THRESHOLD": "lots"})
