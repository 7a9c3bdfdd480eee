"""``make bench``: the standard benchmark scenarios, one after another, at sizes that finish
in under 15 minutes on the development machine (2 vCPUs).

Each scenario runs as ``python -m loadtest ...`` in its own process and writes its JSON
report (and, with a time series, its HTML report) to ``out/bench/``. Its key figures, with
the command, date, machine and commit, go to ``bench/results.json`` (one object per
scenario; ``--only`` replaces only the scenarios it ran), and the tables of
``docs/benchmarks.md`` are regenerated from that file between their marker comments.

    python bench/suite.py --list
    python bench/suite.py                     # everything, then the docs tables
    python bench/suite.py --only chaos-kill --only run
    python bench/suite.py --quick             # smallest sizes: checks the plumbing only
    python bench/suite.py --tables-only       # regenerate the tables from results.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: `python bench/suite.py`
    sys.path.insert(0, str(REPO))

from bench.doc_tables import MarkerError, regenerate  # noqa: E402
from bench.scenarios import SCENARIOS, Scenario, figures_of  # noqa: E402
from loadtest.stats import git_commit, machine_info, utc_now  # noqa: E402

RESULTS = REPO / "bench" / "results.json"
DOCS = REPO / "docs" / "benchmarks.md"
OUT = REPO / "out" / "bench"


def available() -> list[Scenario]:
    """The scenarios this checkout can run (one needing a missing module is left out)."""
    return [s for s in SCENARIOS if not s.requires or importlib.util.find_spec(s.requires)]


def command_of(scenario: Scenario, quick: bool) -> str:
    return "python -m loadtest " + shlex.join(scenario.quick if quick else scenario.argv)


def run_one(scenario: Scenario, out: Path, *, quick: bool) -> dict[str, Any]:
    """Run one scenario; its entry for results.json (with ``error`` when it gave no report)."""
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{scenario.name}.json"
    json_path.unlink(missing_ok=True)
    argv = [*(scenario.quick if quick else scenario.argv), "--json", str(json_path)]
    html_path = out / f"{scenario.name}.html" if scenario.html else None
    if html_path is not None:
        argv += ["--html", str(html_path)]
    entry: dict[str, Any] = {
        "scenario": scenario.name,
        "command": command_of(scenario, quick),
        "size": "quick" if quick else "standard",
        "date": utc_now(),
        "machine": machine_info(),
        "commit": git_commit(),
    }
    print(f"[bench] {scenario.name}: {entry['command']}", file=sys.stderr, flush=True)
    started = time.monotonic()
    try:
        # The report goes to a file; the child's stdout (the same JSON) is not needed here.
        proc = subprocess.run(
            [sys.executable, "-m", "loadtest", *argv],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            timeout=scenario.timeout_s / (4 if quick else 1),
            check=False,
        )
        entry["exit_code"] = proc.returncode
    except subprocess.TimeoutExpired:
        entry["exit_code"] = None
        entry["error"] = f"timed out after {scenario.timeout_s:.0f} s"
    entry["duration_s"] = round(time.monotonic() - started, 1)
    try:
        report = json.loads(json_path.read_text())
    except (OSError, ValueError):
        entry.setdefault("error", f"no report (exit code {entry['exit_code']})")
        entry["figures"] = {}
        return entry
    entry["figures"] = figures_of(scenario, report)
    entry["report"] = _shown(json_path)
    if html_path is not None and html_path.exists():
        entry["html"] = _shown(html_path)
    status = "ok" if entry["exit_code"] == 0 else f"exit {entry['exit_code']} (targets missed?)"
    print(f"[bench] {scenario.name}: {status} in {entry['duration_s']} s", file=sys.stderr)
    return entry


def _shown(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def merge(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The entries of ``old`` with those of ``new`` replacing the same scenarios, in the
    suite's order."""
    order = {s.name: i for i, s in enumerate(SCENARIOS)}
    by_name = {e["scenario"]: e for e in old}
    by_name.update({e["scenario"]: e for e in new})
    return sorted(by_name.values(), key=lambda e: order.get(e["scenario"], len(order)))


def load_results(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    return list(data.get("scenarios", [])) if isinstance(data, dict) else []


def save_results(path: Path, entries: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"generated_by": "bench/suite.py", "scenarios": entries}
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def update_docs(docs: Path, entries: list[dict[str, Any]]) -> int:
    try:
        text, done, missing = regenerate(docs.read_text(), entries)
    except MarkerError as exc:
        print(f"[bench] {docs}: {exc}; tables not written", file=sys.stderr)
        return 1
    docs.write_text(text)
    print(f"[bench] {docs}: regenerated {', '.join(done) or 'nothing'}", file=sys.stderr)
    for block in missing:
        print(f"[bench] {docs}: no <!-- bench:{block} begin/end --> markers", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/suite.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    p.add_argument("--only", action="append", default=[], metavar="NAME", help="repeatable")
    p.add_argument("--quick", action="store_true", help="smallest sizes; docs left alone")
    p.add_argument("--tables-only", action="store_true", help="no run: tables from results")
    p.add_argument("--results", type=Path, help=f"default {RESULTS.relative_to(REPO)}")
    p.add_argument("--docs", type=Path, help=f"default {DOCS.relative_to(REPO)} (not --quick)")
    p.add_argument("--out", type=Path, default=OUT, help="where the reports go")
    args = p.parse_args(argv)
    offered = available()
    if args.list:
        for s in offered:
            print(f"{s.name:14} table {s.block:14} {command_of(s, args.quick)}")
        return 0
    names = {s.name for s in offered}
    unknown = [n for n in args.only if n not in names]
    if unknown:
        p.error(f"unknown scenario {', '.join(unknown)}; --list shows them")
    # A quick run measures nothing worth publishing: it writes elsewhere, docs untouched.
    results = args.results or (args.out / "results-quick.json" if args.quick else RESULTS)
    docs = args.docs or (None if args.quick else DOCS)
    entries = load_results(results)
    failed = 0
    if not args.tables_only:
        chosen = [s for s in offered if not args.only or s.name in args.only]
        new = [run_one(s, args.out, quick=args.quick) for s in chosen]
        failed = sum(1 for e in new if e.get("error"))
        entries = merge(entries, new)
        save_results(results, entries)
        print(f"[bench] results written to {results}", file=sys.stderr)
    if docs is not None:
        failed += update_docs(docs, entries)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
