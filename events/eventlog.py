"""The per-call event log: what every turn saw and did, for replay (issue: replay).

Records are JSON objects on ``calls.{tenant}.{call_id}.events``; each has ``type``,
``turn``, ``ts_ms`` and type-specific fields. They are produced by the node as part of a
turn, travel through the same outbox as side effects (so a committed turn's records are
never lost and never doubled), and are read back by :mod:`events.replay`.

One JetStream message holds the records of one checkpoint commit, as JSON lines: one
compact JSON object per line (``json.dumps`` escapes newlines inside strings, so a line is
always one record). Publishing a turn as one message instead of one per record is what
makes the log cheap: a publish and its acknowledgement cost the node and the NATS server
far more than the bytes. A message with a single record is byte for byte the older
one-record-per-message format, which is how the effects worker still writes its
``effect_delivery`` records; readers take both. A commit larger than
:data:`MAX_MESSAGE_BYTES` is split, in order, into several messages.

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

# The largest message a commit's records are packed into (a record larger than this alone
# is one message by itself). JetStream refuses a message over the server's max_payload,
# 1 MiB by default, headers included; a turn's records are typically 2-3 KB.
MAX_MESSAGE_BYTES = 256 * 1024
UNDECODABLE = "undecodable"


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


def undecodable(raw: bytes) -> dict[str, Any]:
    """What replay shows for a line of the log that is not a record."""
    return {"type": UNDECODABLE, "turn": -1, "ts_ms": 0, "raw": raw.decode(errors="replace")}


def decode_message(data: bytes) -> list[dict[str, Any]]:
    """The records of one event-log message, in order: one per line (a message written
    before batching, or by the effects worker, holds one). A line that does not decode
    becomes an :func:`undecodable` record, so the rest of the message is kept."""
    out: list[dict[str, Any]] = []
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            out.append(decode(line))
        except (ValueError, RecursionError):  # RecursionError: absurdly nested JSON
            out.append(undecodable(line))
    return out or [undecodable(data)]


def message_spans(sizes: list[int], max_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[int, int]]:
    """``[start, end)`` ranges of lines of the given sizes packed in order into messages
    of at most ``max_bytes`` (newlines included); a line alone over the bound is one
    message by itself."""
    spans: list[tuple[int, int]] = []
    start, size = 0, 0
    for i, n in enumerate(sizes):
        if i > start and size + 1 + n > max_bytes:
            spans.append((start, i))
            start, size = i, n
        else:
            size += n + (1 if i > start else 0)
    if sizes:
        spans.append((start, len(sizes)))
    return spans


def to_outbox(
    tenant: str,
    call_id: str,
    records: list[dict[str, Any]],
    first_index: int,
    *,
    max_bytes: int = MAX_MESSAGE_BYTES,
) -> list[OutboxEntry]:
    """Outbox entries for records numbered from ``first_index`` (the call's event cursor):
    one message for all of them unless they exceed ``max_bytes``. A message's id is its
    first record's index: the entry is encoded once and kept in the checkpoint until
    JetStream has it, so a republish (retry, takeover) sends the same id and the same
    records, and no two commits share a first index."""
    subject = subjects.call_events(tenant, call_id)
    lines = [encode_for_log(r) for r in records]
    return [
        OutboxEntry(
            subject,
            subjects.event_msg_id(tenant, call_id, first_index + start),
            b"\n".join(lines[start:end]),
            int(records[start]["turn"]),
        )
        for start, end in message_spans([len(line) for line in lines], max_bytes)
    ]
