"""Where a process's memory goes, on demand: a diagnostic for memory that stays.

Set ``CALLMESH_HEAP_PROBE_DIR`` (the ``heap_probe_dir`` setting) and the router, a node or
the effects worker traces its allocations from start-up (:mod:`tracemalloc`, which slows
the process down: never in production). On every ``SIGUSR2`` it runs a full garbage
collection, then writes into that directory:

- ``{process}-{pid}-{n}.tracemalloc``: the snapshot (``tracemalloc.Snapshot.load``);
- ``{process}-{pid}-{n}.json``: what the collection freed, the objects the collector
  tracks by type (count), and tracemalloc's traced and peak bytes.

Two probes taken N calls apart, diffed (:func:`diff`), name the source lines whose memory
stayed, and the census names the kinds of object that did. ``python -m loadtest soak
--heap-probe DIR`` takes one at every 1,000 completed calls and reports the growth sites.
The collection first is the point: what only waits for the collector is not a leak, and
what survives a full collection is.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

# Frames kept per allocation: enough to see past a container's constructor to its owner.
FRAMES = 8
PROBE_SIGNAL = signal.SIGUSR2
# Types in a census: the most numerous ones.
CENSUS_TYPES = 60


class HeapProbe:
    """Writes a probe on ``PROBE_SIGNAL``; :meth:`install` starts tracing."""

    def __init__(self, directory: Path, process: str) -> None:
        self.directory = directory
        self.process = process
        self.taken = 0

    def install(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if not tracemalloc.is_tracing():
            tracemalloc.start(FRAMES)
        # A plain handler runs between bytecodes on the main thread, where the event loop
        # runs: no call is mid-way through a frame of ours when the snapshot is taken.
        signal.signal(PROBE_SIGNAL, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.write()

    def write(self) -> Path:
        """Collect, then write the snapshot and the census; returns the snapshot's path."""
        self.taken += 1
        stem = self.directory / f"{self.process}-{os.getpid()}-{self.taken:03d}"
        t0 = time.perf_counter()
        freed = gc.collect()
        census = Counter(type(o).__qualname__ for o in gc.get_objects())
        snap = tracemalloc.take_snapshot().filter_traces(
            (tracemalloc.Filter(False, tracemalloc.__file__),)
        )
        traced, peak = tracemalloc.get_traced_memory()
        snap.dump(f"{stem}.tracemalloc")
        info = {
            "process": self.process,
            "pid": os.getpid(),
            "n": self.taken,
            "gc_freed": freed,
            "gc_garbage": len(gc.garbage),
            "traced_bytes": traced,
            "peak_bytes": peak,
            "objects": sum(census.values()),
            "census": dict(census.most_common(CENSUS_TYPES)),
            "probe_ms": round((time.perf_counter() - t0) * 1000, 1),
        }
        Path(f"{stem}.json").write_text(json.dumps(info))
        return Path(f"{stem}.tracemalloc")


def install_from_settings(values: Any, process: str) -> HeapProbe | None:
    """Install the probe when ``heap_probe_dir`` is set (None otherwise)."""
    directory = values.get("heap_probe_dir") if hasattr(values, "get") else None
    if not directory:
        return None
    probe = HeapProbe(Path(directory), process)
    probe.install()
    return probe


def diff(before: Path, after: Path, *, top: int = 15) -> list[dict[str, Any]]:
    """The allocation sites (by line, with their callers) that grew most from ``before``
    to ``after``: ``size_diff`` bytes and ``count_diff`` blocks each."""
    old = tracemalloc.Snapshot.load(str(before))
    new = tracemalloc.Snapshot.load(str(after))
    out = []
    for stat in new.compare_to(old, "traceback")[:top]:
        if stat.size_diff <= 0:
            break
        out.append(
            {
                "size_diff": stat.size_diff,
                "count_diff": stat.count_diff,
                "where": [f"{f.filename}:{f.lineno}" for f in stat.traceback][:FRAMES],
            }
        )
    return out


def census_growth(before: Path, after: Path, *, top: int = 15) -> dict[str, int]:
    """Object types whose count grew most between two censuses (``.json`` probes)."""
    old = json.loads(before.read_text())["census"]
    new = json.loads(after.read_text())["census"]
    grown = {t: n - old.get(t, 0) for t, n in new.items()}
    return dict(sorted(((t, d) for t, d in grown.items() if d > 0), key=lambda x: -x[1])[:top])
