"""Retrieval queries and cache keys are bounded in size, however long the utterance."""

from __future__ import annotations

import sys

from memory.knowledge import DEMO_KB_DIR, KnowledgeBase
from memory.retrieval import RetrievalOrchestrator, SourcePolicy
from memory.session import SessionMemory
from memory.sources import MAX_QUERY_CHARS, KnowledgeBaseSource, Query


def key_size(key: object) -> int:
    """Bytes held by a cache key of tuples of strings."""
    if isinstance(key, tuple):
        return sys.getsizeof(key) + sum(key_size(k) for k in key)
    return sys.getsizeof(key)


def test_a_query_keeps_a_bounded_head_of_the_utterance() -> None:
    text = "How much is a cleaning " + "word%d " * 40_000
    query = Query(text, "acme", "bob")
    assert len(query.text) == MAX_QUERY_CHARS and text.startswith(query.text)
    memory = SessionMemory("acme", "bob")
    assert len(memory.query_for(text).text) <= MAX_QUERY_CHARS


async def test_a_huge_utterance_costs_a_bounded_cache_entry() -> None:
    kb = KnowledgeBaseSource(default=KnowledgeBase.from_directory(DEMO_KB_DIR))
    memory = SessionMemory("acme", "bob")
    huge = "How much is a cleaning? " + " ".join(f"filler{i}" for i in range(30_000))
    assert len(huge) > 250_000
    async with RetrievalOrchestrator([(kb, SourcePolicy(timeout_ms=2000))]) as orch:
        await orch.retrieve(memory.query_for(huge))
        await orch.retrieve(memory.query_for("What are your opening hours?"))
        (reg,) = orch._sources
        assert len(reg.cache) == 2
        # Each key is bounded by the query text (a few KB), not by the utterance.
        assert all(key_size(k) < 64 * 1024 for k in reg.cache)
