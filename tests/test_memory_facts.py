"""Session facts: provenance, corrections overriding older values, confirmations, and the
two extractors (rules; a tool call with the model, validated)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from memory.extract import FACTS_TOOL, LLMToolExtractor, extract, parse_tool_arguments
from memory.facts import SessionFacts
from memory.session import SessionMemory


def test_fact_records_the_turn_that_set_it_and_what_it_replaced() -> None:
    facts = SessionFacts()
    assert facts.set("date", "Monday", 3)
    assert not facts.set("date", "Monday", 5)  # same value: no change, provenance kept
    first = facts.fact("date")
    assert first is not None and first.turn == 3
    assert facts.set("date", "Tuesday", 7)
    fact = facts.fact("date")
    assert fact is not None
    assert (fact.value, fact.turn, fact.replaced) == ("Tuesday", 7, "Monday")
    assert SessionFacts.from_state(facts.to_state()).fact("date") == fact


def test_facts_are_bounded_by_slot_count() -> None:
    facts = SessionFacts(max_slots=2)
    assert facts.set("a", "1", 1) and facts.set("b", "2", 1)
    assert not facts.set("c", "3", 1)
    assert facts.set("a", "changed", 2)  # existing slots still update
    assert facts.values() == {"a": "changed", "b": "2"}


@pytest.mark.parametrize(
    ("text", "slots", "intent"),
    [
        ("Hi, my name is Anna Smith", {"name": "Anna Smith"}, "provide_info"),
        ("I'd like to book a cleaning on Tuesday at 3pm",
         {"service": "cleaning", "date": "Tuesday", "time": "3:00 pm"}, "booking"),
        ("How much is a check-up?", {"service": "checkup"}, "pricing"),
        ("around noon tomorrow", {"time": "12:00 pm", "date": "Tomorrow"}, "provide_info"),
        ("my budget is $200", {"budget": "200"}, "provide_info"),
        ("can I come in at the Riverside office", {"location": "Riverside"}, "provide_info"),
        ("I need to cancel", {}, "cancel"),
        ("yes please", {}, "confirm"),
    ],
)  # fmt: skip
def test_rule_extraction(text: str, slots: dict[str, str], intent: str) -> None:
    ex = extract(text)
    assert ex.slots == slots
    assert ex.intent == intent


def test_correction_overrides_the_older_value_with_provenance() -> None:
    mem = SessionMemory("acme", "alice")
    mem.observe_user(1, "I want to book a cleaning on Monday")
    update = mem.observe_user(2, "no, Tuesday")
    assert update.denied
    assert [(c.slot, c.previous, c.value) for c in update.corrections] == [
        ("date", "Monday", "Tuesday")
    ]
    fact = mem.facts.fact("date")
    assert fact is not None and (fact.value, fact.turn, fact.replaced) == ("Tuesday", 2, "Monday")
    assert any("date corrected from Monday to Tuesday" in text for _, text in mem.notes)


def test_yes_confirms_the_action_and_a_later_change_withdraws_it() -> None:
    mem = SessionMemory("acme", "alice")
    mem.observe_user(1, "Book a cleaning on Monday at 3pm please")
    mem.observe_user(2, "How much does it cost?")  # a question in between
    update = mem.observe_user(3, "Yes, book it")
    assert update.confirmed
    confirmed = mem.facts.fact("confirmed")
    assert confirmed is not None and confirmed.turn == 3
    assert confirmed.value == "booking: cleaning, Monday, 3:00 pm"

    withdrawn = mem.observe_user(4, "Actually, Wednesday works better")
    assert mem.facts.get("confirmed") is None
    assert ("confirmed", None) in [(c.slot, c.value) for c in withdrawn.changes]
    assert mem.facts.get("date") == "Wednesday"


def test_yes_without_an_action_confirms_nothing() -> None:
    mem = SessionMemory("acme", "alice")
    mem.observe_user(1, "What are your opening hours?")
    assert mem.observe_user(2, "yes").confirmed
    assert mem.facts.get("confirmed") is None


class FakeToolCaller:
    """A model that answers with a scripted ``record_facts`` call (or fails)."""

    def __init__(self, args: Mapping[str, Any] | None = None, error: Exception | None = None):
        self.args = args
        self.error = error
        self.requests: list[tuple[list[dict[str, Any]], list[dict[str, Any]]]] = []

    async def __call__(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]
    ) -> Mapping[str, Any] | None:
        self.requests.append((messages, tools))
        if self.error:
            raise self.error
        return self.args


async def test_tool_call_extraction_is_validated() -> None:
    model = FakeToolCaller(
        {
            "date": "Tuesday",
            "ssn": "123-45-6789",
            "name": "x" * 500,
            "intent": "booking",
            "confirmed": "yes",
        }
    )
    ex = await LLMToolExtractor(model).extract("no, Tuesday", {"date": "Monday"})
    assert ex.slots == {"date": "Tuesday", "name": "x" * 80}  # unknown slot dropped, cut
    assert ex.intent == "booking" and not ex.confirmed  # only a real boolean confirms
    messages, tools = model.requests[0]
    assert tools == [FACTS_TOOL]
    assert "date=Monday" in messages[0]["content"] and messages[1]["content"] == "no, Tuesday"


async def test_tool_call_failure_falls_back_to_rules() -> None:
    ex = await LLMToolExtractor(FakeToolCaller(error=TimeoutError())).extract(
        "book a cleaning on Friday", {}
    )
    assert ex.slots == {"service": "cleaning", "date": "Friday"}
    ex = await LLMToolExtractor(FakeToolCaller(None)).extract("on Friday", {})
    assert ex.slots == {"date": "Friday"}


def test_unknown_intent_from_the_model_is_not_trusted() -> None:
    assert parse_tool_arguments({"intent": "transfer_money"}).intent == "other"
    assert parse_tool_arguments({"intent": "x", "date": "Monday"}).intent == "provide_info"


def test_llm_extraction_feeds_session_memory() -> None:
    mem = SessionMemory("acme", "alice")
    extraction = parse_tool_arguments({"date": "Friday", "intent": "booking"})
    update = mem.observe_user(1, "whatever was said", extraction)
    assert mem.facts.get("date") == "Friday" and mem.facts.get("action") == "booking"
    assert update.intent == "booking"
