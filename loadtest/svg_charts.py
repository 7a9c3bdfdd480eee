"""Inline SVG charts for the HTML reports: time series with fault events marked, and a
histogram on a log axis. Plain strings, no plotting library and nothing fetched: a report
must open anywhere, offline, years later.

Every text that reaches the SVG goes through :func:`esc`: series names, event targets and
axis labels can come from the network (node names, error texts)."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Any

FONT = "font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif"
EVENT_COLOR = "#b91c1c"


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def as_float(value: object) -> float:
    """A number from a report read back from disk: anything else (or NaN) counts as 0."""
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0.0
    return v if math.isfinite(v) else 0.0


@dataclass(frozen=True)
class Series:
    name: str
    values: list[float]
    color: str
    kind: str = "line"  # "line" or "bar"
    axis: str = "left"  # "left" or "right": a second scale, e.g. calls up against turns/s


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (1, 2 or 5 times a power of ten apart)."""
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / max(1, count)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    ticks = []
    v = first
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 10))
        v += step
    if ticks[-1] < hi:
        ticks.append(round(ticks[-1] + step, 10))
    return ticks


def _round3(v: float) -> float:
    """About three significant digits, never in exponent form: 73.978 -> 74.0, 1460 -> 1460."""
    return round(v) if abs(v) >= 100 else round(v, 1) if abs(v) >= 10 else round(v, 2)


def fmt(v: float) -> str:
    if abs(v) >= 1_000_000:
        return f"{v / 1_000_000:g}M"
    if abs(v) >= 10_000:
        return f"{v / 1000:g}k"
    return f"{v:g}"


class _Frame:
    """Plot area geometry and the mapping from data to pixels."""

    def __init__(self, width: int, height: int, x_max: float, y_max: float, y2_max: float):
        self.w, self.h = width, height
        self.left, self.right, self.top, self.bottom = 64, 64, 34, 40
        self.x_ticks = nice_ticks(0, max(x_max, 1), count=8)
        # An all-zero series (no errors) still gets a readable 0..1 scale.
        self.y_ticks = nice_ticks(0, y_max if y_max > 0 else 1.0)
        self.y2_ticks = nice_ticks(0, y2_max if y2_max > 0 else 1.0)

    @property
    def pw(self) -> float:
        return self.w - self.left - self.right

    @property
    def ph(self) -> float:
        return self.h - self.top - self.bottom

    def x(self, v: float) -> float:
        return self.left + self.pw * v / self.x_ticks[-1]

    def y(self, v: float, axis: str = "left") -> float:
        top = (self.y2_ticks if axis == "right" else self.y_ticks)[-1]
        return self.top + self.ph * (1 - v / top)


def _plot_area(f: _Frame) -> list[str]:
    """The white plot area with the left scale's grid lines and labels."""
    out = [
        f'<rect x="{f.left}" y="{f.top}" width="{f.pw:.1f}" height="{f.ph:.1f}" '
        'fill="#fff" stroke="#d4d4d8"/>'
    ]
    for t in f.y_ticks:
        y = f.y(t)
        out.append(
            f'<line x1="{f.left}" x2="{f.left + f.pw:.1f}" y1="{y:.1f}" y2="{y:.1f}" '
            'stroke="#f0f0f3"/>'
        )
        out.append(f'<text x="{f.left - 6}" y="{y + 4:.1f}" text-anchor="end">{fmt(t)}</text>')
    return out


def _axes(f: _Frame, y_label: str, x_label: str, y2_label: str | None) -> list[str]:
    out = _plot_area(f)
    if y2_label is not None:
        for t in f.y2_ticks:
            y = f.y(t, "right")
            out.append(f'<text x="{f.left + f.pw + 6:.1f}" y="{y + 4:.1f}">{fmt(t)}</text>')
        out.append(f'<text x="{f.w - 8}" y="{f.top - 12}" text-anchor="end">{esc(y2_label)}</text>')
    for t in f.x_ticks:
        x = f.x(t)
        out.append(
            f'<text x="{x:.1f}" y="{f.top + f.ph + 16:.1f}" text-anchor="middle">{fmt(t)}</text>'
        )
    out.append(f'<text x="{f.left}" y="{f.top - 12}">{esc(y_label)}</text>')
    out.append(
        f'<text x="{f.left + f.pw / 2:.1f}" y="{f.h - 6}" text-anchor="middle">'
        f"{esc(x_label)}</text>"
    )
    return out


