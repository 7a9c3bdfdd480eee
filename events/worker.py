"""The effects worker: delivers side effects from JetStream to a sink (issue 6, part 2).

Every worker process binds the same durable pull consumer, so N processes share the work
and scale horizontally; JetStream hands each message to one of them at a time. A message
is acked only after the sink confirmed it, so a worker that dies mid-delivery loses
nothing: after ``ack_wait`` another worker gets the message, and the Idempotency-Key makes
the repeat harmless. A retryable failure is nak'ed with exponential backoff and jitter;
after ``max_deliveries`` attempts, past the per-effect deadline, or on a rejection, the
effect goes to the dead-letter stream with an error log naming the call.

Effects never block a conversation: the node only publishes them; this worker is where
a CRM outage waits it out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import BadRequestError

from callmesh.protocol import valid_id
from events import subjects
from events.errors import EventsError, translate
from events.eventlog import EventType, encode, record
from events.sinks import Effect, Sink, SinkRejected, SinkRetryable

log = logging.getLogger(__name__)

DEFAULT_DURABLE = "callmesh-effects"


class WorkerStateError(EventsError):
    """A lifecycle method was called in a state that does not allow it."""


class WorkerState(Enum):
    NEW = "new"
    RUNNING = "running"
    DRAINING = "draining"
    CLOSED = "closed"


@dataclass(frozen=True)
class WorkerConfig:
    """Delivery policy of the effects worker. Durations in seconds."""

    # Shared by every worker process that should split the same work.
    durable: str = DEFAULT_DURABLE
    # ``effects.>`` for all tenants; ``effects.{tenant}.>`` gives a tenant its own workers,
    # so one tenant's CRM outage cannot fill another tenant's ack-pending window.
    filter_subject: str = subjects.EFFECTS_SUBJECTS
    batch: int = 32
    concurrency: int = 64
    max_deliveries: int = 10
    # How long JetStream waits for an ack before handing the message to another worker;
    # each sink attempt is cut off before it, so a slow CRM does not cause parallel repeats.
    ack_wait_s: float = 30.0
    backoff_base_s: float = 1.0
    backoff_max_s: float = 300.0
    # An effect older than this (since its first publish) is dead-lettered, not retried.
    deadline_s: float = 24 * 3600.0
    # Consumer-wide cap on delivered-but-unacked messages, including backed-off ones.
    max_ack_pending: int = 10_000
    fetch_timeout_s: float = 1.0
    drain_timeout_s: float = 20.0
    # Append EFFECT_DELIVERY records to the call's event log (for replay).
    log_events: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
                raise ValueError(f"{f.name} must be > 0, got {value}")
        if not valid_id(self.durable):
            raise ValueError(f"durable must match [A-Za-z0-9_-]{{1,64}}, got {self.durable!r}")
        if not self.filter_subject.startswith("effects."):
            raise ValueError(f"filter_subject must be under effects., got {self.filter_subject!r}")
        if self.backoff_max_s < self.backoff_base_s:
            raise ValueError("backoff_max_s must be >= backoff_base_s")

    @property
    def attempt_timeout_s(self) -> float:
        return self.ack_wait_s * 0.9


def backoff_delay(
    attempt: int, base_s: float, max_s: float, rand: Callable[[], float] = random.random
) -> float:
    """Delay before retry number ``attempt`` (1-based): exponential, capped, with "equal
    jitter" (half fixed, half random) so workers that failed together do not retry in
    lockstep against a CRM that is just coming back, yet never retry immediately."""
    step = min(max_s, base_s * 2 ** min(attempt - 1, 62))
    return step / 2 + rand() * step / 2


@dataclass
class WorkerMetrics:
    delivered: int = 0
    already_applied: int = 0  # delivered, but the sink had applied it before (409)
    retried: int = 0
    dead_lettered: int = 0
    rejected: int = 0  # dead-lettered because the sink refused the effect (4xx)
    malformed: int = 0
    in_flight: int = 0

    def snapshot(self) -> dict[str, int]:
        return dict(self.__dict__)


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
        self._sink = sink
        self._config = config or WorkerConfig()
        self._name = name
        self._state = WorkerState.NEW
        self.metrics = WorkerMetrics()
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
            await self._process(msg)
        except asyncio.CancelledError:
            # Drain cut this delivery short: hand the message back now rather than after
            # ack_wait. Shielded so the nak survives the cancellation.
            with contextlib.suppress(Exception):
                await asyncio.shield(msg.nak())
            raise

    async def _process(self, msg: Msg) -> None:
        cfg = self._config
        attempt = msg.metadata.num_delivered
        published_s = msg.metadata.timestamp.timestamp()
        try:
            effect = _parse(msg)
        except ValueError as exc:
            self.metrics.malformed += 1
            await self._dead_letter(msg, None, "malformed", attempt, 0, str(exc))
            return
        # attempt > max: earlier attempts ended without a verdict (a worker died mid-way).
        reason = _give_up_reason(cfg, attempt - 1, published_s)
        if reason:
            await self._dead_letter(msg, effect, reason, attempt - 1, 0, "")
            return
        remaining = cfg.deadline_s - (time.time() - published_s)
        try:
            async with asyncio.timeout(min(cfg.attempt_timeout_s, remaining)):
                result = await self._sink.deliver(effect)
        except SinkRejected as exc:
            self.metrics.rejected += 1
            await self._dead_letter(msg, effect, "rejected", attempt, exc.status, str(exc))
            return
        except Exception as exc:
            # SinkRetryable and our attempt timeout are the expected causes. Anything else
            # is a sink bug; retrying is still the safe choice since the effect is
            # idempotent, and a dead letter would need a human anyway.
            if not isinstance(exc, (SinkRetryable, TimeoutError)):
                log.exception("%s: sink raised unexpectedly for %s", self._name, effect.id)
            await self._retry(msg, effect, attempt, published_s, exc)
            return
        self.metrics.delivered += 1
        self.metrics.already_applied += int(result.already_applied)
        await self._log_outcome(effect, "delivered", attempt, result.status, msg)
        with contextlib.suppress(Exception):
            # A lost ack means a redelivery, which the Idempotency-Key turns into a 409.
            await msg.ack()

    async def _retry(
        self, msg: Msg, effect: Effect, attempt: int, published_s: float, exc: Exception
    ) -> None:
        cfg = self._config
        status = exc.status if isinstance(exc, SinkRetryable) else 0
        error = str(exc) or type(exc).__name__
        reason = _give_up_reason(cfg, attempt, published_s)
        if reason:
            await self._dead_letter(msg, effect, reason, attempt, status, error)
            return
        delay = backoff_delay(attempt, cfg.backoff_base_s, cfg.backoff_max_s)
        hint = exc.retry_after_s if isinstance(exc, SinkRetryable) else None
        if hint is not None:
            delay = max(delay, min(hint, cfg.backoff_max_s))
        # Never past the deadline: the next delivery then dead-letters it on time.
        delay = min(delay, cfg.deadline_s - (time.time() - published_s))
        self.metrics.retried += 1
        log.info("effect %s try %d failed (%s); retry in %.2fs", effect.id, attempt, error, delay)
        with contextlib.suppress(Exception):
            await msg.nak(delay=delay)

    async def _dead_letter(
        self, msg: Msg, effect: Effect | None, reason: str, attempts: int, status: int, error: str
    ) -> None:
        """Store the dead letter, then terminate the original: in that order, so a crash in
        between redelivers the effect and the repeat publish is de-duplicated."""
        meta = msg.metadata
        info = {
            "reason": reason,
            "attempts": attempts,
            "status": status,
            "error": error,
            "first_published_ms": int(meta.timestamp.timestamp() * 1000),
            "dead_lettered_ms": int(time.time() * 1000),
            "stream_seq": meta.sequence.stream,
            "worker": self._name,
        }
        if effect is not None:
            tenant, call_id, kind, msg_id = effect.tenant, effect.call_id, effect.kind, effect.id
            body = {**effect.to_dict(), "dead_letter": info}
        else:
            parts = msg.subject.split(".")
            tenant, kind = (parts[1], parts[2]) if len(parts) == 3 else ("_unknown", "malformed")
            call_id, msg_id = "?", f"malformed:{meta.sequence.stream}"
            body = {
                "raw": msg.data.decode(errors="replace"),
                "subject": msg.subject,
                "dead_letter": info,
            }
        try:
            with translate():
                await self._js.publish(
                    subjects.dead_letter(tenant, kind),
                    encode(body),
                    headers={"Nats-Msg-Id": f"{msg_id}:dead"},
                )
        except EventsError as exc:
            log.warning("%s: dead-letter publish failed for %s: %s", self._name, msg_id, exc)
            with contextlib.suppress(Exception):
                await msg.nak(delay=self._config.backoff_base_s)
            return
        with contextlib.suppress(Exception):
            await msg.term()
        self.metrics.dead_lettered += 1
        where = f"tenant={tenant} call={call_id} effect={msg_id} kind={kind}"
        why = f"reason={reason} attempts={attempts} status={status} error={error}"
        fields = {
            "tenant": tenant,
            "call_id": call_id,
            "effect_id": msg_id,
            "kind": kind,
            "reason": reason,
            "attempts": attempts,
            "status": status,
        }
        log.error("effect dead-lettered: %s %s", where, why, extra={"fields": fields})
        if effect is not None:
            await self._log_outcome(effect, "dead_lettered", attempts, status, msg, reason=reason)

    async def _log_outcome(
        self, effect: Effect, outcome: str, attempts: int, status: int, msg: Msg, **extra: Any
    ) -> None:
        """Append EFFECT_DELIVERY to the call's event log, once (dedupe id)."""
        if not self._config.log_events:
            return
        lag_ms = int((time.time() - msg.metadata.timestamp.timestamp()) * 1000)
        rec = record(
            EventType.EFFECT_DELIVERY,
            effect.turn,
            msg_id=effect.id,
            outcome=outcome,
            attempts=attempts,
            status=status,
            lag_ms=lag_ms,
            **extra,
        )
        try:
            with translate():
                await self._js.publish(
                    subjects.call_events(effect.tenant, effect.call_id),
                    encode(rec),
                    headers={"Nats-Msg-Id": f"{effect.id}:delivery"},
                )
        except EventsError as exc:
            # The delivery itself happened; losing its log line must not cause a re-delivery.
            log.warning("%s: could not log delivery of %s: %s", self._name, effect.id, exc)

    def __repr__(self) -> str:
        m = self.metrics
        return (
            f"<EffectsWorker {self._name} {self._state.value} [in flight: {m.in_flight}, "
            f"delivered: {m.delivered}, retried: {m.retried}, "
            f"dead-lettered: {m.dead_lettered}]>"
        )


def _give_up_reason(cfg: WorkerConfig, attempts: int, published_s: float) -> str:
    """Why an effect that has had ``attempts`` tries must not get another ("" if it may)."""
    if attempts >= cfg.max_deliveries:
        return "max_deliveries"
    if time.time() - published_s >= cfg.deadline_s:
        return "deadline"
    return ""


def _parse(msg: Msg) -> Effect:
    """The effect in ``msg``, checked against its subject: the tenant token of the subject
    is authoritative, so a body naming another tenant (or an id that is not a single
    subject token) cannot make the worker write into another tenant's event log."""
    effect = Effect.from_bytes(msg.data)
    parts = msg.subject.split(".")
    if len(parts) != 3 or parts[1] != effect.tenant or parts[2] != effect.kind:
        raise ValueError(f"effect {effect.id!r} does not match its subject {msg.subject!r}")
    if not (valid_id(effect.tenant) and valid_id(effect.call_id)):
        raise ValueError(f"effect {effect.id!r} has an invalid tenant or call id")
    return effect
