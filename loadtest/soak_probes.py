"""What the soak looks at besides RSS: Redis's keys by kind, the event log's size, and heap
probes of processes.

- :func:`redis_census`: every key counted by what it is (:func:`state_store.keys.kind_of`),
  with the bytes and the time to live of a sample of each kind, so a slope of Redis memory
  per call can be read as "which keys, how big, gone when".
- :func:`event_log_sizes`: bytes and messages of the JetStream streams a call writes to
  (its event log, and the effect stream), whose slopes per call size the event log.
- :class:`HeapProbes`: with ``--heap-probe DIR`` the soak asks the probed processes for a
  probe (:mod:`callmesh.heap_probe`) at every 1,000 completed calls and compares the first
  probe after the warm-up with the last: the object types whose count grew, pymalloc's
  arenas and glibc's heap per call, and (``--heap-probe-trace``, which slows the process
  down) the source lines whose memory stayed.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from callmesh import heap_probe
from events import subjects
from state_store import keys

# Keys sampled per kind for their size and time to live.
SAMPLE_PER_KIND = 50
# How long a process may take to write its probe (tracemalloc snapshots of a process with
# some hundred MB traced take seconds on a busy machine).
PROBE_WAIT_S = 60.0


async def redis_census(redis: aioredis.Redis) -> dict[str, dict[str, float]]:
    """Keys by kind: ``count``, and over a sample of each kind the mean ``bytes``
    (MEMORY USAGE), the longest ``ttl_s`` left and how many have no expiry at all."""
    by_kind: dict[str, list[bytes]] = {}
    count: dict[str, int] = {}
    async for key in redis.scan_iter(count=1000):
        kind = keys.kind_of(key.decode(errors="replace") if isinstance(key, bytes) else key)
        count[kind] = count.get(kind, 0) + 1
        sample = by_kind.setdefault(kind, [])
        if len(sample) < SAMPLE_PER_KIND:
            sample.append(key)
    out: dict[str, dict[str, float]] = {}
    for kind, sample in sorted(by_kind.items()):
        sizes, ttls, forever = [], [], 0
        for key in sample:
            sizes.append(int(await redis.memory_usage(key) or 0))
            ttl = int(await redis.ttl(key))
            if ttl == -1:
                forever += 1
            elif ttl >= 0:
                ttls.append(ttl)
        out[kind] = {
            "count": count[kind],
            "bytes_mean": round(sum(sizes) / len(sizes), 1) if sizes else 0.0,
            "ttl_s_max": max(ttls, default=0),
            "sampled_without_ttl": forever,
        }
    return out


# Stream → the prefix of its sampled series.
STREAMS = {subjects.EVENTS_STREAM: "event_log", subjects.EFFECTS_STREAM: "effect_stream"}


async def event_log_sizes(js: JetStreamContext) -> dict[str, float]:
    """``event_log_bytes``/``_messages`` and ``effect_stream_bytes``/``_messages`` now (0
    for a stream not created yet)."""
    row: dict[str, float] = {}
    for stream, name in STREAMS.items():
        try:
            state = (await js.stream_info(stream)).state
            row[f"{name}_bytes"], row[f"{name}_messages"] = state.bytes, state.messages
        except NotFoundError:
            row[f"{name}_bytes"] = row[f"{name}_messages"] = 0
    return row


class HeapProbes:
    """Probes of the soak's processes, taken at call marks and diffed at the end."""

    def __init__(self, directory: Path, every_calls: int = 1000, *, traced: bool = False) -> None:
        self.directory = directory
        self.every_calls = every_calls
        self.signal = heap_probe.TRACED_SIGNAL if traced else heap_probe.LIGHT_SIGNAL
        self.next_mark = every_calls
        # (completed calls, t_s, {process: probe stem}) per mark.
        self.marks: list[tuple[int, float, dict[str, Path]]] = []

    def env(self) -> dict[str, str]:
        return {"CALLMESH_HEAP_PROBE_DIR": str(self.directory)}

    def due(self, completed: int) -> bool:
        return completed >= self.next_mark

    async def take(self, completed: int, t_s: float, pids: dict[str, int]) -> None:
        """Ask every process for a probe and wait until each has written it."""
        self.next_mark = (completed // self.every_calls + 1) * self.every_calls
        before = {name: self._written(pid) for name, pid in pids.items()}
        for pid in pids.values():
            if pid:
                os.kill(pid, self.signal)
        got: dict[str, Path] = {}
        deadline = time.monotonic() + PROBE_WAIT_S
        while len(got) < len(pids) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            for name, pid in pids.items():
                new = self._written(pid) - before[name]
                if new and name not in got:
                    got[name] = max(new)
        self.marks.append((completed, t_s, got))

    def _written(self, pid: int) -> set[Path]:
        """Stems of the complete probes of ``pid`` (its .json is written last)."""
        return {p.with_suffix("") for p in self.directory.glob(f"*-{pid}-*.json")}

    def report(self, warmup_s: float) -> dict[str, Any]:
        """Per process, between the first probe after the warm-up and the last: object
        types that grew, allocator figures per call, and growth sites (traced probes)."""
        marks = self.marks
        if self.signal == heap_probe.TRACED_SIGNAL:
            # The first traced probe starts tracing: its snapshot holds nothing to diff.
            marks = marks[1:]
        kept = [m for m in marks if m[1] >= warmup_s] or marks
        if len(kept) < 2:
            return {"marks": len(self.marks), "note": "fewer than two probes after warm-up"}
        (c0, _, first), (c1, _, last) = kept[0], kept[-1]
        calls = max(c1 - c0, 1)
        out: dict[str, Any] = {"from_calls": c0, "to_calls": c1, "processes": {}}
        for name in sorted(set(first) & set(last)):
            a, b = first[name], last[name]
            probes = [json.loads(Path(f"{p}.json").read_text()) for p in (a, b)]
            grown = {
                f"{part}.{k}": round((probes[1][part][k] - probes[0][part][k]) / calls, 1)
                for part in ("pymalloc", "malloc")
                for k in probes[1].get(part, {})
                if k in probes[0].get(part, {})
            }
            row: dict[str, Any] = {
                "objects_per_call": round((probes[1]["objects"] - probes[0]["objects"]) / calls, 3),
                "objects_grown": heap_probe.census_growth(Path(f"{a}.json"), Path(f"{b}.json")),
                "allocators_bytes_per_call": grown,
            }
            if Path(f"{a}.tracemalloc").exists() and Path(f"{b}.tracemalloc").exists():
                sites = heap_probe.diff(Path(f"{a}.tracemalloc"), Path(f"{b}.tracemalloc"))
                row["traced_bytes_per_call"] = round(
                    (probes[1]["traced_bytes"] - probes[0]["traced_bytes"]) / calls, 1
                )
                row["sites"] = [
                    {**s, "bytes_per_call": round(s["size_diff"] / calls, 2)} for s in sites
                ]
            out["processes"][name] = row
        return out
