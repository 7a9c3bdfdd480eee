"""Replay: rebuild a call turn by turn from its event log and check it (issue 6, part 4).

The log of a call is ``calls.{tenant}.{call_id}.events`` in ``CALLMESH_EVENTS``. It lives
in JetStream, not on the node, so replay works after the call ended and after its node
died. Records the node committed but had not published yet (still in the checkpoint's
outbox) are added from the checkpoint, marked ``pending``.

This module reads the log and assembles the :class:`ReplayReport`; the state is rebuilt
by :mod:`events.replay_state`, checked by :mod:`events.replay_verify` and shown by
:mod:`events.replay_text` and :mod:`events.replay_html`. Everything is scoped by tenant:
a tenant's replay reads only that tenant's subject and key.

Replay shows the redacted form only (:mod:`callmesh.redaction`): the log is redacted when
written, and the report redacts again what it takes from elsewhere (the checkpoint's
working memory and facts, pending records, a log written before redaction existed).
"""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass, field
from typing import Any

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from callmesh.protocol import valid_id
from callmesh.redaction import Redactor, default_redactor
from events import subjects
from events.errors import translate
from events.eventlog import UNDECODABLE, EventType, decode_message
from events.replay_state import CallState, rebuild
from events.replay_verify import Divergence, compare
from state_store.checkpoint import Checkpoint


async def read_records(
    js: JetStreamContext, tenant: str, call_id: str, *, timeout_s: float = 2.0
) -> list[dict[str, Any]]:
    """Every record of one call of one tenant, in log order. Each record gets ``_seq``
    (the stream sequence of its message) and ``_msg_id`` (its message's de-duplication
    id) for reference; the records of one message share both. Reads with a short-lived,
    in-memory, unacknowledged consumer that is deleted afterwards."""
    if not (valid_id(tenant) and valid_id(call_id)):
        # A wildcard or dotted id would widen the subject to other calls or tenants.
        raise ValueError("tenant and call id must match [A-Za-z0-9_-]{1,64}")
    subject = subjects.call_events(tenant, call_id)
    with translate():
        try:
            info = await js.stream_info(subjects.EVENTS_STREAM, subjects_filter=subject)
        except NotFoundError:
            return []
        # Messages, not records: a message holds one commit's records.
        total = (info.state.subjects or {}).get(subject, 0)
        if not total:
            return []
        name = f"replay-{uuid.uuid4().hex[:12]}"
        await js.add_consumer(
            subjects.EVENTS_STREAM,
            ConsumerConfig(
                name=name,
                filter_subject=subject,
                ack_policy=AckPolicy.NONE,
                deliver_policy=DeliverPolicy.ALL,
                inactive_threshold=60.0,
                mem_storage=True,
            ),
        )
        sub = await js.pull_subscribe_bind(consumer=name, stream=subjects.EVENTS_STREAM)
        out: list[dict[str, Any]] = []
        read = 0
        try:
            done = False
            while not done and read < total:
                try:
                    msgs = await sub.fetch(min(256, total - read), timeout=timeout_s)
                except TimeoutError:
                    break  # messages expired (retention) while we read: show what is left
                for msg in msgs:
                    out.extend(_records(msg))
                    read += 1
                    done = msg.metadata.num_pending == 0
        finally:
            # Best effort: the consumer also deletes itself after inactive_threshold.
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
                await js.delete_consumer(subjects.EVENTS_STREAM, name)
    return out


def _records(msg: Msg) -> list[dict[str, Any]]:
    seq = msg.metadata.sequence.stream
    msg_id = (msg.headers or {}).get("Nats-Msg-Id", "")
    recs = decode_message(msg.data or b"")
    for rec in recs:
        rec["_seq"] = seq
        rec["_msg_id"] = msg_id
    return recs


async def list_calls(js: JetStreamContext, tenant: str) -> dict[str, int]:
    """Call ids of one tenant that have a log, with the number of messages in each log.
    A message holds one checkpoint commit's records (about one turn), or one effect
    delivery; it is not a record count, which only reading the log gives."""
    if not valid_id(tenant):
        raise ValueError("tenant must match [A-Za-z0-9_-]{1,64}")
    with translate():
        try:
            info = await js.stream_info(
                subjects.EVENTS_STREAM, subjects_filter=subjects.tenant_events(tenant)
            )
        except NotFoundError:
            return {}
    return {subj.split(".")[2]: n for subj, n in sorted((info.state.subjects or {}).items())}


