"""What ``loadtest run`` measures of its local cluster, and how the cluster is set up for it.

:class:`ClusterProbe` samples every process of the cluster (routers, nodes, Valkey, NATS,
the caller processes): RSS and open file descriptors, from ``/proc``; and the Valkey's
memory and key count. :func:`per_call` turns a run's samples (no call, every call idle,
every call after its turns) into what one call costs.
"""

from __future__ import annotations

import os
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from loadtest.stats import percentiles
from localcluster.cluster import LocalCluster

# The router's default per-tenant cap on live calls (CALLMESH_MAX_CALLS_PER_TENANT): every
# call of a run is of one tenant, so a run near it raises it.
DEFAULT_TENANT_CALLS = 10_000


def cluster_env(calls: int, latency_scale: float, tts_chunk_ms: int) -> dict[str, str]:
    """The cluster's settings for a run of ``calls`` calls of one tenant."""
    return {
        "CALLMESH_SIM_LATENCY_SCALE": str(latency_scale),
        "CALLMESH_LOG_LEVEL": "WARNING",
        "CALLMESH_TTS_CHUNK_MS": str(tts_chunk_ms),
        "CALLMESH_MAX_CALLS_PER_TENANT": str(max(DEFAULT_TENANT_CALLS, 2 * calls)),
    }


