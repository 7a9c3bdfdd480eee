"""A load run's report as one self-contained HTML page, to attach to an incident or a pull
request: the verdict, what was run and where, the figures, latency over time with the
injected faults marked, throughput, errors, the latency histogram, the fault events and
sample errors.

Built from the JSON report alone (``render_html(json.load(...))`` works on a saved report)
so every scenario with a time series (:mod:`loadtest.timeline`) gets the same page. The
page fetches nothing (inline CSS and SVG, system fonts) and runs no script; its Content
Security Policy forbids both, and every value from the report is escaped, since call ids,
node names and error texts come from the network.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from loadtest.stats import describe_machine
from loadtest.svg_charts import Series, as_float, esc, histogram_chart, time_chart

# Keys drawn as charts or sections of their own, not repeated in the summary table.
_SECTIONS = {
    "timeseries",
    "events",
    "turn_latency_histogram",
    "meta",
    "error_samples",
    "resource_samples",
    "samples",
    "failover_gap_definition",
}
# Counts that must be zero for a run to be clean, in whichever scenario has them.
_MUST_BE_ZERO = (
    "errors",
    "lost_turns",
    "duplicate_replies",
    "duplicate_effects",
    "context_lost",
    "lost_effects",
)
_MAX_ROWS = 200
_MAX_ERRORS = 50

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;color:#18181b;
 background:#f4f4f5;margin:0;padding:24px;line-height:1.45}
main{max-width:1100px;margin:0 auto;background:#fff;padding:28px 36px;border-radius:8px;
 box-shadow:0 1px 3px rgba(0,0,0,.08)}
h1{font-size:24px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;
 border-bottom:1px solid #e4e4e7;padding-bottom:4px}
.sub{color:#52525b;margin:0 0 16px}
.verdict{display:inline-block;padding:2px 10px;border-radius:12px;font-weight:600;
 font-size:14px;vertical-align:middle;margin-left:8px}
.ok{background:#dcfce7;color:#166534}.bad{background:#fee2e2;color:#991b1b}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:12px;
 margin:16px 0}
.card{border:1px solid #e4e4e7;border-radius:6px;padding:8px 12px}
.card b{display:block;font-size:20px}.card span{color:#52525b;font-size:13px}
table{border-collapse:collapse;width:100%;font-size:13.5px}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #f0f0f3;vertical-align:top}
th{color:#52525b;font-weight:600}.kv th{width:32%}tr:nth-child(even) td{background:#fafafa}
pre{background:#f4f4f5;padding:8px 12px;border-radius:4px;white-space:pre-wrap;
 word-break:break-all;font-size:13px;margin:0}
ul.errors{font-family:ui-monospace,monospace;font-size:12.5px}
.event-kind{color:#b91c1c;font-weight:600}
figure{margin:8px 0 0}figcaption{color:#52525b;font-size:13px}
@media print{body{background:#fff;padding:0}main{box-shadow:none}}
"""


