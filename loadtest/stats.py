"""Percentiles and report helpers shared by every load-test scenario."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any


def percentiles(values: list[float], points: tuple[int, ...] = (50, 95, 99)) -> dict[str, float]:
    """Nearest-rank percentiles plus max; empty input gives zeros (and says n=0)."""
    out: dict[str, float] = {"n": float(len(values))}
    if not values:
        return {**out, **{f"p{p}": 0.0 for p in points}, "max": 0.0}
    ordered = sorted(values)
    for p in points:
        rank = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
        out[f"p{p}"] = round(ordered[rank], 3)
    out["max"] = round(ordered[-1], 3)
    out["mean"] = round(statistics.fmean(ordered), 3)
    return out


def write_report(report: dict[str, Any], path: str | None) -> None:
    text = json.dumps(report, indent=2, sort_keys=False)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
        print(f"report written to {path}", file=sys.stderr)
    print(text)
