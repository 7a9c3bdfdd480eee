"""``callmesh replay --html PATH``: one self-contained page for an incident report.

The page has no external assets (inline CSS, inline SVG, no scripts), so it can be
attached to a ticket and opened anywhere. It shows the verification verdict, a stacked
latency chart per turn, the timeline, and the rebuilt state.
"""

from __future__ import annotations

import html
import json
from typing import Any

from events.eventlog import EventType
from events.replay import ReplayReport
from events.replay_text import LATENCY_PARTS, describe

# Colours per latency stage, then "other" (network, orchestration: the rest of latency_ms).
_COLOURS = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#bab0ac")
_LABELS = ("STT", "retrieval", "LLM first token", "TTS first chunk", "other")
# Architecture latency targets (p50 / p95), drawn as reference lines.
_TARGETS_MS = (400, 800)

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.35em}h2{font-size:1.1em;margin-top:1.6em}
table{border-collapse:collapse;width:100%}td,th{padding:2px 8px;text-align:left;
vertical-align:top;border-bottom:1px solid #eee}th{background:#f6f6f6}
.turn td{background:#f0f4fa;font-weight:600}.ok{color:#17803d}.bad{color:#b42318}
.pending{color:#8a6d00}.t{color:#888;white-space:nowrap;font-variant-numeric:tabular-nums}
.k{font-family:ui-monospace,monospace;font-size:.9em;color:#555}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _segments(metrics: dict[str, Any]) -> list[float]:
    parts = [float(metrics.get(name) or 0.0) for name in LATENCY_PARTS]
    total = float(metrics.get("latency_ms") or sum(parts))
    return [*parts, max(0.0, total - sum(parts))]


def latency_chart(report: ReplayReport, width: int = 1000, height: int = 260) -> str:
    """Inline SVG: one stacked bar per turn (STT, retrieval, LLM, TTS, other)."""
    rows = [
        (int(r.get("turn", 0)), _segments(r.get("metrics") or {}))
        for _, recs in report.turns()
        for r in recs
        if r.get("type") == EventType.TURN_METRICS
    ]
    if not rows:
        return "<p>No turn metrics in the log.</p>"
    left, bottom, top = 50, 30, 24
    plot_w, plot_h = width - left - 10, height - bottom - top
    # Scale to the data (a target line is drawn only when it is in range), so fast
    # turns are not flattened by an 800 ms line they never approach.
    peak = max(1.0, max(sum(seg) for _, seg in rows)) * 1.15
    bar = min(plot_w / len(rows), 60.0)  # a short call should not get slabs
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="100%" role="img" aria-label="latency per turn">'
    ]

    def y(ms: float) -> float:
        return top + plot_h - ms / peak * plot_h

    out.append(
        f'<text x="{left - 4}" y="{top + 4}" font-size="10" text-anchor="end">{peak:.0f}</text>'
    )
    for target in (t for t in _TARGETS_MS if t <= peak):
        out.append(
            f'<line x1="{left}" x2="{width - 10}" y1="{y(target):.1f}" y2="{y(target):.1f}" '
            f'stroke="#999" stroke-dasharray="4 3"/><text x="{left - 4}" '
            f'y="{y(target) + 4:.1f}" font-size="10" text-anchor="end">{target}</text>'
        )
    for i, (turn, segs) in enumerate(rows):
        x, base = left + i * bar, 0.0
        for seg, colour, label in zip(segs, _COLOURS, _LABELS, strict=True):
            if seg > 0:
                out.append(
                    f'<rect x="{x + bar * 0.1:.1f}" y="{y(base + seg):.1f}" '
                    f'width="{bar * 0.8:.1f}" height="{seg / peak * plot_h:.1f}" '
                    f'fill="{colour}"><title>turn {turn} {label}: {seg:.0f} ms'
                    f"</title></rect>"
                )
            base += seg
        if len(rows) <= 40 or i % max(1, len(rows) // 40) == 0:
            out.append(
                f'<text x="{x + bar / 2:.1f}" y="{height - bottom + 14}" font-size="10" '
                f'text-anchor="middle">{turn}</text>'
            )
    out.append(
        f'<line x1="{left}" x2="{width - 10}" y1="{y(0):.1f}" y2="{y(0):.1f}" stroke="#333"/>'
    )
    for i, (colour, label) in enumerate(zip(_COLOURS, _LABELS, strict=True)):
        out.append(
            f'<rect x="{left + i * 130}" y="4" width="10" height="10" fill="{colour}"/>'
            f'<text x="{left + i * 130 + 14}" y="13" font-size="11">{label}</text>'
        )
    out.append("</svg>")
    return "".join(out)


def _timeline(report: ReplayReport) -> str:
    t0 = next((int(r["ts_ms"]) for r in report.records if r.get("ts_ms")), 0)
    rows = ["<table><tr><th>offset</th><th>record</th><th>detail</th></tr>"]
    for turn, recs in report.turns():
        rows.append(f'<tr class="turn"><td colspan="3">turn {turn}</td></tr>')
        for rec in recs:
            off = (int(rec.get("ts_ms") or t0) - t0) / 1000
            cls = ' class="pending"' if rec.get("_pending") else ""
            rows.append(
                f'<tr{cls}><td class="t">+{off:.3f}s</td><td class="k">'
                f"{_e(rec.get('type'))}</td><td>{_e(describe(rec))}</td></tr>"
            )
    rows.append("</table>")
    return "".join(rows)


def _state(report: ReplayReport) -> str:
    st = report.state
    parts = [
        f"<p>turn {st.turn} · last seq {st.last_seq} · {_e(st.status)} · owner "
        f"{_e(st.node or '?')} epoch {st.epoch}</p>",
        "<table><tr><th>fact</th><th>value</th><th>set at turn</th><th>replaced</th></tr>",
    ]
    for slot, fact in st.facts:
        parts.append(
            f"<tr><td>{_e(slot)}</td><td>{_e(fact.value)}</td><td>{fact.turn}</td>"
            f"<td>{_e(fact.replaced if fact.replaced is not None else '')}</td></tr>"
        )
    parts.append(
        "</table><h2>Working memory</h2><table><tr><th>turn</th><th>user</th>"
        "<th>agent (as heard)</th></tr>"
    )
    for ex in st.working:
        cut = " <em>(interrupted)</em>" if ex.interrupted else ""
        parts.append(
            f"<tr><td>{ex.turn}</td><td>{_e(ex.user)}</td><td>{_e(ex.agent)}{cut}</td></tr>"
        )
    parts.append(
        "</table><h2>Effects</h2><table><tr><th>id</th><th>kind</th><th>outcome</th>"
        "<th>attempts</th><th>payload</th></tr>"
    )
    for e in st.effects.values():
        parts.append(
            f"<tr><td class='k'>{_e(e.msg_id)}</td><td>{_e(e.kind)}</td>"
            f"<td>{_e(e.outcome)}</td><td>{e.attempts}</td>"
            f"<td class='k'>{_e(json.dumps(e.payload, ensure_ascii=False))}</td></tr>"
        )
    parts.append("</table>")
    return "".join(parts)


def _verdict(report: ReplayReport) -> str:
    if report.verified is None:
        out = '<p class="pending">Not verified: no checkpoint.</p>'
    elif report.verified:
        out = '<p class="ok">Verified: the log reproduces the last checkpoint.</p>'
    else:
        items = "".join(
            f"<li><b>{_e(d.field)}</b>: log {_e(json.dumps(d.rebuilt))}, checkpoint "
            f"{_e(json.dumps(d.checkpoint))}</li>"
            for d in report.divergences
        )
        out = f'<p class="bad">Diverged from the last checkpoint:</p><ul>{items}</ul>'
    warnings = "".join(f"<li>{_e(w)}</li>" for w in report.warnings)
    return out + (f'<ul class="pending">{warnings}</ul>' if warnings else "")


def render_html(report: ReplayReport) -> str:
    """The whole page as a string (UTF-8, no external references)."""
    title = f"call {report.call_id} · tenant {report.tenant}"
    scope = "final state" if report.at is None else f"state as of turn {report.at}"
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f"<style>{_CSS}</style></head><body><h1>Replay: {_e(title)}</h1>"
        f"<p>caller {_e(report.final.caller or '?')} · {len(report.records)} records · "
        f"status {_e(report.final.status)}</p>{_verdict(report)}"
        f"<h2>Latency per turn (ms)</h2>{latency_chart(report)}"
        f"<h2>Timeline</h2>{_timeline(report)}<h2>{_e(scope.capitalize())}</h2>"
        f"{_state(report)}</body></html>"
    )
