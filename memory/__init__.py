"""Hierarchical memory of a call: working memory, session facts, long-term retrieval, and
a prompt assembled from that compressed state within a token budget.

Per node: one :class:`KnowledgeBase` per tenant (or a shared default), one
:class:`RetrievalOrchestrator` over the knowledge sources, one :class:`PromptBuilder`.
Per call: a :class:`SessionMemory` (restored from the checkpoint) and a
:class:`CallRetriever`. See ``SessionMemory`` for the per-turn calls.
"""

from memory.errors import (
    CallMemoryError,
    HistoryUnavailable,
    InvalidScope,
    KnowledgeBaseError,
    SourceError,
)
from memory.extract import Extraction, FactExtractor, LLMToolExtractor, RuleExtractor, extract
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
    "extract",
    "synthetic_passages",
]
