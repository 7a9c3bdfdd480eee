"""``python -m loadtest chaos``: kill (or drain) a node in the middle of live calls.

Starts a local cluster, holds ``--calls`` concurrent multi-turn calls, and when 40% of all
turns are done sends SIGKILL (``--kill``) or SIGTERM (``--drain``) to the node holding the
most calls. Every caller keeps talking; the report scores what the callers experienced:

- ``affected_calls``: calls whose owner was the victim at that moment and had not ended;
- ``failover_gap_ms``: per affected call, from the later of the kill and the caller's next
  utterance to the first reply frame produced by the new owner (so a caller who was silent
  when the node died is not charged for their own silence);
- ``lost_turns``: utterances never answered; ``duplicate_replies``: reply frames received
  twice; ``duplicate_effects``: bookings applied twice at JetStream (per call);
- ``context_lost``: affected calls whose first reply after failover lacks the caller's name,
  which they gave before the failure;
- ``lost_effects``: calls told their booking was made with no booking in the effects
  stream (architecture invariant 4), counted once the effects stream has settled (nodes
  keep publishing what ended calls left in their outboxes after a backend outage).

Backends: ``--redis-cluster`` / ``--nats-cluster`` run on clustered backends (3 Valkey
masters + 3 replicas; 3 NATS servers, streams at R3). At the same moment as the node,
``--kill-redis-master`` SIGKILLs the Valkey master holding most calls' state (restarted once
its replica is promoted, as Kubernetes would, so it rejoins as a replica) and
``--kill-nats`` SIGKILLs one NATS server. The scoring is the same.

Routers (``--routers N --kill-router K | --drain-router K``, native or ``--transport
twilio`` callers): :mod:`loadtest.chaos_routers`. Node and backend faults asked for in the
same run strike in the same moment as the router's (:mod:`loadtest.chaos_faults`); a call
is then affected through its router or its node.

Composed faults (``--fault KIND[:ARG]@WHEN[+DURATION][/EVERY[xTIMES]]``, repeatable;
:mod:`loadtest.fault_schedule`): node kills and drains, a router kill or drain, Redis
restarts, NATS outages, CRM outages, a slow model and router<->node link latency, each at
its own moment (a share of the turns or seconds into the talk), for a window, or again on a
schedule, struck by :mod:`loadtest.fault_injector`. The report's ``events`` mark when each
started and (windows) ended, ``faults`` how often each spec struck; the scoring is the
same, over every node strike. A run with ``crm-outage`` also starts the fake CRM and an
effects worker and reports what the CRM applied (``crm_*``).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from callmesh_client.client import CallClient, CallError
from loadtest import chaos_faults, chaos_plan, chaos_routers
from loadtest.callers import NAMES, script
from loadtest.chaos_score import ChaosCall, confirmed_bookings, score, score_crm, score_effects
from loadtest.effects_procs import start_crm_and_workers
from loadtest.fault_injector import FaultInjector, FaultRunner
from loadtest.html_report import write_html
from loadtest.progress import LiveProgress, add_progress_flag, progress_wanted
from loadtest.stats import percentiles, run_meta, write_report
from loadtest.timeline import Timeline
from localcluster.cluster import LocalCluster, Proc


def add_parser(sub: Any) -> None:
    p = sub.add_parser("chaos", help="kill or drain a node mid-conversation; failover report")
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--turns", type=int, default=8)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--kill", type=int, default=0, help="SIGKILL this many nodes")
    group.add_argument("--drain", type=int, default=0, help="SIGTERM (drain) this many nodes")
    p.add_argument("--think", type=float, default=1.0, help="mean pause between turns, s")
    p.add_argument("--latency-scale", type=float, default=1.0)
    p.add_argument("--tts-chunk-ms", type=int, default=500)
    p.add_argument("--redis-cluster", action="store_true", help="Valkey cluster, 3+3")
    p.add_argument("--nats-cluster", action="store_true", help="3 NATS servers, R3 streams")
    p.add_argument("--kill-redis-master", action="store_true", help="needs --redis-cluster")
    p.add_argument("--kill-nats", action="store_true", help="needs --nats-cluster")
    chaos_routers.add_router_flags(p)
    chaos_plan.add_fault_flag(p)
    p.add_argument("--json", dest="json_path")
    p.add_argument("--html", dest="html_path", help="write a self-contained HTML report here")
    p.add_argument(
        "--log-dir",
        help="keep the cluster's process logs in this directory, at INFO (default: WARNING, "
        "discarded)",
    )
    add_progress_flag(p)
    p.set_defaults(func=main)


class Chaos:
    """Callers through one router; the classic strike (``--kill``/``--drain`` and the
    backend flags at 40 % of the turns) and the ``--fault`` schedule."""

    def __init__(
        self, args: argparse.Namespace, cluster: LocalCluster, plan: chaos_plan.Plan
    ) -> None:
        self.args = args
        self.cluster = cluster
        self.total_turns = args.calls * args.turns
        self.done_turns = 0
        self.trigger = asyncio.Event()
        self.kill_at: float | None = None
        self.victims: list[Proc] = []
        self.timeline = Timeline()
        self.backend_victims: list[str] = []
        self.failed_shard: set[str] = set()  # calls whose Valkey master was killed
        prefix = uuid.uuid4().hex[:6]
        self.call_ids = [f"chaos-{prefix}-{i}" for i in range(args.calls)]
        self.injector = FaultInjector(
            cluster, self.timeline, call_ids=self.call_ids, crm_url=plan.crm_url
        )
        self.runner = FaultRunner(plan.specs, self.injector, self.total_turns)

    @property
    def strikes(self) -> list[tuple[float, set[str]]]:
        """Every node strike: the classic one and the scheduled ones."""
        classic = [(self.kill_at, {v.name for v in self.victims})] if self.kill_at else []
        return classic + self.injector.node_strikes

    async def caller(self, call_id: str, seed: int) -> ChaosCall:
        rng = random.Random(seed)
        call = ChaosCall(call_id, rng.choice(NAMES))
        try:
            async with CallClient(self.cluster.router_url, call_id, timeout_s=60) as client:
                call.ready_node = (await client.start("demo", f"caller-{call_id}"))["node"]
                self.timeline.call_started()
                await asyncio.sleep(rng.uniform(0, self.args.think))
                for line in script(self.args.turns):
                    call.sent += 1
                    call.replies.append(await client.say(line.format(name=call.name)))
                    self.timeline.turn(call.replies[-1].latency_ms)
                    self.done_turns += 1
                    self.runner.turn_done()
                    if self.done_turns >= 0.4 * self.total_turns:
                        self.trigger.set()
                    await asyncio.sleep(rng.uniform(0.5, 1.5) * self.args.think)
                await client.hangup()
                call.ended_at = time.monotonic()
                call.duplicates = client.duplicates
        except (CallError, OSError, TimeoutError) as exc:
            call.errors.append(f"{type(exc).__name__}: {exc}")
            self.timeline.error()
        if call.ready_node:
            self.timeline.call_ended()
        return call

    async def strike(self) -> None:
        if not (chaos_faults.node_fault(self.args) or chaos_faults.backend_fault(self.args)):
            return  # only --fault specs: the runner strikes them
        await self.trigger.wait()
        count = self.args.kill or self.args.drain
        self.victims = chaos_faults.busiest_nodes(self.cluster, count)
        at = time.monotonic()
        sig = chaos_faults.strike_nodes(self.args, self.victims)
        kind = "kill" if self.args.kill else "drain"
        for victim in self.victims:
            self.timeline.fault(kind, victim.name, sig.name, at=at)
        self.kill_at = at if self.victims else None
        if self.args.kill_redis_master and self.cluster.backends is not None:
            # The calls whose state is on the master about to be killed: their gaps wait
            # for its replica's promotion, reported apart (failover_gap_by_shard_ms).
            _, self.failed_shard = chaos_faults.busiest_master(self.cluster, self.call_ids)
        self.backend_victims = await asyncio.to_thread(
            chaos_faults.strike_backends, self.args, self.cluster, self.call_ids
        )
        for name in self.backend_victims:
            self.timeline.fault("kill", name, "SIGKILL", at=at)
        # A drained node's exit marks the end of its drain on the report's time line.
        draining = list(self.victims) if self.args.drain else []
        while draining:
            await asyncio.sleep(0.1)
            for v in [v for v in draining if not v.alive()]:
                draining.remove(v)
                code = v.popen.returncode if v.popen else None
                self.timeline.fault("exited", v.name, f"exit code {code}")

    async def run(self) -> list[ChaosCall]:
        striker = asyncio.create_task(self.strike(), name="chaos-strike")
        show = progress_wanted(self.args.no_progress)
        try:
            async with (
                LiveProgress(self.timeline, "chaos", total_turns=self.total_turns, enabled=show),
                self.runner,
            ):
                calls = await asyncio.gather(
                    *(self.caller(call_id, i) for i, call_id in enumerate(self.call_ids))
                )
        finally:
            if not striker.done():
                striker.cancel()
            await asyncio.gather(striker, return_exceptions=True)
        return list(calls)


async def _router_chaos(
    args: argparse.Namespace, cluster: LocalCluster, plan: chaos_plan.Plan
) -> dict[str, Any]:
    timeline = Timeline()
    t0 = time.monotonic()
    show = progress_wanted(args.no_progress)
    total = args.calls * args.turns
    injector = FaultInjector(cluster, timeline, crm_url=plan.crm_url)
    runner = FaultRunner(plan.specs, injector, total)
    async with (
        LiveProgress(timeline, "chaos", total_turns=total, enabled=show),
        runner,
    ):
        rep = {"scenario": "chaos", "nodes": args.nodes}
        rep["backends"] = {
            k: v for k, v in vars(args).items() if k in ("redis_cluster", "nats_cluster") and v
        } or "single"
        rep.update(
            await chaos_routers.run(
                args, cluster, timeline, at=plan.router_at, on_turn=runner.turn_done
            )
        )
    rep.update(await score_effects(cluster.nats_url, set(rep.pop("confirmed_bookings"))))
    rep["faults"] = plan.router_report(rep) + runner.report()
    rep["elapsed_s"] = round(time.monotonic() - t0, 2)
    rep.update(timeline.report())
    return rep


async def _node_chaos(
    args: argparse.Namespace, cluster: LocalCluster, plan: chaos_plan.Plan
) -> dict[str, Any]:
    chaos = Chaos(args, cluster, plan)
    t0 = time.monotonic()
    calls = await chaos.run()
    elapsed = time.monotonic() - t0
    victims = {name for _, names in chaos.strikes for name in names}
    rep: dict[str, Any] = {
        "scenario": "chaos",
        "mode": ("kill" if args.kill else "drain") if chaos_faults.node_fault(args) else "faults",
        "calls": len(calls),
        "nodes": args.nodes,
        "victims": sorted(victims),
        "backends": {k: v for k, v in plan.clustered.items() if v} or "single",
        "backend_victims": chaos.backend_victims,
        "completed_calls": sum(1 for c in calls if c.ended_at and not c.errors),
        "turns": sum(len(c.replies) for c in calls),
    }
    rep.update(score(calls, chaos.strikes, chaos.failed_shard))
    rep.update(await score_effects(cluster.nats_url, confirmed_bookings(calls)))
    rep["errors"] = sum(len(c.errors) for c in calls)
    rep["error_samples"] = [e for c in calls for e in c.errors][:5]
    rep["turn_latency_ms"] = percentiles([r.latency_ms for c in calls for r in c.replies])
    if args.drain:
        codes = []
        for v in chaos.victims:
            codes.append(v.popen.wait(30) if v.popen else None)
        rep["drained_exit_codes"] = codes
    if chaos.injector.drained:
        rep["scheduled_drain_exit_codes"] = [
            v.popen.returncode if v.popen else None for v in chaos.injector.drained
        ]
    rep["faults"] = chaos.runner.report()
    rep["elapsed_s"] = round(elapsed, 2)
    rep["failover_gap_definition"] = (
        "per affected call and node strike: from max(strike, caller's next utterance) to "
        "the first reply frame from the new owner"
    )
    rep.update(chaos.timeline.report())
    return rep


def main(args: argparse.Namespace) -> int:
    plan = chaos_plan.plan(args)
    if isinstance(plan, str):
        print(f"loadtest chaos: {plan}", file=sys.stderr)
        return 2
    env = {
        "CALLMESH_SIM_LATENCY_SCALE": str(args.latency_scale),
        "CALLMESH_TTS_CHUNK_MS": str(args.tts_chunk_ms),
        "CALLMESH_LOG_LEVEL": "INFO" if args.log_dir else "WARNING",
    }
    if plan.routers_hit:
        env["CALLMESH_ROUTER_DRAIN_S"] = "20"
    if args.transport == "twilio":
        # The TwiML names the public URL, the 'load balancer' in front of the routers: the
        # simulated Twilio sends each request to a live router of its list instead. Its
        # webhooks are unsigned, which only development mode accepts.
        env["CALLMESH_PUBLIC_URL"] = "http://127.0.0.1:9"
        env["CALLMESH_DEV_MODE"] = "1"
    log_dir = Path(args.log_dir) if args.log_dir else None
    with ExitStack() as stack:
        cluster = stack.enter_context(
            LocalCluster(
                nodes=args.nodes,
                routers=args.routers,
                env=env,
                log_dir=log_dir,
                link_proxy=plan.link_proxy,
                llm_control=plan.llm_control,
                redis_cluster=plan.clustered["redis_cluster"],
                nats_cluster=plan.clustered["nats_cluster"],
            )
        )
        if plan.crm:
            crm, _ = start_crm_and_workers(
                stack, cluster, 1, nats_cluster=plan.clustered["nats_cluster"]
            )
            plan.crm_url = crm.url

        async def go() -> dict[str, Any]:
            go_chaos = _router_chaos if plan.routers_hit else _node_chaos
            rep = await go_chaos(args, cluster, plan)
            if plan.crm_url is not None:
                rep.update(await score_crm(plan.crm_url, int(rep["effects_stored"])))
            return rep

        report = asyncio.run(go())
    report["meta"] = run_meta()
    write_report(report, args.json_path)
    if args.html_path:
        write_html(report, Path(args.html_path))
    ok = all(
        report[k] == 0
        for k in (
            "lost_turns",
            "duplicate_replies",
            "duplicate_effects",
            "context_lost",
            "lost_effects",
        )
    )
    return 0 if ok else 1
