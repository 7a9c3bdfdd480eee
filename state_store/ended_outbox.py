"""The index of ended calls whose checkpoint outbox may still hold unpublished effects.

The node that ended a call retries its outbox itself; this index is for when that node
dies or gives up first. Its drainer stamps a call here (score: the time of its last try)
before each try, and removes it once the outbox is published and saved empty; a sweep on
any node takes over calls nobody has tried for a while (architecture invariant 4).
"""

from __future__ import annotations

from typing import cast

from state_store import keys
from state_store.client import RedisClient, as_bytes
from state_store.errors import translate


class EndedOutboxIndex:
    def __init__(self, redis: RedisClient) -> None:
        self._redis = redis

    async def touch(self, tenant: str, call_id: str, now_ms: int) -> None:
        """Mark the call pending and tried now (a sweep leaves it alone for a while)."""
        with translate():
            await self._redis.zadd(
                keys.ENDED_OUTBOX, {keys.ended_outbox_member(tenant, call_id): now_ms}
            )

    async def remove(self, tenant: str, call_id: str) -> None:
        with translate():
            await self._redis.zrem(keys.ENDED_OUTBOX, keys.ended_outbox_member(tenant, call_id))

    async def untried_since(self, before_ms: int, limit: int) -> list[tuple[str, str]]:
        """Up to ``limit`` calls nobody tried since ``before_ms``, oldest first."""
        with translate():
            raw = await self._redis.zrangebyscore(
                keys.ENDED_OUTBOX, "-inf", before_ms, start=0, num=limit
            )
        calls = []
        for member in cast(list[bytes | str], raw):
            tenant, _, call_id = as_bytes(member).decode().partition("/")
            if tenant and call_id:
                calls.append((tenant, call_id))
        return calls
