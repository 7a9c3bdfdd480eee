"""What happened to the effects of an ``effects`` benchmark run, read from the sources.

Three witnesses, none of them the benchmark's own bookkeeping: JetStream (the effects the
nodes committed and published, when each was stored, the dead-letter stream, and whether
the workers' durable consumer still holds anything), the fake CRM (every key it applied,
how often, and when first) and the callers (which booking turns they were told about).
:func:`score` turns them into the report's ``effects_*`` figures.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from events import subjects
from events.worker_config import DEFAULT_DURABLE
from loadtest.stats import percentiles


@dataclass(frozen=True)
class Booking:
    """A booking turn as the caller saw it: the effect key it must produce and when the
    caller had the whole reply (wall clock, seconds)."""

    key: str
    confirmed: bool  # the reply told the caller the booking was made
    replied_at: float


@dataclass
class Ledger:
    """The witnesses' testimony at one moment."""

    published: dict[str, float] = field(default_factory=dict)  # key -> stored at (wall s)
    applied: dict[str, dict[str, float]] = field(default_factory=dict)  # CRM /_applied
    dead_lettered: int = 0
    consumer_pending: int = 0  # not yet delivered to any worker
    consumer_ack_pending: int = 0  # delivered, not yet acked (in flight or backing off)

    @property
    def consumer_idle(self) -> bool:
        """Nothing is left for a worker to (re)deliver, so nothing can be applied later."""
        return self.consumer_pending == 0 and self.consumer_ack_pending == 0


async def read_published(js: JetStreamContext) -> dict[str, float]:
    """Every effect stored in the effects stream: its id (the Idempotency-Key the CRM sees)
    and when JetStream stored it. A republish by a new owner is de-duplicated by the
    stream, so each key appears once, at its first publish."""
    try:
        info = await js.stream_info(subjects.EFFECTS_STREAM)
    except NotFoundError:
        return {}
    out: dict[str, float] = {}
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            msg = await js.get_msg(subjects.EFFECTS_STREAM, seq)
        except NotFoundError:
            continue  # a gap: nothing was stored under this sequence
        if msg.data and msg.time is not None:
            out[str(json.loads(msg.data)["id"])] = msg.time.timestamp()
    return out


async def read_ledger(js: JetStreamContext, http: aiohttp.ClientSession, crm_base: str) -> Ledger:
    ledger = Ledger(published=await read_published(js))
    async with http.get(f"{crm_base}/_applied") as resp:
        resp.raise_for_status()
        ledger.applied = await resp.json()
    try:
        dl = await js.stream_info(subjects.DEAD_LETTER_STREAM)
        ledger.dead_lettered = int(dl.state.messages)
    except NotFoundError:
        ledger.dead_lettered = 0
    try:
        ci = await js.consumer_info(subjects.EFFECTS_STREAM, DEFAULT_DURABLE)
        ledger.consumer_pending = int(ci.num_pending or 0)
        ledger.consumer_ack_pending = int(ci.num_ack_pending or 0)
    except NotFoundError:
        pass  # no worker ever bound: then nothing was delivered either, and score says so
    return ledger


def expected_keys(ledger: Ledger, bookings: list[Booking]) -> set[str]:
    """Every effect the system owes the CRM: each one it committed and published, and
    each one a caller was told about (a confirmed booking missing from the stream would be
    an outbox loss, and must count against delivery)."""
    return set(ledger.published) | {b.key for b in bookings if b.confirmed}


def score(
    ledger: Ledger, bookings: list[Booking], outage: tuple[float, float] | None
) -> dict[str, Any]:
    """The report's effects figures. ``outage`` is the CRM outage window (wall seconds)."""
    expected = expected_keys(ledger, bookings)
    applied = ledger.applied
    delivered = expected & set(applied)
    replied = {b.key: b.replied_at for b in bookings if b.confirmed}
    lag_store = [
        (applied[k]["first_applied_at"] - ledger.published[k]) * 1000
        for k in delivered
        if k in ledger.published
    ]
    lag_reply = [
        (applied[k]["first_applied_at"] - replied[k]) * 1000 for k in delivered & set(replied)
    ]
    during = (
        sum(1 for t in ledger.published.values() if outage[0] <= t <= outage[1]) if outage else 0
    )
    return {
        "effects_expected": len(expected),
        "effects_published": len(ledger.published),
        "bookings_confirmed": len(replied),
        "confirmed_not_published": len(set(replied) - set(ledger.published)),
        "effects_delivered": len(delivered),
        "effects_duplicated": sum(1 for v in applied.values() if v["applied"] > 1),
        "effects_dead_lettered": ledger.dead_lettered,
        "effects_unexpected": len(set(applied) - expected),
        "effects_missing_sample": sorted(expected - delivered)[:5],
        "effects_published_during_outage": during,
        "delivery_lag_ms": _lag(lag_store),
        "delivery_lag_from_reply_ms": _lag(lag_reply),
    }


def _lag(values: list[float]) -> dict[str, float]:
    p = percentiles(values, (50, 99))
    return {"n": p["n"], "p50": p["p50"], "p99": p["p99"], "max": p["max"]}
