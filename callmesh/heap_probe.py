"""Where a process's memory goes, on demand: a diagnostic for memory that stays.

Set ``CALLMESH_HEAP_PROBE_DIR`` (the ``heap_probe_dir`` setting) and the router, a node or
the effects worker answers two signals: ``SIGUSR1`` (a light probe) and ``SIGUSR2`` (a
traced one). The first ``SIGUSR2`` starts tracing allocations (:mod:`tracemalloc`, which
slows the process down from then on: never in production; not from start-up, which it
would slow past the cluster's readiness bound). On every probe the process runs a full
garbage collection, then writes into that directory:

- ``{process}-{pid}-{n}.tracemalloc`` (while tracing): the snapshot
  (``tracemalloc.Snapshot.load``);
- ``{process}-{pid}-{n}.json``: what the collection freed, the objects the collector
  tracks by type (count), tracemalloc's traced and peak bytes, and where the process's
  memory sits below Python: pymalloc's arenas (``sys._debugmallocstats``, which has none to
  show while tracing) and glibc's
  heap, in use and free (``mallinfo2``). RSS that grows while the objects and the traced
  bytes do not is memory the allocators keep (fragmentation), not a leak of ours.

Two traced probes taken N calls apart, diffed (:func:`diff`), name the source lines whose
memory stayed (the first snapshot is empty: everything the later one holds was allocated
since, and is still alive), and the censuses name the kinds of object that did.
``python -m loadtest soak --heap-probe DIR`` takes one at every 1,000 completed calls and
reports what grew per call. The collection first is the point: what only waits for the
collector is not a leak, and what survives a full collection is.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import re
import signal
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

# Frames kept per allocation: enough to see past a container's constructor to its owner.
FRAMES = 8
LIGHT_SIGNAL = signal.SIGUSR1
TRACED_SIGNAL = signal.SIGUSR2
# Types in a census: the most numerous ones.
CENSUS_TYPES = 60


class HeapProbe:
    """Writes a probe on either signal once :meth:`install`-ed (the first traced one
    starts tracing)."""

    def __init__(self, directory: Path, process: str) -> None:
        self.directory = directory
        self.process = process
        self.taken = 0

    def install(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        # A plain handler runs between bytecodes on the main thread, where the event loop
        # runs: no call is mid-way through a frame of ours when the snapshot is taken.
        signal.signal(LIGHT_SIGNAL, self._on_signal)
        signal.signal(TRACED_SIGNAL, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.write(traced=signum == TRACED_SIGNAL)

    def write(self, *, traced: bool) -> Path:
        """Collect, then write the census (and the snapshot, ``traced``); returns the
        probe's path without its suffix."""
        self.taken += 1
        stem = self.directory / f"{self.process}-{os.getpid()}-{self.taken:03d}"
        t0 = time.perf_counter()
        if traced and not tracemalloc.is_tracing():
            tracemalloc.start(FRAMES)
        freed, garbage = collect_garbage()
        census = Counter(type(o).__qualname__ for o in gc.get_objects())
        if tracemalloc.is_tracing():
            snap = tracemalloc.take_snapshot().filter_traces(
                (tracemalloc.Filter(False, tracemalloc.__file__),)
            )
            snap.dump(f"{stem}.tracemalloc")
        traced_bytes, peak = tracemalloc.get_traced_memory()
        info = {
            "process": self.process,
            "pid": os.getpid(),
            "n": self.taken,
            "gc_freed": freed,
            # What only the collector could free (reference cycles), by type: per-call
            # objects here wait for a collection, and pile up in between.
            "gc_freed_types": dict(garbage.most_common(CENSUS_TYPES)),
            "gc_garbage": len(gc.garbage),
            "traced_bytes": traced_bytes,
            "peak_bytes": peak,
            "objects": sum(census.values()),
            "census": dict(census.most_common(CENSUS_TYPES)),
            "pymalloc": pymalloc_stats(),
            "malloc": malloc_stats(),
            "probe_ms": round((time.perf_counter() - t0) * 1000, 1),
        }
        Path(f"{stem}.json").write_text(json.dumps(info))
        return stem


def collect_garbage() -> tuple[int, Counter[str]]:
    """A full collection; how many objects it freed, and their types (module.name)."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        freed = gc.collect()
        kinds = Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage)
    finally:
        gc.garbage.clear()
        gc.set_debug(0)
    # Saved objects were not freed; now nothing holds them, this collection frees them.
    gc.collect()
    return freed, kinds


# struct mallinfo2, in order (glibc >= 2.33).
_MALLINFO_FIELDS: tuple[str, ...] = ("arena", "ordblks", "smblks", "hblks", "hblkhd")
_MALLINFO_FIELDS += ("usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in _MALLINFO_FIELDS]


def malloc_stats() -> dict[str, int]:
    """glibc's heap: ``heap_bytes`` obtained with brk, ``in_use_bytes`` and
    ``free_bytes`` of it, ``mmapped_bytes`` ({} where mallinfo2 is missing)."""
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return {}
    fn.restype = _Mallinfo2
    info = fn()
    return {
        "heap_bytes": info.arena,
        "in_use_bytes": info.uordblks,
        "free_bytes": info.fordblks,
        "mmapped_bytes": info.hblkhd,
    }


_PYMALLOC_LINES = {
    "arenas_current": r"# arenas allocated current\s*=\s*([\d,]+)",
    "arenas_highwater": r"# arenas highwater mark\s*=\s*([\d,]+)",
    "arena_bytes": r"\d+ arenas \* \d+ bytes/arena\s*=\s*([\d,]+)",
    "free_pool_bytes": r"# bytes in available blocks\s*=\s*([\d,]+)",
    "used_block_bytes": r"# bytes in allocated blocks\s*=\s*([\d,]+)",
}


def pymalloc_stats() -> dict[str, int]:
    """pymalloc's arenas, from ``sys._debugmallocstats`` (which prints on the C stderr)."""
    with tempfile.TemporaryFile("w+") as out:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(out.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        out.seek(0)
        text = out.read()
    stats = {}
    for name, pattern in _PYMALLOC_LINES.items():
        found = re.search(pattern, text)
        if found:
            stats[name] = int(found.group(1).replace(",", ""))
    return stats


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
                # The allocating line first, then its callers.
                "where": [f"{f.filename}:{f.lineno}" for f in reversed(stat.traceback)],
            }
        )
    return out


def census_growth(before: Path, after: Path, *, top: int = 15) -> dict[str, int]:
    """Object types whose count grew most between two censuses (``.json`` probes)."""
    old = json.loads(before.read_text())["census"]
    new = json.loads(after.read_text())["census"]
    grown = {t: n - old.get(t, 0) for t, n in new.items()}
    return dict(sorted(((t, d) for t, d in grown.items() if d > 0), key=lambda x: -x[1])[:top])
