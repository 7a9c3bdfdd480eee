"""Knowledge sources the retrieval orchestrator queries in parallel.

Each source answers one :class:`Query` with a few short :class:`Snippet` s. A source knows
how to fetch and what identifies a query for caching (:meth:`KnowledgeSource.cache_key`);
timeouts and caching belong to the orchestrator, so a source is plain async code.

Every query carries its tenant and caller; a source must never answer from another
tenant's (or, for caller-scoped data, another caller's) records, and the orchestrator keys
its cache by tenant as a second fence.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from memory.history import HistoryStore
from memory.knowledge import KnowledgeBase, tokenize

# A query's text is what sources search and what cache keys are made of: its size is
# bounded here, for every source and cache (a 250 KiB utterance used to cost ~2.4 MB of
# cache). The head of an utterance says what it is about; the tail is dropped.
MAX_QUERY_CHARS = 500


@dataclass(frozen=True, slots=True)
class Query:
    """What a turn asks the knowledge sources: the utterance plus the session's facts
    (a booking system needs the date and service, not the words)."""

    text: str
    tenant: str
    caller: str
    # Sorted (slot, value) pairs: hashable, and equal for equal facts.
    facts: tuple[tuple[str, str], ...] = ()
    intent: str = ""

    def __post_init__(self) -> None:
        if len(self.text) > MAX_QUERY_CHARS:
            object.__setattr__(self, "text", self.text[:MAX_QUERY_CHARS])

    def fact(self, slot: str) -> str | None:
        for name, value in self.facts:
            if name == slot:
                return value
        return None


@dataclass(frozen=True, slots=True)
class Snippet:
    """One retrieved piece of knowledge, with where it came from (for audit and replay)."""

    source: str
    text: str
    ref: str = ""  # document id, record id...
    score: float = 0.0


class KnowledgeSource(Protocol):
    """An async knowledge source. ``fetch`` may be slow or fail (raise anything); the
    orchestrator bounds it with a timeout and reports the outcome."""

    name: str

    def cache_key(self, query: Query) -> Hashable:
        """What identifies this query's answer, without the tenant (the orchestrator adds
        it). Two queries with the same key may share a cached answer."""
        ...

    async def fetch(self, query: Query) -> list[Snippet]: ...


# ---------------------------------------------------------------- knowledge base


@dataclass
class KnowledgeBaseSource:
    """Policies, FAQ and prices from a local BM25 knowledge base, one per tenant.

    ``default`` serves tenants without a knowledge base of their own (the demo shares one);
    a tenant with neither gets no snippets, never another tenant's documents.
    """

    by_tenant: Mapping[str, KnowledgeBase] = field(default_factory=dict)
    default: KnowledgeBase | None = None
    k: int = 3
    name: str = "knowledge_base"

    def cache_key(self, query: Query) -> Hashable:
        # Rephrasings with the same terms share an entry ("price of a cleaning" /
        # "cleaning price").
        return tuple(sorted(set(tokenize(query.text))))

    async def fetch(self, query: Query) -> list[Snippet]:
        kb = self.by_tenant.get(query.tenant, self.default)
        if kb is None:
            return []
        return [
            Snippet(self.name, f"{h.passage.title}: {h.passage.text}", h.passage.doc_id, h.score)
            for h in kb.search(query.text, self.k)
        ]


# ---------------------------------------------------------------- customer history


@dataclass
class CustomerHistorySource:
    """Earlier calls of the same caller of the same tenant (facts and a short summary)."""

    store: HistoryStore
    limit: int = 3
    name: str = "customer_history"

    def cache_key(self, query: Query) -> Hashable:
        # The history changes only at call end: asked once per call (``per_call`` policy).
        return ("caller", query.caller)

    async def fetch(self, query: Query) -> list[Snippet]:
        records = await self.store.load(query.tenant, query.caller, limit=self.limit)
        return [Snippet(self.name, r.render(), r.call_id) for r in records]


# ---------------------------------------------------------------- live systems (simulated)


@dataclass
class SimulatedBookingSlots:
    """A SIMULATED live booking system: free appointment slots for the date and service in
    the session's facts, after a configurable latency. Deterministic per
    (tenant, date, service) so tests and replays see the same slots. Stands in for a real
    practice-management API, which would implement the same :class:`KnowledgeSource`."""

    latency_s: float = 0.015
    jitter: float = 0.2
    seed: int = 0
    name: str = "booking_slots_simulated"
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def cache_key(self, query: Query) -> Hashable:
        return (query.fact("date"), query.fact("service"), query.fact("location"))

    async def fetch(self, query: Query) -> list[Snippet]:
        if self.latency_s > 0:
            spread = self.latency_s * self.jitter
            await asyncio.sleep(max(0.0, self._rng.uniform(-spread, spread) + self.latency_s))
        date = query.fact("date")
        if date is None:
            return []
        service = query.fact("service") or "any service"
        office = query.fact("location") or "Downtown"
        digest = hashlib.blake2b(f"{query.tenant}|{date}|{service}|{office}".encode()).digest()
        hours = sorted({9 + b % 8 for b in digest[:4]})
        times = ", ".join(_clock_time(h, half=bool(digest[h] & 1)) for h in hours)
        return [
            Snippet(
                self.name,
                f"Free slots on {date} for {service} at the {office} office: {times}.",
                f"slots:{date}:{service}:{office}",
            )
        ]


def _clock_time(hour: int, *, half: bool) -> str:
    return f"{hour % 12 or 12}:{'30' if half else '00'} {'am' if hour < 12 else 'pm'}"
