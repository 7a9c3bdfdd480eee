"""``python -m loadtest memory``: hierarchical memory against append-everything, one long call.

One simulated call of ``--turns`` turns (prefetch on an interim transcript, facts, retrieval
over a ``--kb-docs`` knowledge base plus the demo one, prompt, barge-ins, checkpoint) is
driven through :mod:`memory`, and a naive baseline (the whole transcript in the prompt and
in the checkpoint) is kept beside it. At turns 10, 100 and 1,000 (those within ``--turns``)
the report gives, for both: prompt tokens, prompt build time (p50/p99 over ``--repeats``
builds of that turn's prompt; the slower naive one over a twentieth as many) and
checkpoint bytes (a real msgpack ``Checkpoint``).
Separately, ``retrieval_ms`` times uncached queries over the knowledge base through the
orchestrator. Timings are wall-clock on this machine; medians are the figures to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from tqdm import tqdm

from memory.history import CallRecord, InMemoryHistoryStore
from memory.knowledge import DEMO_KB_DIR, KnowledgeBase, load_passages, synthetic_passages
from memory.prompt import DEFAULT_INSTRUCTIONS, PromptBuilder, TokenCounter
from memory.retrieval import RetrievalOrchestrator, SourcePolicy
from memory.session import SessionMemory
from memory.sources import (
    CustomerHistorySource,
    KnowledgeBaseSource,
    KnowledgeSource,
    Query,
    SimulatedBookingSlots,
)
from state_store.checkpoint import Checkpoint

POINTS = (10, 100, 1000)
TARGETS = {
    "prompt_tokens_max": 2000,
    "checkpoint_bytes_max": 32 * 1024,
    "prompt_build_p99_ms_max": 5.0,
    "retrieval_p99_ms_max": 5.0,
}
TENANT, CALLER, CALL_ID = "bench", "caller-1", "bench-call"

_USER_LINES = (
    "Hi, my name is Anna Smith and I'd like to book a cleaning",
    "How much does a cleaning cost at your clinic?",
    "Could I come in on Monday at 3pm?",
    "No, Tuesday please, Monday doesn't work for me after all",
    "Do you take Delta Dental insurance, and will it cover the whole cleaning?",
    "What happens if I need to cancel at the last minute, is there a fee?",
    "Actually make it 10am instead",
    "Is there parking near the Riverside office?",
    "My budget is about $200 for everything today",
    "Can I also get a checkup in the same visit?",
    "What time do you close on Fridays?",
    "Yes, please book it",
    "Sorry, one more thing, what should I bring to my first visit? I have not been to a "
    "dentist in a few years and I am a bit nervous about the whole thing honestly",
    "Wednesday would be better, at the Downtown office",
)
_AGENT_LINES = (
    "Of course. Which day and time suit you best?",
    "A cleaning is $120 and takes about 45 minutes; with a checkup it is $190.",
    "Let me check the free slots for that day for you.",
    "No problem, I have changed that. Shall I read the booking back to you?",
    "We accept Delta Dental PPO plans, which usually cover two cleanings a year in full.",
    "With less than 24 hours notice there is a $50 late cancellation fee, waived once a year.",
    "Done, I have updated the time. Anything else I can help with?",
    "The Riverside office has a free parking lot behind the building.",
)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``memory`` subcommand on an ``argparse`` subparsers object."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "memory", help="one long call: hierarchical memory vs. append-everything"
    )
    p.add_argument("--turns", type=int, default=1000, help="turns of the call (default 1000)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the report")
    p.add_argument(
        "--kb-docs", type=int, default=10000, help="synthetic knowledge base size (default 10000)"
    )
    p.add_argument(
        "--repeats", type=int, default=1000, help="prompt builds timed at each point (default 1000)"
    )
    p.add_argument("--seed", type=int, default=1)
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    """``python -m loadtest memory``: exit status 0 when every target is met."""
    return 0 if run(args)["pass"] else 1


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark; writes ``args.json`` if set, prints a summary to stderr."""
    report = asyncio.run(run_async(args))
    if args.json is not None:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(_summary(report), file=sys.stderr)
    return report


async def run_async(args: argparse.Namespace) -> dict[str, Any]:
    """The benchmark itself, for a caller already in an event loop (writes nothing)."""
    if args.turns < 1 or args.kb_docs < 0 or args.repeats < 1:
        raise SystemExit("--turns and --repeats must be >= 1, --kb-docs >= 0")
    builder = PromptBuilder()
    t0 = time.perf_counter()
    kb = KnowledgeBase(load_passages(DEMO_KB_DIR) + synthetic_passages(args.kb_docs))
    build_s = time.perf_counter() - t0
    retrieval = await _bench_retrieval(kb, args.seed)
    call = await _bench_call(kb, builder, args.turns, args.repeats, args.seed)
    report: dict[str, Any] = {
        "benchmark": "memory",
        "turns": args.turns,
        "kb_docs": len(kb),
        "kb_index_build_s": round(build_s, 3),
        "token_counter": builder.counter.name,
        "token_counter_exact": builder.counter.exact,
        "repeats": args.repeats,
        **call,
        "retrieval_ms": retrieval,
        "targets": TARGETS,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
    }
    report["pass"] = _verdict(report)
    return report


