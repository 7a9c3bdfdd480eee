"""What the callers of a ``loadtest chaos`` run (one router) experienced, scored; and the
effects (bookings) the run confirmed against those stored. Definitions in
:mod:`loadtest.chaos`.

A run may strike nodes more than once (``--fault node-kill@20%/30%``): each strike is a
time and its victims, and a call is affected by a strike when its owner then was a victim;
``affected_calls`` and ``context_lost`` count calls, the gaps are one per call and strike.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import nats

from callmesh_client.client import Reply
from events import subjects
from events.connection import server_urls
from loadtest.stats import percentiles

# The simulated agent's confirmation of a booking ("... is booked for ...") and its later
# reminders of it ("... is booked. Anything else ...") both say this.
BOOKED_WORD = "booked"
# After the calls end, nodes may still be publishing outboxes left by an outage: the
# effects are counted again until none is missing or this bound passes.
EFFECTS_SETTLE_S = 60.0
# Strikes: (time.monotonic() of the strike, the names of its victims).
Strike = tuple[float, set[str]]


@dataclass
class ChaosCall:
    call_id: str
    name: str
    ready_node: str = ""
    replies: list[Reply] = field(default_factory=list)
    sent: int = 0
    duplicates: int = 0
    errors: list[str] = field(default_factory=list)
    ended_at: float | None = None


def _owner_at(call: ChaosCall, t: float) -> str:
    owner = call.ready_node
    for r in call.replies:
        if r.done_at <= t:
            owner = str(r.metrics.get("node", owner))
    return owner


def score(
    calls: list[ChaosCall], strikes: list[Strike], failed_shard: set[str] | None = None
) -> dict[str, Any]:
    """The scores of a run. ``failed_shard``: calls whose state is on a Valkey master the
    run killed; their gaps are also given apart, as they wait for its replica's promotion."""
    gaps: list[float] = []
    answering: list[float] = []  # of each gap, the new owner's retrieval and model time
    samples: list[tuple[float, str, float, float]] = []
    # Gaps of turns whose reply had not started before the kill, and of those the caller
    # was already receiving: the new owner's first frame the caller lacks then comes after
    # the part it already has (identical frames are not sent twice).
    by_case: dict[str, list[float]] = {"reply_not_started": [], "reply_under_way": []}
    by_shard: dict[str, list[float]] = {"master_killed": [], "shard_up": []}
    affected: set[str] = set()
    context_lost: set[str] = set()
    for kill_at, victims in strikes:
        for call in calls:
            if _owner_at(call, kill_at) not in victims:
                continue
            if call.ended_at is not None and call.ended_at <= kill_at:
                continue
            if not any(r.done_at > kill_at for r in call.replies) and not call.errors:
                continue  # its last turn finished before the kill and it only hung up after
            affected.add(call.call_id)
            after = [
                r
                for r in call.replies
                if r.done_at > kill_at and r.metrics.get("node") not in victims
            ]
            if not after:
                continue
            first = after[0]
            frames = [t for t in first.frame_times if t > kill_at] or [first.done_at]
            gaps.append((frames[0] - max(kill_at, first.sent_at)) * 1000)
            metrics = first.metrics
            answering.append(
                float(metrics.get("retrieval_ms", 0))
                + float(metrics.get("llm_first_sentence_ms", 0))
            )
            samples.append(
                (gaps[-1], call.call_id, answering[-1], (first.sent_at - kill_at) * 1000)
            )
            under_way = any(t <= kill_at for t in first.frame_times)
            by_case["reply_under_way" if under_way else "reply_not_started"].append(gaps[-1])
            if failed_shard:
                shard = "master_killed" if call.call_id in failed_shard else "shard_up"
                by_shard[shard].append(gaps[-1])
            knew_name = any(r.done_at <= kill_at for r in call.replies)
            if knew_name and call.name not in first.text:
                context_lost.add(call.call_id)
    report: dict[str, Any] = {
        "affected_calls": len(affected),
        "failover_gap_ms": percentiles(gaps, (50, 99)),
        # What the gap is made of: the new owner answering (retrieval and the model's first
        # sentence, from its turn metrics), and the rest (detection, relink, ownership,
        # restore, waiting for the new owner's loop).
        "failover_gap_parts_ms": {
            "answering": percentiles(answering, (50, 99)),
            "failover": percentiles([g - a for g, a in zip(gaps, answering, strict=True)]),
        },
        "failover_gap_by_case_ms": {k: percentiles(v, (50, 99)) for k, v in by_case.items()},
        # The slowest gaps, to look up in the logs: call, gap, answering, and when the
        # utterance was sent (ms, relative to the kill).
        "slowest_gaps": [
            {"call_id": c, "gap_ms": round(g), "answering_ms": round(a), "sent_ms": round(t)}
            for g, c, a, t in sorted(samples, reverse=True)[:5]
        ],
        "lost_turns": sum(c.sent - len(c.replies) for c in calls),
        "duplicate_replies": sum(c.duplicates for c in calls),
        "context_lost": len(context_lost),
    }
    if failed_shard:
        report["failover_gap_by_shard_ms"] = {
            k: percentiles(v, (50, 99)) for k, v in by_shard.items()
        }
    return report


