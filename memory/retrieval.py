"""The retrieval orchestrator: knowledge sources queried in parallel, each with its own
timeout and stale-while-revalidate cache, and a result that says where every part came from.

One :class:`RetrievalOrchestrator` per node is shared by its calls (a cache warmed by one
call serves the next); each call gets a :class:`CallRetriever` that starts retrieval on
interim transcripts (:meth:`CallRetriever.prefetch`) and reuses it for the final one.

A source that misses its timeout is reported ``timed_out`` and its fetch goes on in the
background, so its late answer warms the cache for the next turn instead of being lost.
Fetches of the same key are shared (single flight), which also lets a cancelled prefetch
hand its in-flight work to the final retrieval.

A source whose answer cannot change while a call lasts (``SourcePolicy.per_call``: a
caller's history changes only when one of their calls ends) is asked once per call, at the
call's first retrieval, and its answer is kept by the call's :class:`CallRetriever` until
the call ends; it was asked again every few turns, a Redis read per turn for nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field, replace
from enum import StrEnum

from memory.knowledge import tokenize
from memory.sources import KnowledgeSource, Query, Snippet

Clock = Callable[[], float]


class SourceStatus(StrEnum):
    ANSWERED = "answered"  # fetched within its timeout for this query
    CACHED = "cached"  # from a fresh cache entry
    STALE = "stale"  # from a cache entry past its freshness; a refresh runs in the background
    TIMED_OUT = "timed_out"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class SourcePolicy:
    """Timeout and cache of one source. Ages are counted from when an answer was stored."""

    timeout_ms: float = 50.0
    # Served from cache without asking the source.
    fresh_ms: float = 30_000.0
    # Served from cache (marked stale) while a background fetch revalidates it; older
    # entries are never served. Live systems keep this short: old slots are wrong slots.
    stale_ms: float = 300_000.0
    max_entries: int = 4096  # 0 disables the cache
    max_snippets: int = 3
    # Fetches in flight at once (including timed-out ones finishing in the background);
    # beyond it a query fails fast instead of piling up tasks on a slow source.
    max_inflight: int = 64
    # The answer does not change while a call lasts: a call asks once and keeps the answer
    # (a failed fetch is asked again) until it ends. The node-wide cache is not used, so a
    # new call never reads what an earlier call of the same caller cached before it ended.
    # Without a call (``RetrievalOrchestrator.retrieve`` alone) the source is asked every time.
    per_call: bool = False

    def __post_init__(self) -> None:
        if self.timeout_ms <= 0:
            raise ValueError("timeout_ms must be > 0")
        if not 0 <= self.fresh_ms <= self.stale_ms:
            raise ValueError("need 0 <= fresh_ms <= stale_ms")
        if self.max_entries < 0 or self.max_snippets < 1 or self.max_inflight < 1:
            raise ValueError("max_entries >= 0, max_snippets >= 1 and max_inflight >= 1")


@dataclass(frozen=True, slots=True)
class RetrievalResult:
    """What one retrieval produced. Snippets are grouped by source in registration order;
    ``status`` has one entry per source, so a gap is always visible, never merged away."""

    text: str
    snippets: tuple[Snippet, ...]
    status: dict[str, SourceStatus]
    elapsed_ms: float
    errors: dict[str, str] = field(default_factory=dict)
    prefetched: bool = False  # reused the prefetch started on an interim transcript

    def _with(self, *statuses: SourceStatus) -> tuple[str, ...]:
        return tuple(name for name, s in self.status.items() if s in statuses)

    @property
    def answered(self) -> tuple[str, ...]:
        """Sources that answered live for this query."""
        return self._with(SourceStatus.ANSWERED)

    @property
    def from_cache(self) -> tuple[str, ...]:
        """Sources served from cache (fresh or stale)."""
        return self._with(SourceStatus.CACHED, SourceStatus.STALE)

    @property
    def stale(self) -> tuple[str, ...]:
        return self._with(SourceStatus.STALE)

    @property
    def timed_out(self) -> tuple[str, ...]:
        return self._with(SourceStatus.TIMED_OUT)

    @property
    def failed(self) -> tuple[str, ...]:
        return self._with(SourceStatus.FAILED)

    @property
    def partial(self) -> bool:
        """True when some source gave nothing: the answer must not pretend to be complete."""
        return bool(self.timed_out or self.failed)


@dataclass(slots=True)
class _Entry:
    snippets: tuple[Snippet, ...]
    stored_at: float


class _Overloaded(Exception):
    pass


# A per-call source's answers one call keeps (one per cache key: a caller's history has
# one); beyond it, answers are fetched again rather than held.
MAX_KEPT_PER_CALL = 8
# What a call keeps of its per-call sources: the fetch of each, done or still running.
Kept = dict[Hashable, asyncio.Task[tuple[Snippet, ...]]]
# A source's part of a retrieval: its status, its snippets and what went wrong.
_Outcome = tuple[SourceStatus, tuple[Snippet, ...], str]
# A source's part as it starts: known at once, or a fetch to wait for.
_Started = _Outcome | asyncio.Task[tuple[Snippet, ...]]


def _overloaded(reg: _Registered) -> _Outcome:
    return SourceStatus.FAILED, (), f"{reg.policy.max_inflight} fetches already in flight"


class _Registered:
    """A source with its policy, cache and in-flight fetches."""

    def __init__(self, source: KnowledgeSource, policy: SourcePolicy) -> None:
        self.source = source
        self.policy = policy
        self.cache: OrderedDict[Hashable, _Entry] = OrderedDict()
        self.inflight: dict[Hashable, asyncio.Task[tuple[Snippet, ...]]] = {}

    def remember(self, key: Hashable, snippets: tuple[Snippet, ...], now: float) -> None:
        if self.policy.max_entries == 0 or self.policy.per_call:
            return
        self.cache[key] = _Entry(snippets, now)
        self.cache.move_to_end(key)
        while len(self.cache) > self.policy.max_entries:
            self.cache.popitem(last=False)


class RetrievalOrchestrator:
    """Queries every registered source in parallel, each bounded by its own timeout."""

    def __init__(
        self,
        sources: Iterable[tuple[KnowledgeSource, SourcePolicy]],
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        self._sources: list[_Registered] = []
        for source, policy in sources:
            if any(r.source.name == source.name for r in self._sources):
                raise ValueError(f"duplicate source name: {source.name!r}")
            self._sources.append(_Registered(source, policy))
        self._clock = clock
        self._closed = False

    @property
    def source_names(self) -> tuple[str, ...]:
        return tuple(r.source.name for r in self._sources)

    async def retrieve(self, query: Query, kept: Kept | None = None) -> RetrievalResult:
        """Ask every source; return when each has answered, hit the cache, or timed out.
        ``kept``: what the call asking has kept of its per-call sources."""
        if self._closed:
            raise RuntimeError("retrieval orchestrator is closed")
        start = time.perf_counter()
        started = [self._start(r, query, kept) for r in self._sources]
        waiting = {i: t for i, t in enumerate(started) if isinstance(t, asyncio.Task)}
        waited: dict[int, _Outcome] = {}
        if len(waiting) == 1:  # no gather: it would wrap the one wait in a task
            ((i, task),) = waiting.items()
            waited[i] = await self._wait(self._sources[i], task)
        elif waiting:
            outcomes = await asyncio.gather(
                *(self._wait(self._sources[i], t) for i, t in waiting.items())
            )
            waited = dict(zip(waiting, outcomes, strict=True))
        snippets: list[Snippet] = []
        status: dict[str, SourceStatus] = {}
        errors: dict[str, str] = {}
        for i, (reg, outcome) in enumerate(zip(self._sources, started, strict=True)):
            st, found, error = waited[i] if isinstance(outcome, asyncio.Task) else outcome
            status[reg.source.name] = st
            snippets.extend(found)
            if error:
                errors[reg.source.name] = error
        elapsed = (time.perf_counter() - start) * 1000
        return RetrievalResult(query.text, tuple(snippets), status, elapsed, errors)

    def for_call(
        self, query_for: Callable[[str], Query], *, reuse_similarity: float = 0.75
    ) -> CallRetriever:
        """A per-call retriever; ``query_for`` turns a transcript into a :class:`Query`
        (``SessionMemory.query_for`` adds tenant, caller and facts)."""
        return CallRetriever(self, query_for, reuse_similarity=reuse_similarity)

    def _start(self, reg: _Registered, query: Query, kept: Kept | None) -> _Started:
        """What a source answers at once (from a cache, or a fetch that cannot start), or
        the fetch to wait for: answers at hand cost the turn no task."""
        # The tenant is part of every key: one tenant's answer never serves another.
        key = (query.tenant, reg.source.cache_key(query))
        if reg.policy.per_call and kept is not None:
            return self._once_per_call(reg, query, key, kept)
        entry = reg.cache.get(key)
        if entry is not None:
            age_ms = (self._clock() - entry.stored_at) * 1000
            if age_ms <= reg.policy.fresh_ms:
                reg.cache.move_to_end(key)
                return SourceStatus.CACHED, entry.snippets, ""
            if age_ms <= reg.policy.stale_ms:
                with contextlib.suppress(_Overloaded):
                    self._fetch(reg, query, key)
                return SourceStatus.STALE, entry.snippets, ""
            del reg.cache[key]
        try:
            return self._fetch(reg, query, key)
        except _Overloaded:
            return _overloaded(reg)

    def _once_per_call(self, reg: _Registered, query: Query, key: Hashable, kept: Kept) -> _Started:
        """A per-call source: the call's own answer, fetched at its first retrieval."""
        name_key = (reg.source.name, key)
        task = kept.get(name_key)
        if task is not None and task.done() and not task.cancelled() and not task.exception():
            return SourceStatus.CACHED, task.result(), ""
        if task is None or task.done():  # not asked yet, or the last try failed
            try:
                task = self._fetch(reg, query, key)
            except _Overloaded:
                return _overloaded(reg)
            if name_key in kept or len(kept) < MAX_KEPT_PER_CALL:
                kept[name_key] = task
        # A fetch that timed out for an earlier turn is still the call's: waited for again.
        return task

    async def _wait(self, reg: _Registered, task: asyncio.Task[tuple[Snippet, ...]]) -> _Outcome:
        try:
            # shield: a timeout (or a cancelled prefetch) stops the waiting, not the fetch.
            async with asyncio.timeout(reg.policy.timeout_ms / 1000):
                found = await asyncio.shield(task)
        except TimeoutError:
            return SourceStatus.TIMED_OUT, (), f"no answer within {reg.policy.timeout_ms:g} ms"
        except Exception as exc:  # a source may fail any way it likes; the turn goes on
            return SourceStatus.FAILED, (), f"{type(exc).__name__}: {exc}"
        return SourceStatus.ANSWERED, found, ""

    def _fetch(
        self, reg: _Registered, query: Query, key: Hashable
    ) -> asyncio.Task[tuple[Snippet, ...]]:
        task = reg.inflight.get(key)
        if task is not None:
            return task
        if len(reg.inflight) >= reg.policy.max_inflight:
            raise _Overloaded
        task = asyncio.create_task(
            self._run_fetch(reg, query, key), name=f"retrieval:{reg.source.name}"
        )
        reg.inflight[key] = task
        task.add_done_callback(lambda t: self._fetch_done(reg, key, t))
        return task

    async def _run_fetch(
        self, reg: _Registered, query: Query, key: Hashable
    ) -> tuple[Snippet, ...]:
        found = tuple((await reg.source.fetch(query))[: reg.policy.max_snippets])
        reg.remember(key, found, self._clock())
        return found

    @staticmethod
    def _fetch_done(
        reg: _Registered, key: Hashable, task: asyncio.Task[tuple[Snippet, ...]]
    ) -> None:
        if reg.inflight.get(key) is task:
            del reg.inflight[key]
        if not task.cancelled():
            # Consumed here: nobody may be waiting any more (a timed-out query).
            task.exception()

    async def aclose(self) -> None:
        """Cancel background fetches and wait for them. Idempotent."""
        self._closed = True
        tasks = [t for r in self._sources for t in r.inflight.values()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> RetrievalOrchestrator:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        cached = sum(len(r.cache) for r in self._sources)
        inflight = sum(len(r.inflight) for r in self._sources)
        return (
            f"<RetrievalOrchestrator [{len(self._sources)} sources, {cached} cached, "
            f"{inflight} in flight]>"
        )


@dataclass(slots=True)
class _Prefetch:
    query: Query
    terms: frozenset[str]
    task: asyncio.Task[RetrievalResult]


class CallRetriever:
    """Retrieval for one call: prefetch on interim transcripts, reuse on the final one."""

    def __init__(
        self,
        orchestrator: RetrievalOrchestrator,
        query_for: Callable[[str], Query],
        *,
        reuse_similarity: float = 0.75,
    ) -> None:
        if not 0 < reuse_similarity <= 1:
            raise ValueError("reuse_similarity must be in (0, 1]")
        self._orch = orchestrator
        self._query_for = query_for
        self._similarity = reuse_similarity
        self._pending: _Prefetch | None = None
        # Every task this object started, including cancelled ones still unwinding.
        self._tasks: set[asyncio.Task[RetrievalResult]] = set()
        # This call's answers of the per-call sources (``SourcePolicy.per_call``).
        self._kept: Kept = {}
        self._closed = False
        self.prefetches_started = 0
        self.prefetches_reused = 0

    def prefetch(self, partial_text: str) -> None:
        """Start retrieval for an interim transcript. A new interim close enough to the one
        being fetched keeps that fetch; a different one replaces it."""
        if self._closed:
            return
        query = self._query_for(partial_text)
        terms = frozenset(tokenize(query.text))
        if not terms:
            return
        if self._pending is not None:
            if self._close_enough(self._pending, query, terms):
                return
            self._pending.task.cancel()
        task = asyncio.create_task(
            self._orch.retrieve(query, self._kept), name="retrieval:prefetch"
        )
        self._tasks.add(task)
        task.add_done_callback(self._forget)
        self._pending = _Prefetch(query, terms, task)
        self.prefetches_started += 1

    async def retrieve(self, final_text: str) -> RetrievalResult:
        """Retrieval for the final transcript, reusing a close-enough prefetch."""
        query = self._query_for(final_text)
        pending, self._pending = self._pending, None
        start = time.perf_counter()
        if pending is not None:
            if self._close_enough(pending, query, frozenset(tokenize(query.text))):
                result = await pending.task
                # A prefetch that missed a source is asked again: the late answer may
                # have reached the cache since.
                if not result.partial:
                    self.prefetches_reused += 1
                    waited = (time.perf_counter() - start) * 1000
                    return replace(result, text=query.text, elapsed_ms=waited, prefetched=True)
            else:
                pending.task.cancel()
        return await self._orch.retrieve(query, self._kept)

    def _forget(self, task: asyncio.Task[RetrievalResult]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            # A replaced prefetch has no reader; its error (a closed orchestrator) is moot.
            task.exception()

    def _close_enough(self, pending: _Prefetch, query: Query, terms: frozenset[str]) -> bool:
        before = pending.query
        scope = (query.tenant, query.caller, query.facts)
        if (before.tenant, before.caller, before.facts) != scope:
            return False
        union = pending.terms | terms
        return bool(union) and len(pending.terms & terms) / len(union) >= self._similarity

    async def aclose(self) -> None:
        """Cancel a pending prefetch and wait for it. Idempotent."""
        self._closed = True
        self._pending = None
        self._kept.clear()  # the fetches are the orchestrator's: it cancels those running
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def __repr__(self) -> str:
        state = "prefetching" if self._pending and not self._pending.task.done() else "idle"
        return (
            f"<CallRetriever [{state}, {self.prefetches_reused}/{self.prefetches_started} "
            f"prefetches reused]>"
        )