def _status_kb(pid: int, name: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (0 once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def syscalls(pid: int) -> int:
    """Read and write system calls a process has made, all its threads (0 once it is
    gone): what a turn costs in trips to the kernel, beside its CPU time."""
    try:
        fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    except (OSError, ValueError):
        return 0
    return int(fields.get("syscr", 0)) + int(fields.get("syscw", 0))


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (every process, ours or not)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / CLK_TCK


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


@dataclass
class ClusterProbe:
    """The processes of a run by role (``router``, ``node``, ``redis``, ``nats``,
    ``callers``) and the Valkey to ask for its memory."""

    pids: dict[str, list[int]]
    redis_url: str
    names: dict[int, str] = field(default_factory=dict)
    # Each router's and node's base URL, by role, for the responsiveness probe.
    urls: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def of(cls, cluster: LocalCluster) -> ClusterProbe:
        pids: dict[str, list[int]] = {
            "router": [p.pid for p in cluster.all_routers],
            "node": [p.pid for p in cluster.nodes],
        }
        names = {p.pid: p.name for p in [*cluster.all_routers, *cluster.nodes]}
        backends = cluster.backends
        for role in ("redis", "nats"):
            server = getattr(backends, role, None)
            proc = getattr(server, "proc", None)
            if proc is not None:
                pids[role] = [proc.pid]
        urls = {"router": cluster.router_urls, "node": [p.url for p in cluster.nodes]}
        return cls(pids, cluster.redis_url, names, urls)

    def sample(self) -> dict[str, Any]:
        """RSS (KB) and open files of every process, and the Valkey's memory and keys."""
        out: dict[str, Any] = {
            "at": time.monotonic(),
            "machine_busy_s": machine_busy_s(),
            "rss_kb": {},
            "fds": {},
            "cpu_s": {},
            "syscalls": {},
        }
        for role, pids in self.pids.items():
            out["rss_kb"][role] = [_status_kb(pid, "VmRSS") for pid in pids]
            out["fds"][role] = [open_fds(pid) for pid in pids]
            out["cpu_s"][role] = [cpu_s(pid) for pid in pids]
            out["syscalls"][role] = [syscalls(pid) for pid in pids]
        client = redis.Redis.from_url(self.redis_url)
        try:
            out["redis_used_memory_b"] = int(client.info("memory")["used_memory"])
            out["redis_keys"] = int(client.dbsize())
            out["redis_commands"] = {
                name.removeprefix("cmdstat_"): int(stat["calls"])
                for name, stat in client.info("commandstats").items()
            }
        finally:
            client.close()
        return out


def per_call(samples: dict[str, Any], calls: int, turns: int = 0) -> dict[str, Any]:
    """What one call costs, from the samples ``baseline``, ``idle`` and ``after_turns``:
    RSS growth of all routers (all nodes) together over the calls, Valkey memory and keys
    per call, and the most file descriptors any process of each role held; with ``turns``
    (every call's turns of the talk phase together), what one turn costs."""
    base = samples["baseline"]
    out: dict[str, Any] = {}
    for phase, suffix in (("idle", ""), ("after_turns", "_after_turns")):
        s = samples.get(phase)
        if s is None or not calls:
            continue
        for role in ("node", "router"):
            grown = sum(s["rss_kb"][role]) - sum(base["rss_kb"][role])
            out[f"{role}_rss_per_call_kb{suffix}"] = round(grown / calls, 1)
        grown_b = s["redis_used_memory_b"] - base["redis_used_memory_b"]
        out[f"redis_bytes_per_call{suffix}"] = round(grown_b / calls)
        out[f"redis_keys_per_call{suffix}"] = round(
            (s["redis_keys"] - base["redis_keys"]) / calls, 2
        )
    idle = samples.get("idle")
    if idle is not None:
        out["fds_max"] = {role: max(v, default=0) for role, v in idle["fds"].items()}
    talked = samples.get("after_turns")
    if idle is not None and talked is not None:
        # Cores each role used while the calls talked (the samples bracket that phase),
        # and the whole machine's, other work on it included.
        wall = talked["at"] - idle["at"]
        out["talk_cpu_cores"] = {
            role: round((sum(talked["cpu_s"][role]) - sum(idle["cpu_s"][role])) / wall, 3)
            for role in talked["cpu_s"]
        }
        out["talk_machine_busy_cores"] = round(
            (talked["machine_busy_s"] - idle["machine_busy_s"]) / wall, 3
        )
        if turns:
            out.update(per_turn(idle, talked, turns))
    return out


def per_turn(idle: dict[str, Any], talked: dict[str, Any], turns: int) -> dict[str, Any]:
    """CPU ms of each role, and Valkey commands by name, per turn of the talk phase (the
    samples bracket it; a ramp's last calls and the settle pauses are in it too)."""
    cpu = {
        role: round((sum(talked["cpu_s"][role]) - sum(idle["cpu_s"][role])) * 1000 / turns, 3)
        for role in talked["cpu_s"]
    }
    before, after = idle.get("redis_commands", {}), talked.get("redis_commands", {})
    commands = {
        name: round((n - before.get(name, 0)) / turns, 2)
        for name, n in sorted(after.items())
        if n > before.get(name, 0)
    }
    calls_made = {
        role: round((sum(talked["syscalls"][role]) - sum(idle["syscalls"][role])) / turns, 1)
        for role in talked.get("syscalls", {})
    }
    return {
        "talk_cpu_ms_per_turn": cpu,
        # Reads and writes to sockets and pipes (epoll waits are not counted).
        "talk_syscalls_per_turn": calls_made,
        # The probe's own INFO/DBSIZE are counted too: 3 a sample, nothing per turn.
        "redis_commands_per_turn": commands,
        "redis_commands_per_turn_total": round(sum(commands.values()), 2),
    }


class Responsiveness:
    """How long each router and node takes to answer ``/livez``, sampled every
    ``every_s`` from a thread while a phase runs: a process's event loop that is busy or
    stalled answers late (a node whose loop stalls past ``dead_after_ms`` misses its
    heartbeats, and routers declare it dead)."""

    def __init__(self, urls: dict[str, list[str]], every_s: float = 0.25) -> None:
        self._urls = [(role, u) for role, us in urls.items() for u in us]
        self._every = every_s
        self._samples: dict[str, list[float]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._samples = {role: [] for role, _ in self._urls}
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="livez-probe", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            for role, url in self._urls:
                t0 = time.monotonic()
                try:
                    with urllib.request.urlopen(url + "/livez", timeout=5) as resp:
                        resp.read()
                except OSError:
                    pass  # a timeout is a measurement too: 5 s without an answer
                self._samples[role].append((time.monotonic() - t0) * 1000)

    def stop(self) -> dict[str, dict[str, float]]:
        """Percentiles of the answer times (ms) by role since ``start``."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        return {role: percentiles(v, (50, 99)) for role, v in self._samples.items()}
