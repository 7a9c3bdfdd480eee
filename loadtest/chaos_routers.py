"""Router faults for ``loadtest chaos`` (``--routers N --kill-router K | --drain-router K``),
for native and Twilio callers (``--transport``).

Every caller knows several routers: a native caller its list of router URLs (each call
starts on a different one), a Twilio caller the routers behind the 'load balancer' of its
simulated Twilio (:class:`callmesh_client.twilio_phone.TwilioPhone`). When the fault comes,
the routers serving the most calls are the victims; a call is *affected* when it was
connected through a victim then and had not ended. Scoring, per affected call:

- gap: from the later of the fault and the moment the caller's next utterance was over
  (as it would have been without the fault) to the first reply after the fault. Native:
  the first reply frame; Twilio: the first agent audio;
- lost turns: utterances never answered; duplicate replies: native, reply frames received
  twice; Twilio, turns the node took beyond the utterances spoken (from the checkpoint);
- context lost: native, the first reply after the fault lacks the caller's name given
  before it; Twilio, the call's checkpoint does not hold the name the caller gave.

Twilio callers behave like people (``VoiceCaller(repeat_after_s=...)``): nobody on a phone
knows that the media stream behind the line was replaced, so they talk on their own
schedule, and what they say while no stream exists (between the old stream's end and the
new one's start) reaches nobody. A caller who hears no answer within
:data:`REPEAT_AFTER_S` of the end of an utterance says it again (at most
:data:`MAX_REPEATS` times). Scored so:

- an utterance answered only after the caller repeated it is not lost, and counts once
  (a node that answered both the original and the repeat shows as a duplicate reply);
- its gap runs from the end of its *first* saying, so the caller's patience is in it; the
  gaps are reported apart: ``failover_gap_ms`` for the affected calls whose next utterance
  reached callmesh (answered without a repeat: the failover's own cost), and
  ``repeated_gap_ms`` with ``repeated_utterances`` for those whose utterance fell, whole
  or in part, in the gap between streams; ``all_gap_ms`` has both.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from callmesh.audio.tones import speech_from_text
from callmesh_client.client import CallClient, CallError
from callmesh_client.reconnect import ReconnectPolicy
from callmesh_client.twilio_phone import TwilioPhone
from callmesh_client.voice_client import VoiceCaller, VoiceCallError
from callmesh_client.voice_results import TurnResult
from loadtest import chaos_faults
from loadtest.callers import NAMES, script
from loadtest.fault_schedule import When
from loadtest.stats import percentiles
from loadtest.timeline import Timeline
from localcluster.cluster import LocalCluster, Proc
from state_store.client import connect
from state_store.pins import PinStore
from state_store.store import StateStore

SPEECH_BYTES_PER_S = 8000  # mu-law 8 kHz
# A caller hearing nothing this long after finishing an utterance says it again (s); the
# simulated agent's replies start within about 0.5 s at these loads, so only an utterance
# that nobody heard is repeated.
REPEAT_AFTER_S = 3.0
# What the simulated agent says of a booking it made (loadtest.chaos scores the effects).
BOOKED_WORD = "booked"
MAX_REPEATS = 2


def add_router_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--routers", type=int, default=1, help="routers of the local cluster")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--kill-router", type=int, default=0, help="SIGKILL this many routers")
    group.add_argument(
        "--drain-router", type=int, default=0, help="SIGTERM (drain) this many routers"
    )
    p.add_argument("--transport", choices=("native", "twilio"), default="native")


def router_fault(args: argparse.Namespace) -> bool:
    return bool(args.kill_router or args.drain_router)


@dataclass
class RouterCall:
    call_id: str
    name: str
    sent: int = 0
    answered: int = 0
    duplicates: int = 0
    errors: list[str] = field(default_factory=list)
    ended_at: float | None = None
    router: str = ""  # the router the call is connected through right now
    router_at_fault: str = ""
    node_at_fault: str = ""  # the call's node then, if a victim of --kill / --drain
    # (utterance end as planned, first reply after it, reply text, times the caller
    # repeated it) per answered turn
    turns: list[tuple[float, float, str, int]] = field(default_factory=list)
    repeated: int = 0  # utterances said again (Twilio): unanswered, answered or not


def _rotated(urls: list[str], i: int) -> list[str]:
    k = i % len(urls)
    return urls[k:] + urls[:k]


class RouterChaos:
    """Callers over several routers, and the router fault in the middle of them."""

    def __init__(self, args: argparse.Namespace, cluster: LocalCluster, on_turn: Any) -> None:
        self.args = args
        self.cluster = cluster
        self.on_turn = on_turn  # called after every answered turn (progress, trigger)
        self.calls: list[RouterCall] = []
        self.fault_at: float | None = None
        self.victims: list[Proc] = []  # routers
        self.node_victims: list[Proc] = []
        self.backend_victims: list[str] = []

    async def caller(self, call_id: str, seed: int, started: Any) -> RouterCall:
        rng = random.Random(seed)
        call = RouterCall(call_id, rng.choice(NAMES))
        self.calls.append(call)
        urls = _rotated(self.cluster.router_urls, seed)
        try:
            if self.args.transport == "twilio":
                await self._twilio(call, urls, rng, started)
            else:
                await self._native(call, urls, rng, started)
            call.ended_at = time.monotonic()
        except (CallError, VoiceCallError, OSError, TimeoutError) as exc:
            call.errors.append(f"{type(exc).__name__}: {exc}")
        return call

    async def _native(
        self, call: RouterCall, urls: list[str], rng: random.Random, started: Any
    ) -> None:
        policy = ReconnectPolicy(give_up_after_s=30)
        async with CallClient(urls, call.call_id, timeout_s=60, reconnect=policy) as client:
            await client.start("demo", f"caller-{call.call_id}")
            started()
            await asyncio.sleep(rng.uniform(0, self.args.think))
            for line in script(self.args.turns):
                call.router = client.router_url
                call.sent += 1
                reply = await client.say(line.format(name=call.name))
                call.router = client.router_url
                planned_end = reply.sent_at
                first = reply.frame_times[0] if reply.frame_times else reply.done_at
                if self.fault_at is not None and reply.frame_times:
                    after = [t for t in reply.frame_times if t > self.fault_at]
                    first = after[0] if after else first
                call.turns.append((planned_end, first, reply.text, 0))
                call.answered += 1
                self.on_turn(reply.latency_ms)
                await asyncio.sleep(rng.uniform(0.5, 1.5) * self.args.think)
            await client.hangup()
            call.duplicates = client.duplicates

    async def _twilio(
        self, call: RouterCall, urls: list[str], rng: random.Random, started: Any
    ) -> None:
        phone = TwilioPhone(urls, call.call_id, "demo", give_up_after_s=30)
        async with VoiceCaller(
            urls[0],
            call.call_id,
            "demo",
            phone=phone,
            timeout_s=30,
            timestamps="sent",
            repeat_after_s=REPEAT_AFTER_S,
            max_repeats=MAX_REPEATS,
        ) as caller:
            call.router = _router_of(phone, urls)
            started()
            await caller.wait_greeting()
            await asyncio.sleep(rng.uniform(0, self.args.think))
            for line in script(self.args.turns):
                text = line.format(name=call.name)
                call.sent += 1
                t0 = time.monotonic()
                result: TurnResult = await caller.say(text)
                call.router = _router_of(phone, urls)
                call.repeated += result.repeats
                if result.first_audio_at is not None and not result.timed_out:
                    planned_end = t0 + len(speech_from_text(text)) / SPEECH_BYTES_PER_S
                    call.turns.append((planned_end, result.first_audio_at, "", result.repeats))
                    call.answered += 1
                    self.on_turn(result.response_ms or 0.0)
                await asyncio.sleep(rng.uniform(0.5, 1.5) * self.args.think)
            await caller.hangup()

    async def strike(self) -> None:
        """SIGKILL or SIGTERM the routers serving the most calls; in the same moment, the
        nodes and backends the other fault flags name (:mod:`loadtest.chaos_faults`)."""
        args = self.args
        live = [c for c in self.calls if c.ended_at is None]
        by_router: dict[str, int] = {}
        for c in live:
            by_router[c.router] = by_router.get(c.router, 0) + 1
        count = args.kill_router or args.drain_router
        ranked = sorted(self.cluster.all_routers, key=lambda p: -by_router.get(p.url, 0))
        self.victims = ranked[:count]
        victim_urls = {p.url for p in self.victims}
        if chaos_faults.node_fault(args):
            count = args.kill or args.drain
            self.node_victims = await asyncio.to_thread(
                chaos_faults.busiest_nodes, self.cluster, count
            )
            pins = await _pins(self.cluster.redis_url, [c.call_id for c in live])
            victim_nodes = {p.name for p in self.node_victims}
            for c in live:
                c.node_at_fault = pins.get(c.call_id) or ""
                c.node_at_fault = c.node_at_fault if c.node_at_fault in victim_nodes else ""
        self.fault_at = time.monotonic()
        for c in live:
            c.router_at_fault = c.router if c.router in victim_urls else ""
        sig = signal.SIGKILL if args.kill_router else signal.SIGTERM
        for p in self.victims:
            p.signal(sig)
        chaos_faults.strike_nodes(args, self.node_victims)
        if chaos_faults.backend_fault(args):
            ids = [c.call_id for c in self.calls]
            self.backend_victims = await asyncio.to_thread(
                chaos_faults.strike_backends, args, self.cluster, ids
            )

    async def confirmed_bookings(self) -> set[str]:
        """The calls whose caller was told their booking was made: native, a reply said
        so; Twilio (audio only), the agent's words in the call's checkpoint say so."""
        if self.args.transport != "twilio":
            return {c.call_id for c in self.calls if any(BOOKED_WORD in t[2] for t in c.turns)}
        checkpoints = await _checkpoints(self.cluster.redis_url, [c.call_id for c in self.calls])
        return {
            call_id
            for call_id, ckpt in checkpoints.items()
            if ckpt is not None and BOOKED_WORD in str(ckpt.working)
        }

    async def score(self) -> dict[str, Any]:
        fault_at = self.fault_at
        gaps: list[float] = []
        repeated_gaps: list[float] = []
        affected = context_lost = 0
        extra_turns = 0
        twilio = self.args.transport == "twilio"
        checkpoints = (
            await _checkpoints(self.cluster.redis_url, [c.call_id for c in self.calls])
            if twilio
            else {}
        )
        for call in self.calls:
            if twilio:
                ckpt = checkpoints.get(call.call_id)
                took = ckpt.turn if ckpt is not None else 0
                extra_turns += max(0, took - call.sent)
            if fault_at is None or not (call.router_at_fault or call.node_at_fault):
                continue
            affected += 1
            after = [t for t in call.turns if t[1] > fault_at]
            if after:
                end, first, _, repeats = after[0]
                gap = (first - max(fault_at, end)) * 1000
                (repeated_gaps if repeats else gaps).append(gap)
            knew_name = any(t[1] <= fault_at for t in call.turns)
            if not knew_name:
                continue
            if twilio:
                ckpt = checkpoints.get(call.call_id)
                names = ckpt.facts.get("name", []) if ckpt is not None else []
                if not names or names[0] != call.name:
                    context_lost += 1
            elif after and call.name not in after[0][2]:
                context_lost += 1
        duplicates = extra_turns if twilio else sum(c.duplicates for c in self.calls)
        return {
            "affected_calls": affected,
            "failover_gap_ms": percentiles(gaps, (50, 99)),
            "repeated_utterances": sum(c.repeated for c in self.calls),
            "repeated_gap_ms": percentiles(repeated_gaps, (50, 99)),
            "all_gap_ms": percentiles(gaps + repeated_gaps, (50, 99)),
            "lost_turns": sum(c.sent - c.answered for c in self.calls),
            "duplicate_replies": duplicates,
            "context_lost": context_lost,
        }


async def run(
    args: argparse.Namespace,
    cluster: LocalCluster,
    timeline: Timeline,
    *,
    at: When | None = None,
    on_turn: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Hold ``--calls`` calls, strike the routers at ``at`` (default: 40 % of the turns
    done); the report. ``on_turn`` hears of every answered turn (the --fault schedule)."""
    total = args.calls * args.turns
    share = 0.4 if at is None or at.share is None else at.share
    done = 0
    trigger = asyncio.Event()

    def turn_done(latency_ms: float) -> None:
        nonlocal done
        done += 1
        timeline.turn(latency_ms)
        if on_turn is not None:
            on_turn()
        if done >= share * total:
            trigger.set()

    chaos = RouterChaos(args, cluster, turn_done)

    async def strike() -> None:
        await (asyncio.sleep(at.seconds) if at and at.seconds is not None else trigger.wait())
        await chaos.strike()
        kind = "kill-router" if args.kill_router else "drain-router"
        for v in chaos.victims:
            timeline.fault(kind, v.name, kind, at=chaos.fault_at)
        node_kind = "kill" if args.kill else "drain"
        for v in chaos.node_victims:
            timeline.fault(node_kind, v.name, node_kind, at=chaos.fault_at)
        for name in chaos.backend_victims:
            timeline.fault("kill", name, "SIGKILL", at=chaos.fault_at)

    prefix = uuid.uuid4().hex[:6]
    striker = asyncio.create_task(strike(), name="chaos-router-strike")
    try:

        async def one(i: int) -> RouterCall:
            call = await chaos.caller(f"CA{prefix}r{i}", i, timeline.call_started)
            if call.sent:
                timeline.call_ended()
            return call

        calls = await asyncio.gather(*(one(i) for i in range(args.calls)))
    finally:
        if not striker.done():
            striker.cancel()
        await asyncio.gather(striker, return_exceptions=True)
    rep: dict[str, Any] = {
        "mode": "kill-router" if args.kill_router else "drain-router",
        "transport": args.transport,
        "routers": args.routers,
        "victims": sorted(v.name for v in chaos.victims),
        "node_victims": sorted(v.name for v in chaos.node_victims),
        "backend_victims": chaos.backend_victims,
        "affected_by_router": sum(1 for c in calls if c.router_at_fault),
        "affected_by_node": sum(1 for c in calls if c.node_at_fault),
        "calls": len(calls),
        "completed_calls": sum(1 for c in calls if c.ended_at and not c.errors),
        "turns": sum(c.answered for c in calls),
    }
    rep.update(await chaos.score())
    rep["errors"] = sum(len(c.errors) for c in calls)
    rep["error_samples"] = [e for c in calls for e in c.errors][:5]
    if args.drain_router:
        rep["drained_exit_codes"] = [
            await asyncio.to_thread(v.popen.wait, 60) if v.popen else None for v in chaos.victims
        ]
    if args.drain:
        rep["drained_node_exit_codes"] = [
            await asyncio.to_thread(v.popen.wait, 60) if v.popen else None
            for v in chaos.node_victims
        ]
    rep["confirmed_bookings"] = sorted(await chaos.confirmed_bookings())
    rep["failover_gap_definition"] = (
        "per affected call: from max(router fault, the end of the caller's next utterance as "
        "planned, its first saying if it was repeated) to the first reply frame (native) or "
        "agent audio (Twilio) after the fault; failover_gap_ms: utterances answered without "
        "a repeat; repeated_gap_ms: utterances the caller had to say again (Twilio callers "
        f"repeat after {REPEAT_AFTER_S:g} s without an answer, at most {MAX_REPEATS} times)"
    )
    return rep


def _router_of(phone: TwilioPhone, urls: list[str]) -> str:
    """The router a Twilio call streams through now."""
    return phone.stream_base or urls[0]


async def _checkpoints(redis_url: str, call_ids: list[str]) -> dict[str, Any]:
    redis = connect(redis_url)
    try:
        store = StateStore(redis)
        return {c: await store.load("demo", c) for c in call_ids}
    finally:
        await redis.aclose()


async def _pins(redis_url: str, call_ids: list[str]) -> dict[str, str | None]:
    """Each call's node, as its pin names it."""
    redis = connect(redis_url)
    try:
        pins = PinStore(redis)
        return {c: await pins.get("demo", c) for c in call_ids}
    finally:
        await redis.aclose()
