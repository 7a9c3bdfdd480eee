"""Errors of the memory package, grouped by cause.

Redis errors are translated at the one boundary that talks to Redis (:mod:`memory.history`);
a knowledge source's own failure is caught by the retrieval orchestrator and reported in the
result as ``failed`` rather than raised, so a broken source never stops a turn.
"""

from __future__ import annotations


class CallMemoryError(Exception):
    """Root of every memory error."""

    retryable = False


class KnowledgeBaseError(CallMemoryError):
    """A knowledge base directory or document is invalid: a configuration problem, fixed by
    editing the documents, never by retrying."""


class SourceError(CallMemoryError):
    """A knowledge source could not answer a query."""

    def __init__(self, source: str, message: str, *, retryable: bool = True) -> None:
        super().__init__(f"{source}: {message}")
        self.source = source
        self.retryable = retryable


class HistoryUnavailable(SourceError):
    """The customer history store (Redis) could not be reached or timed out; the same
    read or write may succeed later."""

    def __init__(self, message: str) -> None:
        super().__init__("customer_history", message, retryable=True)


class InvalidScope(CallMemoryError, ValueError):
    """A tenant or caller id that may not name a key (empty, too long, or with characters
    that could reach another tenant's or caller's keys)."""
