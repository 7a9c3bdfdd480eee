"""A call's durability: fenced checkpoints, the outbox, and catching up after an outage.

One job: make what a turn decided survive the node. ``commit`` appends the turn's event
records (and the caller already appended its effects) to the outbox and writes the whole
session as one compare-and-set checkpoint (architecture invariants 3 and 4). Only after the
write succeeds is the router acknowledged; the outbox is then published to JetStream *off
the turn's critical path*, by one publisher task per call, so a slow or absent JetStream
never delays a reply or an ``ack`` (the entries are in the checkpoint already: a takeover
republishes them, and JetStream de-duplicates by message id).

If Redis is unreachable the call goes on from memory: the write is retried with backoff
until it succeeds (logged and counted once per outage). A write rejected because a newer
owner holds the epoch raises :class:`Fenced`; the session drops the call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from opentelemetry.context import Context

from callmesh import tracing
from callmesh.metric_names import (
    CHECKPOINT_FAILURES,
    CHECKPOINT_WRITE_MS,
    CHECKPOINTS,
    CHECKPOINTS_CAUGHT_UP,
    OUTBOX_PUBLISH_FAILURES,
    OUTBOX_PUBLISH_MS,
    OUTBOX_PUBLISHED,
)
from conversation_node.node_services import NodeServices
from events import eventlog, subjects
from events.errors import EventsError
from state_store.checkpoint import Checkpoint, OutboxEntry
from state_store.errors import FencedOut, StoreUnavailable

log = logging.getLogger("callmesh.node.checkpoint")

RETRY_FIRST_S = 0.1
RETRY_MAX_S = 1.0


class Fenced(Exception):
    """A newer owner took the call; carries the store's rejection."""

    def __init__(self, exc: FencedOut) -> None:
        super().__init__(str(exc))
        self.rejection = exc