def pending_records(ckpt: Checkpoint, known_ids: set[str]) -> list[dict[str, Any]]:
    """Committed records still in the checkpoint's outbox (the node died before it could
    publish them and nobody took the call over), minus those the log already has."""
    subject = subjects.call_events(ckpt.tenant, ckpt.call_id)
    out = []
    for entry in ckpt.outbox:
        if entry.subject == subject and entry.msg_id not in known_ids:
            for rec in decode_message(entry.data):
                rec.update(_seq=0, _msg_id=entry.msg_id, _pending=True)
                out.append(rec)
    return out


@dataclass
class ReplayReport:
    """What ``callmesh replay`` shows: the records, the state (as of ``at`` or final), the
    verification against the last checkpoint, and anything that makes the log incomplete."""

    tenant: str
    call_id: str
    records: list[dict[str, Any]]
    state: CallState
    final: CallState
    at: int | None = None
    checkpoint: dict[str, Any] | None = None
    divergences: list[Divergence] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def found(self) -> bool:
        return bool(self.records) or self.checkpoint is not None

    @property
    def verified(self) -> bool | None:
        """True when the log reproduces the checkpoint, None when there is no checkpoint."""
        return None if self.checkpoint is None else not self.divergences

    def turns(self) -> list[tuple[int, list[dict[str, Any]]]]:
        """Records grouped by turn (up to ``at``), in turn order, log order within a turn."""
        groups: dict[int, list[dict[str, Any]]] = {}
        for rec in self.records:
            t = int(rec.get("turn", 0))
            if self.at is None or t <= self.at:
                groups.setdefault(t, []).append(rec)
        return sorted(groups.items())

    def to_dict(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "call_id": self.call_id,
            "found": self.found,
            "at": self.at,
            "state": self.state.to_dict(),
            "final_state": self.final.to_dict(),
            "checkpoint": self.checkpoint,
            "verified": self.verified,
            "divergences": [vars(d) for d in self.divergences],
            "warnings": self.warnings,
            "turns": [{"turn": t, "records": recs} for t, recs in self.turns()],
        }


def build_report(
    tenant: str,
    call_id: str,
    records: list[dict[str, Any]],
    ckpt: Checkpoint | None,
    at: int | None = None,
    redactor: Redactor | None = None,
) -> ReplayReport:
    """Rebuild, verify the final state against ``ckpt`` and collect warnings."""
    redact = (redactor or default_redactor()).redact_value
    warnings: list[str] = []
    if ckpt is not None and (ckpt.tenant != tenant or ckpt.call_id != call_id):
        raise ValueError("checkpoint belongs to another call")
    if ckpt is not None:
        pending = pending_records(ckpt, {r.get("_msg_id", "") for r in records})
        if pending:
            warnings.append(
                f"{len(pending)} committed records were not published yet; "
                "shown from the checkpoint's outbox"
            )
            records = records + pending
    records = [redact(rec) for rec in records]
    own = [r for r in records if r.get("type") != EventType.EFFECT_DELIVERY]
    if records and records[0].get("type") != EventType.CALL_STARTED:
        warnings.append("the log does not start with call_started (expired by retention?)")
    if any(r.get("type") == UNDECODABLE for r in records):
        warnings.append("some records could not be decoded")
    if ckpt is not None and ckpt.event_cursor and len(own) != ckpt.event_cursor:
        warnings.append(
            f"the log holds {len(own)} node records; the checkpoint counts {ckpt.event_cursor}"
        )
    final = rebuild(tenant, call_id, records)
    report = ReplayReport(
        tenant,
        call_id,
        records,
        rebuild(tenant, call_id, records, at),
        final,
        at=at,
        warnings=warnings,
    )
    if ckpt is None:
        if records:
            warnings.append("no checkpoint (expired or never written): state not verified")
        return report
    report.checkpoint = {
        "epoch": ckpt.epoch,
        "node": ckpt.node,
        "turn": ckpt.turn,
        "last_seq": ckpt.last_seq,
        "status": ckpt.status,
        "working": redact(ckpt.working),
        "facts": redact(ckpt.facts),
        "event_cursor": ckpt.event_cursor,
        "pending_outbox": len(ckpt.outbox),
    }
    report.divergences = compare(final, ckpt, redactor)
    return report
