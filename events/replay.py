"""Replay: rebuild a call turn by turn from its event log and check it (issue 6, part 4).

The log of a call is ``calls.{tenant}.{call_id}.events`` in ``CALLMESH_EVENTS``. It lives
in JetStream, not on the node, so replay works after the call ended and after its node
died. Records the node committed but had not published yet (still in the checkpoint's
outbox) are added from the checkpoint, marked ``pending``.

Working memory and facts are rebuilt with the memory package's own classes, from the
MEMORY records alone, and compared with the last checkpoint: any divergence means the log
does not explain the state the call continued from, which is itself an incident.
Everything is scoped by tenant: a tenant's replay reads only that tenant's subject and key.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from callmesh.protocol import valid_id
from events import subjects
from events.errors import translate
from events.eventlog import EventType, decode
from memory.facts import SessionFacts
from memory.working import Exchange, WorkingMemory
from state_store.checkpoint import Checkpoint

DEFAULT_WORKING_TURNS = 8
# Fields of the checkpoint the log must explain exactly.
VERIFIED_FIELDS = ("turn", "last_seq", "status", "working", "facts")


async def read_records(
    js: JetStreamContext, tenant: str, call_id: str, *, timeout_s: float = 2.0
) -> list[dict[str, Any]]:
    """Every record of one call of one tenant, in log order. Each record gets ``_seq``
    (stream sequence) and ``_msg_id`` (its de-duplication id) for reference. Reads with a
    short-lived, in-memory, unacknowledged consumer that is deleted afterwards."""
    if not (valid_id(tenant) and valid_id(call_id)):
        # A wildcard or dotted id would widen the subject to other calls or tenants.
        raise ValueError("tenant and call id must match [A-Za-z0-9_-]{1,64}")
    subject = subjects.call_events(tenant, call_id)
    with translate():
        try:
            info = await js.stream_info(subjects.EVENTS_STREAM, subjects_filter=subject)
        except NotFoundError:
            return []
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
        try:
            done = False
            while not done and len(out) < total:
                try:
                    msgs = await sub.fetch(min(256, total - len(out)), timeout=timeout_s)
                except TimeoutError:
                    break  # records expired (retention) while we read: show what is left
                for msg in msgs:
                    out.append(_record(msg))
                    done = msg.metadata.num_pending == 0
        finally:
            # Best effort: the consumer also deletes itself after inactive_threshold.
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
                await js.delete_consumer(subjects.EVENTS_STREAM, name)
    return out


def _record(msg: Msg) -> dict[str, Any]:
    try:
        rec = decode(msg.data)
    except ValueError:
        rec = {
            "type": "undecodable",
            "turn": -1,
            "ts_ms": 0,
            "raw": msg.data.decode(errors="replace"),
        }
    rec["_seq"] = msg.metadata.sequence.stream
    rec["_msg_id"] = (msg.headers or {}).get("Nats-Msg-Id", "")
    return rec


async def list_calls(js: JetStreamContext, tenant: str) -> dict[str, int]:
    """Call ids of one tenant that have a log, with their record counts."""
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
            rec = decode(entry.data)
            rec.update(_seq=0, _msg_id=entry.msg_id, _pending=True)
            out.append(rec)
    return out


@dataclass
class EffectView:
    msg_id: str
    kind: str
    turn: int
    payload: dict[str, Any]
    outcome: str = "pending"  # pending | delivered | dead_lettered
    attempts: int = 0
    status: int = 0
    lag_ms: int | None = None


@dataclass
class CallState:
    """A call's state as rebuilt from its log."""

    tenant: str
    call_id: str
    caller: str = ""
    node: str = ""
    epoch: int = 0
    turn: int = 0
    last_seq: int = 0
    status: str = "active"
    ended_reason: str = ""
    working_turns: int = DEFAULT_WORKING_TURNS
    working: WorkingMemory = field(default_factory=lambda: WorkingMemory(DEFAULT_WORKING_TURNS))
    facts: SessionFacts = field(default_factory=SessionFacts)
    effects: dict[str, EffectView] = field(default_factory=dict)
    ownership: list[dict[str, Any]] = field(default_factory=list)
    _deliveries: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)

    def _settle(self, msg_id: str) -> None:
        view, rec = self.effects.get(msg_id), self._deliveries.get(msg_id)
        if view is not None and rec is not None:
            view.outcome, view.attempts = rec.get("outcome", "?"), int(rec.get("attempts", 0))
            view.status, view.lag_ms = int(rec.get("status", 0)), rec.get("lag_ms")

    def apply(self, rec: dict[str, Any]) -> None:
        """Fold one record into the state."""
        kind, turn = rec.get("type"), int(rec.get("turn", 0))
        if kind == EventType.EFFECT_DELIVERY:
            # Written by the effects worker; it settles an effect, not a turn. It can land
            # before the EFFECT record (the effect is published first), so keep it.
            self._deliveries[rec.get("msg_id", "")] = rec
            self._settle(rec.get("msg_id", ""))
            return
        self.turn = max(self.turn, turn)
        if "seq" in rec:
            # Any record that applied an inbound frame says so (user turns, hang-up).
            self.last_seq = max(self.last_seq, int(rec["seq"]))
        if kind == EventType.CALL_STARTED:
            self.caller = rec.get("caller", self.caller)
            size = int(rec.get("working_memory_turns") or DEFAULT_WORKING_TURNS)
            if size != self.working_turns:
                # The node's window size; a resumed call keeps what it has, re-windowed.
                self.working = WorkingMemory.from_state(size, self.working.to_state()[-size:])
                self.working_turns = size
        elif kind == EventType.OWNERSHIP:
            self.node, self.epoch = rec.get("node", ""), int(rec.get("epoch", 0))
            self.ownership.append({k: rec.get(k) for k in ("turn", "node", "epoch", "reason")})
        elif kind == EventType.EFFECT:
            msg_id = rec.get("msg_id", "")
            self.effects[msg_id] = EffectView(
                msg_id, rec.get("kind", ""), turn, rec.get("payload") or {}
            )
            self._settle(msg_id)
        elif kind == EventType.MEMORY:
            # Clears first: within a turn a slot is only cleared before it is set again
            # (a withdrawn confirmation), so this order reproduces the node's facts exactly.
            for slot in rec.get("facts_cleared") or []:
                self.facts.clear(str(slot))
            for slot, value in (rec.get("facts_set") or {}).items():
                self.facts.set(slot, value, turn)
            if rec.get("exchange"):
                t, user, agent, interrupted = rec["exchange"]
                self.working.add(Exchange(int(t), str(user), str(agent), bool(interrupted)))
        elif kind == EventType.CALL_ENDED:
            self.status, self.ended_reason = "ended", rec.get("reason", "")

    def verified_fields(self) -> dict[str, Any]:
        return {
            "turn": self.turn,
            "last_seq": self.last_seq,
            "status": self.status,
            "working": self.working.to_state(),
            "facts": self.facts.to_state(),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.verified_fields(),
            "caller": self.caller,
            "node": self.node,
            "epoch": self.epoch,
            "ended_reason": self.ended_reason,
            "ownership": self.ownership,
            "effects": [vars(e) for e in self.effects.values()],
        }


