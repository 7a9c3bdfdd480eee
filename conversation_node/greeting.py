"""Customer history at the edges of a call: read for the greeting, written at hang-up.

Both are best effort and bounded in time: a Redis outage costs the caller their "welcome
back", never the call its greeting or its hang-up.
"""

from __future__ import annotations

import asyncio
import logging

from callmesh.metric_names import HISTORY_LOAD_FAILURES, HISTORY_SAVE_FAILURES, HISTORY_SAVED
from callmesh.telemetry import now_ms
from conversation_node.node_services import NodeServices
from memory.history import CallRecord
from memory.session import SessionMemory

log = logging.getLogger("callmesh.node.greeting")

# The protocol's default caller: not a person, so it has no customer history (one
# anonymous caller must never be greeted with what another one booked).
ANONYMOUS_CALLER = "anonymous"
# Earlier calls the greeting looks at, and how long it may wait for them (the greeting
# waits for this read; without history the caller still gets the standard greeting).
GREETING_HISTORY_CALLS = 3
HISTORY_LOAD_TIMEOUT_S = 0.2
HISTORY_SAVE_TIMEOUT_S = 1.0


async def load_history(
    svc: NodeServices, tenant: str, caller: str, call_id: str
) -> list[CallRecord]:
    """The caller's earlier calls, newest first; none if they cannot be read in time."""
    if caller == ANONYMOUS_CALLER:
        return []
    try:
        async with asyncio.timeout(HISTORY_LOAD_TIMEOUT_S):
            return await svc.memory.history.load(tenant, caller, limit=GREETING_HISTORY_CALLS)
    except Exception as exc:  # history is best effort: the standard greeting will do
        svc.metrics.inc(HISTORY_LOAD_FAILURES)
        log.warning(
            "customer history unavailable: standard greeting",
            extra={"fields": {"call_id": call_id, "error": repr(exc)}},
        )
        return []


async def save_history(svc: NodeServices, memory: SessionMemory, caller: str, call_id: str) -> None:
    """The call's facts and summary, for this caller's next call."""
    if caller == ANONYMOUS_CALLER:
        return
    record = memory.call_record(call_id, now_ms())
    try:
        async with asyncio.timeout(HISTORY_SAVE_TIMEOUT_S):
            await svc.memory.history.save(record)
    except Exception as exc:
        svc.metrics.inc(HISTORY_SAVE_FAILURES)
        log.warning(
            "customer history not saved",
            extra={"fields": {"call_id": call_id, "error": repr(exc)}},
        )
        return
    svc.metrics.inc(HISTORY_SAVED)
