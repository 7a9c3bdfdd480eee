"""Delivering one effect message: the policy half of the effects worker.

:class:`Delivery` takes a message the consumer loop (:mod:`events.worker`) fetched and
settles it: ack after the sink confirmed it; nak with exponential backoff and jitter on a
retryable failure; after ``max_deliveries`` attempts, past the per-effect deadline, or on
a rejection, a copy in the dead-letter stream (with an error log naming the call) and
``term`` for the original. Every outcome is appended to the call's event log for replay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from callmesh.protocol import valid_id
from callmesh.redaction import default_redactor
from events import subjects
from events.errors import EventsError, translate
from events.eventlog import EventType, encode, encode_for_log, record
from events.outbox import publish_deduplicated
from events.sinks import Effect, Sink, SinkRejected, SinkRetryable
from events.worker_config import WorkerConfig

log = logging.getLogger(__name__)


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


class Delivery:
    """Settles messages of the effects stream against ``sink``; safe to run concurrently
    (one call of :meth:`process` per message). Counts outcomes in ``metrics``."""

    def __init__(
        self,
        js: JetStreamContext,
        sink: Sink,
        config: WorkerConfig,
        metrics: WorkerMetrics,
        *,
        name: str,
    ) -> None:
        self._js = js
        self._sink = sink
        self._config = config
        self.metrics = metrics
        self._name = name

    async def process(self, msg: Msg) -> None:
        """Deliver the effect in ``msg`` once and ack, nak or dead-letter it."""
        cfg = self._config
        attempt = msg.metadata.num_delivered
        published_s = msg.metadata.timestamp.timestamp()
        try:
            effect = parse_effect(msg)
        except ValueError as exc:
            self.metrics.malformed += 1
            error = default_redactor().redact_text(str(exc))
            await self._dead_letter(msg, None, "malformed", attempt, 0, error)
            return
        # attempt > max: earlier attempts ended without a verdict (a worker died mid-way).
        reason = give_up_reason(cfg, attempt - 1, published_s)
        if reason:
            await self._dead_letter(msg, effect, reason, attempt - 1, 0, "")
            return
        remaining = cfg.deadline_s - (time.time() - published_s)
        try:
            async with asyncio.timeout(min(cfg.attempt_timeout_s, remaining)):
                result = await self._sink.deliver(effect)
        except SinkRejected as exc:
            self.metrics.rejected += 1
            error = default_redactor().redact_text(str(exc))
            await self._dead_letter(msg, effect, "rejected", attempt, exc.status, error)
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
        # A sink's error may quote what it was sent (or a URL): it goes to logs and the
        # dead-letter stream, so it is redacted like any text leaving the call.
        error = default_redactor().redact_text(str(exc) or type(exc).__name__)
        reason = give_up_reason(cfg, attempt, published_s)
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
                # Not an effect, so nothing can deliver it: only an operator reads it.
                "raw": default_redactor().redact_text(msg.data.decode(errors="replace")),
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
            await publish_deduplicated(
                self._js,
                subjects.call_events(effect.tenant, effect.call_id),
                encode_for_log(rec),
                f"{effect.id}:delivery",
            )
        except EventsError as exc:
            # The delivery itself happened; losing its log line must not cause a re-delivery.
            log.warning("%s: could not log delivery of %s: %s", self._name, effect.id, exc)


def give_up_reason(cfg: WorkerConfig, attempts: int, published_s: float) -> str:
    """Why an effect that has had ``attempts`` tries must not get another ("" if it may)."""
    if attempts >= cfg.max_deliveries:
        return "max_deliveries"
    if time.time() - published_s >= cfg.deadline_s:
        return "deadline"
    return ""


def parse_effect(msg: Msg) -> Effect:
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
