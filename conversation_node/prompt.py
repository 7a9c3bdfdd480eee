"""The node's side of the prompt: the model request around a :class:`memory.prompt.Prompt`,
the tools the model may call, and the turn-0 greeting.

The prompt itself (sections, token budget, one shape at turn 3 and turn 3,000) is built by
:class:`memory.prompt.PromptBuilder`; this module only wraps it for the providers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# BOOKED_FACT and describe_booking live in conversation_node.booking; named here too for
# the modules that still import them from the prompt.
from conversation_node.booking import BOOKED_FACT as BOOKED_FACT
from conversation_node.booking import describe_booking as describe_booking
from conversation_node.providers.base import LLMRequest
from memory.history import CallRecord
from memory.prompt import DEFAULT_INSTRUCTIONS, Prompt

CLINIC = "Brightsmile Dental"

INSTRUCTIONS = (
    f"{DEFAULT_INSTRUCTIONS} Before booking, read the booking back as "
    "'<service> on <date> at <time> for <name>' and ask for a yes. Call create_booking "
    "only after the caller said yes to those exact details: the node refuses it otherwise."
)

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "create_booking",
            "description": "Book an appointment once the caller confirmed all details.",
            "parameters": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "service": {"type": "string"},
                    "date": {"type": "string"},
                    "time": {"type": "string"},
                },
                "required": ["name", "service", "date", "time"],
            },
        },
    }
]

STANDARD_GREETING = f"Thank you for calling {CLINIC}. How can I help you today?"


def build_request(prompt: Prompt, user_text: str, *, seed: str) -> LLMRequest:
    """The model request of a turn: the prompt's chat messages, plus the structured state
    (facts, visible snippets) that the simulated model reasons on."""
    return LLMRequest(
        messages=[dict(m) for m in prompt.messages],
        tools=TOOLS,
        user_text=user_text,
        facts=dict(prompt.facts),
        snippets=list(prompt.snippets),
        seed=seed,
    )


@dataclass(frozen=True, slots=True)
class Greeting:
    """What the agent says at turn 0, and the facts it carries over from earlier calls."""

    text: str
    facts: dict[str, str] = field(default_factory=dict)
    # The earlier calls it is based on (newest first), for the event log.
    from_calls: tuple[str, ...] = ()

    @property
    def returning(self) -> bool:
        return bool(self.from_calls)


def greeting_for(history: Sequence[CallRecord]) -> Greeting:
    """The greeting of a new call given the caller's earlier calls (newest first): a
    returning caller is welcomed back with what the last call established; only the name
    is carried into the new session (dates and times of an old booking are not this
    call's facts)."""
    if not history:
        return Greeting(STANDARD_GREETING)
    last = history[0].facts
    name = next((r.facts["name"] for r in history if r.facts.get("name")), None)
    parts = [f"Welcome back, {name}!" if name else "Welcome back!"]
    if booked := last.get(BOOKED_FACT):
        parts.append(f"Last time we booked a {booked}.")
    elif last.get("service"):
        on = f" on {last['date']}" if last.get("date") else ""
        parts.append(f"Last time we talked about a {last['service']}{on}.")
    parts.append("How can I help today?")
    return Greeting(
        " ".join(parts),
        {"name": name} if name else {},
        tuple(r.call_id for r in history),
    )