def rebuild(
    tenant: str, call_id: str, records: list[dict[str, Any]], at: int | None = None
) -> CallState:
    """The state after every record (or every record of turns ``<= at``), in log order."""
    state = CallState(tenant, call_id)
    for rec in records:
        if at is None or int(rec.get("turn", 0)) <= at:
            state.apply(rec)
    return state


@dataclass(frozen=True)
class Divergence:
    field: str
    rebuilt: Any
    checkpoint: Any


def _plain(value: Any) -> Any:
    # msgpack gives lists where to_state() gives lists too, but None/tuples/ints vs floats
    # must compare by value, not by Python type.
    return json.loads(json.dumps(value, default=str))


def compare(state: CallState, ckpt: Checkpoint) -> list[Divergence]:
    """Every field of the checkpoint the rebuilt state does not reproduce; facts are
    compared slot by slot so a wrong correction names its slot."""
    rebuilt = _plain(state.verified_fields())
    stored = _plain(
        {
            "turn": ckpt.turn,
            "last_seq": ckpt.last_seq,
            "status": ckpt.status,
            "working": ckpt.working,
            "facts": ckpt.facts,
        }
    )
    out = []
    for name in VERIFIED_FIELDS:
        if name == "facts":
            for slot in sorted(set(rebuilt["facts"]) | set(stored["facts"])):
                mine, theirs = rebuilt["facts"].get(slot), stored["facts"].get(slot)
                if mine != theirs:
                    out.append(Divergence(f"facts.{slot}", mine, theirs))
        elif rebuilt[name] != stored[name]:
            out.append(Divergence(name, rebuilt[name], stored[name]))
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
) -> ReplayReport:
    """Rebuild, verify the final state against ``ckpt`` and collect warnings."""
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
    own = [r for r in records if r.get("type") != EventType.EFFECT_DELIVERY]
    if records and records[0].get("type") != EventType.CALL_STARTED:
        warnings.append("the log does not start with call_started (expired by retention?)")
    if any(r.get("type") == "undecodable" for r in records):
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
        "working": ckpt.working,
        "facts": ckpt.facts,
        "event_cursor": ckpt.event_cursor,
        "pending_outbox": len(ckpt.outbox),
    }
    report.divergences = compare(final, ckpt)
    return report


def _q(text: Any, limit: int = 120) -> str:
    s = str(text or "")
    return json.dumps(s if len(s) <= limit else s[: limit - 1] + "…", ensure_ascii=False)


