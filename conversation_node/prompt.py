"""Building the model request from the call's compressed state (facts + working memory).

The prompt's shape is the same at turn 3 and turn 3,000: instructions, the session facts,
the working-memory window and retrieved snippets — never the whole transcript.
"""

from __future__ import annotations

from typing import Any

from conversation_node.providers.base import LLMRequest
from memory.working import WorkingMemory

INSTRUCTIONS = (
    "You are the phone receptionist of Bright Smile Dental. Be brief: one or two short "
    "sentences. Collect name, service, date and time, confirm them, and only call "
    "create_booking after the caller explicitly says yes. Never invent prices or policies: "
    "use the provided snippets or say you will check."
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


def build_request(
    facts: dict[str, str],
    working: WorkingMemory,
    user_text: str,
    *,
    seed: str,
    snippets: list[str],
) -> LLMRequest:
    system = INSTRUCTIONS
    if facts:
        system += "\nKnown facts: " + "; ".join(f"{k}={v}" for k, v in sorted(facts.items()))
    if snippets:
        system += "\nReference:\n" + "\n".join(f"- {s}" for s in snippets)
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}]
    for ex in working:
        messages.append({"role": "user", "content": ex.user})
        messages.append({"role": "assistant", "content": ex.agent})
    messages.append({"role": "user", "content": user_text})
    return LLMRequest(
        messages=messages,
        tools=TOOLS,
        user_text=user_text,
        facts=dict(facts),
        snippets=list(snippets),
        seed=seed,
    )