def confirmed_bookings(calls: list[ChaosCall]) -> set[str]:
    """The calls whose caller heard that their booking was made."""
    return {c.call_id for c in calls if any(BOOKED_WORD in r.text for r in c.replies)}


async def effects_per_call(nats_url: str) -> Counter[str]:
    """Bookings stored in the effects stream, per call."""
    nc = await nats.connect(server_urls(nats_url))
    try:
        js = nc.jetstream()
        info = await js.stream_info(subjects.EFFECTS_STREAM)
        per_call: Counter[str] = Counter()
        # An empty stream reports first_seq 0, which get_msg refuses (no call booked yet).
        first = max(1, info.state.first_seq)
        for seq in range(first, info.state.last_seq + 1):
            msg = await js.get_msg(subjects.EFFECTS_STREAM, seq)
            if msg.data:
                per_call[json.loads(msg.data)["call_id"]] += 1
        return per_call
    finally:
        await nc.drain()


async def score_effects(nats_url: str, confirmed: set[str]) -> dict[str, Any]:
    """Bookings confirmed to callers (their call ids) against bookings stored (lost,
    duplicated), waiting (bounded) for the stream to settle."""
    deadline = time.monotonic() + EFFECTS_SETTLE_S
    started = time.monotonic()
    while True:
        per_call = await effects_per_call(nats_url)
        lost = sorted(c for c in confirmed if per_call[c] == 0)
        if not lost or time.monotonic() > deadline:
            break
        await asyncio.sleep(1.0)
    return {
        "bookings_confirmed": len(confirmed),
        "effects_stored": sum(per_call.values()),
        "lost_effects": len(lost),
        "lost_effect_samples": lost[:5],
        "effects_settle_s": round(time.monotonic() - started, 1),
        "duplicate_effects": sum(max(0, n - 1) for n in per_call.values()),
    }


async def score_crm(crm_url: str, stored: int) -> dict[str, Any]:
    """With a CRM in the run (``--fault crm-outage``): the effects it applied, waiting
    (bounded) until every stored one is; applied twice and never applied."""
    deadline = time.monotonic() + EFFECTS_SETTLE_S
    started = time.monotonic()
    async with aiohttp.ClientSession() as http:
        while True:
            async with http.get(f"{crm_url}/_stats") as resp:
                stats = await resp.json()
            if int(stats["applied"]) >= stored or time.monotonic() > deadline:
                break
            await asyncio.sleep(1.0)
    return {
        "crm_applied": int(stats["applied"]),
        "crm_duplicates": int(stats["duplicates"]),
        "crm_undelivered": max(0, stored - int(stats["applied"])),
        "crm_settle_s": round(time.monotonic() - started, 1),
    }
