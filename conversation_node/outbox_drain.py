"""Ended calls whose effects are not out yet: retried by the node, not by the call.

A call's own retries (:mod:`conversation_node.checkpointing`) live as long as its session.
A caller who hangs up while Redis or JetStream is away (or while a Redis Cluster shard has
no synced replica, so every save raises ``NotReplicated``) ends the session with its final
checkpoint unsaved or its outbox unpublished; nothing else would ever publish that outbox
(a takeover happens only on a new connection, and an ended call refuses one). So the
session hands what is left to this node-owned drainer (architecture invariant 4): one
named task that saves the final checkpoint, publishes its outbox (JetStream de-duplicates
by message id, so a repeat is stored once), then saves the emptied outbox so no later
reader publishes it again, retrying with exponential backoff and jitter.

Bounded: at most ``max_calls`` calls, each for at most ``max_age_s``. A call over either
bound is logged as an error by name and counted (``outbox_abandoned_calls``), never
dropped silently: what was saved of it stays in its checkpoint, and the call is marked
(best effort) in the index of ended calls with an outbox (:mod:`state_store.ended_outbox`)
as due, so a sweep on any node (:mod:`conversation_node.outbox_sweep`) takes it over. So
it is when this node dies: the index is stamped before each try and cleared only once
all is out. What a node holds only in memory (a final checkpoint never saved) is lost
with it; a sweep republishes what the last saved checkpoint holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from dataclasses import dataclass

from callmesh.metric_names import (
    CHECKPOINTS_CAUGHT_UP,
    OUTBOX_ABANDONED_CALLS,
    OUTBOX_DRAINING_CALLS,
    OUTBOX_PUBLISHED,
)
from callmesh.telemetry import Metrics, now_ms
from events.errors import EventsError
from events.outbox import OutboxPublisher
from state_store.checkpoint import Checkpoint
from state_store.ended_outbox import EndedOutboxIndex
from state_store.errors import FencedOut, StoreUnavailable
from state_store.store import StateStore

log = logging.getLogger("callmesh.node.outbox_drain")

MAX_CALLS = 1000
MAX_AGE_S = 600.0
FIRST_DELAY_S = 0.1
MAX_DELAY_S = 5.0
# On close, how long marking what is left for other nodes' sweeps may take.
HAND_ON_S = 2.0


@dataclass
class _Leftover:
    ckpt: Checkpoint
    saved: bool  # the store holds exactly ``ckpt`` (outbox included)
    adopted: float
    attempts: int = 0
    due: float = 0.0


class OutboxDrainer:
    """Saves and publishes what ended calls left behind; ``adopt``, ``wait_idle``,
    idempotent ``aclose``."""

    def __init__(
        self,
        store: StateStore,
        publisher: OutboxPublisher | None,
        metrics: Metrics,
        index: EndedOutboxIndex | None = None,
        *,
        max_calls: int = MAX_CALLS,
        max_age_s: float = MAX_AGE_S,
        first_delay_s: float = FIRST_DELAY_S,
        max_delay_s: float = MAX_DELAY_S,
    ) -> None:
        self._store = store
        self._publisher = publisher
        self._metrics = metrics
        self._index = index
        self._max_calls = max_calls
        self._max_age_s = max_age_s
        self._first_delay_s = first_delay_s
        self._max_delay_s = max_delay_s
        self._calls: dict[tuple[str, str], _Leftover] = {}
        # Calls given up here, to be marked in the index as due for any node's sweep.
        self._hand_on: set[tuple[str, str]] = set()
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False

    def __len__(self) -> int:
        return len(self._calls)

    def __contains__(self, call: tuple[str, str]) -> bool:
        return call in self._calls

    def __repr__(self) -> str:
        return f"<OutboxDrainer {len(self._calls)} calls>"

    def adopt(self, ckpt: Checkpoint, *, saved: bool) -> None:
        """Take over an ended call's final checkpoint (``saved``: the store has it as is)."""
        key = (ckpt.tenant, ckpt.call_id)
        if self._closed or (key not in self._calls and len(self._calls) >= self._max_calls):
            reason = "node closing" if self._closed else f"over {self._max_calls} calls"
            self._abandon(ckpt, saved=saved, reason=reason)
            return
        self._hand_on.discard(key)
        self._calls[key] = _Leftover(ckpt, saved, time.monotonic())
        self._metrics.set(OUTBOX_DRAINING_CALLS, len(self._calls))
        self._idle.clear()
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="outbox-drainer")

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait (bounded) until nothing is left to drain; True if nothing is."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(timeout_s, 0.0)):
                await self._idle.wait()
        return self._idle.is_set()

    async def aclose(self) -> None:
        """Stop retrying; every call still pending is logged and counted as abandoned."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(asyncio.gather(task, return_exceptions=True))
        for left in list(self._calls.values()):
            self._abandon(left.ckpt, saved=left.saved, reason="node closing")
        self._calls.clear()
        self._metrics.set(OUTBOX_DRAINING_CALLS, 0)
        self._idle.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(HAND_ON_S):
                await self._mark_handed_on()

    # ------------------------------------------------------------------ the loop

    async def _run(self) -> None:
        me = asyncio.current_task()
        while self._calls:
            self._wake.clear()
            await self._mark_handed_on()
            for key, left in list(self._calls.items()):
                # redis-py can swallow a cancellation that lands inside a command.
                if me is not None and me.cancelling():
                    raise asyncio.CancelledError
                if left.due > time.monotonic():
                    continue
                done = await self._attempt(left)
                if self._calls.get(key) is not left:
                    continue  # adopted again meanwhile: the newer checkpoint is tried next
                if done:
                    del self._calls[key]
                elif time.monotonic() - left.adopted > self._max_age_s:
                    del self._calls[key]
                    self._abandon(left.ckpt, saved=left.saved, reason="drain time bound")
                else:
                    left.attempts += 1
                    left.due = time.monotonic() + self._backoff(left.attempts)
            self._metrics.set(OUTBOX_DRAINING_CALLS, len(self._calls))
            if not self._calls:
                break
            wait = min(left.due for left in self._calls.values()) - time.monotonic()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(wait, 0.0)):
                    await self._wake.wait()
        await self._mark_handed_on()
        self._idle.set()

    def _backoff(self, attempts: int) -> float:
        # Jitter: calls that ended in the same outage must not retry in lockstep.
        ceiling = min(self._first_delay_s * 2 ** min(attempts, 30), self._max_delay_s)
        return random.uniform(ceiling / 2, ceiling)

    async def _attempt(self, left: _Leftover) -> bool:
        """One round for one call: True once its checkpoint is saved and outbox published
        (or a newer owner holds the call: its outbox is that owner's now)."""
        ckpt = left.ckpt
        try:
            if self._index is not None:
                # Best effort: marks the call as tried, so another node's sweep leaves it
                # alone while this node is at it; a missing mark only invites a takeover.
                with contextlib.suppress(StoreUnavailable):
                    await self._index.touch(ckpt.tenant, ckpt.call_id, now_ms())
            if not left.saved:
                await self._store.save(ckpt)
                left.saved = True
                self._metrics.inc(CHECKPOINTS_CAUGHT_UP)
            if ckpt.outbox and self._publisher is not None:
                acked = set(await self._publisher.publish(list(ckpt.outbox)))
                self._metrics.inc(OUTBOX_PUBLISHED, len(acked))
                ckpt = left.ckpt = dataclasses.replace(
                    ckpt,
                    outbox=[e for e in ckpt.outbox if e.msg_id not in acked],
                    updated_ms=now_ms(),
                )
                left.saved = False
                if ckpt.outbox:
                    return False
                # Saved empty, so no later reader of the checkpoint publishes these again
                # after JetStream's de-duplication window.
                await self._store.save(ckpt)
                left.saved = True
            # Out and saved: the call keeps only its checkpoint, for replay (a False means a
            # newer owner holds it, whose outbox it is now).
            await self._store.end(ckpt.tenant, ckpt.call_id, ckpt.epoch, final=not ckpt.outbox)
            if self._index is not None:
                await self._index.remove(ckpt.tenant, ckpt.call_id)
        except FencedOut:
            log.info(
                "ended call taken over: its outbox is the new owner's",
                extra={"fields": {"tenant": ckpt.tenant, "call_id": ckpt.call_id}},
            )
            return True
        except (StoreUnavailable, EventsError) as exc:
            if left.attempts == 0:
                log.warning(
                    "ended call's effects not out yet: retrying",
                    extra={"fields": {"call_id": ckpt.call_id, "error": str(exc)}},
                )
            return False
        except Exception:
            # A bug must not end the drainer for every other call: retried, then bounded.
            log.exception("outbox drain failed", extra={"fields": {"call_id": ckpt.call_id}})
            return False
        log.info(
            "ended call's effects published",
            extra={"fields": {"call_id": ckpt.call_id, "attempts": left.attempts + 1}},
        )
        return True

    async def _mark_handed_on(self) -> None:
        """Best effort: what this node gave up is due for a sweep at once (score 0)."""
        index = self._index
        if index is None:
            self._hand_on.clear()
            return
        for tenant, call_id in list(self._hand_on):
            with contextlib.suppress(StoreUnavailable):
                await index.touch(tenant, call_id, 0)
                self._hand_on.discard((tenant, call_id))

    def _abandon(self, ckpt: Checkpoint, *, saved: bool, reason: str) -> None:
        if len(self._hand_on) < self._max_calls:
            self._hand_on.add((ckpt.tenant, ckpt.call_id))
        self._metrics.inc(OUTBOX_ABANDONED_CALLS)
        log.error(
            "ended call's effects left unpublished",
            extra={
                "fields": {
                    "tenant": ckpt.tenant,
                    "call_id": ckpt.call_id,
                    "pending": len(ckpt.outbox),
                    "checkpoint_saved": saved,
                    "reason": reason,
                }
            },
        )
