"""The node's membership heartbeat: a record in Redis refreshed every ``heartbeat_ms``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable

from callmesh.config import NodeConfig
from callmesh.metric_names import HEARTBEAT_FAILURES, REDIS_UP
from callmesh.telemetry import Metrics, now_ms
from state_store.errors import StateStoreError
from state_store.membership import MembershipStore, NodeRecord, NodeState

log = logging.getLogger("callmesh.node.heartbeat")


class Heartbeat:
    """Owns one task; ``start()`` and idempotent ``aclose()`` (which removes the record,
    so routers learn of a clean exit at once instead of after ``dead_after_ms``)."""

    def __init__(
        self, store: MembershipStore, config: NodeConfig, calls: Callable[[], int], metrics: Metrics
    ) -> None:
        self._store = store
        self._config = config
        self._calls = calls
        self._metrics = metrics
        self._beat = 0
        self._started = now_ms()
        self.state = NodeState.ACTIVE
        self._task: asyncio.Task[None] | None = None
        self._redis_ok = True

    def record(self) -> NodeRecord:
        return NodeRecord(
            node_id=self._config.node_id,
            url=self._config.advertise_url,
            state=self.state.value,
            calls=self._calls(),
            beat=self._beat,
            started_ms=self._started,
            pid=os.getpid(),
        )

    async def beat_once(self) -> None:
        self._beat += 1
        await self._store.publish(self.record())

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="heartbeat")

    @property
    def redis_ok(self) -> bool:
        """The state store answered the last heartbeat."""
        return self._redis_ok

    async def set_state(self, state: NodeState) -> None:
        self.state = state
        with contextlib.suppress(StateStoreError):
            await self.beat_once()

    async def _run(self) -> None:
        period = self._config.membership.heartbeat_ms / 1000
        me = asyncio.current_task()
        while True:
            try:
                await self.beat_once()
                if not self._redis_ok:
                    log.info("redis reachable again: heartbeats resumed")
                self._redis_ok = True
                self._metrics.set(REDIS_UP, 1)
            except StateStoreError as exc:
                self._metrics.inc(HEARTBEAT_FAILURES)
                self._metrics.set(REDIS_UP, 0)
                if self._redis_ok:
                    log.error(
                        "redis unreachable: heartbeats failing (failover unavailable)",
                        extra={"fields": {"error": str(exc)}},
                    )
                self._redis_ok = False
            # redis-py can swallow a cancellation that lands inside a command (the command
            # then returns normally); without this check aclose() would wait forever.
            if me is not None and me.cancelling():
                raise asyncio.CancelledError
            await asyncio.sleep(period)

    async def aclose(self, *, deregister: bool = True) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if deregister:
            with contextlib.suppress(StateStoreError):
                await asyncio.shield(self._store.remove(self._config.node_id))
