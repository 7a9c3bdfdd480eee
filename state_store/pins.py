"""Router pins: which node a live call is routed to, shared by every router instance."""

from __future__ import annotations

from state_store import keys
from state_store.client import RedisClient, as_bytes
from state_store.errors import translate

# KEYS: pin  ARGV: node.  Deletes the pin only if it still names that node.
_CLEAR_IF = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class PinStore:
    def __init__(self, redis: RedisClient, *, ttl_s: int = 6 * 3600) -> None:
        self._redis = redis
        self._ttl_s = ttl_s
        self._clear_if = redis.register_script(_CLEAR_IF)

    async def get(self, tenant: str, call_id: str) -> str | None:
        with translate():
            v = await self._redis.get(keys.pin(tenant, call_id))
        return as_bytes(v).decode() if v else None

    async def set(self, tenant: str, call_id: str, node_id: str) -> None:
        with translate():
            await self._redis.set(keys.pin(tenant, call_id), node_id, ex=self._ttl_s)

    async def clear(self, tenant: str, call_id: str, node_id: str) -> None:
        with translate():
            await self._clear_if(keys=[keys.pin(tenant, call_id)], args=[node_id])
