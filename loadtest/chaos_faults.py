"""The faults ``loadtest chaos`` can strike together, in one moment: nodes (``--kill`` /
``--drain``), the Valkey master holding most calls (``--kill-redis-master``) and a NATS
server (``--kill-nats``). Router faults are in :mod:`loadtest.chaos_routers`, which strikes
these alongside its own when they are asked for too."""

from __future__ import annotations

import argparse
import signal

from localcluster.cluster import LocalCluster, Proc
from localcluster.servers import ManagedServer
from state_store import keys


def node_fault(args: argparse.Namespace) -> bool:
    return bool(args.kill or args.drain)


def backend_fault(args: argparse.Namespace) -> bool:
    return bool(args.kill_redis_master or args.kill_nats)


def busiest_nodes(cluster: LocalCluster, count: int) -> list[Proc]:
    """The ``count`` nodes holding the most calls, as a live router reports them."""
    status = cluster.status() or {}
    nodes = status.get("nodes")
    by_calls = sorted(
        (n for n in nodes if isinstance(n, dict)) if isinstance(nodes, list) else [],
        key=lambda n: -int(n.get("calls", 0)),
    )
    names = [str(n["node"]) for n in by_calls[:count]]
    return [p for p in cluster.nodes if p.name in names]


def strike_nodes(args: argparse.Namespace, victims: list[Proc]) -> signal.Signals:
    """SIGKILL (``--kill``) or SIGTERM (``--drain``) the victims; the signal sent."""
    sig = signal.SIGKILL if args.kill else signal.SIGTERM
    for victim in victims:
        victim.signal(sig)
    return sig


def strike_backends(
    args: argparse.Namespace, cluster: LocalCluster, call_ids: list[str]
) -> list[str]:
    """Kill what ``--kill-nats`` / ``--kill-redis-master`` name (blocking: the master is
    restarted once its replica is promoted, as Kubernetes would, so it rejoins as a
    replica); the names of the servers killed."""
    backends = cluster.backends
    if backends is None:
        return []
    killed = []
    if args.kill_nats and backends.nats_nodes is not None:
        backends.nats_nodes.servers[0].stop(signal.SIGKILL)
        killed.append(backends.nats_nodes.servers[0].name)
    if args.kill_redis_master and backends.redis_nodes is not None:
        killed.append(kill_redis_master(cluster, call_ids))
    return killed


def busiest_master(cluster: LocalCluster, call_ids: list[str]) -> tuple[ManagedServer, set[str]]:
    """The Valkey master holding most of these calls' checkpoints, and those calls: while
    it fails over, their state cannot be written or read."""
    servers = cluster.backends.redis_nodes if cluster.backends is not None else None
    if servers is None:
        raise RuntimeError("the cluster has no Valkey cluster")
    by_call = {c: servers.master_of(keys.checkpoint("demo", c)) for c in call_ids}
    masters = list(by_call.values())
    master = max(masters, key=masters.count)
    return master, {c for c, m in by_call.items() if m is master}


def kill_redis_master(cluster: LocalCluster, call_ids: list[str]) -> str:
    """SIGKILL the Valkey master holding most of these calls' checkpoints, and restart it
    once its replica is promoted (as Kubernetes would: it rejoins as a replica); its name.
    Blocking."""
    master, _ = busiest_master(cluster, call_ids)
    master.stop(signal.SIGKILL)
    assert cluster.backends is not None and cluster.backends.redis_nodes is not None
    cluster.backends.redis_nodes.wait_promoted(master)
    master.start()
    return master.name
