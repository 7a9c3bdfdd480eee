"""The node's heartbeat beats from a thread of its own: a busy event loop (here: blocked
outright) does not stop it, so routers do not take a busy node for a dead one; a loop
stuck past the stall limit does stop it, so a wedged node is still declared dead."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis as sync_redis
from redis.asyncio import Redis

from callmesh.config import Backends, MembershipConfig, NodeConfig
from callmesh.telemetry import Metrics
from conversation_node import heartbeat as hb
from state_store import keys
from state_store.membership import MembershipStore, NodeRecord

BEAT = MembershipConfig(heartbeat_ms=20, dead_after_ms=200, poll_ms=20)


def _block(seconds: float) -> None:
    """Keep the event loop from running at all, as a long burst of work would."""
    time.sleep(seconds)


def _beat(client: sync_redis.Redis, node: str) -> int:
    """Read without the event loop (which the test blocks)."""
    record = NodeRecord.from_bytes(client.hget(keys.MEMBERS, node))  # type: ignore[arg-type]
    assert record is not None
    return record.beat


async def test_a_blocked_loop_keeps_beating_until_the_stall_limit(
    redis_url: str, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hb, "LOOP_STALL_LIMIT_S", 0.6)
    config = NodeConfig(backends=Backends(redis_url=redis_url), node_id="beating", membership=BEAT)
    store = MembershipStore(redis)
    client = sync_redis.Redis.from_url(redis_url)
    beat = hb.Heartbeat(store, config, lambda: 0, Metrics("test"))
    await beat.beat_once()
    beat.start()
    try:
        before = _beat(client, "beating")
        _block(0.4)  # the loop is blocked: no task, no timer runs
        assert _beat(client, "beating") >= before + 5  # ~20 beats came from the thread
        _block(0.5)  # blocked for 0.9 s now, past the limit: the beats stop
        stuck = _beat(client, "beating")
        _block(0.2)
        assert _beat(client, "beating") == stuck
        # The loop turns again (its stamp is renewed): the beats resume.
        await asyncio.sleep(0.3)
        assert _beat(client, "beating") > stuck
    finally:
        await beat.aclose()
        client.close()
    assert "beating" not in await store.read_all()  # deregistered at close
