"""Prompt assembly: within the token budget, counted exactly, one shape at every length."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memory.prompt import (
    EMPTY,
    SECTIONS,
    ApproximateTokenCounter,
    PromptBudget,
    PromptBuilder,
    TiktokenCounter,
    default_counter,
)
from memory.retrieval import RetrievalResult, SourceStatus
from memory.session import SessionMemory
from memory.sources import Snippet

LONG = "I was wondering, and please bear with me because this is a long story, " * 12


@pytest.fixture(scope="module")
def builder() -> PromptBuilder:
    return PromptBuilder()


def call_of(
    turns: int, *, utterance: str = "Can I book a cleaning on Monday at 3pm"
) -> SessionMemory:
    memory = SessionMemory("acme", "alice")
    for turn in range(1, turns + 1):
        memory.observe_turn(turn, f"{utterance} (turn {turn})", f"Sure, noted for turn {turn}.")
    return memory


def retrieval(
    n: int = 3, *, text: str = "Prices: cleaning $120", timed_out: bool = False
) -> RetrievalResult:
    status = {"knowledge_base": SourceStatus.ANSWERED}
    if timed_out:
        status["booking_slots_simulated"] = SourceStatus.TIMED_OUT
    snippets = tuple(Snippet("knowledge_base", f"{text} #{i}", f"doc#{i}") for i in range(n))
    return RetrievalResult("q", snippets, status, 1.0)


def test_tokens_are_counted_exactly_with_tiktoken_offline() -> None:
    counter = default_counter()
    assert isinstance(counter, TiktokenCounter) and counter.exact
    assert counter.count("hello world") == 2  # cl100k_base: "hello", " world"
    assert counter.count(counter.truncate(LONG, 20)) <= 20


def test_prompt_tokens_are_the_exact_count_of_the_messages(builder: PromptBuilder) -> None:
    prompt = builder.build(call_of(5), "How much is it?", retrieval())
    count = builder.counter.count
    exact = sum(count(m["content"]) + 4 for m in prompt.messages) + 3
    assert prompt.tokens == exact


@pytest.mark.parametrize("turns", [0, 1, 10, 1000])
def test_long_calls_stay_within_the_budget(builder: PromptBuilder, turns: int) -> None:
    memory = call_of(turns, utterance=LONG)
    prompt = builder.build(memory, LONG * 3, retrieval(20, text=LONG))
    assert prompt.tokens <= builder.budget.total
    if turns >= 10:
        assert "Recent conversation" in prompt.truncated
        assert "Retrieved knowledge" in prompt.truncated


def test_shape_is_identical_whatever_the_call_length(builder: PromptBuilder) -> None:
    shapes = {
        builder.build(call_of(n), "hello", retrieval() if n else None).shape
        for n in (0, 1, 10, 100, 1000)
    }
    assert shapes == {(("system", SECTIONS), ("user", ()))}


def test_size_does_not_grow_with_the_call(builder: PromptBuilder) -> None:
    at_100 = builder.build(call_of(100), "hello", retrieval())
    at_1000 = builder.build(call_of(1000), "hello", retrieval())
    # Only the turn numbers in the text differ ("turn 95" vs "turn 995").
    assert abs(at_1000.tokens - at_100.tokens) <= 12
    system = at_1000.messages[0]["content"]
    assert "noted for turn 1000." in system and "noted for turn 993." in system
    assert "noted for turn 992." not in system and "noted for turn 1." not in system


def test_empty_sections_say_so(builder: PromptBuilder) -> None:
    prompt = builder.build(SessionMemory("acme", "alice"), "hi")
    system = prompt.messages[0]["content"]
    for text in EMPTY.values():
        assert text in system


def test_facts_show_provenance_and_corrections(builder: PromptBuilder) -> None:
    memory = SessionMemory("acme", "alice")
    memory.observe_turn(1, "book a cleaning on Monday", "Which time?")
    memory.observe_turn(2, "no, Tuesday", "Tuesday it is.")
    system = builder.build(memory, "thanks").messages[0]["content"]
    assert "- date: Tuesday (turn 2, corrected from Monday)" in system
    assert "- service: cleaning (turn 1)" in system
    assert "date corrected from Monday to Tuesday" in system


def test_barge_in_shows_what_the_caller_heard(builder: PromptBuilder) -> None:
    memory = SessionMemory("acme", "alice")
    memory.observe_user(1, "what are your hours")
    memory.observe_agent(1, "We are open from eight", interrupted=True)
    system = builder.build(memory, "sorry, on Saturday?").messages[0]["content"]
    assert "Agent (cut off by the caller; they heard only this): We are open from eight" in system


def test_gaps_are_marked_and_survive_truncation(builder: PromptBuilder) -> None:
    prompt = builder.build(call_of(3), "any slots?", retrieval(20, text=LONG, timed_out=True))
    system = prompt.messages[0]["content"]
    assert "MISSING (do not guess" in system and "booking_slots_simulated (timed_out)" in system
    assert "Retrieved knowledge" in prompt.truncated
    # The structured snippets are the ones the prompt shows, not the ones cut.
    assert 0 < len(prompt.snippets) < 20
    assert all(s in system for s in prompt.snippets)


def test_structured_parts_for_the_model(builder: PromptBuilder) -> None:
    memory = call_of(2)
    prompt = builder.build(memory, "hello", retrieval(2))
    assert prompt.facts == memory.facts.values()
    assert prompt.snippets == ["[knowledge_base] Prices: cleaning $120 #0",
                               "[knowledge_base] Prices: cleaning $120 #1"]  # fmt: skip
    assert prompt.messages[1] == {"role": "user", "content": "hello"}


def test_budget_is_validated() -> None:
    with pytest.raises(ValueError, match="add up"):
        PromptBudget(total=500)
    with pytest.raises(ValueError, match="instructions"):
        PromptBuilder(instructions=LONG * 10)


def test_approximate_counter_is_labelled_and_bounded() -> None:
    counter = ApproximateTokenCounter()
    assert not counter.exact and counter.name.startswith("approximate")
    assert counter.count(counter.truncate(LONG, 30)) <= 30
    builder = PromptBuilder(counter=counter)
    assert builder.build(call_of(50, utterance=LONG), LONG).tokens <= builder.budget.total


def test_the_line_cache_keeps_lines_never_whole_sections() -> None:
    """Sections are new every turn; in the per-process line cache they would take a
    kilobyte a turn that no turn reads again (what an ended call must not leave)."""
    counter = TiktokenCounter()
    kept: list[str] = []
    cached = counter._line_counts

    def recording(text: str) -> int:
        kept.append(text)
        return cached(text)

    counter._line_counts = recording  # type: ignore[method-assign]
    prompt = PromptBuilder(counter=counter).build(call_of(3), "How much is it?", retrieval())
    system = prompt.messages[0]["content"]
    sections = {
        name: body
        for name, body in (part.split("\n", 1) for part in system.split("\n\n## "))
        if name.removeprefix("## ") in ("Recent conversation", "Retrieved knowledge")
    }
    assert len(sections) == 2 and all(body.count("\n") >= 2 for body in sections.values())
    assert kept and not set(sections.values()) & set(kept)


# Letters, digits, punctuation, apostrophes (contractions), every kind of blank: the
# characters tiktoken's pattern treats differently at a line's end and start.
PARTS = [*"ab Zé9'.,:-#()\n\r\t ", "\u00a0", "\u2019s", "'ll", "word", " Word", "123456", "...\n"]
TEXT = st.lists(st.sampled_from(PARTS), max_size=12).map("".join)


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(TEXT, max_size=8))
def test_counting_line_by_line_is_exact(lines: list[str]) -> None:
    counter = default_counter()
    assert isinstance(counter, TiktokenCounter)
    text = "\n".join(lines)
    assert counter.count_lines(text) == counter.count_once(text)


def test_an_unchanged_prompt_is_not_tokenized_again() -> None:
    """Turn after turn most of a prompt recurs (instructions, facts, earlier exchanges);
    only the new words are tokenized, where the whole prompt was, twice."""
    counter = TiktokenCounter()
    builder = PromptBuilder(counter=counter)
    memory, found = call_of(4), retrieval()
    first = builder.build(memory, "How much is it?", found)
    tokenized: list[str] = []
    counter._enc = Recording(counter._enc, tokenized)  # type: ignore[assignment]
    counter.forget()
    builder.build(memory, "How much is it?", found)
    cold = len(tokenized)
    tokenized.clear()
    again = builder.build(memory, "How much is it?", found)
    assert again == first
    # Cut to its budget, then counted: the caller's words only.
    assert tokenized == ["How much is it?"] * 2 and cold > 10


class Recording:
    """A tiktoken encoding that records what it is asked to encode."""

    def __init__(self, enc: Any, texts: list[str]) -> None:
        self._enc, self._texts = enc, texts

    def encode_ordinary(self, text: str) -> list[int]:
        self._texts.append(text)
        return list(self._enc.encode_ordinary(text))

    def decode(self, ids: list[int]) -> str:
        return str(self._enc.decode(ids))
