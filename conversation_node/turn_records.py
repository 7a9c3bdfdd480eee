"""Event-log records a turn writes: what replay needs to rebuild the call exactly.

Pure functions of what the turn saw and did; the session decides when to write them (in
the turn's checkpoint, through the outbox).
"""

from __future__ import annotations

import hashlib
from typing import Any

from events import eventlog
from events.eventlog import EventType
from memory.retrieval import RetrievalResult
from memory.session import SessionMemory

FactOp = tuple[str, str | None]  # (slot, value); None: the slot was cleared


def memory_record(
    memory: SessionMemory, turn: int, ops: list[FactOp], **extra: Any
) -> dict[str, Any]:
    """The ``memory`` record of a turn: exactly what it changed in the session memory.

    Applied in this order to the memory as of the previous record, it gives the memory
    the turn checkpointed (``SessionMemory.to_state()``):

    1. ``facts_cleared`` (slots): ``facts.clear(slot)`` each;
    2. ``facts_set`` ({slot: value}): ``facts.set(slot, value, turn)`` each;
    3. ``exchange`` ([turn, user, heard, interrupted] or null):
       ``working.add(Exchange(*exchange))`` (an exchange for the turn already last in
       working memory amends it: a barge-in after the turn was committed);
    4. ``notes`` ([[turn, text], ...]): appended to the notes window;
    5. a record of a turn >= 1 is a user turn: ``last_user_turn = turn``.

    Clearing first is exact: within a turn a slot is only ever cleared before it is set
    again (a withdrawn confirmation re-given), and a slot set then cleared is listed as
    cleared only.
    """
    facts_set: dict[str, str] = {}
    cleared: list[str] = []
    for slot, value in ops:
        if value is None:
            facts_set.pop(slot, None)
            if slot not in cleared:
                cleared.append(slot)
        else:
            facts_set[slot] = value
    last = memory.working.last()
    exchange = (
        [last.turn, last.user, last.agent, last.interrupted]
        if last is not None and last.turn == turn
        else None
    )
    notes = [[t, note] for t, note in memory.notes if t == turn]
    return eventlog.record(
        EventType.MEMORY,
        turn,
        facts_set=facts_set,
        facts_cleared=cleared,
        exchange=exchange,
        notes=notes,
        **extra,
    )


def prompt_digest(messages: list[dict[str, Any]]) -> str:
    h = hashlib.sha256()
    for m in messages:
        h.update(str(m.get("role")).encode())
        h.update(str(m.get("content")).encode())
    return h.hexdigest()[:16]


def retrieval_record(turn: int, result: RetrievalResult, elapsed_ms: float) -> dict[str, Any]:
    return eventlog.record(
        EventType.RETRIEVAL,
        turn,
        answered=list(result.answered),
        timed_out=list(result.timed_out),
        from_cache=list(result.from_cache),
        stale=list(result.stale),
        failed=list(result.failed),
        partial=result.partial,
        prefetched=result.prefetched,
        elapsed_ms=round(elapsed_ms, 3),
        # Ids, not texts: the knowledge base document, the earlier call, the slot query.
        snippets=[s.ref or s.source for s in result.snippets],
    )


def retrieval_fallbacks(result: RetrievalResult) -> list[str]:
    """Degradations of the knowledge stage, named for the turn's telemetry: a slow source
    answered from its cache (``knowledge_cached``), or nothing at all from one that timed
    out or failed (``retrieval_partial``)."""
    out: list[str] = []
    if result.stale:
        out.append("knowledge_cached")
    if result.partial:
        out.append("retrieval_partial")
    return out
