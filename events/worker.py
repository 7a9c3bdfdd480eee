"""The effects worker: the consumer loop that feeds effects to a sink (issue 6, part 2).

Every worker process binds the same durable pull consumer, so N processes share the work
and scale horizontally; JetStream hands each message to one of them at a time. A message
is acked only after the sink confirmed it, so a worker that dies mid-delivery loses
nothing: after ``ack_wait`` another worker gets the message, and the Idempotency-Key makes
the repeat harmless. What happens to one message (retry, backoff, dead letter) is
:mod:`events.delivery`; the policy is :class:`events.worker_config.WorkerConfig`.

Effects never block a conversation: the node only publishes them; this worker is where
a CRM outage waits it out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from enum import Enum

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import BadRequestError

from events import subjects
from events.delivery import Delivery, WorkerMetrics
from events.errors import EventsError, translate
from events.sinks import Sink
from events.worker_config import WorkerConfig

log = logging.getLogger(__name__)


class WorkerStateError(EventsError):
    """A lifecycle method was called in a state that does not allow it."""


class WorkerState(Enum):
    NEW = "new"
    RUNNING = "running"
    DRAINING = "draining"
    CLOSED = "closed"


class EffectsWorker:
    """Consumes ``CALLMESH_EFFECTS`` through a durable pull consumer and delivers each
    effect to ``sink``. Use as ``async with EffectsWorker(...)`` or ``start()``/``aclose()``.
    The worker does not own ``js`` (its connection) nor ``sink``; the caller closes them."""

    def __init__(
        self,
        js: JetStreamContext,
        sink: Sink,
        config: WorkerConfig | None = None,
        *,
        name: str = "effects-worker",
    ) -> None:
        self._js = js
        self._config = config or WorkerConfig()
        self._name = name
        self._state = WorkerState.NEW
        self.metrics = WorkerMetrics()
        self._delivery = Delivery(js, sink, self._config, self.metrics, name=name)
        self._sub: JetStreamContext.PullSubscription | None = None
        self._fetcher: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._wakeup = asyncio.Event()  # a slot freed up, or drain began
        self._closing: asyncio.Task[None] | None = None

    @property
    def state(self) -> WorkerState:
        return self._state

    @property
    def config(self) -> WorkerConfig:
        return self._config

    def snapshot(self) -> dict[str, int]:
        """Counters since start: delivered, already_applied, retried, dead_lettered,
        rejected, malformed, in_flight."""
        return self.metrics.snapshot()

    def consumer_config(self) -> ConsumerConfig:
        cfg = self._config
        return ConsumerConfig(
            name=cfg.durable,
            durable_name=cfg.durable,
            filter_subject=cfg.filter_subject,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=cfg.ack_wait_s,
            max_ack_pending=cfg.max_ack_pending,
            # No server-side max_deliver: the worker dead-letters on its own count, and a
            # server limit would strand an exhausted message in the stream, not the DLQ.
        )

    async def start(self) -> None:
        """Create (or update) the durable consumer, bind to it and start fetching."""
        if self._state is not WorkerState.NEW:
            raise WorkerStateError(f"cannot start a worker that is {self._state.value}")
        with translate():
            try:
                await self._js.add_consumer(subjects.EFFECTS_STREAM, self.consumer_config())
            except BadRequestError as exc:
                # Another version of the worker made it with settings that cannot change in
                # place (e.g. filter subject); keep working with the existing consumer.
                log.warning("durable %s kept its existing config: %s", self._config.durable, exc)
            self._sub = await self._js.pull_subscribe_bind(
                durable=self._config.durable, stream=subjects.EFFECTS_STREAM
            )
        self._state = WorkerState.RUNNING
        self._fetcher = asyncio.create_task(self._fetch_loop(self._sub), name=f"{self._name}:fetch")

    async def __aenter__(self) -> EffectsWorker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Drain and stop; idempotent, and a cancelled caller does not cut the drain short."""
        if self._closing is None:
            self._closing = asyncio.create_task(self._drain(), name=f"{self._name}:drain")
        await asyncio.shield(self._closing)

    async def _drain(self) -> None:
        """SIGTERM path: stop fetching, let in-flight deliveries finish within
        ``drain_timeout_s``, then cancel the rest (their messages are nak'ed so another
        worker takes them at once). Kubernetes' terminationGracePeriodSeconds should exceed
        drain_timeout_s + fetch_timeout_s."""
        if self._state is WorkerState.NEW:
            self._state = WorkerState.CLOSED
            return
        self._state = WorkerState.DRAINING
        self._wakeup.set()
        deadline = time.monotonic() + self._config.drain_timeout_s
        if self._fetcher is not None:
            # Let the pending fetch expire by itself: cancelling it would strand messages
            # the server already sent us until their ack_wait runs out.
            done, _ = await asyncio.wait({self._fetcher}, timeout=self._config.fetch_timeout_s + 1)
            if not done:
                self._fetcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._fetcher
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=max(0.0, deadline - time.monotonic()))
        leftover = set(self._inflight)
        for task in leftover:
            task.cancel()
        if leftover:
            await asyncio.gather(*leftover, return_exceptions=True)
            log.warning("%s: %d deliveries cut short by drain", self._name, len(leftover))
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        self._state = WorkerState.CLOSED

    async def _fetch_loop(self, sub: JetStreamContext.PullSubscription) -> None:
        cfg = self._config
        while self._state is WorkerState.RUNNING:
            free = cfg.concurrency - len(self._inflight)
            if free <= 0:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            try:
                msgs = await sub.fetch(min(cfg.batch, free), timeout=cfg.fetch_timeout_s)
            except TimeoutError:
                continue  # nothing to do right now
            except Exception as exc:
                # Connection trouble: nats-py reconnects by itself; try again shortly.
                log.warning("%s: fetch failed: %s: %s", self._name, type(exc).__name__, exc)
                await asyncio.sleep(min(1.0, cfg.fetch_timeout_s))
                continue
            for msg in msgs:
                self._spawn(msg)

    def _spawn(self, msg: Msg) -> None:
        seq = msg.metadata.sequence.stream
        task = asyncio.create_task(self._handle(msg), name=f"{self._name}:deliver:{seq}")
        self._inflight.add(task)
        self.metrics.in_flight = len(self._inflight)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self.metrics.in_flight = len(self._inflight)
        self._wakeup.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: delivery task crashed", self._name, exc_info=task.exception())

    async def _handle(self, msg: Msg) -> None:
        try:
            await self._delivery.process(msg)
        except asyncio.CancelledError:
            # Drain cut this delivery short: hand the message back now rather than after
            # ack_wait. Shielded so the nak survives the cancellation.
            with contextlib.suppress(Exception):
                await asyncio.shield(msg.nak())
            raise

    def __repr__(self) -> str:
        m = self.metrics
        return (
            f"<EffectsWorker {self._name} {self._state.value} [in flight: {m.in_flight}, "
            f"delivered: {m.delivered}, retried: {m.retried}, "
            f"dead-lettered: {m.dead_lettered}]>"
        )
