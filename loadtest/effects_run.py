"""One ``effects`` benchmark run against a started cluster, fake CRM and workers.

:class:`EffectsRun` drives the callers (the loadtest booking script, through the router),
takes the CRM down and kills a node in the middle, waits for the effects to settle and
assembles the report from :mod:`loadtest.effects_audit`. Process set-up and the command
line are :mod:`loadtest.effects_bench`.
"""

from __future__ import annotations

import asyncio
import random
import signal
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp
import nats
from tqdm import tqdm

from events import subjects
from events.connection import server_urls
from loadtest.callers import BOOKING, CallResult, scripted_call
from loadtest.effects_audit import Booking, Ledger, expected_keys, read_ledger, score
from loadtest.effects_procs import set_crm_mode
from localcluster.cluster import LocalCluster, Proc

# The callers' tenant: effect ids (the CRM's Idempotency-Keys) begin with it.
TENANT = "demo"


def say(text: str) -> None:
    """Progress on stderr, without breaking the progress bar."""
    tqdm.write(f"[effects] {text}", file=sys.stderr)


@dataclass(frozen=True)
class EffectsScenario:
    """The benchmark's knobs; durations in seconds."""

    calls: int = 200
    nodes: int = 3
    workers: int = 2
    crm_outage_s: float = 10.0
    outage_mode: str = "503"  # or "abort": the CRM drops connections without answering
    outage_at: float = 0.3  # fraction of all turns done when the outage starts
    kill: bool = True
    ramp_s: float = 10.0
    think_s: float = 1.0
    latency_scale: float = 1.0
    tts_chunk_ms: int = 500
    settle_timeout_s: float = 120.0
    seed: int = 0
    # Clustered backends (3 Valkey masters + 3 replicas; 3 NATS servers, streams at R3).
    redis_cluster: bool = False
    nats_cluster: bool = False

    def __post_init__(self) -> None:
        if self.calls < 1 or self.nodes < 2 or self.workers < 1:
            raise ValueError("need calls >= 1, nodes >= 2 (one is killed), workers >= 1")
        if self.outage_mode not in ("503", "abort"):
            raise ValueError("outage_mode must be 503 or abort")
        if not 0 < self.outage_at < 1 or self.crm_outage_s <= 0:
            raise ValueError("outage_at must be in (0, 1) and the outage > 0 s")


