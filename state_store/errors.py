"""State store errors, grouped by cause. Redis errors are translated here, at one boundary."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from redis import exceptions as redis_exc


class StateStoreError(Exception):
    """Root of every state store error."""

    retryable = False


class StoreUnavailable(StateStoreError):
    """Redis could not be reached or timed out; the same write may succeed later."""

    retryable = True


class NotReplicated(StoreUnavailable):
    """A checkpoint was written on the master but fewer replicas than required confirmed
    it in time (``WAIT``). It must not be acknowledged yet: a failover now could lose it.
    Writing it again later is safe (same epoch, same CAS)."""

    def __init__(self, key: str, wanted: int, got: int) -> None:
        super().__init__(f"{key}: {got} of {wanted} replicas confirmed the write")
        self.wanted = wanted
        self.got = got


class FencedOut(StateStoreError):
    """A newer owner took the call: this node's epoch is stale and it must drop the call."""

    def __init__(self, tenant: str, call_id: str, mine: int, current: int | None) -> None:
        super().__init__(f"{tenant}/{call_id}: epoch {mine} fenced out by epoch {current}")
        self.mine = mine
        self.current = current


class CorruptState(StateStoreError):
    """A stored blob could not be decoded."""


@contextlib.contextmanager
def translate() -> Iterator[None]:
    """Turn redis-py's errors into ours. On a Redis Cluster, a shard without a master
    (CLUSTERDOWN, MASTERDOWN, TRYAGAIN, a slot nobody serves yet) is an outage like any
    other: the same write succeeds once a replica has been promoted."""
    try:
        yield
    except (
        redis_exc.ConnectionError,
        redis_exc.TimeoutError,
        redis_exc.ClusterDownError,
        redis_exc.TryAgainError,
        redis_exc.SlotNotCoveredError,
        # A master that was failed over and came back as a replica, before the client
        # re-read the slot map.
        redis_exc.ReadOnlyError,
        OSError,
    ) as exc:
        raise StoreUnavailable(str(exc) or type(exc).__name__) from exc
    except (redis_exc.RedisError, redis_exc.RedisClusterException) as exc:
        raise StateStoreError(str(exc)) from exc
    except (RuntimeError, AttributeError) as exc:
        if not _torn_down(exc):
            raise
        raise StoreUnavailable(f"connection torn down: {exc}") from exc


def _torn_down(exc: BaseException) -> bool:
    """A cluster client re-reading its slot map closes the connections of commands still
    in flight; redis-py then fails in them with uvloop's RuntimeError (a write to a closed
    transport) or an AttributeError (its writer already None), not a ConnectionError.
    Both raised inside redis-py's connection code are a lost connection."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = tb.tb_frame.f_code.co_filename if tb is not None else ""
    in_redis = f"{os.sep}redis{os.sep}" in where
    return in_redis or (isinstance(exc, RuntimeError) and "closed" in str(exc))
