"""``callmesh replay`` as text: one line per record, then the state and the verdict.

:func:`describe` is shared with the HTML page (:mod:`events.replay_html`).
"""

from __future__ import annotations

import json
from typing import Any

from events.eventlog import EventType
from events.replay import ReplayReport
from events.replay_verify import VERIFIED_FIELDS

# Stages of a turn's latency, in pipeline order (the HTML chart stacks them in this order).
LATENCY_PARTS = ("stt_ms", "retrieval_ms", "llm_first_token_ms", "tts_first_chunk_ms")


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
        decided = g("resumed")
        said = (
            f" (resumed from the decided text of {decided.get('node')}, not asked again)"
            if isinstance(decided, dict)
            else ""
        )
        return (
            f"llm {g('prompt_tokens')} tokens digest {str(g('prompt_digest'))[:12]} → "
            f"{_q(g('output'))}" + (f" tools: {tools}" if tools else "") + said
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
    if k == EventType.BARGE_IN:
        return f"caller barged in; had heard {_q(g('heard'))}"
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
