"""What a wake-up costs on this machine: the CPU time an otherwise idle process is charged
for sleeping and waking N times a second (an asyncio timer, as an event loop waiting for
its next frame does).

On bare metal a wake-up costs a few microseconds. On a virtual machine whose virtual CPUs
halt when idle it can cost a hundred times that, charged to the process that woke, and
the capacity benchmark's CPU figures include it: compare its ``wakeups_per_s`` with this.

    python bench/wakeup_cost.py [--rates 50,200,500,1000,2000] [--seconds 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm


def _on_cpu_s() -> float:
    """This thread's time on a CPU, from the scheduler (ns precision, no tick sampling)."""
    return int(Path("/proc/thread-self/schedstat").read_text().split()[0]) / 1e9


async def _wake(rate: int, seconds: float) -> dict[str, Any]:
    period = 1.0 / rate
    cpu0, t0 = _on_cpu_s(), time.perf_counter()
    due, woken = t0, 0
    while time.perf_counter() - t0 < seconds:
        due += period
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        woken += 1
    wall, cpu = time.perf_counter() - t0, _on_cpu_s() - cpu0
    return {
        "wakeups_per_s": round(woken / wall),
        "cpu_pct_of_core": round(100 * cpu / wall, 2),
        "cpu_us_per_wakeup": round(cpu / woken * 1e6, 1),
    }


async def _run(rates: list[int], seconds: float) -> list[dict[str, Any]]:
    return [await _wake(rate, seconds) for rate in tqdm(rates, desc="rates", file=sys.stderr)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="50,200,500,1000,2000")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--json", type=Path, default=None, metavar="PATH")
    args = parser.parse_args()
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    rows = runner(_run([int(r) for r in args.rates.split(",")], args.seconds))
    if args.json is not None:
        args.json.write_text(json.dumps({"benchmark": "wakeup_cost", "rows": rows}, indent=2))
    print(f"{'wakeups/s':>10} {'% of a core':>12} {'us per wakeup':>14}")
    for r in rows:
        print(f"{r['wakeups_per_s']:>10} {r['cpu_pct_of_core']:>12} {r['cpu_us_per_wakeup']:>14}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
