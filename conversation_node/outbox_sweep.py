"""Who publishes an ended call's outbox when the node that ended it cannot.

The node that ended a call drains what it left (:mod:`conversation_node.outbox_drain`),
stamping the call in the index of ended calls with an outbox before each try
(:mod:`state_store.ended_outbox`). If that node dies, restarts or gives up, the stamps
stop; every node sweeps the index now and then, takes over (a new epoch fences the old
owner, whose late writes are then refused) each call nobody stamped for ``grace_s``, and
hands its checkpoint to its own drainer. Two sweeps racing for one call are safe: the
later epoch wins and JetStream stores a message id once.

Bounded: ``batch`` calls a sweep, one sweep every ``interval_s`` (jittered), and the
drainer's own bound of calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random

from callmesh.telemetry import now_ms
from conversation_node.outbox_drain import OutboxDrainer
from state_store.ended_outbox import EndedOutboxIndex
from state_store.errors import StateStoreError
from state_store.store import StateStore

log = logging.getLogger("callmesh.node.outbox_sweep")

INTERVAL_S = 30.0
# Longer than the drainer's longest backoff by far: a live drainer stamps every few s.
GRACE_S = 60.0
BATCH = 50


class OutboxSweep:
    """``sweep_once`` on demand, or every ``interval_s`` once ``start``-ed; ``aclose``."""

    def __init__(
        self,
        index: EndedOutboxIndex,
        store: StateStore,
        drainer: OutboxDrainer,
        node_id: str,
        *,
        interval_s: float = INTERVAL_S,
        grace_s: float = GRACE_S,
        batch: int = BATCH,
    ) -> None:
        self._index = index
        self._store = store
        self._drainer = drainer
        self._node_id = node_id
        self._interval_s = interval_s
        self._grace_s = grace_s
        self._batch = batch
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="outbox-sweep")

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(asyncio.gather(task, return_exceptions=True))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s * random.uniform(0.5, 1.5))
            try:
                await self.sweep_once()
            except StateStoreError as exc:
                log.warning("outbox sweep skipped", extra={"fields": {"error": str(exc)}})

    async def sweep_once(self) -> int:
        """Take over the ended calls nobody is draining; returns how many were adopted."""
        now = now_ms()
        due = await self._index.untried_since(now - int(self._grace_s * 1000), self._batch)
        adopted = 0
        for tenant, call_id in due:
            if (tenant, call_id) in self._drainer:
                continue
            # Stamped first: other nodes' sweeps leave it to this one.
            await self._index.touch(tenant, call_id, now)
            epoch, ckpt = await self._store.take_ownership(tenant, call_id, self._node_id)
            if ckpt is None or not ckpt.outbox:
                if epoch:  # the take made a lease: nothing is left to fence
                    await self._store.end(tenant, call_id, epoch, final=True)
                await self._index.remove(tenant, call_id)
                continue
            log.info(
                "ended call's outbox taken over",
                extra={
                    "fields": {
                        "tenant": tenant,
                        "call_id": call_id,
                        "previous_node": ckpt.node,
                        "pending": len(ckpt.outbox),
                    }
                },
            )
            # Not saved under the new epoch yet: the drainer writes it first.
            self._drainer.adopt(
                dataclasses.replace(ckpt, epoch=epoch, node=self._node_id), saved=False
            )
            adopted += 1
        return adopted
