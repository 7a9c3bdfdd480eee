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
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats

from callmesh_client.client import CallClient, CallError, Reply
from events import subjects
from events.connection import server_urls
from loadtest import chaos_faults, chaos_routers
from loadtest.callers import NAMES, script
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
    p.add_argument("--json", dest="json_path")
    p.add_argument("--html", dest="html_path", help="write a self-contained HTML report here")
    p.add_argument(
        "--log-dir",
        help="keep the cluster's process logs in this directory, at INFO (default: WARNING, "
        "discarded)",
    )
    add_progress_flag(p)
    p.set_defaults(func=main)


@dataclass
class ChaosCall:
    call_id: str
    name: str
    ready_node: str = ""
    replies: list[Reply] = field(default_factory=list)
    sent: int = 0
    duplicates: int = 0
    errors: list[str] = field(default_factory=list)
    ended_at: float | None = None


class Chaos:
    def __init__(self, args: argparse.Namespace, cluster: LocalCluster) -> None:
        self.args = args
        self.cluster = cluster
        self.total_turns = args.calls * args.turns
        self.done_turns = 0
        self.trigger = asyncio.Event()
        self.kill_at: float | None = None
        self.victims: list[Proc] = []
        self.timeline = Timeline()
        self.backend_victims: list[str] = []
        self.call_ids: list[str] = []

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
        await self.trigger.wait()
        count = self.args.kill or self.args.drain
        self.victims = chaos_faults.busiest_nodes(self.cluster, count)
        self.kill_at = time.monotonic()
        sig = chaos_faults.strike_nodes(self.args, self.victims)
        kind = "kill" if self.args.kill else "drain"
        for victim in self.victims:
            self.timeline.fault(kind, victim.name, sig.name, at=self.kill_at)
        self.backend_victims = await asyncio.to_thread(
            chaos_faults.strike_backends, self.args, self.cluster, self.call_ids
        )
        for name in self.backend_victims:
            self.timeline.fault("kill", name, "SIGKILL", at=self.kill_at)
        # A drained node's exit marks the end of its drain on the report's time line.
        draining = list(self.victims) if self.args.drain else []
        while draining:
            await asyncio.sleep(0.1)
            for v in [v for v in draining if not v.alive()]:
                draining.remove(v)
                code = v.popen.returncode if v.popen else None
                self.timeline.fault("exited", v.name, f"exit code {code}")

    async def run(self) -> list[ChaosCall]:
        prefix = uuid.uuid4().hex[:6]
        self.call_ids = [f"chaos-{prefix}-{i}" for i in range(self.args.calls)]
        striker = asyncio.create_task(self.strike(), name="chaos-strike")
        show = progress_wanted(self.args.no_progress)
        try:
            async with LiveProgress(
                self.timeline, "chaos", total_turns=self.total_turns, enabled=show
            ):
                calls = await asyncio.gather(
                    *(self.caller(call_id, i) for i, call_id in enumerate(self.call_ids))
                )
        finally:
            if not striker.done():
                striker.cancel()
            await asyncio.gather(striker, return_exceptions=True)
        return list(calls)


def _owner_at(call: ChaosCall, t: float) -> str:
    owner = call.ready_node
    for r in call.replies:
        if r.done_at <= t:
            owner = str(r.metrics.get("node", owner))
    return owner


