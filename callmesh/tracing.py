"""Traces (OpenTelemetry): the one place that sets tracing up and names spans and attributes.

A call is a span on its owner node (``callmesh.call``); each turn is its child
(``callmesh.turn``), and the turn's stages are the turn's children laid end to end on the
turn's critical path (``stt``, ``retrieval`` with one child per source, ``llm`` with the
GenAI semantic-convention attributes, ``tts``, ``callmesh`` — callmesh's own share), so their
durations add up to the turn's latency; ``checkpoint`` follows the first audio. The turn's
stages are recorded when the turn completes, from the timings it measured anyway: nothing
runs per audio frame. Outbox publishes are spans of their own under the call.

A call that moves to a new owner (failover, hand-off, reconnect) gets a new call span in
the same trace, child of and *linked* to the first owner's call span, whose context travels
in the checkpoint (:func:`traceparent`), and carrying the resume reason. The router's
placement and relinks are spans too.

Off unless ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (the ``otlp_endpoint`` setting,
:func:`configure`): then spans are
sampled parent-based at the configured ratio and exported over OTLP/HTTP in batches.
While off, :func:`enabled` is False and callers skip building spans altogether.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Link, Span, SpanKind, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from callmesh.telemetry import TurnMetrics

INSTRUMENTATION = "callmesh"

# Span names.
CALL = "callmesh.call"
TURN = "callmesh.turn"
STAGE = "callmesh.stage."  # + stt, retrieval, llm, tts, callmesh, checkpoint
RETRIEVAL_SOURCE = "callmesh.retrieval.source"
OUTBOX_PUBLISH = "callmesh.outbox.publish"
PLACEMENT = "callmesh.router.place"
RELINK = "callmesh.router.relink"

# Attributes.
CALL_ID = "callmesh.call_id"
TENANT = "callmesh.tenant"
NODE = "callmesh.node"
EPOCH = "callmesh.epoch"
TURN_NUMBER = "callmesh.turn"
RESUME_REASON = "callmesh.resume.reason"
# On the llm stage of a turn that adopted a speculative (preemptive) generation: the model
# time it ran before the turn was confirmed.
PREEMPTIVE_SAVED_MS = "callmesh.preemptive.saved_ms"

_propagator = TraceContextTextMapPropagator()
_provider: TracerProvider | None = None
_tracer: Tracer = trace.NoOpTracer()


def configure(service: str, instance: str, endpoint: str, sample_ratio: float) -> bool:
    """Export spans to the OTLP/HTTP collector at ``endpoint`` (the setting read from
    ``OTEL_EXPORTER_OTLP_ENDPOINT``; spans go to its ``/v1/traces`` as the OpenTelemetry
    convention says), sampled parent-based at ``sample_ratio``; True if tracing is on.
    An empty endpoint leaves tracing off."""
    if not endpoint:
        return False
    # Imported only when used: the exporter pulls in protobuf.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    resource = Resource.create({"service.name": service, "service.instance.id": instance})
    provider = TracerProvider(
        resource=resource, sampler=ParentBased(TraceIdRatioBased(sample_ratio))
    )
    exporter = OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")
    provider.add_span_processor(BatchSpanProcessor(exporter))
    install(provider)
    return True


def install(provider: TracerProvider | None) -> None:
    """Use ``provider`` for callmesh's spans (None: off). Tests install one with an
    in-memory exporter; the global OpenTelemetry provider is left alone."""
    global _provider, _tracer
    _provider = provider
    _tracer = provider.get_tracer(INSTRUMENTATION) if provider else trace.NoOpTracer()


def shutdown() -> None:
    """Flush and stop the exporter (at process exit)."""
    if _provider is not None:
        _provider.shutdown()


def enabled() -> bool:
    return _provider is not None


def tracer() -> Tracer:
    return _tracer


# ---------------------------------------------------------------- context across owners


def traceparent(span: Span) -> str:
    """The W3C ``traceparent`` of ``span`` ("" if it is not sampled or tracing is off)."""
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return ""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, trace.set_span_in_context(span))
    return carrier.get("traceparent", "")


def _previous(parent: str) -> tuple[Context | None, Link | None]:
    if not parent:
        return None, None
    context = _propagator.extract({"traceparent": parent})
    ctx = trace.get_current_span(context).get_span_context()
    return (context, Link(ctx)) if ctx.is_valid else (None, None)


def start_call(
    *, call_id: str, tenant: str, node: str, resume: str = "", previous: str = ""
) -> Span:
    """The span of a call on this owner; ``previous`` is the traceparent the call's first
    owner recorded, ``resume`` why the call came here. A resumed call's span continues the
    first owner's trace (one trace per call, sampled or not as a whole: the parent-based
    sampler follows the first owner's decision) and links to its span."""
    attrs: dict[str, Any] = {CALL_ID: call_id, TENANT: tenant, NODE: node}
    if resume:
        attrs[RESUME_REASON] = resume
    context, link = _previous(previous)
    return _tracer.start_span(
        CALL,
        context=context,
        kind=SpanKind.SERVER,
        attributes=attrs,
        links=[link] if link else None,
    )