def describe(rec: dict[str, Any]) -> str:
    """One readable line for a record (shared by the text and HTML timelines)."""
    k = rec.get("type")
    g = rec.get
    if k == EventType.CALL_STARTED:
        resumed = " (resumed)" if g("resumed") else ""
        return f"call started{resumed} on {g('node')} epoch {g('epoch')}, caller {g('caller')}"
    if k == EventType.OWNERSHIP:
        return f"owner {g('node')} epoch {g('epoch')} ({g('reason')})"
    if k == EventType.USER_TURN:
        return f"user {_q(g('text'))} (seq {g('seq')}, confidence {g('confidence')})"
    if k == EventType.RETRIEVAL:
        flags = [f.replace("_", " ") for f in ("timed_out", "from_cache", "partial") if g(f)]
        answered = ", ".join(map(str, g("answered") or [])) or "nothing"
        extra = f" · {', '.join(flags)}" if flags else ""
        return f"retrieval answered by {answered}{extra} · {len(g('snippets') or [])} snippet(s)"
    if k == EventType.LLM:
        tools = ", ".join(
            f"{t.get('name')}({json.dumps(t.get('arguments'))})" for t in g("tool_calls") or []
        )
        return (
            f"llm {g('prompt_tokens')} tokens digest {str(g('prompt_digest'))[:12]} → "
            f"{_q(g('output'))}" + (f" tools: {tools}" if tools else "")
        )
    if k == EventType.EFFECT:
        return f"effect {g('msg_id')} {g('kind')} {json.dumps(g('payload'), ensure_ascii=False)}"
    if k == EventType.EFFECT_DELIVERY:
        lag = f", lag {g('lag_ms')} ms" if g("lag_ms") is not None else ""
        why = f" ({g('reason')})" if g("reason") else ""
        return (
            f"effect {g('msg_id')} {g('outcome')}{why} after {g('attempts')} attempt(s), "
            f"status {g('status')}{lag}"
        )
    if k == EventType.FALLBACK:
        return f"fallback {g('kind')}: {g('detail')}"
    if k == EventType.AGENT_REPLY:
        heard = " (interrupted, heard " + _q(g("heard")) + ")" if g("interrupted") else ""
        return f"agent {_q(g('text'))}{heard}"
    if k == EventType.MEMORY:
        facts = ", ".join(f"{s} = {v}" for s, v in (g("facts_set") or {}).items())
        return f"memory {facts or 'no new facts'}"
    if k == EventType.TURN_METRICS:
        m = g("metrics") or {}
        parts = [f"{n.split('_')[0]} {float(m[n]):.0f}" for n in LATENCY_PARTS if m.get(n)]
        total = float(m.get("latency_ms") or 0)
        return f"latency {total:.0f} ms ({' · '.join(parts)}) intent {m.get('intent') or '-'}"
    if k == EventType.CALL_ENDED:
        return f"call ended ({g('reason')})"
    return f"{k} {json.dumps({x: y for x, y in rec.items() if not x.startswith('_')})}"


# Stages of a turn's latency, in pipeline order (the chart stacks them in this order).
LATENCY_PARTS = ("stt_ms", "retrieval_ms", "llm_first_token_ms", "tts_first_chunk_ms")


def format_text(report: ReplayReport) -> str:
    """The readable timeline: records by turn, then the state, then the verification."""
    if not report.found:
        return f"no call {report.call_id} for tenant {report.tenant}"
    st, lines = report.state, []
    head = f"call {report.call_id} · tenant {report.tenant} · caller {st.caller or '?'}"
    lines.append(f"{head} · {len(report.records)} records · status {report.final.status}")
    t0 = next((int(r["ts_ms"]) for r in report.records if r.get("ts_ms")), 0)
    for turn, recs in report.turns():
        lines.append(f"── turn {turn}")
        for rec in recs:
            off = (int(rec.get("ts_ms") or t0) - t0) / 1000
            mark = " [pending]" if rec.get("_pending") else ""
            lines.append(f"  {f'+{off:.3f}s':>10}  {describe(rec)}{mark}")
    label = "final state" if report.at is None else f"state as of turn {report.at}"
    lines.append(
        f"── {label}: turn {st.turn} · last seq {st.last_seq} · {st.status}"
        f" · owner {st.node or '?'} epoch {st.epoch}"
    )
    for slot, fact in st.facts:
        was = f", was {fact.replaced}" if fact.replaced is not None else ""
        lines.append(f"  fact {slot} = {fact.value} (turn {fact.turn}{was})")
    for ex in st.working:
        cut = " [interrupted]" if ex.interrupted else ""
        lines.append(f"  turn {ex.turn}: user {_q(ex.user, 60)} / agent {_q(ex.agent, 60)}{cut}")
    for e in st.effects.values():
        lines.append(f"  effect {e.msg_id} {e.kind}: {e.outcome} ({e.attempts} attempt(s))")
    if report.verified is None:
        lines.append("── not verified: no checkpoint")
    elif report.verified:
        lines.append(
            f"── verified: the log reproduces the checkpoint ({', '.join(VERIFIED_FIELDS)})"
        )
    else:
        lines.append(f"── DIVERGED from the checkpoint in {len(report.divergences)} field(s):")
        for d in report.divergences:
            lines.append(
                f"  {d.field}: log {json.dumps(d.rebuilt)} · checkpoint {json.dumps(d.checkpoint)}"
            )
    lines.extend(f"warning: {w}" for w in report.warnings)
    return "\n".join(lines)
