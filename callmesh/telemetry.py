"""Telemetry types shared by every process: per-turn metrics, counters, structured logs."""

from __future__ import annotations

import bisect
import json
import logging
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import IO, Any

from callmesh import redaction


@dataclass
class TurnMetrics:
    """One turn's timings (ms). ``latency_ms`` is end of user speech → first agent audio;
    ``provider_ms`` is the part of it spent inside providers, so ``overhead_ms`` is
    callmesh's own share (routing excluded: measured by the caller). A turn the caller cut
    off before its first audio (``spoke`` False) has no latency: both are 0 and it is left
    out of latency statistics."""

    call_id: str
    turn: int
    latency_ms: float = 0.0
    stt_ms: float = 0.0
    retrieval_ms: float = 0.0
    llm_first_token_ms: float = 0.0
    tts_first_chunk_ms: float = 0.0
    provider_ms: float = 0.0
    overhead_ms: float = 0.0
    checkpoint_ms: float = 0.0
    intent: str = ""
    fallbacks: list[str] = field(default_factory=list)
    interrupted: bool = False
    spoke: bool = True
    # Preemptive generation: "adopted" (the reply was started before the turn was
    # confirmed), "cancelled" (a guess was wrong and dropped) or "none"; and the model
    # time it saved (ms between the speculative start and the turn's own start).
    preemptive: str = "none"
    preemptive_saved_ms: float = 0.0
    # The silence that ended the caller's utterance (adaptive endpointing; 0: unknown).
    endpoint_ms: float = 0.0
    node: str = ""
    epoch: int = 0

    def set_latency(self, started: float, first_audio_at: float | None) -> None:
        """From the turn's start and its first audio (None: it never spoke); call after
        ``provider_ms`` is known."""
        self.spoke = first_audio_at is not None
        self.latency_ms = (first_audio_at - started) * 1000 if first_audio_at is not None else 0.0
        self.update_overhead()

    def update_overhead(self) -> None:
        self.overhead_ms = max(0.0, self.latency_ms - self.provider_ms) if self.spoke else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, float):
                d[k] = round(v, 3)
        return d


# Milliseconds: fine where real-time audio lives (a 20 ms frame), coarse beyond.
LATENCY_BUCKETS_MS = (0.25, 0.5, 1, 2, 3, 5, 10, 15, 20, 30, 50, 100, 200, 500, 1000, 2000, 5000)


class Histogram:
    """Cumulative-bucket histogram (Prometheus semantics). Benchmarks read ``counts``
    before and after a load step and take quantiles of the difference."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS_MS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.total += value
        self.counts[bisect.bisect_left(self.buckets, value)] += 1

    def to_dict(self) -> dict[str, Any]:
        return {"buckets": list(self.buckets), "counts": list(self.counts), "sum": self.total}


def histogram_quantile(buckets: list[float], counts: list[int], q: float) -> float:
    """The ``q`` quantile of bucket counts (not cumulative), interpolated within a bucket
    like Prometheus' ``histogram_quantile``; the +Inf bucket reports its lower bound."""
    n = sum(counts)
    if n == 0:
        return 0.0
    rank, seen = q * n, 0
    for i, c in enumerate(counts):
        if seen + c >= rank and c:
            lo = buckets[i - 1] if i > 0 else 0.0
            if i >= len(buckets):
                return float(lo)
            return float(lo + (buckets[i] - lo) * (rank - seen) / c)
        seen += c
    return float(buckets[-1])


class Metrics:
    """Process-wide counters, gauges and histograms, in Prometheus text format at /metrics."""

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._counters: dict[str, float] = defaultdict(float)
        self._gauges: dict[str, float] = {}
        self.histograms: dict[str, Histogram] = {}

    def observe(self, name: str, value: float) -> None:
        h = self.histograms.get(name)
        if h is None:
            h = self.histograms[name] = Histogram()
        h.observe(value)

    def inc(self, name: str, value: float = 1.0) -> None:
        self._counters[name] += value

    def set(self, name: str, value: float) -> None:
        self._gauges[name] = value

    def get(self, name: str) -> float:
        return self._counters.get(name, self._gauges.get(name, 0.0))

    def snapshot(self) -> dict[str, float]:
        return {**self._counters, **self._gauges}

    def render(self) -> str:
        lines = []
        for name, value in sorted(self._counters.items()):
            lines += [f"# TYPE {self._prefix}_{name} counter", f"{self._prefix}_{name} {value:g}"]
        for name, value in sorted(self._gauges.items()):
            lines += [f"# TYPE {self._prefix}_{name} gauge", f"{self._prefix}_{name} {value:g}"]
        for name, h in sorted(self.histograms.items()):
            full = f"{self._prefix}_{name}"
            lines.append(f"# TYPE {full} histogram")
            cumulative = 0
            for bound, count in zip([*h.buckets, "+Inf"], h.counts, strict=True):
                cumulative += count
                lines.append(f'{full}_bucket{{le="{bound}"}} {cumulative}')
            lines += [f"{full}_sum {h.total:g}", f"{full}_count {cumulative}"]
        return "\n".join(lines) + "\n"


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ``extra={"fields": {...}}`` adds structured fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            # The redacting filter leaves a redacted traceback in exc_text.
            out["exc"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class RedactingFilter(logging.Filter):
    """Redacts PII and credentials in every record a handler emits: the message with its
    arguments (rendered first, so a number passed as ``%s`` is seen), structured
    ``fields`` and the traceback. Installed on the handler, not a logger, because a
    logger's filters do not see records propagated from its children."""

    def __init__(self, redactor: redaction.Redactor | None = None) -> None:
        super().__init__()
        self._redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        r = self._redactor or redaction.default_redactor()
        try:
            message = record.getMessage()
        except Exception:
            return True  # a broken format string: the handler reports it as usual
        record.msg, record.args = r.redact_text(message), None
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            record.fields = r.redact_value(fields)
        if record.exc_info and not record.exc_text:
            record.exc_text = r.redact_text(logging.Formatter().formatException(record.exc_info))
        if record.stack_info:
            record.stack_info = r.redact_text(record.stack_info)
        return True


def setup_logging(
    level: str = "INFO", *, json_logs: bool = True, stream: IO[str] | None = None
) -> logging.Handler:
    """Send every log record to ``stream`` (stderr), redacted; returns the handler."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RedactingFilter())
    if json_logs:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    return handler


def now_ms() -> int:
    return int(time.time() * 1000)
