"""The end of every turn: its checkpoint, then the client is told (``turn_metrics``),
the trace records it and the node's log has one record of it.

The turn runner (:mod:`conversation_node.turn_runner`) ends each turn here; the narrow
interfaces a turn uses of the rest of the node (counters, the checkpoint, the link) are
declared with it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from opentelemetry.trace import Span

from callmesh import tracing
from callmesh.protocol import Out, encode
from callmesh.telemetry import TurnMetrics
from conversation_node.call_core import CallCore
from conversation_node.turn_outcomes import Record
from state_store.checkpoint import OutboxEntry

__all__ = ["Counters", "Durability", "Send", "TurnCloser"]

# The per-turn log record keeps the logger it always had: log pipelines select on it.
log = logging.getLogger("callmesh.node.session")

Send = Callable[[str], Awaitable[None]]


class Counters(Protocol):
    """The node's counters (:class:`callmesh.telemetry.Metrics`)."""

    def inc(self, name: str, value: float = 1.0) -> None: ...


class Durability(Protocol):
    """The call's checkpoint as turns use it (the session, over its checkpointer)."""

    def effects_waiting(self, before_turn: int) -> bool:
        """Effects of turns before this one are still unpublished."""
        ...

    def queue_effects(self, effects: list[OutboxEntry]) -> None:
        """Side effects to publish with the next commit."""
        ...

    async def commit(self, records: list[Record]) -> None:
        """Write the checkpoint with these records (CAS); raises CallDropped if fenced."""
        ...


class TurnCloser:
    """Ends one call's turns. ``call_span``: the call's span on this owner (None while
    tracing is off)."""

    def __init__(
        self,
        core: CallCore,
        *,
        durability: Durability,
        send: Send,
        observe_turn: Callable[[TurnMetrics], None],
    ) -> None:
        self._core = core
        self._durability = durability
        self._send = send
        self._observe_turn = observe_turn
        self.call_span: Span | None = None

    async def finish(
        self,
        records: list[Record],
        metrics: TurnMetrics,
        started: float,
        *,
        llm: dict[str, Any] | None = None,
        sources: dict[str, str] | None = None,
    ) -> None:
        """Commit the turn, then tell the client it is complete (``turn_metrics``)."""
        core = self._core
        effects_waiting = self._durability.effects_waiting(metrics.turn)
        t0 = time.monotonic()
        core.close_turn(records, metrics, effects_waiting=effects_waiting)
        await self._durability.commit(records)
        t1 = time.monotonic()
        metrics.checkpoint_ms = (t1 - t0) * 1000
        tracing.record_turn(
            self.call_span, metrics, started=started, checkpoint=(t0, t1), llm=llm, sources=sources
        )
        fields = metrics.to_dict()
        await self._send(encode({"type": Out.TURN_METRICS.value, "turn": metrics.turn, **fields}))
        self._observe_turn(metrics)
        # The same record in the node's log, for log pipelines (one JSON object per turn).
        log.info("turn", extra={"fields": {"tenant": core.tenant, **fields}})
