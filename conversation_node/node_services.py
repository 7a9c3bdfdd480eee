"""What every call on a node shares: config, stores, publisher, pipeline, metrics."""

from __future__ import annotations

from dataclasses import dataclass, field

from callmesh.config import NodeConfig
from callmesh.telemetry import Metrics, TurnMetrics
from conversation_node.pipeline import TurnPipeline
from events.outbox import OutboxPublisher
from state_store.store import StateStore


@dataclass
class NodeServices:
    config: NodeConfig
    store: StateStore
    publisher: OutboxPublisher | None
    pipeline: TurnPipeline
    metrics: Metrics = field(default_factory=lambda: Metrics("callmesh_node"))

    @property
    def node_id(self) -> str:
        return self.config.node_id

    def observe_turn(self, m: TurnMetrics) -> None:
        self.metrics.inc("turns")
        self.metrics.inc("turn_latency_ms_sum", m.latency_ms)
        self.metrics.inc("turn_overhead_ms_sum", m.overhead_ms)
        for f in m.fallbacks:
            self.metrics.inc(f"fallback_{f}")