def score(calls: list[ChaosCall], victims: set[str], kill_at: float | None) -> dict[str, Any]:
    gaps: list[float] = []
    answering: list[float] = []  # of each gap, the new owner's retrieval and model time
    samples: list[tuple[float, str, float, float]] = []
    # Gaps of turns whose reply had not started before the kill, and of those the caller
    # was already receiving: the new owner's first frame the caller lacks then comes after
    # the part it already has (identical frames are not sent twice).
    by_case: dict[str, list[float]] = {"reply_not_started": [], "reply_under_way": []}
    affected = context_lost = 0
    for call in calls:
        if kill_at is None or _owner_at(call, kill_at) not in victims:
            continue
        if call.ended_at is not None and call.ended_at <= kill_at:
            continue
        if not any(r.done_at > kill_at for r in call.replies) and not call.errors:
            continue  # its last turn finished before the kill and it only hung up after
        affected += 1
        after = [
            r for r in call.replies if r.done_at > kill_at and r.metrics.get("node") not in victims
        ]
        if not after:
            continue
        first = after[0]
        frames = [t for t in first.frame_times if t > kill_at] or [first.done_at]
        gaps.append((frames[0] - max(kill_at, first.sent_at)) * 1000)
        metrics = first.metrics
        answering.append(
            float(metrics.get("retrieval_ms", 0)) + float(metrics.get("llm_first_sentence_ms", 0))
        )
        samples.append((gaps[-1], call.call_id, answering[-1], (first.sent_at - kill_at) * 1000))
        under_way = any(t <= kill_at for t in first.frame_times)
        by_case["reply_under_way" if under_way else "reply_not_started"].append(gaps[-1])
        knew_name = any(r.done_at <= kill_at for r in call.replies)
        if knew_name and call.name not in first.text:
            context_lost += 1
    return {
        "affected_calls": affected,
        "failover_gap_ms": percentiles(gaps, (50, 99)),
        # What the gap is made of: the new owner answering (retrieval and the model's first
        # sentence, from its turn metrics), and the rest (detection, relink, ownership,
        # restore, waiting for the new owner's loop).
        "failover_gap_parts_ms": {
            "answering": percentiles(answering, (50, 99)),
            "failover": percentiles([g - a for g, a in zip(gaps, answering, strict=True)]),
        },
        "failover_gap_by_case_ms": {k: percentiles(v, (50, 99)) for k, v in by_case.items()},
        # The slowest gaps, to look up in the logs: call, gap, answering, and when the
        # utterance was sent (ms, relative to the kill).
        "slowest_gaps": [
            {"call_id": c, "gap_ms": round(g), "answering_ms": round(a), "sent_ms": round(t)}
            for g, c, a, t in sorted(samples, reverse=True)[:5]
        ],
        "lost_turns": sum(c.sent - len(c.replies) for c in calls),
        "duplicate_replies": sum(c.duplicates for c in calls),
        "context_lost": context_lost,
    }


# The simulated agent's confirmation of a booking ("... is booked for ...") and its later
# reminders of it ("... is booked. Anything else ...") both say this.
BOOKED_WORD = "booked"
# After the calls end, nodes may still be publishing outboxes left by an outage: the
# effects are counted again until none is missing or this bound passes.
EFFECTS_SETTLE_S = 60.0


def confirmed_bookings(calls: list[ChaosCall]) -> set[str]:
    """The calls whose caller heard that their booking was made."""
    return {c.call_id for c in calls if any(BOOKED_WORD in r.text for r in c.replies)}


async def effects_per_call(nats_url: str) -> Counter[str]:
    """Bookings stored in the effects stream, per call."""
    nc = await nats.connect(server_urls(nats_url))
    try:
        js = nc.jetstream()
        info = await js.stream_info(subjects.EFFECTS_STREAM)
        per_call: Counter[str] = Counter()
        # An empty stream reports first_seq 0, which get_msg refuses (no call booked yet).
        first = max(1, info.state.first_seq)
        for seq in range(first, info.state.last_seq + 1):
            msg = await js.get_msg(subjects.EFFECTS_STREAM, seq)
            if msg.data:
                per_call[json.loads(msg.data)["call_id"]] += 1
        return per_call
    finally:
        await nc.drain()


async def _router_chaos(args: argparse.Namespace, cluster: LocalCluster) -> dict[str, Any]:
    timeline = Timeline()
    t0 = time.monotonic()
    show = progress_wanted(args.no_progress)
    total = args.calls * args.turns
    async with LiveProgress(timeline, "chaos", total_turns=total, enabled=show):
        rep = {"scenario": "chaos", "nodes": args.nodes}
        rep["backends"] = {
            k: v for k, v in vars(args).items() if k in ("redis_cluster", "nats_cluster") and v
        } or "single"
        rep.update(await chaos_routers.run(args, cluster, timeline))
    rep.update(await score_effects(cluster.nats_url, set(rep.pop("confirmed_bookings"))))
    rep["elapsed_s"] = round(time.monotonic() - t0, 2)
    rep.update(timeline.report())
    return rep