def call_context(span: Span | None) -> Context | None:
    return trace.set_span_in_context(span) if span is not None else None


# ---------------------------------------------------------------- turns


def _wall_ns(monotonic_s: float) -> int:
    """A ``time.monotonic()`` instant as the wall-clock ns a span takes."""
    return time.time_ns() - int((time.monotonic() - monotonic_s) * 1e9)


def record_turn(
    call: Span | None,
    m: TurnMetrics,
    *,
    started: float,
    checkpoint: tuple[float, float] | None = None,
    llm: dict[str, Any] | None = None,
    sources: dict[str, str] | None = None,
) -> None:
    """A completed turn's spans under the call's span: the turn from ``started``
    (monotonic) until now, its critical-path stages end to end (they add up to the turn's
    latency), then ``checkpoint`` (monotonic start, end). ``llm``: GenAI attributes of the
    model's span; ``sources``: each retrieval source's status."""
    if call is None or not call.is_recording():
        return
    parent = trace.set_span_in_context(call)
    base: dict[str, Any] = {CALL_ID: m.call_id, NODE: m.node, EPOCH: m.epoch, TURN_NUMBER: m.turn}
    attrs = {
        **base,
        "callmesh.turn.intent": m.intent,
        "callmesh.turn.latency_ms": round(m.latency_ms, 3),
        "callmesh.turn.overhead_ms": round(m.overhead_ms, 3),
        "callmesh.turn.interrupted": m.interrupted,
        "callmesh.turn.spoke": m.spoke,
        "callmesh.turn.fallbacks": list(m.fallbacks),
        "callmesh.turn.preemptive": m.preemptive,
    }
    turn = _tracer.start_span(TURN, context=parent, start_time=_wall_ns(started), attributes=attrs)
    inside = trace.set_span_in_context(turn)
    at = turn.start_time or _wall_ns(started)  # type: ignore[attr-defined]
    for stage, ms in m.stages().items():
        end = at + int(ms * 1e6)
        span = _tracer.start_span(STAGE + stage, context=inside, start_time=at, attributes=base)
        if stage == "llm" and llm:
            span.set_attributes(llm)
        if stage == "retrieval" and sources:
            source_ctx = trace.set_span_in_context(span)
            for name, status in sources.items():
                src = _tracer.start_span(
                    RETRIEVAL_SOURCE,
                    context=source_ctx,
                    start_time=at,
                    attributes={**base, "callmesh.source": name, "callmesh.source.status": status},
                )
                src.end(end_time=end)
        span.end(end_time=end)
        at = end
    if checkpoint is not None:
        t0, t1 = checkpoint
        span = _tracer.start_span(
            STAGE + "checkpoint", context=inside, start_time=_wall_ns(t0), attributes=base
        )
        span.end(end_time=_wall_ns(t1))
    turn.end()


def gen_ai_attributes(
    system: str, model: str, input_tokens: int, output_tokens: int
) -> dict[str, Any]:
    """The OpenTelemetry GenAI semantic-convention attributes of a model call."""
    return {
        "gen_ai.operation.name": "chat",
        "gen_ai.system": system,
        "gen_ai.request.model": model,
        "gen_ai.usage.input_tokens": input_tokens,
        "gen_ai.usage.output_tokens": output_tokens,
    }


# ---------------------------------------------------------------- live spans


@contextmanager
def span(name: str, attributes: dict[str, Any], parent: Context | None = None) -> Iterator[Span]:
    """A span around a block (a no-op span while tracing is off); an exception marks it
    failed and propagates."""
    with _tracer.start_as_current_span(name, context=parent, attributes=attributes) as s:
        yield s
