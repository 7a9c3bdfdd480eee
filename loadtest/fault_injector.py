"""Strikes the ``--fault`` specs of a ``loadtest chaos`` run against its local cluster, each
at its moment (:mod:`loadtest.fault_schedule`), and marks every start and end on the run's
time line.

- ``node-kill`` / ``node-drain``: SIGKILL / SIGTERM the busiest live nodes (or one by
  name), never the last one; each strike is kept (time, victims) for the failover score;
- ``redis-restart``: a single server is stopped (SIGTERM, or SIGKILL with ``:kill``) and
  started again on its port and data after the window; on a Valkey cluster the master
  holding most calls is SIGKILLed and restarted once its replica is promoted;
- ``nats-outage``: the (first) NATS server is stopped for the window, then started again
  with its JetStream data;
- ``crm-outage``: the fake CRM answers 503 (or drops connections) for the window;
- ``llm-slow``: every node's simulated model takes that much longer to its first token;
- ``link-latency``: what routers and nodes send each other is delayed, with jitter.

Router faults are struck by :mod:`loadtest.chaos_routers` (their callers keep the score);
the runner hands those to it.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from loadtest import chaos_faults
from loadtest.effects_procs import set_crm_mode
from loadtest.fault_schedule import ROUTER_KINDS, FaultSpec, Kind, Occurrence, Schedule
from loadtest.timeline import Timeline
from localcluster.cluster import LocalCluster, Proc
from localcluster.servers import ManagedServer

# A window fault: its target, what it does, and its start and end (a start may name the
# target it struck).
_Window = tuple[str, str, Callable[[], Awaitable[object]], Callable[[], Awaitable[object]]]
TICK_S = 0.1  # how often the runner looks at the schedule
DRAIN_EXIT_WAIT_S = 60.0


class FaultInjector:
    """Strikes occurrences; owns the tasks of the windows and drains it starts."""

    def __init__(
        self,
        cluster: LocalCluster,
        timeline: Timeline,
        *,
        call_ids: list[str] | None = None,
        crm_url: str | None = None,
    ) -> None:
        self.cluster = cluster
        self.timeline = timeline
        self.call_ids = call_ids or []
        self.crm_url = crm_url
        self.node_strikes: list[tuple[float, set[str]]] = []  # (time, victims)
        self.drained: list[Proc] = []
        self._on: set[Kind] = set()  # window kinds on right now
        self._tasks: set[asyncio.Task[None]] = set()
        self._exits: set[asyncio.Task[None]] = set()  # drained nodes, until they exit
        self._http: aiohttp.ClientSession | None = None

    def strike(self, occ: Occurrence) -> None:
        task = asyncio.create_task(self._strike(occ), name=f"fault-{occ.spec.kind}-{occ.n}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        """End every window still on (each end is shielded: the cluster is left whole) and
        wait for drained nodes to exit."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # Not cancelled: a drain is over when its node exits (bounded by the wait).
        await asyncio.gather(*self._exits, return_exceptions=True)
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def _strike(self, occ: Occurrence) -> None:
        spec = occ.spec
        if spec.kind in (Kind.NODE_KILL, Kind.NODE_DRAIN):
            await self._nodes(spec)
            return
        if spec.kind in self._on:
            self.timeline.fault(spec.kind.value, "-", "skipped: the same fault is still on")
            return
        window = self._window(spec)
        if window is None:
            return
        target, detail, start, end = window
        self._on.add(spec.kind)
        try:
            at = time.monotonic()
            try:
                named = await start()
            except (OSError, RuntimeError, aiohttp.ClientError) as exc:
                # The fault could not be struck (a server would not stop, the CRM's control
                # refused): say so on the report rather than end the run.
                self.timeline.fault(spec.kind.value, target, f"failed: {type(exc).__name__}: {exc}")
                await asyncio.shield(end())
                return
            # A Valkey master is known once struck: its start names it.
            target = named if isinstance(named, str) else target
            handle = self.timeline.fault(spec.kind.value, target, detail, at=at)
            early = ""
            try:
                await asyncio.sleep(spec.duration_s)
            except asyncio.CancelledError:
                early = "; ended early: the calls were over"
                raise
            finally:
                await asyncio.shield(end())
                self.timeline.fault_ended(handle, detail=detail + early)
        finally:
            self._on.discard(spec.kind)

    def _window(self, spec: FaultSpec) -> _Window | None:
        """What a window fault targets, says, and does at its start and end; None (and a
        'skipped' event) when this cluster cannot have it."""
        backends = self.cluster.backends
        if spec.kind is Kind.REDIS_RESTART:
            if backends is not None and backends.redis_nodes is not None:
                return self._redis_master()
            sig = signal.SIGKILL if spec.hard else signal.SIGTERM
            redis = backends.redis if backends is not None else None
            return self._server_down(spec, "redis", redis, sig)
        if spec.kind is Kind.NATS_OUTAGE:
            if backends is not None and backends.nats_nodes is not None:
                first = backends.nats_nodes.servers[0]
                return self._server_down(spec, "nats", first, signal.SIGKILL)
            nats = backends.nats if backends is not None else None
            return self._server_down(spec, "nats", nats, signal.SIGTERM)
        if spec.kind is Kind.CRM_OUTAGE:
            url = self.crm_url
            if url is None:
                self._skip(spec, "crm", "no CRM in this run")
                return None
            http = self._http = self._http or aiohttp.ClientSession()
            return (
                "fake-crm",
                f"answers {spec.crm_mode}" if spec.crm_mode == "503" else "drops connections",
                lambda: set_crm_mode(http, url, spec.crm_mode),
                lambda: set_crm_mode(http, url, "up"),
            )
        if spec.kind is Kind.LLM_SLOW:
            cluster = self.cluster
            ms = spec.extra_s * 1000
            return (
                "nodes",
                f"+{ms:g} ms to the model's first token",
                lambda: asyncio.to_thread(cluster.slow_llm, ms),
                lambda: asyncio.to_thread(cluster.slow_llm, 0),
            )
        if spec.kind is Kind.LINK_LATENCY:
            proxy = self.cluster.link_proxy
            if proxy is None:
                self._skip(spec, "links", "the cluster has no link proxy")
                return None
            delay, jitter = spec.delay_s * 1000, spec.jitter_s * 1000
            return (
                "router<->nodes",
                f"{delay:g} ms +- {jitter:g} ms each way",
                lambda: asyncio.to_thread(proxy.set, delay, jitter),
                lambda: asyncio.to_thread(proxy.set, 0, 0),
            )
        raise ValueError(f"not a window fault: {spec.kind}")

    def _server_down(
        self, spec: FaultSpec, what: str, server: ManagedServer | None, sig: signal.Signals
    ) -> _Window | None:
        """A server stopped for the window, then started on its port and data."""
        if server is None:
            self._skip(spec, what, f"{what} is not one of this cluster's servers")
            return None
        up = server
        return (
            up.name,
            f"{sig.name}, down {spec.duration_s:g}s, started again",
            lambda: asyncio.to_thread(up.stop, sig),
            lambda: asyncio.to_thread(up.start),
        )

    def _skip(self, spec: FaultSpec, target: str, why: str) -> None:
        self.timeline.fault(spec.kind.value, target, f"skipped: {why}")

    def _redis_master(self) -> _Window:
        """On a Valkey cluster: the master holding most calls, killed, and restarted (as a
        replica) once its replica is promoted; the window is the time that takes."""

        async def start() -> str:
            return await asyncio.to_thread(
                chaos_faults.kill_redis_master, self.cluster, self.call_ids
            )

        async def end() -> None:
            return None

        return "valkey master", "SIGKILL, restarted once its replica is promoted", start, end

    async def _nodes(self, spec: FaultSpec) -> None:
        kind = "kill" if spec.kind is Kind.NODE_KILL else "drain"
        alive = [p for p in self.cluster.nodes if p.alive()]
        if spec.target:
            victims = [p for p in alive if p.name == spec.target]
        else:
            status = await asyncio.to_thread(self.cluster.status) or {}
            victims = _busiest(alive, status)[: spec.count]
        victims = victims[: max(0, len(alive) - 1)]  # never the last node
        if not victims:
            self.timeline.fault(kind, spec.target or "-", "skipped: it would leave no live node")
            return
        sig = signal.SIGKILL if spec.kind is Kind.NODE_KILL else signal.SIGTERM
        at = time.monotonic()
        for v in victims:
            v.signal(sig)
            self.timeline.fault(kind, v.name, sig.name, at=at)
        self.node_strikes.append((at, {v.name for v in victims}))
        if spec.kind is Kind.NODE_DRAIN:
            self.drained += victims
            for v in victims:
                task = asyncio.create_task(self._exit_of(v), name=f"fault-drain-exit-{v.name}")
                self._exits.add(task)

    async def _exit_of(self, proc: Proc) -> None:
        """A drained node's exit marks the end of its drain on the time line."""
        code = await asyncio.to_thread(_wait_exit, proc)
        self.timeline.fault("exited", proc.name, f"exit code {code}")


