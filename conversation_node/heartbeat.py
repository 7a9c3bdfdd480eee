"""The node's membership heartbeat: a record in Redis refreshed every ``heartbeat_ms``, from
a thread of its own, while the event loop shows it still runs.

Why a thread: a heartbeat on the event loop waits its turn behind every frame and turn of
every call. Under overload a live node's beats fell more than ``dead_after_ms`` apart,
routers declared it dead and moved all its calls (a new owner fences each one out), and the
surviving nodes got busier still. The thread has a blocking Redis connection of its own and
needs the interpreter for a few microseconds a beat, which Python hands over within its
switch interval (5 ms) however busy the loop is: a slow node keeps beating.

Why the loop still matters: a thread beating for a loop that is stuck (a blocking call in a
coroutine, an endless callback) would keep that node's calls, silent, forever. Every beat
the thread posts a pulse to the loop; when the loop has not run one for ``loop_stall_ms`` the
thread stops beating, so routers declare the node dead ``dead_after_ms`` later and move its
calls. It beats again once the loop runs again (the node is then alive again, and the calls
moved away from it are fenced out of it: architecture invariant 2).

Detection, then: a process that died (its thread dies with it) or is stopped (SIGSTOP) in
``dead_after_ms``; a process whose loop hangs in ``loop_stall_ms + dead_after_ms``; a
process whose loop is slow, never. Fencing does not rest on any of this: the heartbeat only
tells routers where to send calls.
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
from callmesh.metric_names import HEARTBEAT_FAILURES, HEARTBEATS_WITHHELD, REDIS_UP
from callmesh.telemetry import Metrics, now_ms
from state_store.errors import StateStoreError
from state_store.membership import MembershipWriter, NodeRecord, NodeState

log = logging.getLogger("callmesh.node.heartbeat")

# How long aclose() waits for the thread to finish a beat it is in (a Redis command is
# bounded by the client's socket timeout, 1 s).
_JOIN_TIMEOUT_S = 2.0


class Heartbeat:
    """Owns the heartbeat thread; ``start()`` and idempotent ``aclose()`` (which removes
    the record, so routers learn of a clean exit at once instead of after
    ``dead_after_ms``). ``beat_once()`` and ``set_state()`` beat at once, from the loop."""

    def __init__(
        self,
        writer: MembershipWriter,
        config: NodeConfig,
        calls: Callable[[], int],
        metrics: Metrics,
    ) -> None:
        self._writer = writer
        self._config = config
        self._calls = calls
        self._metrics = metrics
        self._beat = 0
        self._started = now_ms()
        self.state = NodeState.ACTIVE
        # One beat at a time: the record a beat builds carries the state as of its write.
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._redis_ok = True
        # When the loop last ran a pulse (monotonic); written on the loop, read by the thread.
        self._pulse_at = time.monotonic()
        self.withheld = False  # beats are withheld: the loop has stalled
        self._closed = False

    def __repr__(self) -> str:
        age = time.monotonic() - self._pulse_at
        return (
            f"<Heartbeat {self._config.node_id} beat={self._beat} {self.state} "
            f"redis_ok={self._redis_ok} pulse_age={age * 1000:.0f}ms"
            f"{' withheld' if self.withheld else ''}>"
        )

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

    def publish(self) -> None:
        """One beat (blocking): the record with the next counter value. Raises
        :class:`~state_store.errors.StateStoreError`."""
        with self._lock:
            self._beat += 1
            self._writer.publish(self.record())

    async def beat_once(self) -> None:
        await asyncio.to_thread(self.publish)

    def start(self) -> None:
        if self._thread is not None or self._closed:
            return
        self._loop = asyncio.get_running_loop()
        self._pulse_at = time.monotonic()
        self._thread = threading.Thread(
            target=self._run, name=f"heartbeat:{self._config.node_id}", daemon=True
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

    # ------------------------------------------------------------------ the thread

    def _pulse(self) -> None:
        self._pulse_at = time.monotonic()

    def _run(self) -> None:
        loop = self._loop
        period = self._config.membership.heartbeat_ms / 1000
        stall_s = self._config.loop_stall_ms / 1000
        while not self._stop.is_set():
            try:
                assert loop is not None
                loop.call_soon_threadsafe(self._pulse)
            except RuntimeError:
                return  # the loop is closed: the node is gone
            stalled = time.monotonic() - self._pulse_at
            if stalled > stall_s:
                self._withhold(stalled)
            else:
                if self.withheld:
                    self.withheld = False
                    log.warning("event loop running again: heartbeats resumed")
                self._beat_from_thread()
            self._stop.wait(period)

    def _withhold(self, stalled_s: float) -> None:
        if not self.withheld:
            self.withheld = True
            log.error(
                "event loop stalled: heartbeats withheld, routers will move this node's calls",
                extra={"fields": {"stalled_ms": round(stalled_s * 1000)}},
            )
        self._on_loop(self._metrics.inc, HEARTBEATS_WITHHELD)

    def _beat_from_thread(self) -> None:
        try:
            self.publish()
        except StateStoreError as exc:
            self._on_loop(self._metrics.inc, HEARTBEAT_FAILURES)
            if self._redis_ok:
                self._redis_ok = False
                self._on_loop(self._metrics.set, REDIS_UP, 0)
                log.error(
                    "redis unreachable: heartbeats failing (failover unavailable)",
                    extra={"fields": {"error": str(exc)}},
                )
            return
        if not self._redis_ok:
            self._redis_ok = True
            self._on_loop(self._metrics.set, REDIS_UP, 1)
            log.info("redis reachable again: heartbeats resumed")

    def _on_loop(self, fn: Callable[..., object], *args: object) -> None:
        """Metrics belong to the loop: run ``fn`` there (nowhere once it is closed)."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(fn, *args)

    # ------------------------------------------------------------------ stop

    async def aclose(self, *, deregister: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            await asyncio.shield(asyncio.to_thread(thread.join, _JOIN_TIMEOUT_S))
        node_id = self._config.node_id
        try:
            if deregister:
                with contextlib.suppress(StateStoreError):
                    await asyncio.shield(asyncio.to_thread(self._writer.remove, node_id))
        finally:
            await asyncio.shield(asyncio.to_thread(self._writer.close))
