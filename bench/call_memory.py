"""Where a live call's memory goes, on the router and on the node.

    .venv/bin/python bench/call_memory.py --calls 300 --mode text [--trace-frames 8]
    .venv/bin/python bench/call_memory.py --calls 200 --mode audio --transport native

A local cluster (one router, one node, embedded Valkey and NATS) is started with the
memory probe (``bench/memprobe/sitecustomize.py``) in every process. After a warm-up of a
few calls that come and go, each process is asked for a snapshot (SIGUSR2); then
``--calls`` calls are opened and held (text: idle after the greeting; audio: the capacity
benchmark's callers, streaming), and a second snapshot is taken. The report, per process
and per call: RSS growth, live objects by type, asyncio tasks, and (with
``--trace-frames`` > 0, which slows the processes and inflates RSS) the allocation sites
that grew, from tracemalloc.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
import tracemalloc
import urllib.request
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from callmesh_client.client import CallClient
from loadtest.capacity import rss_kb
from loadtest.capacity_callers import CallerProcess
from localcluster.cluster import LocalCluster

PROBE = Path(__file__).resolve().parent / "memprobe"


def probe(pid: int, out: Path, n: int, timeout_s: float = 120.0) -> tuple[dict[str, Any], Path]:
    os.kill(pid, signal.SIGUSR2)
    path = out / f"{pid}-{n}.json"
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no memory probe from {pid}")
        time.sleep(0.1)
    return json.loads(path.read_text()), out / f"{pid}-{n}.snap"


async def hold_text_calls(url: str, calls: int, ready: asyncio.Event, done: asyncio.Event) -> int:
    prefix = uuid.uuid4().hex[:6]
    opened = 0

    async def one(i: int) -> None:
        nonlocal opened
        async with CallClient(url, f"mem-{prefix}-{i}", timeout_s=60) as c:
            await c.start("demo", f"caller-{i}")
            await c.wait_greeting()
            opened += 1
            if opened == calls:
                ready.set()
            await done.wait()
            await c.hangup()

    tasks = []
    for i in range(calls):
        tasks.append(asyncio.create_task(one(i)))
        if i % 50 == 49:
            await asyncio.sleep(0.2)
    await asyncio.gather(*tasks)
    return opened


def per_call_diff(before: dict[str, Any], after: dict[str, Any], calls: int, top: int) -> Any:
    out: dict[str, Any] = {"tasks_per_call": round((after["tasks"] - before["tasks"]) / calls, 2)}
    rows = []
    for name, count in after["types"].items():
        d = count - before["types"].get(name, 0)
        size = after["sizes"].get(name, 0) - before["sizes"].get(name, 0)
        if d > 0:
            rows.append((size / calls, d / calls, name))
    rows.sort(reverse=True)
    out["objects_per_call"] = [
        {"type": name, "count": round(n, 2), "shallow_bytes": round(b)} for b, n, name in rows[:top]
    ]
    out["shallow_bytes_per_call"] = round(sum(r[0] for r in rows))
    if after.get("traced"):
        out["traced_kb_per_call"] = round(after["traced"][0] / calls / 1024, 2)
    return out


def traced_sites(snap1: Path, calls: int, top: int, key: str) -> list[dict[str, Any]]:
    if not snap1.exists():
        return []
    # Tracing started at the first probe: the second snapshot holds what came since.
    stats = tracemalloc.Snapshot.load(str(snap1)).statistics(key)
    rows = []
    for s in stats[:top]:
        frames = s.traceback.format(limit=8 if key == "traceback" else 1)
        rows.append(
            {
                "bytes_per_call": round(s.size / calls),
                "count_per_call": round(s.count / calls, 2),
                "site": frames if key == "traceback" else frames[0].strip(),
            }
        )
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--mode", choices=("text", "audio"), default="text")
    p.add_argument("--transport", choices=("native", "twilio"), default="native")
    p.add_argument("--trace-frames", type=int, default=0, help="tracemalloc depth; 0: off")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--settle", type=float, default=10.0)
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--json", dest="json_path")
    args = p.parse_args()
    out = Path(tempfile.mkdtemp(prefix="callmem-"))
    env = {
        "PYTHONPATH": str(PROBE),
        "CALLMESH_MEMPROBE_DIR": str(out),
        "CALLMESH_LOG_LEVEL": "WARNING",
    }
    if args.trace_frames:
        env["CALLMESH_MEMPROBE_TRACE"] = str(args.trace_frames)
    env.update(dict(e.split("=", 1) for e in args.env))
    report: dict[str, Any] = {"calls": args.calls, "mode": args.mode, "settings": vars(args)}
    with LocalCluster(nodes=1, env=env, force_embedded=True) as cluster:
        pids = {"router": cluster.router.pid, "node": cluster.nodes[0].pid}  # type: ignore[union-attr]
        # Warm-up: imports, caches and pools that the first calls fill.
        asyncio.run(_warm(cluster.router_url))
        time.sleep(2)
        before = {role: probe(pid, out, 1) for role, pid in pids.items()}
        rss0 = {role: rss_kb(pid) for role, pid in pids.items()}
        if args.mode == "text":
            after, rss1 = asyncio.run(_text(cluster.router_url, args, pids, out))
        else:
            with CallerProcess(
                cluster.router_url, args.transport, 0, out / "callers.log"
            ) as callers:
                callers.command({"cmd": "grow", "calls": args.calls, "ramp_s": 5.0}, "grown", 300)
                time.sleep(args.settle)
                report["router_status_calls"] = json.loads(
                    urllib.request.urlopen(cluster.router_url + "/v1/status").read()
                )["calls"]
                after = {role: probe(pid, out, 2) for role, pid in pids.items()}
                rss1 = {role: rss_kb(pid) for role, pid in pids.items()}
    for role in pids:
        (b, _), (a, snap1) = before[role], after[role]
        entry = per_call_diff(b, a, args.calls, args.top)
        entry["rss_kb_per_call"] = round((rss1[role] - rss0[role]) / args.calls, 1)
        entry["rss_kb"] = [rss0[role], rss1[role]]
        if args.trace_frames:
            entry["sites"] = traced_sites(snap1, args.calls, args.top, "lineno")
            entry["tracebacks"] = traced_sites(snap1, args.calls, 12, "traceback")
        report[role] = entry
    text = json.dumps(report, indent=1)
    if args.json_path:
        Path(args.json_path).write_text(text + "\n")
    print(text)
    return 0


async def _warm(url: str) -> None:
    async def one(i: int) -> None:
        async with CallClient(url, f"warm-{uuid.uuid4().hex[:8]}", timeout_s=60) as c:
            await c.start("demo", f"warm-{i}")
            await c.wait_greeting()
            await c.say("Hi, my name is Alice")
            await c.hangup()

    await asyncio.gather(*(one(i) for i in range(20)))


async def _text(url: str, args: argparse.Namespace, pids: dict[str, int], out: Path) -> Any:
    ready, done = asyncio.Event(), asyncio.Event()
    holder = asyncio.create_task(hold_text_calls(url, args.calls, ready, done))
    await asyncio.wait_for(ready.wait(), 300)
    await asyncio.sleep(args.settle)
    loop = asyncio.get_running_loop()
    after = {
        role: await loop.run_in_executor(None, probe, pid, out, 2) for role, pid in pids.items()
    }
    rss1 = {role: rss_kb(pid) for role, pid in pids.items()}
    done.set()
    await holder
    return after, rss1


if __name__ == "__main__":
    sys.exit(main())
