"""The standard benchmark scenarios of ``make bench``: what each runs (at the standard size
and at the smallest one), which figures it keeps, and the docs table they go to.

Figures are dotted paths into a scenario's JSON report; ``@last`` is the last key of a
dict (e.g. the prompt at the last measured turn, whatever ``--turns`` was)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Any


def _a(command: str) -> tuple[str, ...]:
    return tuple(shlex.split(command))


@dataclass(frozen=True)
class Scenario:
    name: str
    block: str  # the docs table it fills: <!-- bench:BLOCK begin --> ... end
    argv: tuple[str, ...]  # after `python -m loadtest`, at the standard size
    quick: tuple[str, ...]  # the smallest size: checks the plumbing, measures nothing
    figures: dict[str, str]  # figure name -> dotted path in the JSON report
    html: bool = False  # the scenario writes an HTML report (it has a time series)
    requires: str = ""  # a module that must exist for the scenario to be offered
    timeout_s: float = 1200.0


@dataclass(frozen=True)
class Table:
    title: str
    columns: tuple[tuple[str, str], ...]  # header, template over the figures
    notes: tuple[str, ...] = field(default=())


_LAT = {"turn_latency_p50_ms": "turn_latency_ms.p50", "turn_latency_p99_ms": "turn_latency_ms.p99"}
_CHAOS = {
    "calls": "calls",
    "completed_calls": "completed_calls",
    "affected_calls": "affected_calls",
    "gap_p50_ms": "failover_gap_ms.p50",
    "gap_p99_ms": "failover_gap_ms.p99",
    "lost_turns": "lost_turns",
    "duplicate_replies": "duplicate_replies",
    "duplicate_effects": "duplicate_effects",
    "context_lost": "context_lost",
    "errors": "errors",
    **_LAT,
}

SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "run",
        "run",
        _a("run --calls 200 --turns 5 --think 2"),
        _a("run --calls 5 --turns 2 --think 0.5"),
        {
            "calls": "calls",
            "completed_calls": "completed_calls",
            "errors": "errors",
            "duplicate_replies": "duplicate_replies",
            **_LAT,
            "overhead_p50_ms": "node_overhead_ms.p50",
            "overhead_p99_ms": "node_overhead_ms.p99",
        },
        html=True,
    ),
    Scenario(
        "chaos-kill",
        "chaos",
        _a("chaos --calls 200 --nodes 3 --kill 1"),
        _a("chaos --calls 10 --nodes 2 --turns 5 --think 0.3 --kill 1"),
        _CHAOS,
        html=True,
    ),
    Scenario(
        "chaos-drain",
        "chaos",
        _a("chaos --calls 200 --nodes 3 --drain 1"),
        _a("chaos --calls 10 --nodes 2 --turns 5 --think 0.3 --drain 1"),
        _CHAOS,
        html=True,
    ),
    Scenario(
        "capacity",
        "capacity",
        _a("capacity --transport twilio --steps 200"),
        _a("capacity --transport twilio --steps 5 --step-seconds 3 --settle 1"),
        {
            "max_calls_passing": "max_calls_passing",
            "calls_per_core": "calls_per_core",
            "cpu_per_call_pct": "cpu_per_call_pct",
            "rss_per_call_kb": "rss_per_call_kb",
            "overhead_p50_ms": "overhead_ms.p50",
            "overhead_p99_ms": "overhead_ms.p99",
            "limited_by": "limited_by",
            "targets_met": "targets_met",
        },
    ),
    Scenario(
        "memory",
        "memory",
        _a("memory --turns 1000"),
        _a("memory --turns 20 --kb-docs 200 --repeats 5"),
        {
            "turns": "turns",
            "kb_docs": "kb_docs",
            "prompt_tokens": "hierarchical.prompt_tokens.@last",
            "prompt_tokens_naive": "naive.prompt_tokens.@last",
            "prompt_build_p99_ms": "hierarchical.prompt_build_ms.@last.p99",
            "prompt_build_p99_ms_naive": "naive.prompt_build_ms.@last.p99",
            "checkpoint_bytes": "hierarchical.checkpoint_bytes.@last",
            "checkpoint_bytes_naive": "naive.checkpoint_bytes.@last",
            "retrieval_p99_ms": "retrieval_ms.p99",
        },
    ),
    Scenario(
        "effects",
        "effects",
        _a("effects --calls 200 --crm-outage 10s"),
        _a("effects --calls 5 --crm-outage 2s --ramp 2s"),
        {
            "effects_expected": "effects_expected",
            "effects_delivered": "effects_delivered",
            "effects_duplicated": "effects_duplicated",
            "effects_dead_lettered": "effects_dead_lettered",
            "lag_p50_ms": "delivery_lag_ms.p50",
            "lag_p99_ms": "delivery_lag_ms.p99",
            "call_errors": "call_errors",
        },
    ),
    Scenario(
        "placement-sim",
        "placement-sim",
        _a("placement-sim --nodes 100 --calls 100000 --redis-sample 10000"),
        _a("placement-sim --nodes 10 --calls 2000 --redis-sample 500"),
        {
            "nodes": "config.nodes",
            "calls": "config.calls",
            "max_over_mean_bounded": "summary.max_over_mean_bounded",
            "max_over_mean_plain": "summary.max_over_mean_plain",
            "moved_other_total": "summary.moved_other_total",
            "placement_us_p50": "summary.placement_us_p50",
            "placement_us_p99": "summary.placement_us_p99",
            "bytes_per_pin": "pins_in_redis.bytes_per_pin",
            "state_bytes_per_call": "bounded.placement_state_bytes_per_call",
        },
    ),
    Scenario(
        "soak",
        "soak",
        # A 30 s retention: Redis is judged once the first ended calls have expired.
        _a("soak --minutes 2 --concurrency 20 --ended-call-retention-s 30"),
        _a("soak --minutes 0.25 --concurrency 4"),
        {
            "completed_calls": "completed_calls",
            "errors": "errors",
            "router_bytes_per_call": "slopes_bytes_per_call.router",
            "node_bytes_per_call_max": "slopes_bytes_per_call.nodes_max",
            "redis_bytes_per_call": "slopes_bytes_per_call.redis",
            "redis_keys_per_call": "redis_keys_per_call",
            "redis_steady_bytes_per_call": "redis_steady.bytes_per_call",
            "event_log_bytes_per_call": "jetstream_per_call.event_log_bytes",
        },
        html=True,
        requires="loadtest.soak",
    ),
    Scenario(
        "abuse",
        "abuse",
        _a("abuse"),
        _a("abuse"),
        {
            "bad_inputs_sent": "bad_inputs_sent",
            "crashes": "crashes",
            "takeovers_succeeded": "takeovers_succeeded",
            "takeover_attempts": "takeover_attempts",
            "legit_calls_failed": "legit_calls_failed",
            "legit_calls": "legit_calls",
            "internal_errors": "internal_errors",
            "p99_quiet_ms": "turn_latency_p99_quiet_ms",
            "p99_flood_ms": "turn_latency_p99_flood_ms",
            "errors": "errors",
        },
        requires="loadtest.abuse",
    ),
)

_WHEN = (("command", "`{command}`"), ("date", "{date}"), ("commit", "{commit}"))

TABLES: dict[str, Table] = {
    "run": Table(
        "turn latency and overhead",
        (
            *_WHEN,
            ("calls (completed)", "{calls} ({completed_calls})"),
            ("turn latency p50 / p99", "{turn_latency_p50_ms} / {turn_latency_p99_ms} ms"),
            ("node overhead p50 / p99", "{overhead_p50_ms} / {overhead_p99_ms} ms"),
            ("errors", "{errors}"),
            ("duplicate replies", "{duplicate_replies}"),
        ),
    ),
    "chaos": Table(
        "failover",
        (
            *_WHEN,
            ("affected", "{affected_calls}"),
            ("gap p50", "{gap_p50_ms} ms"),
            ("gap p99", "{gap_p99_ms} ms"),
            (
                "lost / dup replies / dup effects / context lost",
                "{lost_turns} / {duplicate_replies} / {duplicate_effects} / {context_lost}",
            ),
            ("errors", "{errors}"),
        ),
    ),
    "capacity": Table(
        "capacity",
        (
            *_WHEN,
            ("passes at", "{max_calls_passing}"),
            ("calls per core", "{calls_per_core}"),
            ("CPU per call", "{cpu_per_call_pct} %"),
            ("RSS per call", "{rss_per_call_kb} KB"),
            ("overhead p50 / p99", "{overhead_p50_ms} / {overhead_p99_ms} ms"),
            ("limited by", "{limited_by}"),
            ("targets met", "{targets_met}"),
        ),
    ),
    "memory": Table(
        "memory",
        (
            *_WHEN,
            ("turns", "{turns}"),
            ("prompt at the last turn", "{prompt_tokens} tokens (naive {prompt_tokens_naive})"),
            (
                "prompt build p99",
                "{prompt_build_p99_ms} ms (naive {prompt_build_p99_ms_naive} ms)",
            ),
            ("checkpoint", "{checkpoint_bytes} B (naive {checkpoint_bytes_naive} B)"),
            ("retrieval p99", "{retrieval_p99_ms} ms over {kb_docs} documents"),
        ),
    ),
    "effects": Table(
        "side effects",
        (
            *_WHEN,
            ("expected", "{effects_expected}"),
            ("delivered", "{effects_delivered}"),
            ("duplicated", "{effects_duplicated}"),
            ("dead-lettered", "{effects_dead_lettered}"),
            ("delivery lag p50 / p99", "{lag_p50_ms} / {lag_p99_ms} ms"),
        ),
    ),
    "placement-sim": Table(
        "placement simulation",
        (
            *_WHEN,
            ("nodes / calls", "{nodes} / {calls}"),
            ("max / mean load, bounded", "{max_over_mean_bounded}"),
            ("max / mean load, plain ring", "{max_over_mean_plain}"),
            ("live calls moved needlessly", "{moved_other_total}"),
            ("placement p50 / p99", "{placement_us_p50} / {placement_us_p99} µs"),
            ("pin in Redis", "{bytes_per_pin} B"),
            ("router index per call", "{state_bytes_per_call} B"),
        ),
    ),
    "soak": Table(
        "soak",
        (
            *_WHEN,
            ("completed calls", "{completed_calls}"),
            ("errors", "{errors}"),
            ("router growth", "{router_bytes_per_call} B/call"),
            ("node growth (max)", "{node_bytes_per_call_max} B/call"),
            ("Redis growth", "{redis_bytes_per_call} B/call, {redis_keys_per_call} keys/call"),
            ("Redis, ended calls expiring", "{redis_steady_bytes_per_call} B/call"),
            ("event log", "{event_log_bytes_per_call} B/call"),
        ),
    ),
    "abuse": Table(
        "abuse",
        (
            *_WHEN,
            ("hostile inputs", "{bad_inputs_sent}"),
            ("crashes", "{crashes}"),
            ("takeovers", "{takeovers_succeeded} of {takeover_attempts}"),
            ("legitimate calls failed", "{legit_calls_failed} of {legit_calls}"),
            ("`internal` errors", "{internal_errors}"),
            ("turn p99 quiet → flood", "{p99_quiet_ms} → {p99_flood_ms} ms"),
        ),
    ),
}


def pick(report: Any, path: str) -> Any:
    """The value at a dotted ``path`` of a report (None when any step is missing)."""
    node = report
    for step in path.split("."):
        if not isinstance(node, dict) or not node:
            return None
        if step == "@last":
            step = list(node)[-1]
        node = node.get(step)
    return node


def figures_of(scenario: Scenario, report: dict[str, Any]) -> dict[str, Any]:
    return {name: pick(report, path) for name, path in scenario.figures.items()}
