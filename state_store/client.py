"""The one place a Redis connection is configured."""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

# Enough for hundreds of concurrent call operations per process; past it, callers wait
# (up to the timeout) for a free connection instead of failing with "Too many connections".
MAX_CONNECTIONS = 128


def connect(url: str, *, timeout_s: float = 1.0) -> Redis:
    """A client with short timeouts: a call must notice an unreachable Redis in about a
    second and go on from memory, not hang on the default 5 s socket timeout. Retries are
    left to the callers, who know whether an operation is safe to repeat."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )
    return Redis.from_pool(pool)  # the client owns the pool and closes it with itself


def as_bytes(value: bytes | str) -> bytes:
    """redis-py types replies as ``bytes | str``; with decode_responses off they are bytes."""
    return value if isinstance(value, bytes) else value.encode()
