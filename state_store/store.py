"""Fenced ownership and checkpoints of calls (architecture invariants 2 and 3).

Taking a call increments its epoch (the fencing token) and reads its checkpoint in one
atomic script; every checkpoint write is a compare-and-set on that epoch in one atomic
script. A node that was paused or partitioned comes back with a stale epoch, gets
:class:`FencedOut`, and must drop the call.
"""

from __future__ import annotations

from redis.asyncio import Redis

from state_store import keys
from state_store.checkpoint import Checkpoint
from state_store.client import as_bytes
from state_store.errors import FencedOut, translate

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


class StateStore:
    """Checkpoints and ownership leases of calls, on one Redis (or Redis Cluster)."""

    def __init__(self, redis: Redis, *, ttl_s: int = 24 * 3600) -> None:
        self._redis = redis
        self._ttl_ms = ttl_s * 1000
        self._take = redis.register_script(_TAKE)
        self._cas = redis.register_script(_CAS)
        self._release = redis.register_script(_RELEASE)

    async def take_ownership(
        self, tenant: str, call_id: str, node_id: str
    ) -> tuple[int, Checkpoint | None]:
        """Become the owner of a call: returns the new epoch and the last checkpoint."""
        with translate():
            epoch, blob = await self._take(
                keys=[keys.lease(tenant, call_id), keys.checkpoint(tenant, call_id)],
                args=[node_id, self._ttl_ms],
            )
        ckpt = Checkpoint.from_bytes(blob) if blob else None
        return int(epoch), ckpt

    async def save(self, ckpt: Checkpoint) -> None:
        """Write a checkpoint if ``ckpt.epoch`` still owns the call, else raise FencedOut."""
        with translate():
            ok, current = await self._cas(
                keys=[
                    keys.lease(ckpt.tenant, ckpt.call_id),
                    keys.checkpoint(ckpt.tenant, ckpt.call_id),
                ],
                args=[ckpt.epoch, ckpt.to_bytes(), self._ttl_ms],
            )
        if not ok:
            raise FencedOut(ckpt.tenant, ckpt.call_id, ckpt.epoch, int(current) or None)

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
