"""The per-turn checkpoint: a call's compressed state, serialized with msgpack.

Its size is bounded by construction: working memory is a fixed window, facts are one entry
per slot, the outbox holds only what JetStream has not acknowledged yet, and the event
log is referenced by a cursor rather than copied (architecture invariant 3).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import msgpack

from state_store.errors import CorruptState

FORMAT_VERSION = 1
# ``Checkpoint.status`` of a call that ended: its final checkpoint, kept for replay.
ENDED = "ended"


@dataclass
class OutboxEntry:
    """A message a committed turn produced and JetStream has not acknowledged yet: a side
    effect (CRM write, booking) or an event-log record. Recorded in the same atomic
    checkpoint write as the turn; a node taking the call over republishes it, and the
    ``msg_id`` (JetStream's Nats-Msg-Id) makes the republish a no-op if it already landed."""

    subject: str
    msg_id: str
    data: bytes
    turn: int


@dataclass
class Checkpoint:
    tenant: str
    call_id: str
    caller: str
    epoch: int
    node: str
    # Last inbound ``seq`` applied and last turn answered (invariant 5).
    last_seq: int = 0
    turn: int = 0
    status: str = "active"  # active | ended
    working: list[list[Any]] = field(default_factory=list)
    facts: dict[str, list[Any]] = field(default_factory=dict)
    outbox: list[OutboxEntry] = field(default_factory=list)
    # Number of event-log records this call has committed (the replay cursor).
    event_cursor: int = 0
    # Memory parts owned by the memory package (summary, history digest...).
    extra: dict[str, Any] = field(default_factory=dict)
    created_ms: int = 0
    updated_ms: int = 0
    # The W3C traceparent of the call's span on its first owner: a later owner's span
    # links to it, so a failover shows in the call's trace ("" while tracing is off).
    trace: str = ""

    def to_bytes(self) -> bytes:
        # The fields as they are, in order (msgpack copies nothing): dataclasses.asdict
        # deep-copied the whole state on every turn's commit only to pack it.
        d = {name: getattr(self, name) for name in _FIELD_NAMES}
        d["outbox"] = [{name: getattr(e, name) for name in _OUTBOX_FIELDS} for e in self.outbox]
        d["v"] = FORMAT_VERSION
        return msgpack.packb(d, use_bin_type=True)

    @classmethod
    def from_bytes(cls, blob: bytes) -> Checkpoint:
        try:
            d = msgpack.unpackb(blob, raw=False, strict_map_key=False)
            d.pop("v", None)
            # A field a newer version added is ignored (rolling upgrades read both ways).
            d = {k: v for k, v in d.items() if k in _FIELDS}
            d["outbox"] = [OutboxEntry(**p) for p in d.get("outbox", [])]
            return cls(**d)
        except (ValueError, TypeError, KeyError, msgpack.ExtraData) as exc:
            raise CorruptState(f"checkpoint does not decode: {exc}") from exc


_FIELD_NAMES = tuple(f.name for f in fields(Checkpoint))
_OUTBOX_FIELDS = tuple(f.name for f in fields(OutboxEntry))
_FIELDS = frozenset(_FIELD_NAMES)