async def score_effects(nats_url: str, confirmed: set[str]) -> dict[str, Any]:
    """Bookings confirmed to callers (their call ids) against bookings stored (lost,
    duplicated), waiting (bounded) for the stream to settle."""
    deadline = time.monotonic() + EFFECTS_SETTLE_S
    started = time.monotonic()
    while True:
        per_call = await effects_per_call(nats_url)
        lost = sorted(c for c in confirmed if per_call[c] == 0)
        if not lost or time.monotonic() > deadline:
            break
        await asyncio.sleep(1.0)
    return {
        "bookings_confirmed": len(confirmed),
        "effects_stored": sum(per_call.values()),
        "lost_effects": len(lost),
        "lost_effect_samples": lost[:5],
        "effects_settle_s": round(time.monotonic() - started, 1),
        "duplicate_effects": sum(max(0, n - 1) for n in per_call.values()),
    }


def main(args: argparse.Namespace) -> int:
    # With a router fault, the node and backend faults asked for strike in the same moment
    # (loadtest.chaos_routers); a call is affected by either.
    routers_hit = chaos_routers.router_fault(args)
    if not (args.kill or args.drain or routers_hit):
        args.kill = 1
    env = {
        "CALLMESH_SIM_LATENCY_SCALE": str(args.latency_scale),
        "CALLMESH_TTS_CHUNK_MS": str(args.tts_chunk_ms),
        "CALLMESH_LOG_LEVEL": "INFO" if args.log_dir else "WARNING",
    }
    if (args.kill_redis_master and not args.redis_cluster) or (
        args.kill_nats and not args.nats_cluster
    ):
        print(
            "loadtest chaos: --kill-redis-master needs --redis-cluster, --kill-nats needs "
            "--nats-cluster",
            file=sys.stderr,
        )
        return 2
    clustered = {"redis_cluster": args.redis_cluster, "nats_cluster": args.nats_cluster}
    if routers_hit:
        env["CALLMESH_ROUTER_DRAIN_S"] = "20"
    if args.transport == "twilio":
        # The TwiML names the public URL, the 'load balancer' in front of the routers: the
        # simulated Twilio sends each request to a live router of its list instead. Its
        # webhooks are unsigned, which only development mode accepts.
        env["CALLMESH_PUBLIC_URL"] = "http://127.0.0.1:9"
        env["CALLMESH_DEV_MODE"] = "1"
    log_dir = Path(args.log_dir) if args.log_dir else None
    with LocalCluster(
        nodes=args.nodes, routers=args.routers, env=env, log_dir=log_dir, **clustered
    ) as cluster:

        async def go() -> dict[str, Any]:
            if routers_hit:
                return await _router_chaos(args, cluster)
            chaos = Chaos(args, cluster)
            t0 = time.monotonic()
            calls = await chaos.run()
            elapsed = time.monotonic() - t0
            victims = {v.name for v in chaos.victims}
            rep: dict[str, Any] = {
                "scenario": "chaos",
                "mode": "kill" if args.kill else "drain",
                "calls": len(calls),
                "nodes": args.nodes,
                "victims": sorted(victims),
                "backends": {k: v for k, v in clustered.items() if v} or "single",
                "backend_victims": chaos.backend_victims,
                "completed_calls": sum(1 for c in calls if c.ended_at and not c.errors),
                "turns": sum(len(c.replies) for c in calls),
            }
            rep.update(score(calls, victims, chaos.kill_at))
            rep.update(await score_effects(cluster.nats_url, confirmed_bookings(calls)))
            rep["errors"] = sum(len(c.errors) for c in calls)
            rep["error_samples"] = [e for c in calls for e in c.errors][:5]
            rep["turn_latency_ms"] = percentiles([r.latency_ms for c in calls for r in c.replies])
            if args.drain:
                codes = []
                for v in chaos.victims:
                    codes.append(v.popen.wait(30) if v.popen else None)
                rep["drained_exit_codes"] = codes
            rep["elapsed_s"] = round(elapsed, 2)
            rep["failover_gap_definition"] = (
                "per affected call: from max(kill, caller's next utterance) to the first reply "
                "frame from the new owner"
            )
            rep.update(chaos.timeline.report())
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
