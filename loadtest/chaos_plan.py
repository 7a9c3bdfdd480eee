"""What one ``loadtest chaos`` run will do, from its flags: the classic flags (``--kill``,
``--drain``, ``--kill-router`` ... at 40 % of the turns, unchanged) and the ``--fault``
specs (:mod:`loadtest.fault_schedule`), checked together before anything starts, and what
the cluster needs for them (a link proxy, the model's slow-down files, a CRM)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from loadtest import chaos_faults, chaos_routers
from loadtest.fault_schedule import (
    NODE_KINDS,
    ROUTER_KINDS,
    FaultSpec,
    FaultSpecError,
    Kind,
    When,
    parse_faults,
)

FAULT_HELP = (
    "a fault at a moment of the run, repeatable: KIND[:ARG]@WHEN[+DURATION][/EVERY[xTIMES]] "
    "with KIND one of node-kill, node-drain, router-kill, router-drain, redis-restart, "
    "nats-outage, crm-outage, llm-slow, link-latency; WHEN a share of the turns (40%%) or "
    "seconds into the talk (12s). E.g. nats-outage@30%%+5s, llm-slow:1500ms@10s+8s, "
    "link-latency:80ms~30ms@20%%+10s/30%%, node-kill@20%%/40%%"
)


def add_fault_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fault", action="append", default=[], metavar="SPEC", help=FAULT_HELP)


@dataclass
class Plan:
    specs: list[FaultSpec]  # the --fault specs the runner strikes (not the router's)
    routers_hit: bool  # a router fault: the callers know every router
    router_at: When | None  # its moment when a --fault spec gives it
    router_spec: str = ""
    clustered: dict[str, bool] = field(default_factory=dict)
    link_proxy: bool = False
    llm_control: bool = False
    crm: bool = False
    crm_url: str | None = None

    def router_report(self, rep: dict[str, Any]) -> list[dict[str, Any]]:
        """The router --fault spec's line of the report's ``faults``."""
        if not self.router_spec:
            return []
        struck = 1 if rep.get("victims") else 0
        return [{"spec": self.router_spec, "struck": struck, "missed": 1 - struck}]


def plan(args: argparse.Namespace) -> Plan | str:
    """The run's plan, or what is wrong with its flags (exit status 2)."""
    try:
        specs = parse_faults(args.fault)
    except FaultSpecError as exc:
        return f"--fault: {exc}"
    if (args.kill_redis_master and not args.redis_cluster) or (
        args.kill_nats and not args.nats_cluster
    ):
        return "--kill-redis-master needs --redis-cluster, --kill-nats needs --nats-cluster"
    router_specs = [s for s in specs if s.kind in ROUTER_KINDS]
    classic_router = chaos_routers.router_fault(args)
    if router_specs and classic_router:
        return "a router fault either by --kill-router/--drain-router or by --fault, not both"
    routers_hit = classic_router or bool(router_specs)
    if routers_hit and any(s.kind in NODE_KINDS for s in specs):
        return (
            "with a router fault, nodes are struck in its moment: use --kill/--drain, not "
            "--fault node-kill/node-drain"
        )
    router_at = None
    if router_specs:
        spec = router_specs[0]
        if spec.count >= args.routers:
            return f"{spec.kind}: {spec.count} of {args.routers} routers would leave none"
        # The classic router strike, at the spec's moment (chaos_routers keeps the score).
        if spec.kind is Kind.ROUTER_KILL:
            args.kill_router = spec.count
        else:
            args.drain_router = spec.count
        router_at = spec.at
    if not (chaos_faults.node_fault(args) or routers_hit or specs):
        args.kill = 1  # no fault named: the classic node kill
    kinds = {s.kind for s in specs}
    return Plan(
        specs=[s for s in specs if s.kind not in ROUTER_KINDS],
        routers_hit=routers_hit,
        router_at=router_at,
        router_spec=router_specs[0].text if router_specs else "",
        clustered={"redis_cluster": args.redis_cluster, "nats_cluster": args.nats_cluster},
        link_proxy=Kind.LINK_LATENCY in kinds,
        llm_control=Kind.LLM_SLOW in kinds,
        crm=Kind.CRM_OUTAGE in kinds,
    )
