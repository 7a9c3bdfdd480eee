"""Telemetry types shared by every process: per-turn metrics, labelled metrics in the
Prometheus text format, structured logs."""

from __future__ import annotations

import bisect
import json
import logging
import sys
import time
from dataclasses import dataclass, field, fields
from typing import IO, Any

from callmesh import redaction
from callmesh.metric_names import SPECS, Kind, of_process


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
    # The model's first sentence: what the voice waits for (the LLM's critical path).
    llm_first_sentence_ms: float = 0.0
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

    def stages(self) -> dict[str, float]:
        """The turn's critical path, stage by stage (ms): speech-to-text, retrieval, the
        model's first sentence, the voice's first chunk, and callmesh's own share; they add
        up to ``latency_ms`` (empty for a turn that never spoke)."""
        if not self.spoke:
            return {}
        return {
            "stt": self.stt_ms,
            "retrieval": self.retrieval_ms,
            "llm": self.llm_first_sentence_ms,
            "tts": self.tts_first_chunk_ms,
            "callmesh": self.overhead_ms,
        }

    def to_dict(self) -> dict[str, Any]:
        # Field by field: dataclasses.asdict deep-copies every value, several times a turn.
        d: dict[str, Any] = {}
        for name in _TURN_METRICS_FIELDS:
            v = getattr(self, name)
            if type(v) is float:
                v = round(v, 3)
            elif type(v) is list:
                v = list(v)
            d[name] = v
        return d


_TURN_METRICS_FIELDS = tuple(f.name for f in fields(TurnMetrics))


# A turn's stages (``TurnMetrics.stages``, then its checkpoint): the ``stage`` label's values.
STAGES = ("stt", "retrieval", "llm", "tts", "callmesh", "checkpoint")

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


class Counter:
    """One counter series (a metric with its label values bound): hot paths keep one and
    call :meth:`inc`, with no lookup per event."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, value: float = 1.0) -> None:
        self.value += value


class Gauge:
    """One gauge series."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def set(self, value: float) -> None:
        self.value = value


_Series = Counter | Gauge | Histogram


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def series_key(name: str, labels: tuple[tuple[str, str], ...]) -> str:
    """``name`` or ``name{k="v",...}``: how /v1/status and :meth:`Metrics.snapshot` name a
    series."""
    if not labels:
        return name
    return name + "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}"


class Metrics:
    """Process-wide counters, gauges and histograms with labels, in the Prometheus text
    format at /metrics. Every name must be declared in :mod:`callmesh.metric_names` (with
    its type, help and labels); a name or label set not declared there raises."""

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        # family name -> label values -> series.
        self._families: dict[str, dict[tuple[str, ...], _Series]] = {}
        # Unlabelled series by name, and labelled ones by series key: the fast path.
        self._by_key: dict[str, _Series] = {}
        # The process's metrics exist from the start (a counter at 0, a labelled family
        # with no series yet), so rates and alerts see them before their first event.
        for spec in of_process(prefix):
            if spec.labels:
                self._families.setdefault(spec.name, {})
            else:
                self._series(spec.name, spec.kind, {})

    def _series(self, name: str, kind: Kind, labels: dict[str, str]) -> _Series:
        key = series_key(name, tuple(sorted(labels.items()))) if labels else name
        found = self._by_key.get(key)
        if found is not None:
            return found
        spec = SPECS.get(name)
        if spec is None:
            raise KeyError(f"metric {name!r} is not declared in callmesh.metric_names")
        if spec.kind is not kind:
            raise TypeError(f"metric {name!r} is a {spec.kind}, not a {kind}")
        if set(labels) != set(spec.labels):
            raise ValueError(f"metric {name!r} takes labels {spec.labels}, got {sorted(labels)}")
        values = tuple(str(labels[label]) for label in spec.labels)
        series: _Series = (
            Counter() if kind is Kind.COUNTER else Gauge() if kind is Kind.GAUGE else Histogram()
        )
        self._families.setdefault(name, {})[values] = series
        self._by_key[key] = series
        return series

    # Bound series, for hot paths.
    def counter(self, name: str, **labels: str) -> Counter:
        return self._series(name, Kind.COUNTER, labels)  # type: ignore[return-value]

    def gauge(self, name: str, **labels: str) -> Gauge:
        return self._series(name, Kind.GAUGE, labels)  # type: ignore[return-value]

    def histogram(self, name: str, **labels: str) -> Histogram:
        return self._series(name, Kind.HISTOGRAM, labels)  # type: ignore[return-value]

    # One-off updates.
    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        self.counter(name, **labels).inc(value)

    def set(self, name: str, value: float, **labels: str) -> None:
        self.gauge(name, **labels).set(value)

    def observe(self, name: str, value: float, **labels: str) -> None:
        self.histogram(name, **labels).observe(value)

    def get(self, name: str, **labels: str) -> float:
        """A counter's or gauge's value (0 if never set)."""
        key = series_key(name, tuple(sorted(labels.items()))) if labels else name
        series = self._by_key.get(key)
        return series.value if isinstance(series, Counter | Gauge) else 0.0

    def snapshot(self) -> dict[str, float]:
        """Counters and gauges by series key (``name`` or ``name{label="value"}``)."""
        return {k: s.value for k, s in self._by_key.items() if isinstance(s, Counter | Gauge)}

    @property
    def histograms(self) -> dict[str, Histogram]:
        """Histograms by series key."""
        return {k: s for k, s in self._by_key.items() if isinstance(s, Histogram)}

    def render(self) -> str:
        lines: list[str] = []
        for name in sorted(self._families):
            spec = SPECS[name]
            full = spec.exposed(self._prefix)
            lines += [f"# HELP {full} {spec.help}", f"# TYPE {full} {spec.kind}"]
            for values, series in sorted(self._families[name].items()):
                pairs = [f'{k}="{_escape(v)}"' for k, v in zip(spec.labels, values, strict=True)]
                if isinstance(series, Histogram):
                    lines += _histogram_lines(full, pairs, series)
                else:
                    labels = "{" + ",".join(pairs) + "}" if pairs else ""
                    lines.append(f"{full}{labels} {series.value:g}")
        return "\n".join(lines) + "\n"


def _histogram_lines(full: str, pairs: list[str], h: Histogram) -> list[str]:
    lines = []
    cumulative = 0
    for bound, count in zip([*h.buckets, "+Inf"], h.counts, strict=True):
        cumulative += count
        le = ",".join([*pairs, f'le="{bound}"'])
        lines.append(f"{full}_bucket{{{le}}} {cumulative}")
    labels = "{" + ",".join(pairs) + "}" if pairs else ""
    return [*lines, f"{full}_sum{labels} {h.total:g}", f"{full}_count{labels} {cumulative}"]


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
