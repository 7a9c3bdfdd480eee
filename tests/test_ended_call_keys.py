"""What an ended call leaves in Redis: every per-call key of state_store.keys is either
released at hang-up or kept for replay under the ended-call retention, and an ended call
is never taken (nor its lease recreated) again. Against one server and a Redis Cluster."""

from __future__ import annotations

import inspect

import pytest

from callmesh.auth.resume import issue
from state_store import keys
from state_store.checkpoint import ENDED, Checkpoint, OutboxEntry
from state_store.client import RedisClient
from state_store.errors import FencedOut
from state_store.pins import PinStore
from state_store.resume import ResumeStore
from state_store.store import StateStore

T, CALL = "acme", "c1"
RETENTION_S = 120
LIVE_TTL_S = 24 * 3600


@pytest.fixture
def redis(any_redis: RedisClient) -> RedisClient:
    return any_redis


def per_call_key_functions() -> dict[str, str]:
    """Every function of state_store.keys that names a key of one call: name → part."""
    found = {}
    for name, fn in inspect.getmembers(keys, inspect.isfunction):
        params = list(inspect.signature(fn).parameters)
        if fn.__module__ != keys.__name__ or params != ["tenant", "call_id"]:
            continue
        key = fn("t", "c")
        if isinstance(key, str) and ":call:{c}:" in key:
            found[name] = keys.kind_of(key)
    return found


def test_every_per_call_key_is_released_or_kept_for_replay() -> None:
    parts = per_call_key_functions()
    assert set(parts) >= {"lease", "checkpoint", "pin", "resume"}
    decided = set(keys.ENDED_CALL_KEPT) | set(keys.ENDED_CALL_RELEASED)
    assert not set(keys.ENDED_CALL_KEPT) & set(keys.ENDED_CALL_RELEASED)
    undecided = {name for name, part in parts.items() if part not in decided}
    assert not undecided, f"per-call keys with no fate at hang-up: {undecided}"
    assert keys.ENDED_CALL_KEPT == ("ckpt",)  # replay needs the checkpoint, nothing else


def _ckpt(epoch: int, *, status: str = "active", outbox: bool = False) -> Checkpoint:
    return Checkpoint(
        tenant=T,
        call_id=CALL,
        caller="bob",
        epoch=epoch,
        node="n1",
        turn=3,
        status=status,
        outbox=[OutboxEntry("effects.acme.x", "c1:3:0", b"{}", 3)] if outbox else [],
    )


async def _live_call(redis: RedisClient, store: StateStore) -> int:
    """A live call as a router and a node leave it: pin, resume record, lease, checkpoint."""
    await PinStore(redis).set(T, CALL, "n1")
    _, record = issue(T, CALL)
    assert await ResumeStore(redis).swap(None, record)
    epoch, _ = await store.take_ownership(T, CALL, "n1")
    await store.save(_ckpt(epoch))
    return epoch


async def test_hang_up_releases_everything_but_the_checkpoint(redis: RedisClient) -> None:
    store = StateStore(redis, ttl_s=LIVE_TTL_S, ended_retention_s=RETENTION_S)
    epoch = await _live_call(redis, store)
    await store.save(_ckpt(epoch, status=ENDED))
    assert await store.end(T, CALL, epoch, final=True)
    for key in keys.ended_call_released(T, CALL):
        assert not await redis.exists(key), key
    for key in keys.ended_call_kept(T, CALL):
        assert 0 < await redis.ttl(key) <= RETENTION_S, key
    ended = await store.load(T, CALL)  # what replay reads
    assert ended is not None and ended.status == ENDED and ended.turn == 3


async def test_effects_left_to_publish_keep_the_lease_to_fence_their_publisher(
    redis: RedisClient,
) -> None:
    store = StateStore(redis, ttl_s=LIVE_TTL_S, ended_retention_s=RETENTION_S)
    epoch = await _live_call(redis, store)
    await store.save(_ckpt(epoch, status=ENDED, outbox=True))
    assert await store.end(T, CALL, epoch, final=False)
    assert not await redis.exists(keys.pin(T, CALL), keys.resume(T, CALL))
    assert await store.owner(T, CALL) == (None, epoch)
    assert await redis.ttl(keys.checkpoint(T, CALL)) > RETENTION_S
    # Published and saved empty: ended again, finally.
    await store.save(_ckpt(epoch, status=ENDED))
    assert await store.end(T, CALL, epoch, final=True)
    assert not await redis.exists(keys.lease(T, CALL))
    assert 0 < await redis.ttl(keys.checkpoint(T, CALL)) <= RETENTION_S


async def test_a_fenced_node_cannot_end_a_call_that_lives_elsewhere(redis: RedisClient) -> None:
    store = StateStore(redis, ttl_s=LIVE_TTL_S, ended_retention_s=RETENTION_S)
    old = await _live_call(redis, store)
    new, _ = await store.take_ownership(T, CALL, "n2")
    assert not await store.end(T, CALL, old, final=True)
    assert await redis.exists(keys.pin(T, CALL), keys.resume(T, CALL), keys.lease(T, CALL)) == 3
    assert await redis.ttl(keys.checkpoint(T, CALL)) > RETENTION_S
    assert await store.owner(T, CALL) == ("n2", new)


async def test_an_ended_call_is_not_taken_again(redis: RedisClient) -> None:
    """A reconnect of an ended call reads its final checkpoint (and is told it ended) but
    takes nothing: no lease comes back, no epoch is handed out, nothing can be written."""
    store = StateStore(redis, ttl_s=LIVE_TTL_S, ended_retention_s=RETENTION_S)
    epoch = await _live_call(redis, store)
    await store.save(_ckpt(epoch, status=ENDED))
    await store.end(T, CALL, epoch, final=True)
    again, ckpt = await store.take_ownership(T, CALL, "n2")
    assert again == 0 and ckpt is not None and ckpt.status == ENDED
    assert not await redis.exists(keys.lease(T, CALL))
    for stale in (0, epoch):
        with pytest.raises(FencedOut):
            await store.save(_ckpt(stale))
    saved = await store.load(T, CALL)
    assert saved is not None and saved.status == ENDED


async def test_a_live_checkpoint_whose_lease_was_lost_is_taken_past_its_epoch(
    redis: RedisClient,
) -> None:
    store = StateStore(redis, ttl_s=LIVE_TTL_S, ended_retention_s=RETENTION_S)
    for _ in range(3):
        epoch, _ = await store.take_ownership(T, CALL, "n1")
    await store.save(_ckpt(epoch))
    await redis.delete(keys.lease(T, CALL))  # evicted
    new, ckpt = await store.take_ownership(T, CALL, "n2")
    assert new > epoch and ckpt is not None and ckpt.status == "active"
    with pytest.raises(FencedOut):
        await store.save(_ckpt(epoch))