def _num(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v == 0 or not math.isfinite(v):
            return str(v)
        # Three significant digits at least, at most three decimals: 668, 3.84, 0.74.
        decimals = min(3, max(0, 2 - math.floor(math.log10(abs(v)))))
        text = f"{v:,.{decimals}f}"
        return text.rstrip("0").rstrip(".") if "." in text else text
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _cell(v: Any) -> str:
    """A value for the summary table: percentile dicts as one line, lists joined."""
    if isinstance(v, dict):
        if "p50" in v:
            keys = [k for k in ("p50", "p95", "p99", "max", "mean", "n") if k in v]
            return esc(" / ".join(f"{k} {_num(v[k])}" for k in keys))
        return esc(", ".join(f"{k}: {_num(x)}" for k, x in list(v.items())[:12]))
    if isinstance(v, list):
        return esc(", ".join(_num(x) for x in v[:20]) + (" …" if len(v) > 20 else ""))
    return esc(_num(v))


def summary_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, escaped value) for every figure outside the sections drawn on their own;
    one level of nested dicts is spread into ``outer.inner`` rows."""
    rows: list[tuple[str, str]] = []
    for key, value in report.items():
        if key in _SECTIONS or (
            isinstance(value, list) and any(isinstance(v, dict) for v in value)
        ):
            continue  # drawn elsewhere, or raw samples: the JSON report has them
        if (
            isinstance(value, dict)
            and value
            and "p50" not in value
            and all(not isinstance(v, dict) or "p50" in v for v in value.values())
            and len(value) <= 12
        ):
            rows += [(f"{key}.{k}", _cell(v)) for k, v in value.items()]
        else:
            rows.append((key, _cell(value)))
    return rows[:_MAX_ROWS]


def verdict(report: dict[str, Any]) -> tuple[bool, list[str]]:
    """Clean when every must-be-zero count is zero and every ``pass`` flag is true."""
    problems = [
        f"{k} = {report[k]}"
        for k in _MUST_BE_ZERO
        if isinstance(report.get(k), int | float) and report[k] != 0
    ]
    checks = report.get("pass")
    if isinstance(checks, dict):
        problems += [f"{k} failed" for k, ok in checks.items() if not ok]
    return not problems, problems


def _cards(report: dict[str, Any]) -> str:
    picks: list[tuple[str, Any]] = []
    for key, label in (
        ("calls", "calls"),
        ("completed_calls", "completed"),
        ("turns", "turns"),
        ("errors", "errors"),
        ("affected_calls", "affected calls"),
        ("elapsed_s", "seconds"),
    ):
        if key in report:
            picks.append((label, report[key]))
    for key, label in (
        ("turn_latency_ms", "turn latency p99, ms"),
        ("failover_gap_ms", "failover gap p99, ms"),
    ):
        if isinstance(report.get(key), dict) and "p99" in report[key]:
            picks.append((label, report[key]["p99"]))
    return (
        '<div class="cards">'
        + "".join(
            f"<div class=card><b>{esc(_num(v))}</b><span>{esc(label)}</span></div>"
            for label, v in picks
        )
        + "</div>"
    )


def _meta(report: dict[str, Any]) -> str:
    meta = report.get("meta") or {}
    machine = meta.get("machine")
    rows = [
        ("command", f"<pre><code>{esc(meta.get('command', 'unknown'))}</code></pre>"),
        ("date (UTC)", esc(meta.get("date", "unknown"))),
        ("commit", esc(meta.get("commit") or "unknown")),
        ("machine", esc(describe_machine(machine)) if isinstance(machine, dict) else "unknown"),
    ]
    return _table(rows)


def _table(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="kv">{body}</table>'


def _floats(values: Any) -> list[float]:
    return [as_float(v) for v in values] if isinstance(values, list) else []


def _charts(report: dict[str, Any]) -> list[str]:
    """Every chart the report has data for. The report may have been read back from disk,
    so every number is checked on the way in, not trusted to be one."""
    return [*_time_charts(report), *_histogram(report), *_resource_chart(report)]


def _time_charts(report: dict[str, Any]) -> list[str]:
    ts = report.get("timeseries")
    ts = ts if isinstance(ts, dict) else {}
    x = _floats(ts.get("t_s"))
    if not x:
        return []
    events = [e for e in report.get("events") or [] if isinstance(e, dict)]
    latency = [
        Series("p50", _floats(ts.get("latency_p50_ms")), "#2563eb"),
        Series("p99", _floats(ts.get("latency_p99_ms")), "#ea580c"),
    ]
    load = [
        Series("turns/s", _floats(ts.get("turns")), "#64748b", kind="bar"),
        Series("calls up", _floats(ts.get("calls_up")), "#16a34a", axis="right"),
    ]
    errors = _floats(ts.get("errors"))
    return [
        _figure(
            time_chart(
                "Turn latency over time",
                x,
                latency,
                events=events,
                y_label="turn latency, ms (per second)",
            ),
            "Turn latency of the turns answered in each second; dashed red lines are the "
            "injected faults, shaded while a window fault (an outage, a slow model, link "
            "latency) lasted.",
        ),
        _figure(
            time_chart(
                "Throughput and live calls",
                x,
                load,
                events=events,
                y_label="turns answered per second",
                y2_label="calls up",
            ),
            "",
        ),
        _figure(
            time_chart(
                "Errors",
                x,
                [Series("errors/s", errors, "#dc2626", kind="bar")],
                events=events,
                y_label="errors per second",
                height=200,
            ),
            f"Errors in all: {_num(int(sum(errors)))}.",
        ),
    ]


def _histogram(report: dict[str, Any]) -> list[str]:
    hist = report.get("turn_latency_histogram")
    hist = hist if isinstance(hist, dict) else {}
    edges, counts = _floats(hist.get("edges_ms")), _floats(hist.get("counts"))
    if not counts or len(edges) != len(counts) + 1 or min(edges) <= 0:
        return []
    lat = report.get("turn_latency_ms")
    lat = lat if isinstance(lat, dict) else {}
    marks = [(k, as_float(lat[k])) for k in ("p50", "p99") if k in lat]
    chart = histogram_chart(
        "Turn latency histogram", edges, [int(c) for c in counts], markers=marks
    )
    return [_figure(chart, "Log-spaced bins, 8 a decade.")]


def _resource_chart(report: dict[str, Any]) -> list[str]:
    res = report.get("resource_samples")
    res = res if isinstance(res, dict) else {}
    x = _floats(res.get("completed_calls"))
    named = res.get("series")
    if not x or not isinstance(named, dict):
        return []
    palette = ["#2563eb", "#ea580c", "#16a34a", "#9333ea", "#0891b2", "#ca8a04"]
    series = [
        Series(str(name), _floats(vals), palette[i % len(palette)])
        for i, (name, vals) in enumerate(named.items())
    ]
    slopes = report.get("slopes_bytes_per_call")
    slopes = slopes if isinstance(slopes, dict) else {}
    chart = time_chart(
        "Memory over completed calls",
        x,
        series,
        y_label=str(res.get("unit", "")),
        events=[m for m in res.get("marks") or [] if isinstance(m, dict)],
        x_label="completed calls",
        x_unit="calls",
        buckets=False,
    )
    caption = (
        "Sampled while the calls ran. Growth per completed call (least squares, after the "
        "warm-up): " + ", ".join(f"{k} {_num(v)} B" for k, v in slopes.items()) + "."
    )
    return [_figure(chart, caption)]


def _figure(svg: str, caption: str) -> str:
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f"<figure>{svg}{cap}</figure>"


def _events_table(report: dict[str, Any]) -> str:
    events = [e for e in report.get("events") or [] if isinstance(e, dict)]
    if not events:
        return "<p>No faults were injected.</p>"
    head = "<tr><th>at, s</th><th>until, s</th><th>fault</th><th>target</th><th>detail</th></tr>"
    rows = "".join(
        f"<tr><td>{esc(_num(as_float(e.get('t_s'))))}</td>"
        f"<td>{esc(_num(as_float(e['end_s'])) if e.get('end_s') is not None else '')}</td>"
        f"<td class=event-kind>{esc(e.get('kind', ''))}</td><td>{esc(e.get('target', ''))}</td>"
        f"<td>{esc(e.get('detail', ''))}</td></tr>"
        for e in events[:_MAX_ROWS]
    )
    return f"<table>{head}{rows}</table>"


def _errors(report: dict[str, Any]) -> str:
    samples = report.get("error_samples") or []
    if not samples:
        return "<p>None.</p>"
    return (
        '<ul class="errors">'
        + "".join(f"<li>{esc(s)}</li>" for s in samples[:_MAX_ERRORS])
        + "</ul>"
    )


def render_html(report: dict[str, Any]) -> str:
    scenario = str(report.get("scenario") or report.get("benchmark") or "load test")
    meta = report.get("meta") or {}
    ok, problems = verdict(report)
    badge = (
        '<span class="verdict ok">clean</span>'
        if ok
        else f'<span class="verdict bad" title="{esc("; ".join(problems))}">'
        f"{esc(len(problems))} problem{'s' if len(problems) != 1 else ''}</span>"
    )
    title = f"callmesh {scenario} report, {meta.get('date', '')}".strip(", ")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        # No script, no fetch: the page is only text, styles and inline SVG.
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'; img-src data:\">",
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>",
        f"<h1>callmesh {esc(scenario)}{badge}</h1>",
        f'<p class="sub">{esc(meta.get("date", ""))} · {esc(meta.get("commit") or "")}</p>',
    ]
    if problems:
        parts.append("<p><b>Problems:</b> " + esc("; ".join(problems)) + "</p>")
    parts += [_cards(report), "<h2>Run</h2>", _meta(report)]
    parts += ["<h2>Charts</h2>", *_charts(report)]
    parts += ["<h2>Fault events</h2>", _events_table(report)]
    parts += ["<h2>Summary</h2>", _table(summary_rows(report))]
    if report.get("failover_gap_definition"):
        parts.append(f'<p class="sub">failover gap: {esc(report["failover_gap_definition"])}</p>')
    parts += ["<h2>Sample errors</h2>", _errors(report), "</main></body></html>"]
    return "\n".join(parts) + "\n"


def write_html(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(report), encoding="utf-8")
