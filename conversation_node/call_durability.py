"""A call's checkpoint as its turns and its session use it.

:class:`CallDurability` owns the call's :class:`Checkpointer` and builds each checkpoint
from the call core (:mod:`conversation_node.call_core`); it is what a turn sees of the
checkpoint (:class:`conversation_node.turn_close.Durability`). A newer owner's fence is
translated here, once, into dropping the call (:class:`CallDropped`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from callmesh.metric_names import FENCED_WRITES
from callmesh.telemetry import now_ms
from callmesh.weak_callbacks import weak_method
from conversation_node.call_core import CallCore, CallState
from conversation_node.checkpointing import Checkpointer, Fenced
from conversation_node.errors import CallDropped
from conversation_node.node_services import NodeServices
from conversation_node.turn_outcomes import Record
from state_store.checkpoint import Checkpoint, OutboxEntry

__all__ = ["CallDurability"]

log = logging.getLogger("callmesh.node.session")


class CallDurability:
    """One call's checkpoint writes. ``trace``: the traceparent of the call's first
    owner's span, kept in every checkpoint."""

    def __init__(
        self,
        services: NodeServices,
        core: CallCore,
        *,
        acknowledge: Callable[[], Awaitable[None]],
        turn_lock: asyncio.Lock,
    ) -> None:
        self.core = core
        self._metrics = services.metrics
        self.trace = ""
        self.ckpt = Checkpointer(
            services,
            core.tenant,
            core.call_id,
            snapshot=weak_method(self.snapshot),  # not a cycle: callmesh.weak_callbacks
            acknowledge=acknowledge,
            turn_lock=turn_lock,
            active=lambda: core.state in (CallState.ACTIVE, CallState.ENDED),
        )

    def effects_waiting(self, before_turn: int) -> bool:
        return self.ckpt.effects_waiting(before_turn)

    def queue_effects(self, effects: list[OutboxEntry]) -> None:
        self.ckpt.outbox.extend(effects)

    async def commit(self, records: list[Record]) -> None:
        """Record the turn's events in the outbox and write the checkpoint (CAS)."""
        try:
            await self.ckpt.commit(records, self.core.turn)
        except Fenced as exc:
            self._fence(exc)
            raise CallDropped(str(exc)) from exc

    async def persist(self) -> bool:
        """Write the checkpoint if it is not saved yet (:meth:`Checkpointer.persist`)."""
        try:
            return await self.ckpt.persist(turn=self.core.turn)
        except Fenced as exc:
            self._fence(exc)
            raise CallDropped(str(exc)) from exc

    def snapshot(self) -> Checkpoint:
        ckpt = self.core.snapshot(self.ckpt.outbox, self.ckpt.event_cursor, now_ms())
        ckpt.trace = self.trace
        return ckpt

    def _fence(self, exc: Fenced) -> None:
        self.core.fence()
        self._metrics.inc(FENCED_WRITES)
        log.warning(
            "fenced out: dropping call",
            extra={
                "fields": {
                    "tenant": self.core.tenant,
                    "call_id": self.core.call_id,
                    "epoch": exc.rejection.mine,
                    "current_epoch": exc.rejection.current,
                }
            },
        )
