"""The node's membership heartbeat: a record in Redis refreshed every ``heartbeat_ms``.

The beats come from a thread of their own, with its own event loop and Redis client, not
from the node's event loop. A node holding thousands of calls can keep its loop busy for
longer than ``dead_after_ms`` (a burst of turns, a collection of a large heap, the machine
short of CPU): beaten from that loop, the heartbeat then stalls, routers declare a live
node dead and move its calls, the fenced node drops them, and the node that takes them
over stalls in turn: measured with 2,000 calls on two nodes, one stall of the loop became
a failover storm that ended every call. A beat proves the process runs and reaches
Redis; that its loop still turns is checked apart: the loop stamps a time every beat
period (a timer, no task), and the thread stops beating once that stamp is older than
:data:`LOOP_STALL_LIMIT_S`, so a wedged loop still gets its node declared dead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable

from callmesh.config import NodeConfig
from callmesh.metric_names import HEARTBEAT_FAILURES, REDIS_UP
from callmesh.telemetry import Metrics, now_ms
from state_store.client import connect as redis_connect
from state_store.errors import StateStoreError
from state_store.membership import MembershipStore, NodeRecord, NodeState

log = logging.getLogger("callmesh.node.heartbeat")

# A node whose event loop has not run for this long is stuck, not busy: its heartbeat
# stops and routers declare it dead ``dead_after_ms`` later.
LOOP_STALL_LIMIT_S = 5.0


class Heartbeat:
    """Owns the beating thread and the loop's stamp timer; ``start()`` and idempotent
    ``aclose()`` (which removes the record, so routers learn of a clean exit at once
    instead of after ``dead_after_ms``). ``store`` is used from the node's loop (the first
    beat, state changes, the removal); the thread makes a client of its own."""

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
        self._redis_ok = True
        self._period = config.membership.heartbeat_ms / 1000
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stamp_timer: asyncio.TimerHandle | None = None
        self._loop_stamp = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

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

    def _next(self) -> NodeRecord:
        # One counter for both threads: a += on an int attribute is not atomic, but two
        # beats racing would at worst publish the same number twice, which is no progress
        # for one period (never a false death: dead_after_ms spans several beats).
        self._beat += 1
        return self.record()

    async def beat_once(self) -> None:
        await self.beat_with(self._store)

    async def beat_with(self, store: MembershipStore) -> None:
        """One beat through ``store`` (the thread's own, or the loop's)."""
        await store.publish(self._next())

    def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._stamp()
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._thread_main, name=f"heartbeat:{self._config.node_id}", daemon=True
        )
        self._thread.start()

    @property
    def redis_ok(self) -> bool:
        """The state store answered the last heartbeat."""
        return self._redis_ok

    async def set_state(self, state: NodeState) -> None:
        self.state = state
        with contextlib.suppress(StateStoreError):
            await self.beat_once()

    # ------------------------------------------------------------------ the node's loop

    def _stamp(self) -> None:
        """Runs on the node's loop every beat period: proof that the loop turns."""
        self._loop_stamp = time.monotonic()
        if self._loop is not None and not self._stop.is_set():
            self._stamp_timer = self._loop.call_later(self._period, self._stamp)

    def _on_loop(self, fn: Callable[..., object], *args: object) -> None:
        """Run ``fn`` on the node's loop (metrics are the loop's, not the thread's)."""
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(fn, *args)

    # ------------------------------------------------------------------ the thread

    def _thread_main(self) -> None:
        asyncio.run(self._beat_forever())

    async def _beat_forever(self) -> None:
        client = redis_connect(self._config.backends.redis_url)
        store = MembershipStore(client)
        stalled = False
        try:
            while not self._stop.is_set():
                stalled_now = time.monotonic() - self._loop_stamp > LOOP_STALL_LIMIT_S
                if stalled_now != stalled:
                    stalled = stalled_now
                    if stalled:
                        log.error(
                            "event loop stalled: heartbeats stopped",
                            extra={"fields": {"limit_s": LOOP_STALL_LIMIT_S}},
                        )
                    else:
                        log.warning("event loop running again: heartbeats resumed")
                if not stalled:
                    await self._beat_on(store)
                await asyncio.sleep(self._period)
        finally:
            await client.aclose()

    async def _beat_on(self, store: MembershipStore) -> None:
        try:
            await self.beat_with(store)
        except StateStoreError as exc:
            self._on_loop(self._metrics.inc, HEARTBEAT_FAILURES)
            self._on_loop(self._metrics.set, REDIS_UP, 0)
            if self._redis_ok:
                log.error(
                    "redis unreachable: heartbeats failing (failover unavailable)",
                    extra={"fields": {"error": str(exc)}},
                )
            self._redis_ok = False
            return
        if not self._redis_ok:
            log.info("redis reachable again: heartbeats resumed")
            self._redis_ok = True
            self._on_loop(self._metrics.set, REDIS_UP, 1)

    # ------------------------------------------------------------------ ending

    async def aclose(self, *, deregister: bool = True) -> None:
        self._stop.set()
        if self._stamp_timer is not None:
            self._stamp_timer.cancel()
            self._stamp_timer = None
        thread, self._thread = self._thread, None
        if thread is not None:
            # Within a beat period plus one Redis timeout (the client's, 1 s).
            await asyncio.to_thread(thread.join, 5.0)
        if deregister:
            with contextlib.suppress(StateStoreError):
                await asyncio.shield(self._store.remove(self._config.node_id))