def _legend(series: list[Series], f: _Frame, y_label: str) -> list[str]:
    out, x = [], f.left + 7.0 * len(y_label) + 24
    for s in series:
        out.append(f'<rect x="{x:.1f}" y="{f.top - 22}" width="12" height="12" fill="{s.color}"/>')
        out.append(f'<text x="{x + 16:.1f}" y="{f.top - 12}">{esc(s.name)}</text>')
        x += 28 + 7 * len(s.name)
    return out


def _events(events: list[dict[str, Any]], f: _Frame, x_unit: str) -> list[str]:
    out = []
    for i, ev in enumerate(events):
        t = as_float(ev.get("t_s"))
        x = f.x(min(max(t, 0.0), f.x_ticks[-1]))
        label = f"{ev.get('kind', '')} {ev.get('target', '')}".strip()
        y = f.top + 14 + 14 * (i % 3)  # staggered so close events stay legible
        # A window fault (outage, slow model, latency) shades the time it lasted.
        band, until = "", ""
        if ev.get("end_s") is not None:
            end = as_float(ev.get("end_s"))
            x_end = f.x(min(max(end, t), f.x_ticks[-1]))
            until = f" until {end:g} {esc(x_unit)}"
            band = (
                f'<rect x="{x:.1f}" y="{f.top}" width="{max(x_end - x, 1.0):.1f}" '
                f'height="{f.ph:.1f}" fill="{EVENT_COLOR}" fill-opacity="0.08"/>'
            )
        out.append(
            f'<g class="event"><title>{esc(label)} at {t:g} {esc(x_unit)}{until}'
            f"{': ' + esc(ev['detail']) if ev.get('detail') else ''}</title>{band}"
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{f.top}" y2="{f.top + f.ph:.1f}" '
            f'stroke="{EVENT_COLOR}" stroke-width="1.5" stroke-dasharray="5 3"/>'
            f'<text x="{x + 4:.1f}" y="{y}" fill="{EVENT_COLOR}" font-weight="600">'
            f"{esc(label)}</text></g>"
        )
    return out


def _svg(width: int, height: int, title: str, body: list[str]) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="100%" role="img" aria-label="{esc(title)}" style="{FONT};font-size:12px" '
        f'fill="#3f3f46"><title>{esc(title)}</title>' + "".join(body) + "</svg>"
    )


