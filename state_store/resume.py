"""Where a live call's resume record lives: one hash per call, shared by every router.

Every change is a compare-and-set on the record's generation, so two racing (re)connects
cannot both win: the loser is refused as if it held a stale secret.
"""

from __future__ import annotations

from callmesh.auth.resume import ResumeRecord
from state_store import keys
from state_store.client import RedisClient, as_bytes
from state_store.errors import translate

# KEYS: record  ARGV: expected generation ('' = absent), new generation, digest, ttl.
_SWAP = """
local g = redis.call('HGET', KEYS[1], 'generation')
if ARGV[1] == '' then
  if g then return 0 end
elseif g ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'generation', ARGV[2], 'digest', ARGV[3])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
return 1
"""

# KEYS: record  ARGV: generation.  Deletes the record only if it is still that generation.
_DELETE_IF = """
if redis.call('HGET', KEYS[1], 'generation') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class ResumeStore:
    def __init__(self, redis: RedisClient, *, ttl_s: int = 6 * 3600) -> None:
        self._redis = redis
        self._ttl_s = ttl_s
        self._swap = redis.register_script(_SWAP)
        self._delete_if = redis.register_script(_DELETE_IF)

    async def get(self, tenant: str, call_id: str) -> ResumeRecord | None:
        with translate():
            raw = await self._redis.hgetall(keys.resume(tenant, call_id))
        if not raw:
            return None
        state = {as_bytes(k).decode(): as_bytes(v).decode() for k, v in raw.items()}
        try:
            return ResumeRecord.from_state(tenant, call_id, state)
        except (KeyError, ValueError):
            return None

    async def swap(self, old: ResumeRecord | None, new: ResumeRecord) -> bool:
        """Store ``new`` if the stored record is still ``old`` (None: no record yet)."""
        expected = "" if old is None else str(old.generation)
        with translate():
            done = await self._swap(
                keys=[keys.resume(new.tenant, new.call_id)],
                args=[expected, str(new.generation), new.digest, self._ttl_s],
            )
        return bool(done)

    async def delete(self, record: ResumeRecord) -> None:
        with translate():
            await self._delete_if(
                keys=[keys.resume(record.tenant, record.call_id)], args=[str(record.generation)]
            )
