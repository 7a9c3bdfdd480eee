"""Customer history against a real Redis: a call's facts and summary reach the next call of
the same caller, and nothing crosses tenants or callers."""

from __future__ import annotations

import socket

import pytest
from redis.asyncio import Redis

from memory.errors import HistoryUnavailable, InvalidScope
from memory.history import CallRecord, InMemoryHistoryStore, RedisHistoryStore
from memory.prompt import PromptBuilder
from memory.retrieval import RetrievalOrchestrator, SourcePolicy, SourceStatus
from memory.session import SessionMemory
from memory.sources import CustomerHistorySource, Query
from state_store import keys
from state_store.client import connect

NOW_MS = 1_700_000_000_000


def record(
    tenant: str, caller: str, call_id: str, summary: str = "Booked a cleaning."
) -> CallRecord:
    return CallRecord(tenant, caller, call_id, NOW_MS, {"service": "cleaning"}, summary)


async def test_round_trip_newest_first_and_bounded(redis: Redis) -> None:
    store = RedisHistoryStore(redis, max_calls=3)
    for i in range(5):
        await store.save(record("acme", "alice", f"call-{i}"))
    loaded = await store.load("acme", "alice", limit=10)
    assert [r.call_id for r in loaded] == ["call-4", "call-3", "call-2"]
    assert loaded[0] == record("acme", "alice", "call-4")
    assert await redis.llen(keys.caller_history("acme", "alice")) == 3
    assert await redis.ttl(keys.caller_history("acme", "alice")) > 0


async def test_records_are_bounded_in_size(redis: Redis) -> None:
    store = RedisHistoryStore(redis)
    huge = CallRecord("acme", "alice", "c", NOW_MS,
                      {f"slot{i}": "v" * 1000 for i in range(100)}, "s" * 10_000)  # fmt: skip
    await store.save(huge)
    (loaded,) = await store.load("acme", "alice")
    assert len(loaded.summary) == 300 and len(loaded.facts) == 16
    assert all(len(v) == 80 for v in loaded.facts.values())


async def test_nothing_crosses_tenants_or_callers(redis: Redis) -> None:
    store = RedisHistoryStore(redis)
    await store.save(record("acme", "alice", "acme-alice", "acme secret"))
    await store.save(record("globex", "bob", "globex-bob", "globex secret"))
    assert await store.load("globex", "alice") == []  # same caller id, other tenant
    assert await store.load("acme", "bob") == []  # same tenant, other caller
    assert [r.call_id for r in await store.load("acme", "alice")] == ["acme-alice"]
    assert [r.call_id for r in await store.load("globex", "bob")] == ["globex-bob"]


@pytest.mark.parametrize(
    ("tenant", "caller"),
    [("acme:caller:{alice}", "x"), ("acme", "alice}:history"), ("acme", "*"), ("", "alice"),
     ("acme", "al ice"), ("a" * 65, "alice")],
)  # fmt: skip
async def test_ids_that_could_name_another_key_are_refused(
    redis: Redis, tenant: str, caller: str
) -> None:
    store = RedisHistoryStore(redis)
    await store.save(record("acme", "alice", "acme-alice"))
    with pytest.raises(InvalidScope):
        await store.load(tenant, caller)
    with pytest.raises(InvalidScope):
        await store.save(record(tenant, caller, "evil"))
    assert await redis.keys("*evil*") == []


async def test_a_record_under_the_wrong_key_is_not_returned(redis: Redis) -> None:
    # Defence in depth: even if another tenant's record sat under this key, it stays hidden.
    await redis.lpush(keys.caller_history("globex", "alice"),
                      record("acme", "alice", "acme-alice").to_bytes())  # fmt: skip
    await redis.lpush(keys.caller_history("globex", "alice"), b"\xc1 not msgpack")
    assert await RedisHistoryStore(redis).load("globex", "alice") == []


async def test_redis_down_is_a_retryable_error_and_a_failed_source() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    client = connect(f"redis://127.0.0.1:{port}/0", timeout_s=0.5)
    try:
        store = RedisHistoryStore(client)
        with pytest.raises(HistoryUnavailable) as err:
            await store.load("acme", "alice")
        assert err.value.retryable
        with pytest.raises(HistoryUnavailable):
            await store.save(record("acme", "alice", "c"))
        source = CustomerHistorySource(store)
        async with RetrievalOrchestrator([(source, SourcePolicy(timeout_ms=2000))]) as orch:
            result = await orch.retrieve(Query("hi", "acme", "alice"))
        assert result.failed == ("customer_history",) and result.partial
    finally:
        await client.aclose()


async def test_the_next_call_of_the_same_caller_retrieves_the_last_one(redis: Redis) -> None:
    store = RedisHistoryStore(redis)
    first = SessionMemory("acme", "alice")
    first.observe_turn(1, "Hi, my name is Anna Smith, book a cleaning on Monday at 3pm", "OK?")
    first.observe_turn(2, "yes please", "Booked.")
    await store.save(first.call_record("call-1", NOW_MS))

    source = CustomerHistorySource(store)
    async with RetrievalOrchestrator([(source, SourcePolicy(timeout_ms=2000))]) as orch:
        second = SessionMemory("acme", "alice")
        retriever = orch.for_call(second.query_for)
        try:
            result = await retriever.retrieve("Hi, it's me again")
        finally:
            await retriever.aclose()
        stranger = await orch.retrieve(Query("Hi, it's me again", "acme", "mallory"))
        other_tenant = await orch.retrieve(Query("Hi, it's me again", "globex", "alice"))

    assert result.status["customer_history"] is SourceStatus.ANSWERED
    (snippet,) = result.snippets
    assert snippet.ref == "call-1"
    assert "Confirmed booking: cleaning, Monday, 3:00 pm" in snippet.text
    prompt = PromptBuilder().build(second, "Hi, it's me again", result)
    assert "Confirmed booking: cleaning, Monday, 3:00 pm" in prompt.messages[0]["content"]
    assert stranger.snippets == () and other_tenant.snippets == ()


async def test_in_memory_store_has_the_same_isolation() -> None:
    store = InMemoryHistoryStore(max_calls=2)
    for i in range(3):
        await store.save(record("acme", "alice", f"c{i}"))
    assert [r.call_id for r in await store.load("acme", "alice")] == ["c2", "c1"]
    assert await store.load("globex", "alice") == [] and await store.load("acme", "bob") == []
    with pytest.raises(InvalidScope):
        await store.load("acme", "bob}")
