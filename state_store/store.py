"""Fenced ownership and checkpoints of calls (architecture invariants 2 and 3).

Taking a call increments its epoch (the fencing token) and reads its checkpoint in one
atomic script; every checkpoint write is a compare-and-set on that epoch in one atomic
script. A node that was paused or partitioned comes back with a stale epoch, gets
:class:`FencedOut`, and must drop the call.

Durability (:class:`Durability`): a Redis master acknowledges a write before its replicas
have it, so a master failing over right after a checkpoint could lose a turn the router
was already told about. With ``replicas`` > 0, the CAS write is followed on the same
connection by ``WAIT replicas timeout``, and :meth:`StateStore.save` returns only once
that many replicas confirmed it; otherwise it raises :class:`NotReplicated` (retryable),
so the node does not acknowledge the turn yet and writes the checkpoint again later.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any

from redis import exceptions as redis_exc
from redis.asyncio.cluster import PipelineCommand, RedisCluster

from state_store import keys
from state_store.checkpoint import Checkpoint
from state_store.client import RedisClient, as_bytes, is_cluster_url
from state_store.errors import FencedOut, NotReplicated, StoreUnavailable, translate

# KEYS: lease, ckpt   ARGV: node_id, lease_ttl_ms
# Returns {epoch, checkpoint-or-empty}.
_TAKE = """
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('HSET', KEYS[1], 'node', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local blob = redis.call('GET', KEYS[2])
if not blob then blob = '' end
return {epoch, blob}
"""

# KEYS: lease, ckpt   ARGV: epoch, blob, ttl_ms
# Returns {1, epoch} when written, {0, current-epoch-or-0} when fenced out.
_CAS = """
local cur = redis.call('HGET', KEYS[1], 'epoch')
if cur ~= ARGV[1] then
  return {0, tonumber(cur) or 0}
end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1, tonumber(cur)}
"""

# KEYS: lease   ARGV: epoch.  Deletes the lease only if still ours.
_RELEASE = """
if redis.call('HGET', KEYS[1], 'epoch') == ARGV[1] then
  redis.call('HDEL', KEYS[1], 'node')
  return 1
end
return 0
"""


AUTO = -1
# A shard failing over with cluster-node-timeout 1000 ms is back within about 3 s; more
# than this and the caller is better told the store is unavailable.
CLUSTER_TAKEOVER_WAIT_S = 5.0
_UNREACHABLE = (redis_exc.ConnectionError, redis_exc.TimeoutError, OSError)
# Errors after which the call's slot is served elsewhere now.
_REROUTE = (
    redis_exc.MovedError,
    redis_exc.AskError,
    redis_exc.TryAgainError,
    redis_exc.ReadOnlyError,
)


@dataclass(frozen=True)
class Durability:
    """How many replicas must confirm a checkpoint before the turn is acknowledged, and
    how long to wait for them (ms). 0 replicas: the master's word is enough."""

    replicas: int = 0
    timeout_ms: int = 200

    def __post_init__(self) -> None:
        if self.replicas < 0 or self.timeout_ms < 1:
            raise ValueError("replicas must be >= 0 and timeout_ms >= 1")

    @classmethod
    def for_url(cls, url: str, replicas: int = AUTO, timeout_ms: int = 200) -> Durability:
        """``replicas`` = AUTO: one replica on a Redis Cluster (every master has one in a
        production cluster), none on a single server (it may have no replica at all)."""
        if replicas == AUTO:
            replicas = 1 if is_cluster_url(url) else 0
        return cls(replicas, timeout_ms)


