"""``python -m loadtest abuse`` at a tiny size: it runs, its report has every figure the
benchmark table needs, and the flood crashed nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)

KEYS = {
    "bad_inputs_sent",
    "crashes",
    "takeovers_succeeded",
    "legit_calls",
    "legit_calls_failed",
    "turn_latency_p99_quiet_ms",
    "turn_latency_p99_flood_ms",
    "auth_enforced",
    "errors",
}
KINDS = {
    "token_none",
    "token_expired",
    "token_wrong_signature",
    "token_other_tenant",
    "takeover",
    "malformed",
    "idle",
    "over_cap",
    "twilio_unsigned_webhook",
    "twilio_bad_stream_token",
}


def test_abuse_bench_tiny(tmp_path: Path) -> None:
    out = tmp_path / "abuse.json"
    argv = [sys.executable, "-m", "loadtest", "abuse", "--calls", "2", "--turns", "2"]
    argv += ["--think", "0.3", "--attackers", "1", "--idle", "3", "--excess", "3"]
    argv += ["--nodes", "1", "--latency-scale", "0.05", "--rounds", "1", "--json", str(out)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report) >= KEYS
    assert set(report["by_kind"]) == KINDS
    assert report["crashes"] == 0, report["crashed"]
    assert report["legit_calls"] == 4  # two per phase
    assert report["bad_inputs_sent"] >= sum(k["sent"] for k in report["by_kind"].values()) > 0
    assert report["takeover_attempts"] == 2  # one per live call of the flood phase
    assert report["internal_errors"] == 0
    if report["auth_enforced"]:
        assert report["takeovers_succeeded"] == 0
        assert report["legit_calls_failed"] == 0
