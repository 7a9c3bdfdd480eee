"""What checkpoint durability costs per turn: the CAS checkpoint write with and without
``WAIT 1`` (one replica confirms before the turn is acknowledged), on an embedded Valkey
cluster (3 masters + 3 replicas) on this machine.

    python bench/checkpoint_durability.py --writes 2000 --concurrency 1,32 --json out.json

Each mode writes ``--writes`` checkpoints of a realistic size (a call at turn 8: working
memory, facts, a pending outbox entry) over ``--calls`` calls, with ``--concurrency``
writers at once, and reports p50/p99/max of one ``StateStore.save`` in ms. Loopback only:
on a real network WAIT adds about one replica round trip.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from localcluster.backends import EmbeddedBackends
from state_store.checkpoint import Checkpoint, OutboxEntry
from state_store.client import connect
from state_store.store import Durability, StateStore


def _checkpoint(call_id: str, epoch: int, turn: int) -> Checkpoint:
    working = [[t, f"user said {t} " * 4, f"agent answered {t} " * 8] for t in range(8)]
    return Checkpoint(
        tenant="bench",
        call_id=call_id,
        caller="caller-1",
        epoch=epoch,
        node="node-1",
        turn=turn,
        last_seq=turn + 1,
        working=working,
        facts={"name": ["Priya", 1, None], "service": ["cleaning", 2, None]},
        outbox=[OutboxEntry("effects.bench.booking", f"{call_id}:{turn}:0", b"{}" * 80, turn)],
    )


def _summary(samples_ms: list[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)
    q = statistics.quantiles(ordered, n=100, method="inclusive")
    return {
        "n": len(ordered),
        "p50": round(q[49], 3),
        "p99": round(q[98], 3),
        "max": round(ordered[-1], 3),
        "mean": round(statistics.fmean(ordered), 3),
    }


async def _run_mode(
    url: str, durability: Durability, writes: int, calls: int, concurrency: int
) -> dict[str, Any]:
    redis = connect(url, timeout_s=2.0)
    try:
        store = StateStore(redis, durability=durability)
        epochs = {}
        for i in range(calls):
            epochs[f"c{i}"] = (await store.take_ownership("bench", f"c{i}", "node-1"))[0]
        samples: list[float] = []
        next_write = 0

        async def writer() -> None:
            nonlocal next_write
            while next_write < writes:
                n = next_write
                next_write += 1
                call_id = f"c{n % calls}"
                ckpt = _checkpoint(call_id, epochs[call_id], n // calls + 1)
                t0 = time.perf_counter()
                await store.save(ckpt)
                samples.append((time.perf_counter() - t0) * 1000)

        started = time.perf_counter()
        await asyncio.gather(*(writer() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        return {
            "replicas": durability.replicas,
            "wait_timeout_ms": durability.timeout_ms,
            "concurrency": concurrency,
            "save_ms": _summary(samples),
            "writes_per_s": round(writes / elapsed, 1),
            "blob_bytes": len(_checkpoint("c0", 1, 1).to_bytes()),
        }
    finally:
        await redis.aclose()


async def _bench(url: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    for concurrency in args.concurrency:
        # Interleaved and repeated so that a noisy neighbour hurts both modes alike.
        for _ in range(args.rounds):
            for replicas in (0, 1):
                durability = Durability(replicas, args.wait_timeout_ms)
                res = await _run_mode(url, durability, args.writes, args.calls, concurrency)
                results.append(res)
                s = res["save_ms"]
                print(
                    f"concurrency {concurrency:3d} WAIT {replicas}: p50 {s['p50']:.3f} ms, "
                    f"p99 {s['p99']:.3f} ms, max {s['max']:.3f} ms, "
                    f"{res['writes_per_s']:.0f} writes/s",
                    file=sys.stderr,
                )
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--writes", type=int, default=2000, help="checkpoint writes per mode")
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--wait-timeout-ms", type=int, default=200)
    p.add_argument("--json", dest="json_path", help="write the results here")
    args = p.parse_args()
    with EmbeddedBackends(redis_cluster=True) as backends:
        results = asyncio.run(_bench(backends.redis_url, args))
    report = {
        "bench": "checkpoint_durability",
        "backend": "valkey cluster, 3 masters + 3 replicas, loopback",
        "params": {k: v for k, v in vars(args).items() if k != "json_path"},
        "results": results,
    }
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2))
    else:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
