"""`make bench`'s table regeneration on a synthetic results.json and a synthetic docs file:
tables replaced in place between their markers, everything else byte for byte. No
benchmark is run here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import suite
from bench.doc_tables import GENERATED, MarkerError, regenerate, replace_block
from bench.scenarios import SCENARIOS, figures_of, pick

MACHINE = {
    "cpus": 2,
    "cpu_model": "AMD EPYC",
    "memory_gib": 23.5,
    "kernel": "6.1",
    "python": "3.11.7",
}

DOC = """# benchmarks

## Failover: chaos

### Latest

Prose about the latest runs stays.

<!-- bench:chaos begin -->
| run | affected |
|---|---|
| old | 71 |
<!-- bench:chaos end -->

### History

| run | affected |
|---|---|
| older | 99 |

## Turn latency

<!-- bench:run begin -->
| turn latency p50 / p99 |
|---|
| 383 / 582 ms |
<!-- bench:run end -->

### History

Before memory was wired in: p50 358 ms.
"""


def entry(name: str, **figures: Any) -> dict[str, Any]:
    return {
        "scenario": name,
        "command": f"python -m loadtest {name} --calls 200",
        "date": "2026-12-02T07:00:00Z",
        "machine": MACHINE,
        "commit": "abc1234",
        "figures": figures,
    }


RESULTS = [
    entry(
        "chaos-drain",
        affected_calls=102,
        gap_p50_ms=327.0,
        gap_p99_ms=619.4,
        lost_turns=0,
        duplicate_replies=0,
        duplicate_effects=0,
        context_lost=0,
        errors=0,
    ),
    entry(
        "chaos-kill",
        affected_calls=71,
        gap_p50_ms=332.2,
        gap_p99_ms=725.0,
        lost_turns=0,
        duplicate_replies=1,
        duplicate_effects=0,
        context_lost=0,
        errors=2,
    ),
    entry("memory", turns=1000, prompt_tokens=806),
]


def _between(doc: str, block: str) -> str:
    return doc.split(f"<!-- bench:{block} begin -->")[1].split(f"<!-- bench:{block} end -->")[0]


def test_tables_are_replaced_between_their_markers_and_nothing_else_changes() -> None:
    doc, done, missing = regenerate(DOC, RESULTS)
    assert done == ["chaos"] and missing == ["memory"]
    table = _between(doc, "chaos")
    assert GENERATED in table
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    # Suite order (kill before drain), whatever the order in results.json.
    assert rows == [
        "| `python -m loadtest chaos-kill --calls 200` | 2026-12-02 07:00 | abc1234 | 71 "
        "| 332 ms | 725 ms | 0 / 1 / 0 / 0 | 2 |",
        "| `python -m loadtest chaos-drain --calls 200` | 2026-12-02 07:00 | abc1234 | 102 "
        "| 327 ms | 619 ms | 0 / 0 / 0 / 0 | 0 |",
    ]
    assert "Machine: 2 CPUs (AMD EPYC), 23.5 GiB, Linux 6.1, Python 3.11.7." in table
    assert "| old | 71 |" not in doc
    # Outside the chaos markers, the document is unchanged byte for byte.
    before, after = DOC.split("<!-- bench:chaos begin -->"), doc.split("<!-- bench:chaos begin -->")
    assert before[0] == after[0]
    assert (
        before[1].split("<!-- bench:chaos end -->")[1]
        == after[1].split("<!-- bench:chaos end -->")[1]
    )
    assert "| older | 99 |" in doc and "| 383 / 582 ms |" in doc


def test_regenerating_twice_gives_the_same_document() -> None:
    once, _, _ = regenerate(DOC, RESULTS)
    twice, _, _ = regenerate(once, RESULTS)
    assert once == twice


def test_a_missing_figure_is_a_dash_and_a_failed_scenario_says_so() -> None:
    failed = {**entry("run"), "figures": {}, "error": "no report (exit code 1)"}
    doc, done, _ = regenerate(DOC, [failed])
    assert done == ["run"]
    assert "failed: no report (exit code 1)" in _between(doc, "run")
    partial = entry("run", calls=50, completed_calls=50, errors=0)
    row = [r for r in _between(regenerate(DOC, [partial])[0], "run").splitlines() if "| `" in r]
    assert "| 50 (50) | — / — ms |" in row[0]


def test_pipes_in_a_value_do_not_break_the_table() -> None:
    bad = entry("chaos-kill", affected_calls="1 | 2")
    table = _between(regenerate(DOC, [bad])[0], "chaos")
    assert "1 \\| 2" in table


def test_broken_markers_are_refused() -> None:
    with pytest.raises(MarkerError):
        replace_block(DOC + "<!-- bench:chaos begin -->\n", "chaos", "x")
    swapped = (
        DOC.replace("<!-- bench:run begin -->", "@@")
        .replace("<!-- bench:run end -->", "<!-- bench:run begin -->")
        .replace("@@", "<!-- bench:run end -->")
    )
    with pytest.raises(MarkerError):
        replace_block(swapped, "run", "x")


def test_figures_are_picked_from_a_report_by_path() -> None:
    memory = next(s for s in SCENARIOS if s.name == "memory")
    report = {
        "turns": 50,
        "kb_docs": 543,
        "hierarchical": {
            "prompt_tokens": {"10": 763, "50": 795},
            "prompt_build_ms": {"10": {"p99": 2.0}, "50": {"p99": 1.5}},
        },
        "naive": {"prompt_tokens": {"10": 417, "50": 1648}},
    }
    figures = figures_of(memory, report)
    assert figures["prompt_tokens"] == 795 and figures["prompt_tokens_naive"] == 1648
    assert figures["prompt_build_p99_ms"] == 1.5
    assert figures["checkpoint_bytes"] is None
    assert pick({"a": {}}, "a.@last") is None


def test_tables_only_regenerates_the_docs_from_results_json(tmp_path: Path) -> None:
    results, docs = tmp_path / "results.json", tmp_path / "benchmarks.md"
    results.write_text(json.dumps({"generated_by": "test", "scenarios": RESULTS}))
    docs.write_text(DOC)
    assert suite.main(["--tables-only", "--results", str(results), "--docs", str(docs)]) == 0
    assert "| `python -m loadtest chaos-kill --calls 200` |" in docs.read_text()
    assert json.loads(results.read_text())["generated_by"] == "test"  # not rewritten


def test_only_replaces_just_the_scenarios_it_ran() -> None:
    old = [entry("run", calls=1), entry("chaos-kill", affected_calls=1)]
    merged = suite.merge(old, [entry("run", calls=2)])
    assert [(e["scenario"], e["figures"]) for e in merged] == [
        ("run", {"calls": 2}),
        ("chaos-kill", {"affected_calls": 1}),
    ]


def test_every_offered_scenario_has_a_table_and_unknown_names_are_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert suite.main(["--list"]) == 0
    listed = capsys.readouterr().out.split()
    assert "run" in listed and "chaos-kill" in listed and "placement-sim" in listed
    with pytest.raises(SystemExit):
        suite.main(["--only", "nope", "--tables-only"])
