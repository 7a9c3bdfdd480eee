"""Customer history: what earlier calls of a caller established, for the next call.

At call end the session's facts and a short summary are saved under the key of that tenant
and caller (``state_store.keys.caller_history``); the next call of the same caller reads
them back through :class:`memory.sources.CustomerHistorySource`. Per caller only the last
``max_calls`` records are kept, and every record is bounded, so the key cannot grow.

Isolation: tenant and caller must be valid ids (no ``:``, braces or spaces that could
spell another key), and every record also carries its tenant and caller, which a load
checks, so a record that somehow sat under the wrong key would still not be returned.
"""

from __future__ import annotations

import logging
from collections import defaultdict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import msgpack
from redis import exceptions as redis_exc
from redis.asyncio import Redis

from callmesh.protocol import valid_id
from memory.errors import HistoryUnavailable, InvalidScope
from state_store import keys

log = logging.getLogger(__name__)

MAX_SUMMARY_CHARS = 300
MAX_FACTS = 16
MAX_FACT_CHARS = 80


@dataclass(frozen=True, slots=True)
class CallRecord:
    """One finished call of a caller, as remembered for the next ones."""

    tenant: str
    caller: str
    call_id: str
    ended_ms: int
    facts: Mapping[str, str] = field(default_factory=dict)
    summary: str = ""

    def bounded(self) -> CallRecord:
        """The same record cut to the stored limits."""
        facts = {
            str(k)[:MAX_FACT_CHARS]: str(v)[:MAX_FACT_CHARS]
            for k, v in list(self.facts.items())[:MAX_FACTS]
        }
        return CallRecord(
            self.tenant,
            self.caller,
            self.call_id,
            self.ended_ms,
            facts,
            self.summary[:MAX_SUMMARY_CHARS],
        )

    def render(self) -> str:
        """One line for the prompt."""
        day = datetime.fromtimestamp(self.ended_ms / 1000, UTC).strftime("%Y-%m-%d")
        facts = ", ".join(f"{k}={v}" for k, v in sorted(self.facts.items()))
        return f"Earlier call on {day}: {self.summary} Facts then: {facts or 'none'}."

    def to_bytes(self) -> bytes:
        return msgpack.packb(
            [self.tenant, self.caller, self.call_id, self.ended_ms, dict(self.facts), self.summary],
            use_bin_type=True,
        )

    @classmethod
    def from_bytes(cls, blob: bytes) -> CallRecord:
        tenant, caller, call_id, ended_ms, facts, summary = msgpack.unpackb(blob, raw=False)
        return cls(str(tenant), str(caller), str(call_id), int(ended_ms), dict(facts), summary)


class HistoryStore(Protocol):
    """Where customer history lives. Implementations scope everything by tenant and caller."""

    async def save(self, record: CallRecord) -> None: ...

    async def load(self, tenant: str, caller: str, *, limit: int = 3) -> list[CallRecord]:
        """The caller's most recent records, newest first."""
        ...


def check_scope(tenant: str, caller: str) -> None:
    """Refuse ids that could name someone else's key."""
    if not valid_id(tenant):
        raise InvalidScope(f"invalid tenant id: {tenant!r}")
    if not valid_id(caller):
        raise InvalidScope(f"invalid caller id: {caller!r}")


def _decode(blob: Any, tenant: str, caller: str) -> CallRecord | None:
    try:
        record = CallRecord.from_bytes(blob)
    except (ValueError, TypeError, msgpack.ExtraData) as exc:
        log.warning("skipping undecodable history record of %s/%s: %s", tenant, caller, exc)
        return None
    if (record.tenant, record.caller) != (tenant, caller):
        log.error(
            "history record of %s/%s found under %s/%s; not returned",
            record.tenant,
            record.caller,
            tenant,
            caller,
        )
        return None
    return record


class RedisHistoryStore:
    """Customer history in Redis: one list per (tenant, caller), newest first."""

    def __init__(self, redis: Redis, *, max_calls: int = 5, ttl_s: int = 180 * 24 * 3600) -> None:
        if max_calls < 1 or ttl_s < 1:
            raise ValueError("max_calls and ttl_s must be >= 1")
        self._redis = redis
        self.max_calls = max_calls
        self.ttl_s = ttl_s

    async def save(self, record: CallRecord) -> None:
        """Append a finished call and trim to ``max_calls``, in one transaction."""
        check_scope(record.tenant, record.caller)
        key = keys.caller_history(record.tenant, record.caller)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.lpush(key, record.bounded().to_bytes())
                pipe.ltrim(key, 0, self.max_calls - 1)
                pipe.expire(key, self.ttl_s)
                await pipe.execute()
        except (redis_exc.RedisError, OSError) as exc:
            raise HistoryUnavailable(str(exc) or type(exc).__name__) from exc

    async def load(self, tenant: str, caller: str, *, limit: int = 3) -> list[CallRecord]:
        check_scope(tenant, caller)
        if limit < 1:
            return []
        try:
            blobs = await self._redis.lrange(keys.caller_history(tenant, caller), 0, limit - 1)
        except (redis_exc.RedisError, OSError) as exc:
            raise HistoryUnavailable(str(exc) or type(exc).__name__) from exc
        return [r for b in blobs if (r := _decode(b, tenant, caller)) is not None]

    def __repr__(self) -> str:
        return f"<RedisHistoryStore [max {self.max_calls} calls per caller]>"


class InMemoryHistoryStore:
    """The same store in process memory: for the benchmark and single-process demos."""

    def __init__(self, *, max_calls: int = 5) -> None:
        self.max_calls = max_calls
        self._records: defaultdict[tuple[str, str], deque[bytes]] = defaultdict(
            lambda: deque(maxlen=self.max_calls)
        )

    async def save(self, record: CallRecord) -> None:
        check_scope(record.tenant, record.caller)
        self._records[(record.tenant, record.caller)].appendleft(record.bounded().to_bytes())

    async def load(self, tenant: str, caller: str, *, limit: int = 3) -> list[CallRecord]:
        check_scope(tenant, caller)
        blobs = list(self._records.get((tenant, caller), ()))[: max(limit, 0)]
        return [r for b in blobs if (r := _decode(b, tenant, caller)) is not None]

    def __repr__(self) -> str:
        return f"<InMemoryHistoryStore [{len(self._records)} callers]>"