def time_chart(
    title: str,
    x: list[float],
    series: list[Series],
    *,
    events: list[dict[str, Any]] | None = None,
    y_label: str = "",
    y2_label: str | None = None,
    x_label: str = "seconds since start",
    x_unit: str = "s",
    buckets: bool = True,
    width: int = 1040,
    height: int = 300,
) -> str:
    """Lines and bars on one or two y scales, fault events as dashed verticals.

    With ``buckets``, each x is the start of a one-unit bucket (a second): its bar fills
    the bucket and its line point sits in the middle."""
    events = events or []
    width_x = 1.0 if buckets else 0.0
    x_max = max(
        [*(v + width_x for v in x), *(as_float(e.get("end_s", e.get("t_s"))) for e in events), 1.0]
    )
    left = [v for s in series if s.axis == "left" for v in s.values]
    right = [v for s in series if s.axis == "right" for v in s.values]
    # A little headroom, so a line at its maximum does not run along the top border.
    f = _Frame(width, height, x_max, 1.05 * max(left, default=0.0), 1.05 * max(right, default=0.0))
    body = _axes(f, y_label, x_label, y2_label)
    for s in series:
        if s.kind == "bar":
            for xv, yv in zip(x, s.values, strict=False):
                if yv > 0:
                    x0, x1, y = f.x(xv), f.x(xv + max(width_x, 1.0)), f.y(yv, s.axis)
                    gap = 1.0 if x1 - x0 > 3 else 0.0
                    body.append(
                        f'<rect x="{x0 + gap / 2:.1f}" y="{y:.1f}" width="{x1 - x0 - gap:.1f}" '
                        f'height="{f.top + f.ph - y:.1f}" fill="{s.color}" fill-opacity="0.55"/>'
                    )
        else:
            pts = " ".join(
                f"{f.x(xv + width_x / 2):.1f},{f.y(yv, s.axis):.1f}"
                for xv, yv in zip(x, s.values, strict=False)
            )
            if pts:
                body.append(
                    f'<polyline points="{pts}" fill="none" stroke="{s.color}" '
                    'stroke-width="1.8" stroke-linejoin="round"/>'
                )
    body += _events(events, f, x_unit) + _legend(series, f, y_label)
    return _svg(width, height, title, body)


def histogram_chart(
    title: str,
    edges: list[float],
    counts: list[int],
    *,
    markers: list[tuple[str, float]] | None = None,
    x_label: str = "turn latency, ms",
    color: str = "#2563eb",
    width: int = 1040,
    height: int = 260,
) -> str:
    """Bars over log-spaced bins, ticks at round values, ``markers`` (e.g. p50 and p99) as
    labelled verticals."""
    if not counts:
        return _svg(width, 60, title, ['<text x="10" y="30">no data</text>'])
    f = _Frame(width, height, 1.0, float(max(counts)), 1.0)
    lo, hi = math.log10(edges[0]), math.log10(edges[-1])

    def xpos(v: float) -> float:
        return f.left + f.pw * (math.log10(v) - lo) / max(hi - lo, 1e-9)

    body = _plot_area(f)
    ticks = [
        m * 10.0**decade
        for decade in range(math.floor(lo), math.ceil(hi) + 1)
        for m in (1, 2, 3, 5)
        if edges[0] <= m * 10.0**decade <= edges[-1]
    ]
    if len(ticks) < 4:  # a narrow range: label some bin edges themselves
        ticks = [_round3(e) for e in edges[:: max(1, len(edges) // 6)]]
    for v in ticks:
        body.append(
            f'<text x="{xpos(v):.1f}" y="{f.top + f.ph + 16:.1f}" '
            f'text-anchor="middle">{fmt(v)}</text>'
        )
    for a, b, c in zip(edges, edges[1:], counts, strict=False):
        if c:
            y = f.y(c)
            body.append(
                f'<rect class="bin" x="{xpos(a) + 0.5:.1f}" y="{y:.1f}" '
                f'width="{max(1.0, xpos(b) - xpos(a) - 1):.1f}" '
                f'height="{f.top + f.ph - y:.1f}" fill="{color}"><title>'
                f"{a:g}-{b:g} ms: {c}</title></rect>"
            )
    for i, (name, v) in enumerate(markers or []):
        if edges[0] <= v <= edges[-1]:
            x = xpos(v)
            body.append(
                f'<g class="marker"><line x1="{x:.1f}" x2="{x:.1f}" y1="{f.top}" '
                f'y2="{f.top + f.ph:.1f}" stroke="#18181b" stroke-dasharray="3 3"/>'
                f'<text x="{x + 4:.1f}" y="{f.top + 14 + 14 * i}">{esc(name)} {fmt(_round3(v))}'
                "</text></g>"
            )
    body.append(f'<text x="{f.left}" y="{f.top - 12}">turns</text>')
    body.append(
        f'<text x="{f.left + f.pw / 2:.1f}" y="{height - 6}" text-anchor="middle">'
        f"{esc(x_label)}</text>"
    )
    return _svg(width, height, title, body)
