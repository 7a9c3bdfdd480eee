"""What telemetry costs a loaded cluster: the capacity benchmark with tracing off and on,
alternating in one sitting, so a noisy, shared machine skews both arms alike.

    python bench/telemetry_capacity.py --rounds 3 --calls 200 --ratio 0.05 --json out.json

"off" runs ``python -m loadtest capacity`` with no OTLP endpoint (no tracer provider: the
spans are no-ops). "on" points the router and node at a local OTLP/HTTP collector started
here (it accepts ``POST /v1/traces`` and counts the requests and bytes, as a collector
would receive them) with ``CALLMESH_TRACE_SAMPLE_RATIO`` at ``--ratio``. Metrics are
exported in both arms: they have no off switch in the product, and their own per-operation
cost is what ``bench/telemetry_cost.py`` measures. The report gives, per arm, the median of
CPU per call and of the turn overhead p99 at ``--calls`` calls, and the difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: `python bench/telemetry_capacity.py`
    sys.path.insert(0, str(REPO))

from loadtest.stats import git_commit, machine_info, utc_now  # noqa: E402


class _Collector(ThreadingHTTPServer):
    """An OTLP/HTTP trace receiver that keeps only counts."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Receive)
        self.lock = threading.Lock()
        self.requests = 0
        self.bytes = 0


class _Receive(BaseHTTPRequestHandler):
    server: _Collector

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        with self.server.lock:
            self.server.requests += 1
            self.server.bytes += len(body)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        return


def _capacity(calls: int, env: list[str], json_path: Path, transport: str) -> dict[str, Any]:
    argv = [sys.executable, "-m", "loadtest", "capacity", "--transport", transport]
    argv += ["--steps", str(calls), "--json", str(json_path)]
    for pair in env:
        argv += ["--env", pair]
    subprocess.run(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    report: dict[str, Any] = json.loads(json_path.read_text())
    step = report["steps"][-1]
    return {
        "passed": bool(step["pass"]),
        "cpu_per_call_pct": 100.0 * step["cores"] / step["calls"],
        "overhead_p99_ms": step["overhead_ms"]["p99"],
        "overhead_p50_ms": step["overhead_ms"]["p50"],
        # The caller's view (end of speech to first audio): finer than the overhead
        # histogram, whose first bucket (0.25 ms) holds most turns.
        "response_p50_ms": step["response_ms"]["p50"],
        "response_p99_ms": step["response_ms"]["p99"],
        "frame_lag_p99_ms": step["frame_lag_ms"]["p99"],
        "machine_busy_pct": step["machine_busy_pct"],
    }


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return round(statistics.median(r[key] for r in runs), 4)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="off/on pairs, alternating")
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--ratio", type=float, default=0.05, help="trace sample ratio when on")
    p.add_argument("--transport", choices=("twilio", "native"), default="twilio")
    p.add_argument("--json", dest="json_path", type=Path, help="write the report here")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.calls < 1 or not 0 <= args.ratio <= 1:
        p.error("rounds and calls must be >= 1, ratio within [0, 1]")

    collector = _Collector()
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{collector.server_address[1]}"
    arms = {
        "off": [],
        "on": [
            f"OTEL_EXPORTER_OTLP_ENDPOINT={endpoint}",
            f"CALLMESH_TRACE_SAMPLE_RATIO={args.ratio}",
        ],
    }
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for n in range(args.rounds):
                for arm, env in arms.items():
                    result = _capacity(
                        args.calls, env, Path(tmp) / f"{arm}-{n}.json", args.transport
                    )
                    runs[arm].append(result)
                    print(f"round {n + 1} {arm}: {json.dumps(result)}", flush=True)
    finally:
        collector.shutdown()

    summary = {
        arm: {
            "cpu_per_call_pct": _median(rs, "cpu_per_call_pct"),
            "overhead_p99_ms": _median(rs, "overhead_p99_ms"),
            "response_p50_ms": _median(rs, "response_p50_ms"),
            "response_p99_ms": _median(rs, "response_p99_ms"),
            "frame_lag_p99_ms": _median(rs, "frame_lag_p99_ms"),
            "passed": sum(r["passed"] for r in rs),
        }
        for arm, rs in runs.items()
    }
    off, on = summary["off"]["cpu_per_call_pct"], summary["on"]["cpu_per_call_pct"]
    report = {
        "scenario": "telemetry-capacity",
        "calls": args.calls,
        "transport": args.transport,
        "sample_ratio": args.ratio,
        "rounds": args.rounds,
        "runs": runs,
        "median": summary,
        "cpu_per_call_change_pct": round(100.0 * (on - off) / off, 1) if off else None,
        "spans_export_requests": collector.requests,
        "spans_export_bytes": collector.bytes,
        "date": utc_now(),
        "commit": git_commit(),
        "machine": machine_info(),
    }
    print(json.dumps({k: report[k] for k in ("median", "cpu_per_call_change_pct")}, indent=2))
    if args.json_path:
        args.json_path.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