class EffectsRun:
    """The live part of one run against processes already started: the callers, the
    outage with the kill in it, the wait for delivery, and the report."""

    def __init__(
        self, scenario: EffectsScenario, cluster: LocalCluster, crm: Proc, workers: list[Proc]
    ) -> None:
        self.s = scenario
        self.cluster = cluster
        self.crm = crm
        self.workers = workers
        self.total_turns = scenario.calls * len(BOOKING)
        self.done_turns = 0
        self.trigger = asyncio.Event()
        self.t0 = time.monotonic()
        # Wall clock of a monotonic instant: the CRM and JetStream stamp in wall time.
        self.wall_offset = time.time() - time.monotonic()
        self.outage: tuple[float, float] | None = None  # wall seconds
        self.kill: dict[str, Any] = {}
        self.bar = tqdm(total=self.total_turns, desc="turns", unit="turn", leave=False)

    def _rel(self, wall: float) -> float:
        return round(wall - self.wall_offset - self.t0, 2)

    def _on_turn(self) -> None:
        self.done_turns += 1
        self.bar.update(1)
        if self.done_turns >= self.s.outage_at * self.total_turns:
            self.trigger.set()

    async def caller(self, call_id: str, rng: random.Random) -> CallResult:
        await asyncio.sleep(rng.uniform(0, self.s.ramp_s))
        return await scripted_call(
            self.cluster.router_url,
            call_id,
            len(BOOKING),
            tenant=TENANT,
            seed=self.s.seed,
            think_s=self.s.think_s,
            on_turn=self._on_turn,
        )

    async def set_crm(self, http: aiohttp.ClientSession, mode: str) -> None:
        await set_crm_mode(http, self.crm.url, mode)

    async def chaos(self, http: aiohttp.ClientSession) -> None:
        """The outage, with the kill halfway through it (while effects are backing off)."""
        await self.trigger.wait()
        await self.set_crm(http, self.s.outage_mode)
        down = time.time()
        say(f"CRM down ({self.s.outage_mode}) at +{self._rel(down)}s for {self.s.crm_outage_s}s")
        try:
            await asyncio.sleep(self.s.crm_outage_s / 2)
            if self.s.kill:
                await self.kill_busiest()
            await asyncio.sleep(self.s.crm_outage_s - (time.time() - down))
        finally:
            # Shielded: the outage must end even if the run is being torn down.
            await asyncio.shield(self.set_crm(http, "up"))
            self.outage = (down, time.time())
            say(f"CRM up at +{self._rel(self.outage[1])}s")

    async def kill_busiest(self) -> None:
        status = await asyncio.to_thread(self.cluster.status) or {}
        nodes = status.get("nodes")
        live = [n for n in nodes if isinstance(n, dict)] if isinstance(nodes, list) else []
        alive = {p.name for p in self.cluster.nodes if p.alive()}
        ranked = sorted(
            (n for n in live if n.get("node") in alive), key=lambda n: -int(n.get("calls", 0))
        )
        if not ranked:
            raise RuntimeError(f"no live node to kill; router status: {status}")
        name = str(ranked[0]["node"])
        victim = next(p for p in self.cluster.nodes if p.name == name)
        victim.signal(signal.SIGKILL)
        at = time.time()
        calls = int(ranked[0].get("calls", 0))
        self.kill = {"node": name, "at_s": self._rel(at), "live_calls": calls}
        say(f"SIGKILL {name} ({calls} live calls) at +{self._rel(at)}s")

    async def go(self) -> dict[str, Any]:
        prefix = uuid.uuid4().hex[:6]
        rng = random.Random(self.s.seed)
        async with aiohttp.ClientSession() as http:
            chaos = asyncio.create_task(self.chaos(http), name="effects-chaos")
            try:
                results = await asyncio.gather(
                    *(
                        self.caller(f"fx-{prefix}-{i}", random.Random(rng.random()))
                        for i in range(self.s.calls)
                    )
                )
                calls_done = time.monotonic()
                # Few calls can finish before the trigger: then the outage follows them.
                self.trigger.set()
                await chaos
            finally:
                self.bar.close()
                if not chaos.done():
                    chaos.cancel()
                await asyncio.gather(chaos, return_exceptions=True)
            bookings = self.bookings(results)
            ledger, settle_s = await self.settle(http, bookings)
            workers = [await self.worker_metrics(http, w) for w in self.workers]
        return self.report(results, bookings, ledger, workers, calls_done, settle_s)

    def bookings(self, results: list[CallResult]) -> list[Booking]:
        out = []
        for r in results:
            if len(r.replies) == len(BOOKING):
                reply = r.replies[-1]  # the reply to "Yes, book it"
                out.append(
                    Booking(
                        subjects.effect_msg_id(TENANT, r.call_id, reply.turn, 0),
                        # The simulated model's confirmation ("... is booked for Tuesday").
                        "booked" in reply.text,
                        reply.done_at + self.wall_offset,
                    )
                )
        return out

    async def settle(
        self, http: aiohttp.ClientSession, bookings: list[Booking]
    ) -> tuple[Ledger, float]:
        """Poll the witnesses until every expected effect is applied and the consumer is
        idle (so no late redelivery can still double-apply one), or the timeout."""
        start = time.monotonic()
        nc = await nats.connect(server_urls(self.cluster.nats_url))
        try:
            js = nc.jetstream()
            while True:
                ledger = await read_ledger(js, http, self.crm.url)
                missing = len(expected_keys(ledger, bookings) - set(ledger.applied))
                waited = time.monotonic() - start
                if (not missing and ledger.consumer_idle) or waited > self.s.settle_timeout_s:
                    return ledger, waited
                say(f"settling: {missing} effects not applied yet, {waited:.0f}s")
                await asyncio.sleep(1.0)
        finally:
            await nc.drain()

    async def worker_metrics(self, http: aiohttp.ClientSession, worker: Proc) -> dict[str, Any]:
        try:
            async with http.get(f"{worker.url}/healthz") as resp:
                return {"worker": worker.name, **(await resp.json())}
        except aiohttp.ClientError as exc:
            return {"worker": worker.name, "error": str(exc)}

    def report(
        self,
        results: list[CallResult],
        bookings: list[Booking],
        ledger: Ledger,
        workers: list[dict[str, Any]],
        calls_done: float,
        settle_s: float,
    ) -> dict[str, Any]:
        victim = self.kill.get("node")
        # Calls the victim answered and another node answered last: taken over mid-call.
        owners = [[x.metrics.get("node") for x in r.replies] for r in results]
        failed_over = sum(1 for o in owners if victim in o and o[-1] != victim)
        rep: dict[str, Any] = {
            "scenario": "effects",
            "params": asdict(self.s),
            "calls": len(results),
            "calls_completed": sum(1 for r in results if r.completed and not r.errors),
            "calls_booked": sum(1 for b in bookings if b.confirmed),
            "call_errors": sum(len(r.errors) for r in results),
            "error_samples": [e for r in results for e in r.errors][:5],
            "duplicate_replies": sum(r.duplicates for r in results),
            **score(ledger, bookings, self.outage),
            "outage": {
                "mode": self.s.outage_mode,
                "start_s": self._rel(self.outage[0]) if self.outage else None,
                "end_s": self._rel(self.outage[1]) if self.outage else None,
            },
            "kill": {**self.kill, "calls_failed_over": failed_over} if self.kill else None,
            # Failed attempts the workers nak'ed for a later retry (the outage at work).
            "worker_retries": sum(int(w.get("retried", 0)) for w in workers),
            "workers": workers,
            "durations_s": {
                "calls": round(calls_done - self.t0, 2),
                "settle": round(settle_s, 2),
            },
        }
        rep["pass"] = {
            "delivered_eq_expected": rep["effects_expected"] > 0
            and rep["effects_delivered"] == rep["effects_expected"],
            "no_duplicates": rep["effects_duplicated"] == 0 and rep["effects_unexpected"] == 0,
            "no_dead_letters": rep["effects_dead_lettered"] == 0,
            "every_call_booked": rep["calls_booked"] == rep["calls"],
            "outage_and_kill_happened": self.outage is not None
            and (bool(self.kill) or not self.s.kill),
        }
        return rep
