"""Hierarchical memory of a call: working memory, session facts, long-term retrieval, and
a prompt assembled from that compressed state within a token budget.

Per node: one :class:`KnowledgeBase` per tenant (or a shared default), one
:class:`RetrievalOrchestrator` over the knowledge sources, one :class:`PromptBuilder`.
Per call: a :class:`SessionMemory` (restored from the checkpoint) and a
:class:`CallRetriever`. See ``SessionMemory`` for the per-turn calls.

Names are imported on first use: ``import memory.working`` (as the node and replay do) does
not load the retrieval and tokenizer libraries.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from memory.errors import (
        CallMemoryError,
        HistoryUnavailable,
        InvalidScope,
        KnowledgeBaseError,
        SourceError,
    )
    from memory.extract import Extraction, FactExtractor, LLMToolExtractor, RuleExtractor
    from memory.facts import Fact, SessionFacts
    from memory.history import CallRecord, HistoryStore, InMemoryHistoryStore, RedisHistoryStore
    from memory.knowledge import DEMO_KB_DIR, KnowledgeBase, Passage, synthetic_passages
    from memory.prompt import DEFAULT_INSTRUCTIONS, Prompt, PromptBudget, PromptBuilder
    from memory.retrieval import (
        CallRetriever,
        RetrievalOrchestrator,
        RetrievalResult,
        SourcePolicy,
        SourceStatus,
    )
    from memory.session import MemoryConfig, MemoryState, SessionMemory, TurnUpdate
    from memory.sources import (
        CustomerHistorySource,
        KnowledgeBaseSource,
        KnowledgeSource,
        Query,
        SimulatedBookingSlots,
        Snippet,
    )
    from memory.working import Exchange, WorkingMemory

_HOME = {
    "CallMemoryError": "memory.errors",
    "CallRecord": "memory.history",
    "CallRetriever": "memory.retrieval",
    "CustomerHistorySource": "memory.sources",
    "DEFAULT_INSTRUCTIONS": "memory.prompt",
    "DEMO_KB_DIR": "memory.knowledge",
    "Exchange": "memory.working",
    "Extraction": "memory.extract",
    "Fact": "memory.facts",
    "FactExtractor": "memory.extract",
    "HistoryStore": "memory.history",
    "HistoryUnavailable": "memory.errors",
    "InMemoryHistoryStore": "memory.history",
    "InvalidScope": "memory.errors",
    "KnowledgeBase": "memory.knowledge",
    "KnowledgeBaseError": "memory.errors",
    "KnowledgeBaseSource": "memory.sources",
    "KnowledgeSource": "memory.sources",
    "LLMToolExtractor": "memory.extract",
    "MemoryConfig": "memory.session",
    "MemoryState": "memory.session",
    "Passage": "memory.knowledge",
    "Prompt": "memory.prompt",
    "PromptBudget": "memory.prompt",
    "PromptBuilder": "memory.prompt",
    "Query": "memory.sources",
    "RedisHistoryStore": "memory.history",
    "RetrievalOrchestrator": "memory.retrieval",
    "RetrievalResult": "memory.retrieval",
    "RuleExtractor": "memory.extract",
    "SessionFacts": "memory.facts",
    "SessionMemory": "memory.session",
    "SimulatedBookingSlots": "memory.sources",
    "Snippet": "memory.sources",
    "SourceError": "memory.errors",
    "SourcePolicy": "memory.retrieval",
    "SourceStatus": "memory.retrieval",
    "TurnUpdate": "memory.session",
    "WorkingMemory": "memory.working",
    "synthetic_passages": "memory.knowledge",
}

__all__ = [
    "DEFAULT_INSTRUCTIONS",
    "DEMO_KB_DIR",
    "CallMemoryError",
    "CallRecord",
    "CallRetriever",
    "CustomerHistorySource",
    "Exchange",
    "Extraction",
    "Fact",
    "FactExtractor",
    "HistoryStore",
    "HistoryUnavailable",
    "InMemoryHistoryStore",
    "InvalidScope",
    "KnowledgeBase",
    "KnowledgeBaseError",
    "KnowledgeBaseSource",
    "KnowledgeSource",
    "LLMToolExtractor",
    "MemoryConfig",
    "MemoryState",
    "Passage",
    "Prompt",
    "PromptBudget",
    "PromptBuilder",
    "Query",
    "RedisHistoryStore",
    "RetrievalOrchestrator",
    "RetrievalResult",
    "RuleExtractor",
    "SessionFacts",
    "SessionMemory",
    "SimulatedBookingSlots",
    "Snippet",
    "SourceError",
    "SourcePolicy",
    "SourceStatus",
    "TurnUpdate",
    "WorkingMemory",
    "synthetic_passages",
]


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'memory' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value
