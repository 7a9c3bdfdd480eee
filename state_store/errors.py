"""State store errors, grouped by cause. Redis errors are translated here, at one boundary."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from redis import exceptions as redis_exc


class StateStoreError(Exception):
    """Root of every state store error."""

    retryable = False


class StoreUnavailable(StateStoreError):
    """Redis could not be reached or timed out; the same write may succeed later."""

    retryable = True


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
    """Turn redis-py's errors into ours."""
    try:
        yield
    except (redis_exc.ConnectionError, redis_exc.TimeoutError, OSError) as exc:
        raise StoreUnavailable(str(exc) or type(exc).__name__) from exc
    except redis_exc.RedisError as exc:
        raise StateStoreError(str(exc)) from exc
