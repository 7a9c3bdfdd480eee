"""Every NATS stream and subject name callmesh uses, in one place.

Subjects are per tenant and call (architecture invariant 8/9); tenant and call ids are
restricted to ``[A-Za-z0-9_-]`` at the edge so they are always single subject tokens.
"""

from __future__ import annotations

# Side effects waiting for delivery (CRM writes, bookings): work-queue semantics.
EFFECTS_STREAM = "CALLMESH_EFFECTS"
EFFECTS_SUBJECTS = "effects.>"
# Effects that exhausted their deliveries, kept for operators.
DEAD_LETTER_STREAM = "CALLMESH_DEAD_LETTERS"
DEAD_LETTER_SUBJECTS = "deadletter.>"
# Per-call event log for replay.
EVENTS_STREAM = "CALLMESH_EVENTS"
EVENTS_SUBJECTS = "calls.>"


def is_effect(subject: str) -> bool:
    return subject.startswith(EFFECTS_SUBJECTS[:-1])


def effect(tenant: str, kind: str) -> str:
    """Subject of one effect, e.g. ``effects.acme.booking_create``."""
    return f"effects.{tenant}.{kind}"


def dead_letter(tenant: str, kind: str) -> str:
    return f"deadletter.{tenant}.{kind}"


def call_events(tenant: str, call_id: str) -> str:
    """The call's event log subject: ``calls.{tenant}.{call_id}.events``."""
    return f"calls.{tenant}.{call_id}.events"


def tenant_events(tenant: str) -> str:
    """Wildcard over every call's events of one tenant (replay listing)."""
    return f"calls.{tenant}.*.events"


# De-duplication ids are global to a stream (JetStream keeps one window per stream, not per
# subject), and call ids are chosen by clients: two tenants may use the same call id, so
# every id starts with the tenant. Without it the second tenant's records and effects were
# dropped as duplicates of the first's. The effect id is also the CRM's Idempotency-Key.
# Entries of the older ``{call_id}:...`` form still sitting in a checkpoint's outbox are
# published once under that id (the id travels with the entry).


def effect_msg_id(tenant: str, call_id: str, turn: int, n: int) -> str:
    """JetStream de-duplication id of the n-th effect of a turn (invariant 4)."""
    return f"{tenant}:{call_id}:{turn}:{n}"


def event_msg_id(tenant: str, call_id: str, index: int) -> str:
    """De-duplication id of the event-log message whose first record is the call's
    index-th (a message holds one commit's records; before batching, exactly one). The
    index is the call's event cursor, advanced only by committed checkpoints, so ids are
    stable across a republish by a new owner and never reused for different records."""
    return f"{tenant}:{call_id}:ev{index}"