def _busiest(alive: list[Proc], status: dict[str, object]) -> list[Proc]:
    """The live nodes, those holding the most calls (as a router reports them) first."""
    nodes = status.get("nodes")
    calls = {
        str(n.get("node")): int(n.get("calls", 0))
        for n in (nodes if isinstance(nodes, list) else [])
        if isinstance(n, dict)
    }
    return sorted(alive, key=lambda p: -calls.get(p.name, 0))


def _wait_exit(proc: Proc) -> int | None:
    if proc.popen is None:
        return None
    try:
        return proc.popen.wait(DRAIN_EXIT_WAIT_S)
    except subprocess.TimeoutExpired:
        return None  # still draining


class FaultRunner:
    """Hands each occurrence to the injector (router faults to ``on_router``) when its
    moment comes: a share of ``total_turns`` answered, or seconds since the start."""

    def __init__(
        self,
        specs: list[FaultSpec],
        injector: FaultInjector,
        total_turns: int,
        on_router: Callable[[Occurrence], None] | None = None,
    ) -> None:
        self.specs = specs
        self.schedule = Schedule(specs)
        self.struck: dict[str, int] = {}  # spec text -> occurrences struck
        self.injector = injector
        self.total_turns = max(1, total_turns)
        self.turns = 0
        self.on_router = on_router
        self.t0 = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    def turn_done(self) -> None:
        self.turns += 1

    def tick(self) -> None:
        elapsed = time.monotonic() - self.t0
        for occ in self.schedule.due(self.turns / self.total_turns, elapsed):
            self.struck[occ.spec.text] = self.struck.get(occ.spec.text, 0) + 1
            if occ.spec.kind in ROUTER_KINDS:
                if self.on_router is not None:
                    self.on_router(occ)
            else:
                self.injector.strike(occ)

    async def _loop(self) -> None:
        while True:
            self.tick()
            await asyncio.sleep(TICK_S)

    async def __aenter__(self) -> FaultRunner:
        self.t0 = time.monotonic()
        if self.schedule.total:
            self._task = asyncio.create_task(self._loop(), name="fault-schedule")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.injector.aclose()

    def report(self) -> list[dict[str, Any]]:
        """Per spec: how often it struck and how many of its moments never came."""
        missed: dict[str, int] = {}
        for occ in self.schedule.missed():
            missed[occ.spec.text] = missed.get(occ.spec.text, 0) + 1
        return [
            {"spec": t, "struck": self.struck.get(t, 0), "missed": missed.get(t, 0)}
            for t in dict.fromkeys(s.text for s in self.specs)
        ]