class StateStore:
    """Checkpoints and ownership leases of calls, on one Redis (or Redis Cluster)."""

    def __init__(
        self,
        redis: RedisClient,
        *,
        ttl_s: int = 24 * 3600,
        durability: Durability | None = None,
        takeover_wait_s: float | None = None,
    ) -> None:
        self._redis = redis
        self._ttl_ms = ttl_s * 1000
        self.durability = durability or Durability()
        # Taking a call over needs its state. On a Redis Cluster one shard is briefly
        # masterless while a replica is promoted (cluster-node-timeout plus an election):
        # wait that out rather than fail the call. On one server an outage is no blip.
        if takeover_wait_s is None:
            takeover_wait_s = CLUSTER_TAKEOVER_WAIT_S if isinstance(redis, RedisCluster) else 0.0
        self._takeover_wait_s = takeover_wait_s
        self._take = redis.register_script(_TAKE)
        self._cas = redis.register_script(_CAS)
        self._release = redis.register_script(_RELEASE)

    async def take_ownership(
        self, tenant: str, call_id: str, node_id: str
    ) -> tuple[int, Checkpoint | None]:
        """Become the owner of a call: returns the new epoch and the last checkpoint."""
        deadline = time.monotonic() + self._takeover_wait_s
        delay = 0.05
        while True:
            try:
                with translate():
                    epoch, blob = await self._take(
                        keys=[keys.lease(tenant, call_id), keys.checkpoint(tenant, call_id)],
                        args=[node_id, self._ttl_ms],
                    )
                break
            except StoreUnavailable:
                if time.monotonic() + delay > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
        ckpt = Checkpoint.from_bytes(blob) if blob else None
        return int(epoch), ckpt

    async def save(self, ckpt: Checkpoint) -> None:
        """Write a checkpoint if ``ckpt.epoch`` still owns the call, else raise FencedOut;
        with :attr:`durability` replicas, raise NotReplicated unless they confirmed it."""
        ckeys = [keys.lease(ckpt.tenant, ckpt.call_id), keys.checkpoint(ckpt.tenant, ckpt.call_id)]
        args: list[Any] = [ckpt.epoch, ckpt.to_bytes(), self._ttl_ms]
        want = self.durability.replicas
        with translate():
            if want == 0:
                ok, current = await self._cas(keys=ckeys, args=args)
            else:
                (ok, current), got = await self._cas_and_wait(ckeys, args)
        if not ok:
            raise FencedOut(ckpt.tenant, ckpt.call_id, ckpt.epoch, int(current) or None)
        if want and int(got) < want:
            raise NotReplicated(ckeys[1], want, int(got))

    async def _cas_and_wait(self, ckeys: list[str], args: list[Any]) -> list[Any]:
        """The CAS script and ``WAIT`` pipelined on one connection: WAIT counts the replicas
        that have every write *of its own connection*, so it must follow the write there."""
        wait = ("WAIT", self.durability.replicas, self.durability.timeout_ms)
        if not isinstance(self._redis, RedisCluster):
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.eval(_CAS, len(ckeys), *ckeys, *args)
                pipe.execute_command(*wait)
                return list(await pipe.execute())
        cluster = self._redis
        for attempt in (1, 2):
            await cluster.initialize()
            # Both commands down one connection to the master of the call's slot. Not the
            # cluster pipeline: its redirect and retry handling re-sends commands one by
            # one, which would put the WAIT on another connection than the write, where it
            # vouches for nothing.
            node = cluster.get_node_from_key(ckeys[0])
            cmds = [
                PipelineCommand(0, "EVAL", _CAS, len(ckeys), *ckeys, *args),
                PipelineCommand(1, *wait),
            ]
            failed: Exception | None
            try:
                if node is None:
                    raise redis_exc.ConnectionError(f"no master serves {ckeys[0]}")
                await node.execute_pipeline(cmds)
                failed = next((c.result for c in cmds if isinstance(c.result, Exception)), None)
            except _UNREACHABLE as exc:
                failed = exc
            if failed is None:
                return [c.result for c in cmds]
            if not isinstance(failed, (*_REROUTE, *_UNREACHABLE)):
                raise failed
            # The slot moved or its master is gone: a keyed read through the client
            # re-reads the slot map (following MOVED, or re-initializing after a
            # connection error), then try once more. Only a refresh: whatever it raises,
            # the caller gets StoreUnavailable below.
            with contextlib.suppress(Exception):
                await cluster.pttl(ckeys[0])
            if attempt == 2:
                raise StoreUnavailable(f"{ckeys[1]}: {failed}") from failed
        raise AssertionError("unreachable")

    async def load(self, tenant: str, call_id: str) -> Checkpoint | None:
        with translate():
            blob = await self._redis.get(keys.checkpoint(tenant, call_id))
        return Checkpoint.from_bytes(as_bytes(blob)) if blob else None

    async def owner(self, tenant: str, call_id: str) -> tuple[str | None, int]:
        """The node holding the lease and its epoch (None if nobody holds it)."""
        with translate():
            node, epoch = await self._redis.hmget(keys.lease(tenant, call_id), ["node", "epoch"])
        return (as_bytes(node).decode() if node else None), int(epoch or 0)

    async def release(self, tenant: str, call_id: str, epoch: int) -> bool:
        """Give up ownership at the end of a call (no-op if fenced out meanwhile)."""
        with translate():
            return bool(await self._release(keys=[keys.lease(tenant, call_id)], args=[epoch]))
