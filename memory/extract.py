"""Slot extraction: rules for the simulated language model, a tool call for a real one.

Both fill the same slots of the demo domain (booking a dental appointment) and return the
same :class:`Extraction`; the rules are deterministic and testable, the tool-call extractor
(:class:`LLMToolExtractor`) asks the model to call ``record_facts`` and falls back to the
rules when the model fails, so a slow model never loses a fact.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger(__name__)

WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
SERVICES = ("cleaning", "checkup", "check-up", "whitening", "filling", "consultation", "crown")

_NAME = re.compile(r"\b(?:my name is|this is|i am|i'm|call me)\s+([A-Z][a-z]+(?:\s[A-Z][a-z]+)?)")
_DATE = re.compile(r"\b(" + "|".join(WEEKDAYS) + r"|today|tomorrow)\b", re.I)
_TIME = re.compile(r"\b(\d{1,2})(?::(\d{2}))?\s*(am|pm|a\.m\.|p\.m\.)|\b(noon|midday)\b", re.I)
_BUDGET = re.compile(r"\$\s?(\d+(?:\.\d{2})?)|\b(\d+)\s*(?:dollars|usd)\b", re.I)
_LOCATION = re.compile(
    r"\b(?:in|at the)\s+([A-Z][a-z]+(?:\s[A-Z][a-z]+)?)\s+(?:office|clinic|branch)"
)
_CONFIRM = re.compile(r"^\s*(?:yes|yeah|yep|correct|confirm|please do|book it|sounds good)\b", re.I)
_DENY = re.compile(r"^\s*(?:no|nope|not)\b", re.I)

INTENT_WORDS = {
    "booking": ("book", "appointment", "schedule", "reserve"),
    "cancel": ("cancel",),
    "pricing": ("price", "cost", "how much", "pricing"),
    "hours": ("open", "hours", "close"),
}


SLOTS = ("name", "date", "time", "service", "budget", "location")
INTENTS = ("booking", "cancel", "pricing", "hours", "provide_info", "confirm", "deny", "other")
MAX_VALUE_CHARS = 80


@dataclass(frozen=True, slots=True)
class Extraction:
    """What one user utterance said: slot values, intent, and whether it was a yes or a no."""

    slots: dict[str, str]
    intent: str
    confirmed: bool
    denied: bool


def extract(text: str) -> Extraction:
    """Slots, intent and yes/no of one user utterance."""
    slots: dict[str, str] = {}
    if m := _NAME.search(text):
        slots["name"] = m.group(1)
    if m := _DATE.search(text):
        slots["date"] = m.group(1).capitalize()
    if m := _TIME.search(text):
        if m.group(4):
            slots["time"] = "12:00 pm"
        else:
            hour, minute, ampm = m.group(1), m.group(2) or "00", m.group(3)
            slots["time"] = f"{int(hour)}:{minute} {ampm.replace('.', '').lower()}"
    lowered = text.lower()
    for service in SERVICES:
        if service in lowered:
            slots["service"] = service.replace("-", "")
            break
    if m := _BUDGET.search(text):
        slots["budget"] = m.group(1) or m.group(2)
    if m := _LOCATION.search(text):
        slots["location"] = m.group(1)
    intent = "other"
    for name, words in INTENT_WORDS.items():
        if any(w in lowered for w in words):
            intent = name
            break
    confirmed = bool(_CONFIRM.search(text))
    denied = bool(_DENY.search(text)) and not confirmed
    if intent == "other" and slots:
        intent = "provide_info"
    if intent == "other" and (confirmed or denied):
        intent = "confirm" if confirmed else "deny"
    return Extraction(slots, intent, confirmed, denied)


# ---------------------------------------------------------------- extractors


class FactExtractor(Protocol):
    """Turns an utterance (with the facts known so far) into an :class:`Extraction`."""

    async def extract(self, text: str, known: Mapping[str, str]) -> Extraction: ...


class RuleExtractor:
    """The rules above, as a :class:`FactExtractor` (used with the simulated model)."""

    async def extract(self, text: str, known: Mapping[str, str]) -> Extraction:
        return extract(text)


class ToolCaller(Protocol):
    """One non-streamed model request that must answer with a tool call; returns the
    arguments of the first call of a tool in ``tools``, or None if the model made none.
    The conversation node adapts its LLM provider to this."""

    async def __call__(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]
    ) -> Mapping[str, Any] | None: ...


FACTS_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "record_facts",
        "description": (
            "Record what the caller's last utterance states. Only fill a slot the caller "
            "actually said or corrected; leave the others out."
        ),
        "parameters": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "description": "caller's name"},
                "date": {"type": "string", "description": "weekday, 'today' or 'tomorrow'"},
                "time": {"type": "string", "description": "like '3:00 pm'"},
                "service": {"type": "string", "enum": [s.replace("-", "") for s in SERVICES]},
                "budget": {"type": "string", "description": "amount in dollars, digits only"},
                "location": {"type": "string", "description": "office name"},
                "intent": {"type": "string", "enum": list(INTENTS)},
                "confirmed": {"type": "boolean", "description": "caller said yes"},
                "denied": {"type": "boolean", "description": "caller said no"},
            },
            "required": ["intent"],
            "additionalProperties": False,
        },
    },
}


class LLMToolExtractor:
    """Facts through a ``record_facts`` tool call of a real model, validated: unknown
    slots are dropped and values cut to :data:`MAX_VALUE_CHARS`, so a model cannot grow
    the session state."""

    def __init__(self, call: ToolCaller, *, fallback: FactExtractor | None = None) -> None:
        self._call = call
        self._fallback = fallback or RuleExtractor()

    async def extract(self, text: str, known: Mapping[str, str]) -> Extraction:
        known_line = ", ".join(f"{k}={v}" for k, v in sorted(known.items())) or "none"
        messages = [
            {
                "role": "system",
                "content": "Extract booking facts from the caller's utterance by calling "
                f"record_facts. Facts known so far: {known_line}.",
            },
            {"role": "user", "content": text},
        ]
        try:
            args = await self._call(messages, [FACTS_TOOL])
        except Exception as exc:  # any provider failure: the rules still get the facts
            log.warning("fact extraction tool call failed, using rules: %s", exc)
            return await self._fallback.extract(text, known)
        if args is None:
            return await self._fallback.extract(text, known)
        return parse_tool_arguments(args)


def parse_tool_arguments(args: Mapping[str, Any]) -> Extraction:
    """Validate the arguments of a ``record_facts`` call into an :class:`Extraction`."""
    slots = {
        slot: " ".join(value.split())[:MAX_VALUE_CHARS]
        for slot in SLOTS
        if isinstance(value := args.get(slot), str) and value.strip()
    }
    intent = args.get("intent")
    if intent not in INTENTS:
        intent = "provide_info" if slots else "other"
    confirmed = args.get("confirmed") is True
    denied = args.get("denied") is True and not confirmed
    return Extraction(slots, str(intent), confirmed, denied)
