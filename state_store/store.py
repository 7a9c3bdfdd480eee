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
from state_store.checkpoint import ENDED, Checkpoint
from state_store.client import RedisClient, as_bytes, is_cluster_url
from state_store.errors import FencedOut, NotReplicated, StoreUnavailable, translate

# KEYS: lease, ckpt   ARGV: node_id, lease_ttl_ms, epoch floor ('' for none)
# Returns {epoch, checkpoint-or-empty}, or {0, checkpoint} without taking anything when the
# call has a checkpoint but no lease: it ended (its lease went at hang-up, see _END), unless
# the caller reads otherwise in the checkpoint and asks again with its epoch as the floor.
# A lease recreated after it was lost must not hand out an epoch a former owner had.
_TAKE = """
local blob = redis.call('GET', KEYS[2])
if ARGV[3] == '' and blob and redis.call('EXISTS', KEYS[1]) == 0 then
  return {0, blob}
end
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
local floor = tonumber(ARGV[3]) or 0
if epoch <= floor then
  epoch = floor + 1
  redis.call('HSET', KEYS[1], 'epoch', epoch)
end
redis.call('HSET', KEYS[1], 'node', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
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

# KEYS: lease, the keys kept for replay (ARGV[4] of them), the other keys released at
# hang-up.  ARGV: epoch, retention_ms, final ('1': the checkpoint is the call's last word,
# its outbox empty), how many keys are kept.  Only the current owner ends a call. The keys
# nobody needs once the call ended go at once; with a final checkpoint the lease goes too
# and the kept keys expire after the retention; otherwise the lease stays, without a node,
# to fence whoever publishes the outbox left (who then ends the call again).
_END = """
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then
  return 0
end
local kept = tonumber(ARGV[4])
for i = kept + 2, #KEYS do
  redis.call('DEL', KEYS[i])
end
if ARGV[3] == '1' then
  redis.call('DEL', KEYS[1])
  for i = 2, kept + 1 do
    redis.call('PEXPIRE', KEYS[i], ARGV[2])
  end
else
  redis.call('HDEL', KEYS[1], 'node')
end
return 1
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
        ended_retention_s: int = 3600,
        durability: Durability | None = None,
        takeover_wait_s: float | None = None,
    ) -> None:
        self._redis = redis
        self._ttl_ms = ttl_s * 1000
        # How long an ended call's last checkpoint stays for replay (:meth:`end`).
        self._ended_retention_ms = ended_retention_s * 1000
        self.durability = durability or Durability()
        # Taking a call over needs its state. On a Redis Cluster one shard is briefly
        # masterless while a replica is promoted (cluster-node-timeout plus an election):
        # wait that out rather than fail the call. On one server an outage is no blip.
        if takeover_wait_s is None:
            takeover_wait_s = CLUSTER_TAKEOVER_WAIT_S if isinstance(redis, RedisCluster) else 0.0
        self._takeover_wait_s = takeover_wait_s
        self._take = redis.register_script(_TAKE)
        self._cas = redis.register_script(_CAS)
        self._end = redis.register_script(_END)

    async def take_ownership(
        self, tenant: str, call_id: str, node_id: str
    ) -> tuple[int, Checkpoint | None]:
        """Become the owner of a call: returns the new epoch and the last checkpoint. An
        ended call is not taken: epoch 0 and its final checkpoint (status ``ended``)."""
        epoch, ckpt = await self._take_once(tenant, call_id, node_id, "")
        if epoch == 0 and ckpt is not None and ckpt.status != ENDED:
            # A live call's checkpoint without its lease (evicted, or deleted by hand):
            # take it past every epoch the checkpoint knows of.
            epoch, ckpt = await self._take_once(tenant, call_id, node_id, str(ckpt.epoch))
        return epoch, ckpt

    async def _take_once(
        self, tenant: str, call_id: str, node_id: str, floor: str
    ) -> tuple[int, Checkpoint | None]:
        deadline = time.monotonic() + self._takeover_wait_s
        delay = 0.05
        while True:
            try:
                with translate():
                    epoch, blob = await self._take(
                        keys=[keys.lease(tenant, call_id), keys.checkpoint(tenant, call_id)],
                        args=[node_id, self._ttl_ms, floor],
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

    async def end(self, tenant: str, call_id: str, epoch: int, *, final: bool) -> bool:
        """The call ended under ``epoch``: release what it holds (no-op, False, if fenced out
        meanwhile). ``final``: its last checkpoint is saved with an empty outbox, so it
        keeps only that, for replay, for the ended-call retention; otherwise the lease
        stays (without a node) for whoever publishes the outbox, which ends it again."""
        lease = keys.lease(tenant, call_id)
        kept = keys.ended_call_kept(tenant, call_id)
        others = [k for k in keys.ended_call_released(tenant, call_id) if k != lease]
        with translate():
            done = await self._end(
                keys=[lease, *kept, *others],
                args=[epoch, self._ended_retention_ms, "1" if final else "0", len(kept)],
            )
        return bool(done)
