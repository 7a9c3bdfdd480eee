"""The per-call event log: what every turn saw and did, for replay (issue: replay).

Records are JSON objects on ``calls.{tenant}.{call_id}.events``; each has ``type``,
``turn``, ``ts_ms`` and type-specific fields. They are produced by the node as part of a
turn, travel through the same outbox as side effects (so a committed turn's records are
never lost and never doubled), and are read back by :mod:`events.replay`.

The log is kept for days and read by operators, so PII never enters it: every record is
redacted (:mod:`callmesh.redaction`) when it is encoded for the log, here, before it
reaches the outbox. The checkpoint's own state (working memory, facts) is not a record
and keeps what the conversation needs.
"""

from __future__ import annotations

import json
import time
from enum import StrEnum
from typing import Any

from callmesh import redaction
from events import subjects
from state_store.checkpoint import OutboxEntry


class EventType(StrEnum):
    CALL_STARTED = "call_started"
    OWNERSHIP = "ownership"  # taken (start, failover, drain hand-off) with epoch
    USER_TURN = "user_turn"  # final transcript with confidence, seq
    RETRIEVAL = "retrieval"  # sources answered / timed out / cached, snippet ids
    LLM = "llm"  # prompt digest, compressed state, output text, tool calls
    FALLBACK = "fallback"
    EFFECT = "effect"  # an effect recorded in the outbox
    EFFECT_DELIVERY = "effect_delivery"  # written by the effects worker
    AGENT_REPLY = "agent_reply"  # what the caller heard; interrupted?
    BARGE_IN = "barge_in"  # the caller interrupted a reply already committed: what they heard
    MEMORY = "memory"  # facts set this turn (with provenance) — replay rebuilds from these
    TURN_METRICS = "turn_metrics"
    CALL_ENDED = "call_ended"


def record(kind: EventType, turn: int, /, **fields: Any) -> dict[str, Any]:
    return {"type": kind.value, "turn": turn, "ts_ms": int(time.time() * 1000), **fields}


def encode(rec: dict[str, Any]) -> bytes:
    return json.dumps(rec, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def encode_for_log(rec: dict[str, Any]) -> bytes:
    """A record as the event log stores it: redacted with the process's redactor (ids in
    ``redaction.ID_FIELDS`` are kept so records stay joinable)."""
    return encode(redaction.default_redactor().redact_value(rec))


def decode(data: bytes) -> dict[str, Any]:
    rec = json.loads(data)
    if not isinstance(rec, dict) or "type" not in rec:
        raise ValueError("not an event record")
    return rec


def to_outbox(
    tenant: str, call_id: str, records: list[dict[str, Any]], first_index: int
) -> list[OutboxEntry]:
    """Outbox entries for records numbered from ``first_index`` (the call's event cursor)."""
    subject = subjects.call_events(tenant, call_id)
    return [
        OutboxEntry(
            subject,
            subjects.event_msg_id(tenant, call_id, first_index + i),
            encode_for_log(r),
            int(r["turn"]),
        )
        for i, r in enumerate(records)
    ]