class Checkpointer:
    """Owns a call's outbox, event cursor, checkpoint writes and the tasks that retry them.

    ``snapshot`` builds the checkpoint from the session (it reads :attr:`outbox` and
    :attr:`event_cursor` from here); ``acknowledge`` tells the router what is now durable;
    ``turn_lock`` is held by retries so a checkpoint never captures a half-applied turn.
    """

    def __init__(
        self,
        services: NodeServices,
        tenant: str,
        call_id: str,
        *,
        snapshot: Callable[[], Checkpoint],
        acknowledge: Callable[[], Awaitable[None]],
        turn_lock: asyncio.Lock,
        active: Callable[[], bool],
    ) -> None:
        self._svc = services
        self.tenant = tenant
        self.call_id = call_id
        self._snapshot = snapshot
        self._acknowledge = acknowledge
        self._turn_lock = turn_lock
        self._active = active
        self.outbox: list[OutboxEntry] = []
        self.event_cursor = 0
        self.dirty = False
        # True from a failed publish until one succeeds: turns report it as a fallback.
        self.publish_failing = False
        self._save_lock = asyncio.Lock()
        self._retry_task: asyncio.Task[None] | None = None
        self._publish_task: asyncio.Task[None] | None = None
        # Publishes never overlap: the event log keeps the turn order.
        self._publish_lock = asyncio.Lock()
        # The call's span: outbox publishes are its children (None while tracing is off).
        self.trace_parent: Context | None = None

    def effects_waiting(self, before_turn: int) -> bool:
        """Side effects of earlier turns still unpublished: the effect stream is down
        (normally a turn's effects are published within milliseconds of its commit)."""
        return self.publish_failing or any(
            e.turn < before_turn and subjects.is_effect(e.subject) for e in self.outbox
        )

    def restore(self, outbox: list[OutboxEntry], event_cursor: int) -> None:
        self.outbox = list(outbox)
        self.event_cursor = event_cursor

    # ------------------------------------------------------------------ writes

    async def commit(self, records: list[dict[str, Any]], turn: int) -> bool:
        """Queue ``records`` in the outbox (one event-log message for all of them) and write
        the checkpoint. True when it is durable now; False when Redis is away (the retry
        loop will catch up)."""
        self.outbox.extend(
            eventlog.to_outbox(self.tenant, self.call_id, records, self.event_cursor)
        )
        self.event_cursor += len(records)
        self.dirty = True
        if not await self.persist(turn=turn):
            return False
        await self._after_save()
        return True

    async def persist(self, *, turn: int, retrying: bool = False) -> bool:
        """One CAS checkpoint write. Raises :class:`Fenced` if a newer owner holds the call."""
        async with self._save_lock:
            t0 = time.monotonic()
            try:
                await self._svc.store.save(self._snapshot())
            except StoreUnavailable as exc:
                if retrying:
                    return False
                self._svc.metrics.inc(CHECKPOINT_FAILURES)
                log.warning(
                    "checkpoint deferred: redis unavailable",
                    extra={"fields": {"call_id": self.call_id, "turn": turn, "error": str(exc)}},
                )
                self._schedule_retry()
                return False
            except FencedOut as exc:
                raise Fenced(exc) from exc
            self.dirty = False
            self._svc.metrics.observe(CHECKPOINT_WRITE_MS, (time.monotonic() - t0) * 1000)
            if retrying:
                self._svc.metrics.inc(CHECKPOINTS_CAUGHT_UP)
                log.info(
                    "checkpoint caught up",
                    extra={"fields": {"call_id": self.call_id, "turn": turn}},
                )
            else:
                self._svc.metrics.inc(CHECKPOINTS)
            return True

    async def _after_save(self) -> None:
        await self._acknowledge()
        self.kick_publisher()

    # ------------------------------------------------------------------ outbox

    def kick_publisher(self) -> None:
        """Publish the outbox in the background (one task per call keeps the order)."""
        if not self.outbox or self._svc.publisher is None:
            return
        if self._publish_task is not None and not self._publish_task.done():
            return  # the running task's loop picks the new entries up
        self._publish_task = asyncio.create_task(
            self._publish_loop(), name=f"outbox:{self.call_id}"
        )

    async def _publish_loop(self) -> None:
        # Entries committed while a publish is in flight are published by the next round.
        while self.outbox:
            if not await self.publish_once():
                return

    async def publish_once(self) -> bool:
        """Publish what is pending now; False (and a retry scheduled) if JetStream failed."""
        async with self._publish_lock:
            return await self._publish_pending()

    async def _publish_pending(self) -> bool:
        publisher = self._svc.publisher
        if not self.outbox or publisher is None:
            return True
        pending = list(self.outbox)
        t0 = time.monotonic()
        try:
            attrs = {tracing.CALL_ID: self.call_id, "messaging.batch.message_count": len(pending)}
            with tracing.span(tracing.OUTBOX_PUBLISH, attrs, self.trace_parent):
                acked = set(await publisher.publish(pending))
        except EventsError as exc:
            self._svc.metrics.inc(OUTBOX_PUBLISH_FAILURES)
            if not self.publish_failing:
                log.warning(
                    "outbox publish deferred",
                    extra={
                        "fields": {
                            "call_id": self.call_id,
                            "pending": len(pending),
                            "error": str(exc),
                        }
                    },
                )
            self.publish_failing = True
            self._schedule_retry()
            return False
        # The removal is persisted with the next checkpoint; until then a takeover would
        # republish these, which JetStream de-duplicates by msg id.
        self.outbox = [e for e in self.outbox if e.msg_id not in acked]
        self._svc.metrics.inc(OUTBOX_PUBLISHED, len(acked))
        self._svc.metrics.observe(OUTBOX_PUBLISH_MS, (time.monotonic() - t0) * 1000)
        if self.publish_failing:
            self.publish_failing = False
            log.info("outbox publishing again", extra={"fields": {"call_id": self.call_id}})
        if len(acked) < len(pending):
            self._schedule_retry()  # JetStream stopped part-way: retry the rest
            return False
        return True

    async def settle(self) -> None:
        """Wait for the background publish in flight (the final checkpoint of a call should
        show what is still pending, not what is about to be acknowledged)."""
        task = self._publish_task
        if task is not None and not task.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(task)

    # ------------------------------------------------------------------ retries

    def _schedule_retry(self) -> None:
        if self._retry_task is None or self._retry_task.done():
            self._retry_task = asyncio.create_task(
                self._retry_loop(), name=f"checkpoint-retry:{self.call_id}"
            )

    async def _retry_loop(self) -> None:
        delay = RETRY_FIRST_S
        me = asyncio.current_task()
        while self._active() and (self.dirty or self.outbox):
            # redis-py can swallow a cancellation that lands inside a command; aclose()
            # must not wait for an outage to end.
            if me is not None and me.cancelling():
                raise asyncio.CancelledError
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)
            try:
                # Under the turn lock: a checkpoint must never capture a half-applied turn.
                async with self._turn_lock:
                    if self.dirty:
                        if not await self.persist(turn=-1, retrying=True):
                            continue
                        await self._acknowledge()
                    if self.outbox and await self.publish_once():
                        return
            except Fenced:
                return  # the next turn meets the fence too and drops the call
            except (ConnectionError, RuntimeError):
                return  # the link to the router is gone; the next owner republishes

    async def aclose(self) -> None:
        """Stop the retry and publisher tasks. Whatever is pending is in the checkpoint."""
        for task in (self._retry_task, self._publish_task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(asyncio.gather(task, return_exceptions=True))
        self._retry_task = self._publish_task = None

    def __repr__(self) -> str:
        return (
            f"<Checkpointer {self.call_id} outbox={len(self.outbox)} cursor={self.event_cursor}"
            f"{' dirty' if self.dirty else ''}{' publish-failing' if self.publish_failing else ''}>"
        )
