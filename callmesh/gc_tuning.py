"""The cyclic garbage collector in a process that moves real-time audio.

CPython collects generation 0 whenever container allocations outnumber deallocations by
700, and every collection of an older generation walks every object in it. A node at a
few hundred calls allocates frames, dicts and futures fast enough for dozens of young
collections a second, and its old generations hold everything the process keeps for
good (modules, the tokenizer's tables, provider clients), so the older collections
stopped the event loop for 2 to 7 ms: a pause every call on the node feels at once.

:func:`tune` is run once the process has started. It collects, then *freezes* what is
alive (moved to a permanent generation that collections never walk: it lives as long as
the process anyway) and raises the generation-0 threshold, so young collections run a
tenth as often over more objects each (their cost follows the objects, not the count of
collections) and older ones are rarer still. Reference counting still frees almost
everything at once; only cycles wait.

Under steady load a young collection walks far more than the threshold: CPython 3.11
counts every deallocation against the allocations, old objects' included, so a node whose
turns free about as many old objects as they make collects rarely, over tens of thousands
of young objects (10-25 ms at 2,500 text calls; docs/benchmarks.md, Scale). A lower
threshold shortens those but promotes more to the old generation, whose full collections
then take longer still. :class:`GcPauses` times every collection into the
``gc_pause_ms`` histogram and counts them per generation, so the effect is visible in
``/metrics`` rather than assumed.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from callmesh.metric_names import GC_COLLECTIONS, GC_PAUSE_MS
from callmesh.telemetry import Metrics

DEFAULT_GEN0_THRESHOLD = 7000
"""Ten times CPython's default: measured (``loadtest capacity``) to cut the collector's
share of a loaded node's CPU without lengthening the pauses that remain."""


class GcPauses:
    """Times each collection (``gc.callbacks``) into ``metrics``."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause_ms = (time.perf_counter() - self._started) * 1000
        self._metrics.observe(GC_PAUSE_MS, pause_ms)
        self._metrics.inc(GC_COLLECTIONS, generation=str(info.get("generation", 0)))

    def install(self) -> None:
        if self not in gc.callbacks:
            gc.callbacks.append(self)

    def remove(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)


def tune(metrics: Metrics, gen0_threshold: int = DEFAULT_GEN0_THRESHOLD) -> GcPauses:
    """Freeze what start-up left alive, set the thresholds and start timing pauses.
    ``gen0_threshold`` 0 keeps CPython's defaults (pauses are still timed)."""
    gc.collect()
    gc.freeze()
    if gen0_threshold > 0:
        _, gen1, gen2 = gc.get_threshold()
        gc.set_threshold(gen0_threshold, gen1, gen2)
    pauses = GcPauses(metrics)
    pauses.install()
    return pauses
