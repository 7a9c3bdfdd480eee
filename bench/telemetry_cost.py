"""CPU cost of callmesh's telemetry on a call's paths, in process CPU time (so a busy,
shared machine slows it less than it skews a load test): what a turn, an audio frame, a
call and a scrape pay for metrics and for traces (sampled at ``--ratio``, parent-based,
spans batched to an exporter that drops them), set against a call's whole CPU budget.

    .venv/bin/python -m bench.telemetry_cost [--ratio 0.05] [--turns-per-call-s 0.15]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from callmesh import tracing
from callmesh.config import NodeConfig
from callmesh.telemetry import TurnMetrics
from conversation_node.node_services import NodeServices
from memory.prompt import default_counter

REPLY = "We're open nine to five on weekdays and ten to two on Saturdays. Anything else?"
FRAMES_PER_CALL_S = 50  # 20 ms audio frames


class _Drop(SpanExporter):
    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def _cpu_us(fn: Callable[[], object], n: int, repeats: int = 5) -> float:
    """Least CPU µs per call of ``fn`` over ``repeats`` rounds of ``n``."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        for _ in range(n):
            fn()
        best = min(best, (time.process_time() - t0) / n * 1e6)
    return best


def _turn() -> TurnMetrics:
    m = TurnMetrics("call-1", 3, stt_ms=120.0, retrieval_ms=8.0, llm_first_sentence_ms=300.0)
    m.tts_first_chunk_ms, m.provider_ms, m.node, m.epoch = 90.0, 518.0, "node-1", 1
    m.fallbacks = ["tts_backup"]
    m.set_latency(0.0, 0.521)
    return m


def measure(ratio: float) -> dict[str, float]:
    none = cast(Any, None)
    svc = NodeServices(NodeConfig(), store=none, publisher=None, pipeline=none, memory=none)
    m = _turn()
    out: dict[str, float] = {}
    out["metrics_per_turn_us"] = _cpu_us(lambda: svc.observe_turn(m), 20_000)
    out["metrics_per_frame_us"] = _cpu_us(lambda: svc.observe_frame_lag(1.5), 200_000)
    out["metrics_scrape_us"] = _cpu_us(lambda: svc.metrics.render(), 500)

    # Tracing on: every span sampled (what a sampled call pays), batched, dropped.
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(1.0)))
    provider.add_span_processor(BatchSpanProcessor(_Drop(), max_queue_size=1 << 16))
    tracing.install(provider)
    call = tracing.start_call(call_id="call-1", tenant="demo", node="node-1")
    llm = tracing.gen_ai_attributes("simulated-llm", "simulated-llm", 900, 20)
    sources = {"kb": "answered", "crm": "cached"}
    counter = default_counter()
    t = time.monotonic()

    def sampled_turn() -> None:
        counter.count(REPLY)  # the output tokens are counted for a sampled call only
        tracing.record_turn(call, m, started=t, checkpoint=(t, t), llm=llm, sources=sources)

    out["trace_sampled_turn_us"] = _cpu_us(sampled_turn, 2_000)

    def sampled_call() -> None:
        tracing.start_call(call_id="c", tenant="demo", node="n", previous="").end()

    out["trace_sampled_call_us"] = _cpu_us(sampled_call, 5_000)
    provider.force_flush()

    # Tracing on, this call not sampled (the other 1 - ratio of calls).
    provider_off = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.0)))
    tracing.install(provider_off)
    unsampled = tracing.start_call(call_id="call-2", tenant="demo", node="node-1")
    out["trace_unsampled_turn_us"] = _cpu_us(
        lambda: tracing.record_turn(unsampled, m, started=t), 20_000
    )
    out["trace_unsampled_call_us"] = _cpu_us(
        lambda: tracing.start_call(call_id="c", tenant="d", node="n").end(), 20_000
    )
    tracing.install(None)
    provider.shutdown()
    provider_off.shutdown()
    out["ratio"] = ratio
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratio", type=float, default=0.05, help="trace sampling ratio")
    p.add_argument("--turns-per-call-s", type=float, default=0.15, help="turns per call-second")
    p.add_argument("--call-s", type=float, default=120.0, help="a call's length (s)")
    p.add_argument(
        "--call-cpu-pct", type=float, default=0.34, help="a call's CPU, %% of a core (capacity)"
    )
    args = p.parse_args(argv)
    r = measure(args.ratio)
    for k, v in r.items():
        print(f"{k:28s} {v:10.3f}")
    turns, ratio = args.turns_per_call_s, args.ratio
    metrics_us_s = r["metrics_per_turn_us"] * turns + r["metrics_per_frame_us"] * FRAMES_PER_CALL_S
    per_turn = ratio * r["trace_sampled_turn_us"] + (1 - ratio) * r["trace_unsampled_turn_us"]
    per_call = ratio * r["trace_sampled_call_us"] + (1 - ratio) * r["trace_unsampled_call_us"]
    tracing_us_s = per_turn * turns + per_call / args.call_s
    budget_us_s = args.call_cpu_pct / 100 * 1e6
    print(
        f"metrics: {metrics_us_s:.1f} µs CPU per call-second = "
        f"{100 * metrics_us_s / budget_us_s:.2f} % of a call's {args.call_cpu_pct} % of a core"
    )
    print(
        f"tracing at {ratio}: {tracing_us_s:.2f} µs CPU per call-second = "
        f"{100 * tracing_us_s / budget_us_s:.2f} % of it"
    )


if __name__ == "__main__":
    main()
