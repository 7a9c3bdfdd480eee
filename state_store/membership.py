"""Node membership records: written by each node's heartbeat, read by routers.

All records live in one hash (one key, one slot). A record carries a heartbeat counter;
readers judge liveness by whether the counter advanced on *their own* monotonic clock,
so clock skew between machines never makes a live node look dead or a dead one alive.

Nodes write their record from a thread of their own (:class:`MembershipWriter`, blocking);
routers read the hash on their event loop (:class:`MembershipStore`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum

import msgpack

from state_store import keys
from state_store.client import RedisClient, SyncRedisClient, as_bytes
from state_store.errors import translate


class NodeState(StrEnum):
    ACTIVE = "active"
    DRAINING = "draining"


@dataclass(frozen=True)
class NodeRecord:
    node_id: str
    url: str
    state: str = NodeState.ACTIVE.value
    calls: int = 0
    beat: int = 0
    started_ms: int = 0
    pid: int = 0

    def to_bytes(self) -> bytes:
        return msgpack.packb(asdict(self))

    @classmethod
    def from_bytes(cls, blob: bytes) -> NodeRecord | None:
        try:
            return cls(**msgpack.unpackb(blob))
        except (ValueError, TypeError):
            return None  # a record from an incompatible version is ignored, not fatal


class MembershipStore:
    def __init__(self, redis: RedisClient) -> None:
        self._redis = redis

    async def publish(self, record: NodeRecord) -> None:
        with translate():
            await self._redis.hset(keys.MEMBERS, record.node_id, record.to_bytes())

    async def remove(self, node_id: str) -> None:
        with translate():
            await self._redis.hdel(keys.MEMBERS, node_id)

    async def read_all(self) -> dict[str, NodeRecord]:
        with translate():
            raw = await self._redis.hgetall(keys.MEMBERS)
        out: dict[str, NodeRecord] = {}
        for v in raw.values():
            rec = NodeRecord.from_bytes(as_bytes(v))
            if rec is not None:
                out[rec.node_id] = rec
        return out


class MembershipWriter:
    """A node's own record, written with a blocking client from the heartbeat's thread
    (conversation_node.heartbeat). Errors are translated like the async store's."""

    def __init__(self, redis: SyncRedisClient) -> None:
        self._redis = redis

    def publish(self, record: NodeRecord) -> None:
        with translate():
            self._redis.hset(keys.MEMBERS, record.node_id, record.to_bytes())

    def remove(self, node_id: str) -> None:
        with translate():
            self._redis.hdel(keys.MEMBERS, node_id)

    def close(self) -> None:
        self._redis.close()
