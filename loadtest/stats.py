"""Percentiles, run metadata and report helpers shared by every load-test scenario."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def percentile(values: list[float], p: float, *, presorted: bool = False) -> float:
    """Nearest-rank percentile ``p`` (0 for no values)."""
    if not values:
        return 0.0
    ordered = values if presorted else sorted(values)
    rank = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def percentiles(values: list[float], points: tuple[int, ...] = (50, 95, 99)) -> dict[str, float]:
    """Nearest-rank percentiles plus max; empty input gives zeros (and says n=0)."""
    out: dict[str, float] = {"n": float(len(values))}
    if not values:
        return {**out, **{f"p{p}": 0.0 for p in points}, "max": 0.0}
    ordered = sorted(values)
    for p in points:
        out[f"p{p}"] = round(percentile(ordered, p, presorted=True), 3)
    out["max"] = round(ordered[-1], 3)
    out["mean"] = round(statistics.fmean(ordered), 3)
    return out


def slope(x: list[float], y: list[float]) -> float:
    """Least-squares slope of y over x (0 when x does not vary)."""
    n = len(x)
    if n < 2 or len(y) != n:
        return 0.0
    mx, my = statistics.fmean(x), statistics.fmean(y)
    sxx = sum((a - mx) ** 2 for a in x)
    if sxx == 0:
        return 0.0
    return sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True)) / sxx


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError):
        pass
    return None


def machine_info() -> dict[str, Any]:
    """What a figure depends on: CPUs, their model, memory, kernel and Python."""
    return {
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": _memory_gib(),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def describe_machine(machine: dict[str, Any]) -> str:
    """One line for a table caption: ``2 CPUs (AMD EPYC), 23.5 GiB, Linux 6.1, Python 3.11``."""
    parts = [f"{machine.get('cpus')} CPUs ({machine.get('cpu_model') or 'unknown CPU'})"]
    if machine.get("memory_gib"):
        parts.append(f"{machine['memory_gib']} GiB")
    if machine.get("kernel"):
        parts.append(f"Linux {machine['kernel']}")
    parts.append(f"Python {machine.get('python')}")
    return ", ".join(parts)


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()


def git_commit(repo: Path = REPO) -> str | None:
    """The checked-out commit (short), ``+dirty`` when tracked files differ from it."""
    try:
        head = _git(repo, "rev-parse", "--short", "HEAD")
        dirty = _git(repo, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def run_meta(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line, date, machine and commit of this run, for its report."""
    args = sys.argv[1:] if argv is None else argv
    return {
        "command": "python -m loadtest " + shlex.join(args),
        "date": utc_now(),
        "machine": machine_info(),
        "commit": git_commit(),
    }


def write_report(report: dict[str, Any], path: str | None) -> None:
    text = json.dumps(report, indent=2, sort_keys=False)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
        print(f"report written to {path}", file=sys.stderr)
    print(text)
