"""Per-tenant call quotas shared by every router: concurrent calls and new calls a second.

A tenant's live calls are a sorted set whose scores are lease expiries (Redis server
time, so routers' clocks do not matter): a router renews the leases of its calls, removes
a call that ended, and a crashed router's calls lapse by themselves. A call id already in
the set (a reconnect) is renewed, never counted twice and never rate-limited. New calls
are counted per second in a key that expires with its second.
"""

from __future__ import annotations

from enum import Enum

from state_store import keys
from state_store.client import RedisClient
from state_store.errors import translate

# KEYS: calls, rate  ARGV: call_id, lease_ms, max_calls, max_new_per_s (0: no cap)
# Returns 1 admitted, 2 renewed (already live), -1 too many calls, -2 too many new calls.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], lease)
  return 2
end
local max_calls = tonumber(ARGV[3])
if max_calls > 0 and redis.call('ZCARD', KEYS[1]) >= max_calls then return -1 end
local max_rate = tonumber(ARGV[4])
if max_rate > 0 then
  local n = redis.call('INCR', KEYS[2])
  if n == 1 then redis.call('PEXPIRE', KEYS[2], 1000) end
  if n > max_rate then return -2 end
end
redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
redis.call('PEXPIRE', KEYS[1], lease)
return 1
"""

# KEYS: calls  ARGV: lease_ms, call_id...  Renews the leases of calls still in the set.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', now + lease, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], lease)
return 1
"""


class QuotaVerdict(Enum):
    ADMITTED = 1
    RENEWED = 2
    TOO_MANY_CALLS = -1
    TOO_FAST = -2


class CallQuota:
    def __init__(self, redis: RedisClient) -> None:
        self._redis = redis
        self._acquire = redis.register_script(_ACQUIRE)
        self._renew = redis.register_script(_RENEW)

    async def acquire(
        self, tenant: str, call_id: str, *, max_calls: int, max_new_per_s: int, lease_ms: int
    ) -> QuotaVerdict:
        with translate():
            result = await self._acquire(
                keys=[keys.tenant_calls(tenant), keys.tenant_call_rate(tenant)],
                args=[call_id, lease_ms, max_calls, max_new_per_s],
            )
        return QuotaVerdict(int(result))

    async def release(self, tenant: str, call_id: str) -> None:
        with translate():
            await self._redis.zrem(keys.tenant_calls(tenant), call_id)

    async def renew(self, calls: list[tuple[str, str]], lease_ms: int) -> None:
        """Renew ``(tenant, call_id)`` leases: one script per tenant (one slot each)."""
        by_tenant: dict[str, list[str]] = {}
        for tenant, call_id in calls:
            by_tenant.setdefault(tenant, []).append(call_id)
        with translate():
            for tenant, ids in by_tenant.items():
                await self._renew(keys=[keys.tenant_calls(tenant)], args=[lease_ms, *ids])

    async def live(self, tenant: str) -> int:
        """Calls of the tenant holding a slot (expired leases included until next use)."""
        with translate():
            return int(await self._redis.zcard(keys.tenant_calls(tenant)))
