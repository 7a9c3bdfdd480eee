"""The one place a Redis connection is configured: one server, or a Redis Cluster.

A cluster is named by a ``redis+cluster://`` URL listing some of its nodes (any reachable
one is enough to discover the rest; listing several survives one being down at start)::

    redis+cluster://10.0.0.1:6379,10.0.0.2:6379,10.0.0.3:6379
    rediss+cluster://user:secret@redis-0.redis:6379,redis-1.redis:6379   (TLS)

Everything else (``redis://``, ``rediss://``, ``unix://``) is one server. Callers get a
:data:`RedisClient` either way; the stores only use commands and scripts whose keys share
one hash slot (state_store/keys.py), so both clients run the same code.

:func:`connect_sync` is the same client, blocking, for a thread of its own (the node's
heartbeat, which must not depend on the event loop being free).
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

import redis
import redis.cluster
import redis.retry
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.maint_notifications import MaintNotificationsConfig

# Enough for hundreds of concurrent call operations per process; past it, callers wait
# (up to POOL_WAIT_S) for a free connection instead of failing with "Too many connections".
MAX_CONNECTIONS = 128
# Every connection busy is load, not an outage (an unreachable Redis fails each command
# within the socket timeout, which frees its connection): wait longer for one than for an
# answer. With the 1 s socket timeout as the wait, 10,000 calls on four nodes saturating
# the CPU turned thousands of checkpoints into "No connection available" and retries.
POOL_WAIT_S = 5.0

# The connection handshake is HELLO (and AUTH) only. redis-py would also send, on every new
# connection, CLIENT MAINT_NOTIFICATIONS (no Valkey has it) and CLIENT SETINFO (Redis 7.2+
# and Valkey only): a wasted round trip or two, and on a server without them a
# ResponseError per command whose traceback cycle keeps the task that opened the
# connection (a router's call handler, with its WebSocket) alive until the cyclic
# collector runs. During a cluster slot-map refresh, MAINT_NOTIFICATIONS also races the
# connection being reset and fails with an AttributeError instead of a ConnectionError.
_NO_MAINT_NOTIFICATIONS = MaintNotificationsConfig(enabled=False)
_NO_CLIENT_SETINFO = None  # redis-py's driver_info: None sends no CLIENT SETINFO

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")

RedisClient = Redis | RedisCluster
SyncRedisClient = redis.Redis | redis.cluster.RedisCluster


def is_cluster_url(url: str) -> bool:
    return url.split("://", 1)[0] in CLUSTER_SCHEMES


def cluster_nodes(url: str) -> tuple[list[tuple[str, int]], str | None, str | None, bool]:
    """(host, port) of every node listed in a cluster URL, username, password, TLS."""
    parts = urlsplit(url)
    if parts.scheme not in CLUSTER_SCHEMES:
        raise ValueError(f"not a redis+cluster:// URL: {parts.scheme}://...")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    nodes = []
    for item in hosts.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"cluster node must be host:port, got {item!r}")
        nodes.append((host.strip("[]"), int(port)))
    return (
        nodes,
        unquote(user) or None,
        unquote(password) or None,
        parts.scheme.startswith("rediss"),
    )


def connect(url: str, *, timeout_s: float = 1.0) -> RedisClient:
    """A client with short timeouts: a call must notice an unreachable Redis in about a
    second and go on from memory, not hang on the default 5 s socket timeout. Retries are
    left to the callers, who know whether an operation is safe to repeat."""
    if is_cluster_url(url):
        return _connect_cluster(url, timeout_s)
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=max(timeout_s, POOL_WAIT_S),
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
        maint_notifications_config=_NO_MAINT_NOTIFICATIONS,
        driver_info=_NO_CLIENT_SETINFO,
    )
    return Redis.from_pool(pool)  # the client owns the pool and closes it with itself


def _connect_cluster(url: str, timeout_s: float) -> RedisCluster:
    nodes, user, password, tls = cluster_nodes(url)
    # One immediate retry, after re-reading the slot map: after a failover, or a master
    # restarting, pooled connections to the old process fail on first use although the
    # shard is serving again. Every state store operation is safe to repeat (writes are
    # compare-and-set on the epoch; taking a call twice only skips an epoch number).
    # While a shard has no master yet, the retry fails at once too and the caller's own
    # backoff takes over. MOVED redirects are followed regardless: they are not failures.
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in nodes],
        username=user,
        password=password,
        ssl=tls,
        # Per node, and not a blocking pool: past it a command fails (StoreUnavailable,
        # retried by the caller) instead of waiting, so leave more room than one server.
        max_connections=4 * MAX_CONNECTIONS,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1),
        # Other shards keep serving while one master is being failed over.
        require_full_coverage=False,
        health_check_interval=0,
        maint_notifications_config=_NO_MAINT_NOTIFICATIONS,
        driver_info=_NO_CLIENT_SETINFO,
    )


def connect_sync(url: str, *, timeout_s: float = 1.0) -> SyncRedisClient:
    """:func:`connect`'s blocking twin, with the same timeouts, for one thread's few
    commands (a small pool: no call's operation shares it)."""
    if is_cluster_url(url):
        nodes, user, password, tls = cluster_nodes(url)
        return redis.cluster.RedisCluster(
            startup_nodes=[redis.cluster.ClusterNode(host, port) for host, port in nodes],
            username=user,
            password=password,
            ssl=tls,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=redis.retry.Retry(NoBackoff(), 1),
            require_full_coverage=False,
            health_check_interval=0,
            maint_notifications_config=_NO_MAINT_NOTIFICATIONS,
            driver_info=_NO_CLIENT_SETINFO,
        )
    return redis.Redis.from_url(
        url,
        max_connections=4,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=redis.retry.Retry(NoBackoff(), 0),
        health_check_interval=0,
        maint_notifications_config=_NO_MAINT_NOTIFICATIONS,
        driver_info=_NO_CLIENT_SETINFO,
    )


def as_bytes(value: bytes | str) -> bytes:
    """redis-py types replies as ``bytes | str``; with decode_responses off they are bytes."""
    return value if isinstance(value, bytes) else value.encode()
