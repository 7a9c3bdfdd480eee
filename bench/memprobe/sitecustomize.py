"""Memory probe for ``bench/call_memory.py``: loaded into every process started with this
directory on ``PYTHONPATH`` and ``CALLMESH_MEMPROBE_DIR`` set (never in production).

On SIGUSR2 the process collects garbage, then writes to that directory a count of live
objects by type (``{pid}-{n}.json``) and, when tracing, a tracemalloc snapshot
(``{pid}-{n}.snap``). With ``CALLMESH_MEMPROBE_TRACE=FRAMES`` tracing starts at the first
signal (start-up stays fast), so later snapshots hold only what was allocated since. The
handler runs between bytecodes of the main thread: the event loop waits while it writes.
"""

from __future__ import annotations

import os

_DIR = os.environ.get("CALLMESH_MEMPROBE_DIR")

if _DIR:
    import collections
    import gc
    import json
    import signal
    import sys
    import tracemalloc

    _count = [0]
    _TRACE = int(os.environ.get("CALLMESH_MEMPROBE_TRACE", "0"))

    def _dump(signum: int, frame: object) -> None:
        _count[0] += 1
        base = os.path.join(_DIR, f"{os.getpid()}-{_count[0]}")
        gc.collect()
        types: collections.Counter[str] = collections.Counter()
        sizes: collections.Counter[str] = collections.Counter()
        for obj in gc.get_objects():
            name = type(obj).__module__ + "." + type(obj).__qualname__
            types[name] += 1
            try:
                sizes[name] += sys.getsizeof(obj)
            except TypeError:
                pass
        tasks = 0
        try:
            import asyncio

            loop = asyncio.get_event_loop_policy().get_event_loop()
            tasks = len(asyncio.all_tasks(loop))
        except Exception:
            pass
        with open(base + ".json.tmp", "w") as f:
            json.dump(
                {
                    "argv": sys.argv,
                    "tasks": tasks,
                    "types": dict(types),
                    "sizes": dict(sizes),
                    "traced": tracemalloc.get_traced_memory() if tracemalloc.is_tracing() else None,
                },
                f,
            )
        if tracemalloc.is_tracing():
            tracemalloc.take_snapshot().dump(base + ".snap")
        if _TRACE and not tracemalloc.is_tracing():
            tracemalloc.start(_TRACE)
        os.rename(base + ".json.tmp", base + ".json")

    signal.signal(signal.SIGUSR2, _dump)
