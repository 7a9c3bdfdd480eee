"""What happened second by second during a load run: turns, latency, errors, live calls,
and the faults the harness injected, with their times.

Sans-I/O: the callers and the fault injectors report into a :class:`Timeline` (times are
``time.monotonic()`` values unless a clock is given); the live progress display reads its
totals, and the JSON and HTML reports read :meth:`Timeline.series`, :meth:`Timeline.events`
and :meth:`Timeline.histogram`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loadtest.stats import percentile

# Texts that reach the report come from the network (error messages, node names): keep
# each bounded so a misbehaving server cannot grow the report without limit.
MAX_TEXT = 300
MAX_EVENTS = 1000


def _bounded(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


@dataclass(frozen=True)
class FaultEvent:
    """A fault the harness injected (``kill``, ``drain``, ...) or saw (``exited``); a
    window fault (an outage, a slow model) also has its end, ``end_s``."""

    t_s: float
    kind: str
    target: str
    detail: str = ""
    end_s: float | None = None

    def as_dict(self) -> dict[str, object]:
        t_s = round(self.t_s, 3)
        out: dict[str, object] = {
            "t_s": t_s,
            "kind": self.kind,
            "target": self.target,
            "detail": self.detail,
        }
        if self.end_s is not None:
            out["end_s"] = round(self.end_s, 3)
        return out


@dataclass
class _Second:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    calls_up: int | None = None


class Timeline:
    """Per-second buckets of one run, from its start (``t0``)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.t0 = clock()
        self._seconds: dict[int, _Second] = {}
        self._faults: list[FaultEvent] = []
        self._latencies: list[float] = []
        self._sorted_upto = 0
        self.calls_up = 0
        self.calls_started = 0
        self.calls_ended = 0
        self.turns = 0
        self.errors = 0

    # ------------------------------------------------------------------ what the run reports

    def _bucket(self, at: float | None) -> _Second:
        second = max(0, int((self._clock() if at is None else at) - self.t0))
        bucket = self._seconds.get(second)
        if bucket is None:
            bucket = self._seconds[second] = _Second()
        return bucket

    def call_started(self, at: float | None = None) -> None:
        self.calls_started += 1
        self.calls_up += 1
        self._bucket(at).calls_up = self.calls_up

    def call_ended(self, at: float | None = None) -> None:
        self.calls_ended += 1
        self.calls_up = max(0, self.calls_up - 1)
        self._bucket(at).calls_up = self.calls_up

    def turn(self, latency_ms: float, at: float | None = None) -> None:
        self.turns += 1
        self._latencies.append(latency_ms)
        self._bucket(at).latencies.append(latency_ms)

    def error(self, at: float | None = None) -> None:
        self.errors += 1
        self._bucket(at).errors += 1

    def fault(self, kind: str, target: str, detail: str = "", at: float | None = None) -> int:
        """Record a fault; its handle for :meth:`fault_ended` (-1 once the report is full)."""
        if len(self._faults) >= MAX_EVENTS:
            return -1
        t = (self._clock() if at is None else at) - self.t0
        self._faults.append(
            FaultEvent(max(0.0, t), _bounded(kind), _bounded(target), _bounded(detail))
        )
        return len(self._faults) - 1

    def fault_ended(self, handle: int, at: float | None = None, detail: str | None = None) -> None:
        """A window fault (``handle`` from :meth:`fault`) is over, optionally saying more."""
        if not 0 <= handle < len(self._faults):
            return
        ev = self._faults[handle]
        end = max(ev.t_s, (self._clock() if at is None else at) - self.t0)
        more = ev.detail if detail is None else _bounded(detail)
        self._faults[handle] = FaultEvent(ev.t_s, ev.kind, ev.target, more, end)

    # ------------------------------------------------------------------ what readers see

    def elapsed_s(self) -> float:
        return self._clock() - self.t0

    def last_fault(self) -> FaultEvent | None:
        return self._faults[-1] if self._faults else None

    def turns_per_s(self, window_s: int = 5) -> float:
        """Turns a second over the last ``window_s`` whole seconds (fewer at the start)."""
        now = int(self.elapsed_s())
        first = max(0, now - window_s)
        span = max(1, now - first)
        return (
            sum(len(self._seconds[s].latencies) for s in range(first, now) if s in self._seconds)
            / span
        )

    def latency_p(self, p: float) -> float:
        """Percentile ``p`` of every turn latency so far (0 before the first turn)."""
        if self._sorted_upto != len(self._latencies):
            self._latencies.sort()
            self._sorted_upto = len(self._latencies)
        return percentile(self._latencies, p, presorted=True)

    def series(self) -> dict[str, list[float]]:
        """One entry per second from the start to the last second anything happened.

        ``calls_up`` is carried forward through seconds where no call started or ended."""
        last = max(self._seconds, default=-1)
        out: dict[str, list[float]] = {
            k: []
            for k in ("t_s", "turns", "latency_p50_ms", "latency_p99_ms", "errors", "calls_up")
        }
        calls_up = 0
        for s in range(last + 1):
            b = self._seconds.get(s) or _Second()
            calls_up = b.calls_up if b.calls_up is not None else calls_up
            lat = sorted(b.latencies)
            out["t_s"].append(s)
            out["turns"].append(len(lat))
            out["latency_p50_ms"].append(round(percentile(lat, 50, presorted=True), 2))
            out["latency_p99_ms"].append(round(percentile(lat, 99, presorted=True), 2))
            out["errors"].append(b.errors)
            out["calls_up"].append(calls_up)
        return out

    def events(self) -> list[dict[str, object]]:
        return [f.as_dict() for f in sorted(self._faults, key=lambda f: f.t_s)]

    def histogram(self) -> dict[str, list[Any]]:
        return latency_histogram(self._latencies)

    def report(self) -> dict[str, object]:
        """The keys every report with a time series carries."""
        return {
            "timeseries": {"interval_s": 1, **self.series()},
            "events": self.events(),
            "turn_latency_histogram": self.histogram(),
        }


def latency_histogram(values: list[float], per_decade: int = 8) -> dict[str, list[Any]]:
    """Counts over log-spaced bins (``per_decade`` a decade) that cover ``values``.

    Latencies span orders of magnitude (a few ms of overhead to seconds of failover), so
    linear bins would put nearly everything in the first one."""
    positive = [v for v in values if v > 0]
    if not positive:
        return {"edges_ms": [], "counts": []}
    lo = math.floor(math.log10(min(positive)) * per_decade)
    hi = math.floor(math.log10(max(positive)) * per_decade) + 1
    edges = [round(10 ** (i / per_decade), 3) for i in range(lo, hi + 1)]
    counts = [0] * (len(edges) - 1)
    for v in positive:
        i = math.floor(math.log10(v) * per_decade) - lo
        counts[min(max(i, 0), len(counts) - 1)] += 1
    return {"edges_ms": edges, "counts": counts}
