"""The router's view of the cluster: which nodes are alive, draining or dead.

Polls the membership hash every ``poll_ms``. A node is alive while its heartbeat counter
keeps advancing on the router's own monotonic clock, or while its link to this router
carries frames; ``dead_after_ms`` without either declares it dead and notifies listeners
(who re-pin that node's calls). A dropped upstream link makes a node *suspect* at once so
new calls avoid it while it is confirmed.

Why the link counts: a node starved of CPU (an overloaded machine) beats late, yet still
answers its calls; declaring it dead moved its calls onto the other nodes, which starved
in turn: a failover storm that made an overload fail every call (10,000 calls on two
cores). A node that is stopped, hung or cut off sends nothing on its link either, so it is
still found dead within ``dead_after_ms``; a killed one loses its link at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from callmesh.config import MembershipConfig
from state_store.errors import StateStoreError
from state_store.membership import MembershipStore, NodeRecord, NodeState

log = logging.getLogger("callmesh.router.membership")


@dataclass
class NodeView:
    record: NodeRecord
    last_progress: float  # monotonic time the beat counter last advanced
    alive: bool = True
    suspect_since: float | None = None
    # Kept alive by its link's frames while its heartbeat is late (logged once a spell).
    beat_late: bool = False


def _never_heard(node_id: str) -> float | None:
    return None


class MembershipView:
    def __init__(
        self,
        store: MembershipStore,
        config: MembershipConfig,
        heard_from: Callable[[str], float | None] = _never_heard,
    ) -> None:
        self._store = store
        self._config = config
        # When a node last sent on its link to this router (monotonic), None without one.
        self._heard_from = heard_from
        self.nodes: dict[str, NodeView] = {}
        self._listeners: list[Callable[[str], None]] = []
        self._task: asyncio.Task[None] | None = None
        self.redis_ok = True
        self.refreshed = asyncio.Event()

    def on_dead(self, listener: Callable[[str], None]) -> None:
        self._listeners.append(listener)

    def routable(self) -> list[str]:
        """Alive, not draining, not suspect: where new calls (and re-pins) may go."""
        return [
            n
            for n, v in self.nodes.items()
            if v.alive and v.suspect_since is None and v.record.state == NodeState.ACTIVE.value
        ]

    def is_alive(self, node_id: str) -> bool:
        v = self.nodes.get(node_id)
        return v is not None and v.alive

    def url(self, node_id: str) -> str | None:
        v = self.nodes.get(node_id)
        return v.record.url if v else None

    def loads(self) -> dict[str, int]:
        return {n: v.record.calls for n, v in self.nodes.items()}

    def suspect(self, node_id: str) -> None:
        v = self.nodes.get(node_id)
        if v is not None and v.suspect_since is None:
            v.suspect_since = time.monotonic()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="membership")

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def refresh(self) -> None:
        # Judged as of when the records were asked for, not when the reply was handled: a
        # router whose own loop stalled (at 10,000 calls, for seconds) handles a reply
        # that old, and its beats looked frozen for the length of the stall, so every
        # node was declared dead. A node that really stopped still shows no progress
        # between two asks more than ``dead_after_ms`` apart.
        now = time.monotonic()
        records = await self._store.read_all()
        dead_after = self._config.dead_after_ms / 1000
        died: list[str] = []
        for node_id, rec in records.items():
            view = self.nodes.get(node_id)
            if view is None:
                self.nodes[node_id] = NodeView(rec, now)
                log.info("node joined", extra={"fields": {"node": node_id, "url": rec.url}})
                continue
            if rec.beat != view.record.beat:
                view.last_progress = now
                if not view.alive:
                    log.info("node alive again", extra={"fields": {"node": node_id}})
                view.alive = True
                # Progress after suspicion clears it: the process is running.
                if view.suspect_since is not None and now - view.suspect_since > 0.05:
                    view.suspect_since = None
            view.record = rec
            if view.alive and now - view.last_progress > dead_after:
                heard = self._heard_from(node_id)
                if heard is not None and now - heard <= dead_after:
                    if not view.beat_late:
                        log.info(
                            "node heartbeat late, its link active: alive",
                            extra={"fields": {"node": node_id}},
                        )
                    view.beat_late = True
                    continue
                view.alive = False
                died.append(node_id)
            elif view.beat_late and now - view.last_progress <= dead_after:
                view.beat_late = False
        for node_id in list(self.nodes):
            if node_id not in records:
                # Deregistered (clean exit) — its calls were handed off or ended.
                view = self.nodes.pop(node_id)
                if view.alive:
                    died.append(node_id)
        for node_id in died:
            log.warning("node dead", extra={"fields": {"node": node_id}})
            for listener in self._listeners:
                listener(node_id)
        self.refreshed.set()

    async def _run(self) -> None:
        period = self._config.poll_ms / 1000
        me = asyncio.current_task()
        while True:
            try:
                await self.refresh()
                if not self.redis_ok:
                    log.info("redis reachable again: membership refreshed")
                self.redis_ok = True
            except StateStoreError as exc:
                # Without Redis we cannot judge liveness: keep the last view rather than
                # declaring every node dead, and say so.
                if self.redis_ok:
                    log.error(
                        "redis unreachable: membership frozen",
                        extra={"fields": {"error": str(exc)}},
                    )
                self.redis_ok = False
                now = time.monotonic()
                for v in self.nodes.values():
                    v.last_progress = now
            # redis-py can swallow a cancellation that lands inside a command (the command
            # then returns normally); without this check aclose() would wait forever.
            if me is not None and me.cancelling():
                raise asyncio.CancelledError
            await asyncio.sleep(period)
