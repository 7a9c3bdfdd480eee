"""Fenced ownership and checkpoints against a real Redis-compatible server, and against a
Redis Cluster (3 masters + 3 replicas): every test runs on both."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest

from state_store import keys
from state_store.checkpoint import Checkpoint, OutboxEntry
from state_store.client import RedisClient, connect, connect_sync
from state_store.errors import CorruptState, FencedOut
from state_store.pins import PinStore
from state_store.store import StateStore


@pytest.fixture
def redis(any_redis: RedisClient) -> RedisClient:
    return any_redis


def _ckpt(epoch: int, turn: int, node: str = "n1") -> Checkpoint:
    return Checkpoint(
        tenant="acme",
        call_id="c1",
        caller="bob",
        epoch=epoch,
        node=node,
        turn=turn,
        last_seq=turn + 1,
        facts={"name": ["Bob", 1, None]},
        outbox=[OutboxEntry("effects.acme.booking_create", "c1:1:0", b"{}", 1)],
    )


async def test_take_ownership_increments_epoch_and_restores(redis: RedisClient) -> None:
    store = StateStore(redis)
    epoch, ckpt = await store.take_ownership("acme", "c1", "n1")
    assert (epoch, ckpt) == (1, None)
    await store.save(_ckpt(epoch, 3))
    epoch2, restored = await store.take_ownership("acme", "c1", "n2")
    assert epoch2 == 2
    assert restored is not None and restored.turn == 3 and restored.facts["name"][0] == "Bob"
    assert restored.outbox[0].msg_id == "c1:1:0"
    assert await store.owner("acme", "c1") == ("n2", 2)


async def test_stale_owner_is_fenced_out_and_cannot_overwrite(redis: RedisClient) -> None:
    store = StateStore(redis)
    old, _ = await store.take_ownership("acme", "c1", "n1")
    await store.save(_ckpt(old, 1))
    new, _ = await store.take_ownership("acme", "c1", "n2")
    await store.save(_ckpt(new, 2, node="n2"))
    with pytest.raises(FencedOut) as info:
        await store.save(_ckpt(old, 5))
    assert (info.value.mine, info.value.current) == (old, new)
    saved = await store.load("acme", "c1")
    assert saved is not None and saved.turn == 2 and saved.node == "n2"


async def test_end_only_by_current_owner(redis: RedisClient) -> None:
    store = StateStore(redis)
    e1, _ = await store.take_ownership("acme", "c1", "n1")
    e2, _ = await store.take_ownership("acme", "c1", "n2")
    assert not await store.end("acme", "c1", e1, final=False)
    assert await store.end("acme", "c1", e2, final=False)
    # Effects still to publish: the lease stays, without a node, to fence their publisher.
    assert await store.owner("acme", "c1") == (None, e2)


async def test_keys_share_the_call_hash_tag_and_are_tenant_scoped() -> None:
    names = [keys.lease("t1", "c9"), keys.checkpoint("t1", "c9"), keys.pin("t1", "c9")]
    assert all("{c9}" in k and k.startswith("cm:t1:") for k in names)
    assert keys.checkpoint("t1", "c9") != keys.checkpoint("t2", "c9")


async def test_tenants_do_not_see_each_others_calls(redis: RedisClient) -> None:
    store = StateStore(redis)
    epoch, _ = await store.take_ownership("acme", "c1", "n1")
    await store.save(_ckpt(epoch, 1))
    assert await store.load("other", "c1") is None


async def test_corrupt_checkpoint_is_reported(redis: RedisClient) -> None:
    await redis.set(keys.checkpoint("acme", "c1"), b"\xc1 not msgpack")
    with pytest.raises(CorruptState):
        await StateStore(redis).load("acme", "c1")


async def test_pins_clear_only_if_unchanged(redis: RedisClient) -> None:
    pins = PinStore(redis)
    await pins.set("acme", "c1", "n1")
    await pins.set("acme", "c1", "n2")
    await pins.clear("acme", "c1", "n1")
    assert await pins.get("acme", "c1") == "n2"
    await pins.clear("acme", "c1", "n2")
    assert await pins.get("acme", "c1") is None


def test_a_checkpoint_packs_to_the_same_bytes_as_its_fields() -> None:
    """Packed field by field (no deep copy per commit), the format is what it was: every
    field in order, the outbox as maps, and the version."""
    ckpt = _ckpt(3, 7)
    ckpt.working = [[6, "hi", "hello", False], [7, "book", "Booked.", True]]
    ckpt.extra = {"notes": [[2, "asked for prices"]], "summary": "booking"}
    ckpt.trace = "00-abc-def-01"
    blob = ckpt.to_bytes()
    expected = {**dataclasses.asdict(ckpt), "v": 1}
    assert msgpack.unpackb(blob, raw=False, strict_map_key=False) == expected
    assert list(msgpack.unpackb(blob, raw=False)) == list(expected)
    assert Checkpoint.from_bytes(blob) == ckpt


async def test_a_new_connection_sends_nothing_the_server_may_refuse(redis_url: str) -> None:
    """redis-py's default handshake adds CLIENT SETINFO and CLIENT MAINT_NOTIFICATIONS:
    refused by Redis before 7.2 and by every Valkey respectively, and each refusal's
    traceback cycle kept the router's call handler alive until the cyclic collector ran."""
    admin = connect(redis_url)

    async def server_counts() -> tuple[int, dict[str, int]]:
        stats = await admin.info("stats")
        commands = await admin.info("commandstats")
        client = {k: v["calls"] for k, v in commands.items() if k.startswith("cmdstat_client")}
        return stats["total_error_replies"], client

    try:
        before = await server_counts()
        fresh = connect(redis_url)
        await fresh.ping()
        await fresh.aclose()
        blocking = connect_sync(redis_url)
        blocking.ping()
        blocking.close()
        assert await server_counts() == before
    finally:
        await admin.aclose()
