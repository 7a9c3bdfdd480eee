"""What every call on a node shares: config, stores, publisher, pipeline, memory, metrics."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

from callmesh.config import NodeConfig
from callmesh.metric_names import (
    FALLBACKS,
    INBOUND_FRAME_LAG_MS,
    TIME_TO_FIRST_AUDIO_MS,
    TURN_LATENCY_MS,
    TURN_OVERHEAD_MS,
    TURN_STAGE_MS,
    TURNS,
    TURNS_CUT_OFF_BEFORE_AUDIO,
    TURNS_OVER_BUDGET,
    TURNS_OVER_BUDGET_BY_CALLMESH,
)
from callmesh.telemetry import STAGES, Metrics, TurnMetrics
from conversation_node.pipeline import TurnPipeline
from conversation_node.prompt import INSTRUCTIONS
from conversation_node.providers.base import STT
from events.outbox import OutboxPublisher
from memory.history import HistoryStore
from memory.knowledge import DEMO_KB_DIR, KnowledgeBase
from memory.prompt import PromptBuilder
from memory.retrieval import RetrievalOrchestrator, SourcePolicy
from memory.session import MemoryConfig
from memory.sources import CustomerHistorySource, KnowledgeBaseSource, SimulatedBookingSlots
from memory.tenant_kb import TenantKnowledgeBases
from state_store.store import StateStore

log = logging.getLogger("callmesh.node")

# Earlier calls per caller kept in the customer history.
HISTORY_MAX_CALLS = 5


@dataclass
class MemoryServices:
    """The node's long-term memory, shared by its calls: the knowledge base (indexed once,
    at start), the customer history store, the retrieval orchestrator (its caches warmed
    by one call serve the next) and the prompt builder. Per-call memory lives in
    :class:`memory.session.SessionMemory`."""

    config: MemoryConfig
    knowledge: KnowledgeBase
    history: HistoryStore
    retrieval: RetrievalOrchestrator
    prompts: PromptBuilder

    @classmethod
    def build(
        cls,
        history: HistoryStore,
        *,
        working_turns: int,
        kb_dir: Path = DEMO_KB_DIR,
        tenants: TenantKnowledgeBases | None = None,
        max_tenants: int = 10_000,
    ) -> MemoryServices:
        """Index the knowledge bases (``kb_dir``, the default; and ``tenants``' own, up to
        ``max_tenants``) and wire the sources (the demo's: knowledge base, customer
        history, a simulated booking system), each with its timeout and cache."""
        kb = KnowledgeBase.from_directory(kb_dir)
        own: dict[str, KnowledgeBase] = {}
        if tenants is not None:
            if tenants.root is not None and not tenants.root.is_dir():
                log.error(
                    "knowledge base directory not found: every tenant gets the demo's",
                    extra={"fields": {"kb_dir": str(tenants.root)}},
                )
            own, failed = tenants.index(max_tenants)
            for tenant, why in failed.items():  # no snippets for that tenant, not the demo's
                fields = {"tenant": tenant}
                log.error("knowledge base not indexed: %s", why, extra={"fields": fields})
        retrieval = RetrievalOrchestrator(
            [
                (KnowledgeBaseSource(by_tenant=own, default=kb), SourcePolicy(timeout_ms=30)),
                # A caller's history changes only when one of their calls ends: each call
                # reads it at its first retrieval and keeps it (it was a read every turn).
                (CustomerHistorySource(history), SourcePolicy(timeout_ms=30, per_call=True)),
                (
                    SimulatedBookingSlots(),
                    SourcePolicy(timeout_ms=40, fresh_ms=2_000, stale_ms=10_000),
                ),
            ]
        )
        return cls(
            MemoryConfig(working_turns=working_turns),
            kb,
            history,
            retrieval,
            PromptBuilder(INSTRUCTIONS),
        )

    async def aclose(self) -> None:
        """Stop background retrieval fetches. Idempotent."""
        await asyncio.shield(self.retrieval.aclose())

    def __repr__(self) -> str:
        return f"<MemoryServices {self.knowledge!r} {self.retrieval!r} {self.history!r}>"


@dataclass
class NodeServices:
    config: NodeConfig
    store: StateStore
    publisher: OutboxPublisher | None
    pipeline: TurnPipeline
    memory: MemoryServices
    # The recognizer for calls that send audio; None: audio is accepted but not heard.
    stt: STT | None = None
    metrics: Metrics = field(default_factory=lambda: Metrics("callmesh_node"))

    @property
    def node_id(self) -> str:
        return self.config.node_id

    def observe_turn(self, m: TurnMetrics) -> None:
        self.metrics.inc(TURNS)
        for f in m.fallbacks:
            self.metrics.inc(FALLBACKS, kind=f)
        if m.checkpoint_ms:
            self._stages["checkpoint"].observe(m.checkpoint_ms)
        if not m.spoke:
            self.metrics.inc(TURNS_CUT_OFF_BEFORE_AUDIO)
            return
        self.metrics.observe(TURN_LATENCY_MS, m.latency_ms)
        if m.turn == 0:
            self.metrics.observe(TIME_TO_FIRST_AUDIO_MS, m.latency_ms)
        self.metrics.observe(TURN_OVERHEAD_MS, m.overhead_ms)
        for stage, ms in m.stages().items():
            self._stages[stage].observe(ms)
        budget = self.config.turn_budget_ms
        if m.latency_ms > budget:
            self.metrics.inc(TURNS_OVER_BUDGET)
            if m.provider_ms <= budget and m.overhead_ms > self.config.overhead_budget_ms:
                # The providers left room and callmesh overran its own share: the miss is
                # callmesh's (a turn pushed over by a fraction of a ms of jitter is not).
                self.metrics.inc(TURNS_OVER_BUDGET_BY_CALLMESH)

    def __post_init__(self) -> None:
        # Bound once: observed for every audio frame, and every turn's stages.
        self._frame_lag = self.metrics.histogram(INBOUND_FRAME_LAG_MS)
        self._stages = {s: self.metrics.histogram(TURN_STAGE_MS, stage=s) for s in STAGES}

    def observe_frame_lag(self, lag_ms: float) -> None:
        """How far behind the caller's clock an audio frame was processed."""
        self._frame_lag.observe(lag_ms)