# ---------------------------------------------------------------- retrieval


async def _bench_retrieval(kb: KnowledgeBase, seed: int, n: int = 1000) -> dict[str, Any]:
    """Uncached queries (cache disabled) over the whole knowledge base, via the orchestrator."""
    rng = random.Random(seed)
    words = [w for line in _USER_LINES for w in line.split()]
    source = KnowledgeBaseSource(default=kb)
    policy = SourcePolicy(timeout_ms=1000, max_entries=0)
    async with RetrievalOrchestrator([(source, policy)]) as orch:
        times = []
        for i in range(n):
            text = " ".join(rng.choices(words, k=rng.randint(4, 14)))
            query = Query(text, TENANT, CALLER)
            start = time.perf_counter()
            result = await orch.retrieve(query)
            times.append((time.perf_counter() - start) * 1000)
            if result.failed or result.timed_out:
                raise RuntimeError(f"retrieval query {i} failed: {result.errors}")
    return {**_percentiles(times), "queries": n, "docs": len(kb), "cache": "off"}


# ---------------------------------------------------------------- the call


@dataclass(frozen=True, slots=True)
class _Turn:
    user: str
    heard: str  # the reply as played; a prefix of it after a barge-in
    interrupted: bool


def _script(turns: int, seed: int) -> list[_Turn]:
    rng = random.Random(seed)
    out = []
    for turn in range(1, turns + 1):
        user, reply = rng.choice(_USER_LINES), rng.choice(_AGENT_LINES)
        interrupted = turn % 7 == 0
        out.append(_Turn(user, reply[: len(reply) * 2 // 5] if interrupted else reply, interrupted))
    return out


def _checkpoint(
    turn: int, working: list[list[Any]], facts: dict[str, list[Any]], extra: dict[str, Any]
) -> Checkpoint:
    return Checkpoint(
        TENANT,
        CALL_ID,
        CALLER,
        epoch=1,
        node="bench",
        turn=turn,
        last_seq=turn,
        working=working,
        facts=facts,
        extra=extra,
    )


def _figures() -> dict[str, dict[str, Any]]:
    return {"prompt_tokens": {}, "prompt_build_ms": {}, "checkpoint_bytes": {}}


async def _bench_call(
    kb: KnowledgeBase, builder: PromptBuilder, turns: int, repeats: int, seed: int
) -> dict[str, Any]:
    """The same scripted call twice: through :mod:`memory`, then append-everything (apart,
    so the baseline's garbage does not land in the hierarchical timings)."""
    script = _script(turns, seed)
    points = sorted({p for p in POINTS if p <= turns} | {turns})
    hier, call = await _hierarchical(kb, builder, script, points, repeats, seed)
    gc.collect()
    base = _naive(builder.counter, script, points, max(20, repeats // 20))
    return {"hierarchical": hier, "naive": base, "call": call}


async def _hierarchical(
    kb: KnowledgeBase,
    builder: PromptBuilder,
    script: list[_Turn],
    points: list[int],
    repeats: int,
    seed: int,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    history = InMemoryHistoryStore()
    await history.save(
        CallRecord(
            TENANT,
            CALLER,
            "earlier-call",
            int(time.time() * 1000) - 86_400_000,
            {"service": "checkup", "date": "Friday"},
            "Booked a checkup, confirmed.",
        )
    )
    sources: list[tuple[KnowledgeSource, SourcePolicy]] = [
        (KnowledgeBaseSource(default=kb), SourcePolicy(timeout_ms=30)),
        (CustomerHistorySource(history), SourcePolicy(timeout_ms=30)),
        (
            SimulatedBookingSlots(latency_s=0.002, seed=seed),
            SourcePolicy(timeout_ms=40, fresh_ms=2_000, stale_ms=10_000),
        ),
    ]
    memory = SessionMemory(TENANT, CALLER)
    figures = _figures()
    build_ms: list[float] = []
    retrieve_ms: list[float] = []
    partials = prefetched = 0
    turns = tqdm(script, desc="memory bench", unit="turn", file=sys.stderr, leave=False)
    async with RetrievalOrchestrator(sources) as orch:
        retriever = orch.for_call(memory.query_for)
        try:
            for turn, step in enumerate(turns, start=1):
                words = step.user.split()
                retriever.prefetch(" ".join(words[: max(1, len(words) * 3 // 4)]))
                await asyncio.sleep(0)  # the interim arrives while the caller still speaks
                memory.observe_user(turn, step.user)
                start = time.perf_counter()
                result = await retriever.retrieve(step.user)
                retrieve_ms.append((time.perf_counter() - start) * 1000)
                partials += result.partial
                prefetched += result.prefetched
                start = time.perf_counter()
                prompt = builder.build(memory, step.user, result)
                build_ms.append((time.perf_counter() - start) * 1000)
                memory.observe_agent(turn, step.heard, interrupted=step.interrupted)
                if turn in points:
                    key, state = str(turn), memory.to_state()
                    figures["prompt_tokens"][key] = prompt.tokens
                    figures["prompt_build_ms"][key] = _timed(
                        partial(builder.build, memory, step.user, result),
                        repeats,
                        builder.counter,
                    )
                    figures["checkpoint_bytes"][key] = len(
                        _checkpoint(turn, state.working, state.facts, state.extra).to_bytes()
                    )
        finally:
            await retriever.aclose()
    call = {
        "prompt_build_ms_all_turns": _percentiles(build_ms),
        "turn_retrieval_ms": _percentiles(retrieve_ms),
        "partial_retrievals": partials,
        "prefetch_reused": prefetched,
    }
    return figures, call


def _naive(
    counter: TokenCounter, script: list[_Turn], points: list[int], repeats: int
) -> dict[str, dict[str, Any]]:
    """The baseline: every turn appended to the prompt and to the checkpoint."""
    transcript: list[list[Any]] = []

    def build(user: str) -> int:
        lines = [f"{'Caller' if who == 'user' else 'Agent'}: {text}" for _, who, text in transcript]
        system = DEFAULT_INSTRUCTIONS + "\n\n## Conversation\n" + "\n".join(lines)
        return counter.count(system) + counter.count(user) + 11  # chat framing, as in memory

    figures = _figures()
    for turn, step in enumerate(script, start=1):
        tokens = build(step.user)
        transcript += [[turn, "user", step.user], [turn, "agent", step.heard]]
        if turn in points:
            key = str(turn)
            figures["prompt_tokens"][key] = tokens
            figures["prompt_build_ms"][key] = _timed(partial(build, step.user), repeats, counter)
            figures["checkpoint_bytes"][key] = len(_checkpoint(turn, transcript, {}, {}).to_bytes())
    return figures


def _timed(
    fn: Callable[[], object], repeats: int, counter: TokenCounter | None = None
) -> dict[str, float]:
    # Start each series without garbage left by the turns before it (the naive transcript
    # makes plenty); collections during the series still count.
    gc.collect()
    times = []
    for _ in range(repeats):
        if counter is not None:
            # Each build counts every line afresh, as it would if no line recurred: a
            # repeat of the same build would otherwise find them all counted already.
            counter.forget()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return _percentiles(times)


def _percentiles(ms: list[float]) -> dict[str, float]:
    ordered = sorted(ms)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"p50": round(statistics.median(ordered), 4), "p99": round(p99, 4)}


def _verdict(report: dict[str, Any]) -> dict[str, bool]:
    hier = report["hierarchical"]
    last = str(report["turns"])
    p99s = [v["p99"] for v in hier["prompt_build_ms"].values()]
    p50s = [v["p50"] for v in hier["prompt_build_ms"].values()]
    return {
        "prompt_tokens": hier["prompt_tokens"][last] <= TARGETS["prompt_tokens_max"],
        "checkpoint_bytes": hier["checkpoint_bytes"][last] <= TARGETS["checkpoint_bytes_max"],
        "prompt_build_p99": max(p99s) <= TARGETS["prompt_build_p99_ms_max"],
        # Flat: the median build at the last point within 1.5x (+0.2 ms of noise) of the first.
        "prompt_build_flat": p50s[-1] <= 1.5 * p50s[0] + 0.2,
        "retrieval_p99": report["retrieval_ms"]["p99"] <= TARGETS["retrieval_p99_ms_max"],
    }


def _summary(report: dict[str, Any]) -> str:
    hier, base = report["hierarchical"], report["naive"]
    rows = [
        f"memory bench: {report['turns']} turns, {report['kb_docs']} KB passages, "
        f"tokens by {report['token_counter']}  (hierarchical | naive)",
        f"{'turn':>5}  {'prompt tokens':>15}  {'build ms p50/p99':>25}  {'checkpoint bytes':>17}",
    ]
    for key in hier["prompt_tokens"]:
        h, n = hier["prompt_build_ms"][key], base["prompt_build_ms"][key]
        rows.append(
            f"{key:>5}  {hier['prompt_tokens'][key]:>6} | {base['prompt_tokens'][key]:<6}  "
            f"{h['p50']:5.2f}/{h['p99']:5.2f} | {n['p50']:5.2f}/{n['p99']:5.2f}  "
            f"{hier['checkpoint_bytes'][key]:>6} | {base['checkpoint_bytes'][key]:<8}"
        )
    r = report["retrieval_ms"]
    rows.append(
        f"retrieval over {r['docs']} passages: p50 {r['p50']:.3f} ms, p99 {r['p99']:.3f} ms"
    )
    rows.append("pass: " + json.dumps(report["pass"]))
    return "\n".join(rows)


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m loadtest.memory_bench")
    add_parser(_parser.add_subparsers(dest="command", required=True))
    run(_parser.parse_args(["memory", *sys.argv[1:]]))
