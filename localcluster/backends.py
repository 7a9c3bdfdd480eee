"""The backends of a local cluster: a Redis-compatible server and NATS, embedded or given.

Single servers come from :mod:`localcluster.servers`; clustered ones (three Valkey masters
with a replica each, three NATS servers with JetStream) from
:mod:`localcluster.server_clusters`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from callmesh import settings
from callmesh.settings.table import UP
from localcluster.server_clusters import (
    NatsClusterServers,
    RedisClusterServers,
    nats_cluster,
    redis_cluster,
)
from localcluster.servers import ManagedServer, nats_server, redis_server


class EmbeddedBackends:
    """Context manager: Redis + NATS for a local cluster, honouring REDIS_URL / NATS_URL.

    ``redis_cluster`` / ``nats_cluster`` start clustered servers instead (three Valkey
    masters with a replica each; three NATS servers with JetStream), for the cluster-mode
    tests and chaos runs; they are then in :attr:`redis_nodes` / :attr:`nats_nodes`.
    """

    def __init__(
        self,
        env: dict[str, str] | None = None,
        *,
        force_embedded: bool = False,
        redis_cluster: bool = False,
        nats_cluster: bool = False,
    ) -> None:
        self._env = dict(os.environ if env is None else env)
        self._force = force_embedded
        self._redis_cluster = redis_cluster
        self._nats_cluster = nats_cluster
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.redis: ManagedServer | None = None
        self.nats: ManagedServer | None = None
        self.redis_nodes: RedisClusterServers | None = None
        self.nats_nodes: NatsClusterServers | None = None
        self.redis_url = ""
        self.nats_url = ""

    def __enter__(self) -> EmbeddedBackends:
        self._tmp = tempfile.TemporaryDirectory(prefix="callmesh-")
        root = Path(self._tmp.name)
        try:
            # Forced (tests): embedded servers whatever the environment says.
            urls = {} if self._force else self._urls_given()
            if self._redis_cluster:
                self.redis_nodes = redis_cluster(root)
                self.redis_nodes.start()
                self.redis_url = self.redis_nodes.url
            elif "redis_url" in urls:
                self.redis_url = urls["redis_url"]
            else:
                self.redis = redis_server(root)
                self.redis.start()
                self.redis_url = self.redis.url
            if self._nats_cluster:
                self.nats_nodes = nats_cluster(root)
                self.nats_nodes.start()
                self.nats_url = self.nats_nodes.url
            elif "nats_url" in urls:
                self.nats_url = urls["nats_url"]
            else:
                self.nats = nats_server(root)
                self.nats.start()
                self.nats_url = self.nats.url
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _urls_given(self) -> dict[str, str]:
        values = settings.load(UP, self._env, only=("redis_url", "nats_url"))
        return {key: values[key] for key in values if values.given(key)}

    def __exit__(self, *exc: object) -> None:
        for server in (self.nats, self.redis, self.nats_nodes, self.redis_nodes):
            if server is not None:
                server.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
