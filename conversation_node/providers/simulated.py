"""Simulated language model and voice: deterministic, offline, with configurable latency.

They stand in for real providers in local runs, tests and load tests. They are honest
stand-ins: the "model" is a small rule-based booking assistant for the demo domain (a
dental clinic), and the "voice" is a tone whose length follows the text. Determinism
matters for failover: the same request (same seed) streams the same reply, so a turn
re-answered by a new owner is identical to what the dead node had started to say.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import math
import os
import random
import re
from collections.abc import AsyncIterator
from typing import Any

import numpy as np

from callmesh.audio.codec import mulaw_encode_array
from callmesh.audio.format import TELEPHONY_RATE, AudioChunk, AudioEncoding, bytes_in, bytes_per_ms
from callmesh.config import SimulatedLatency
from conversation_node.booking import BOOKED_FACT, describe_booking
from conversation_node.providers.base import (
    LLMDelta,
    LLMRequest,
    ProviderError,
    ToolCall,
)
from memory.extract import extract

log = logging.getLogger(__name__)

BOOKING_SLOTS = ("name", "service", "date", "time")
# The most a slow-down file can add to a first token (ms): a typo must not hang a call.
MAX_SLOWDOWN_MS = 60_000.0
KNOWLEDGE_SOURCE = "knowledge_base"

_SNIPPET = re.compile(r"^\[(?P<source>[^\]]+)\]\s*(?P<text>.*)$", re.S)
# What the caller heard last, from the prompt's "Recent conversation" section.
_AGENT_LINE = re.compile(r"^Agent(?P<cut> \(cut off[^)]*\))?: (?P<text>.*)$", re.M)


def _rng(seed: str) -> random.Random:
    return random.Random(int.from_bytes(hashlib.blake2b(seed.encode(), digest_size=8).digest()))


def _jittered(rng: random.Random, mean_ms: float, jitter: float) -> float:
    if mean_ms <= 0:
        return 0.0
    return max(0.0, rng.gauss(mean_ms, mean_ms * jitter)) / 1000.0


def _read_back(facts: dict[str, Any]) -> str:
    return f"So that's a {facts['service']} on {facts['date']} at {facts['time']}"


def _heard_last(messages: list[dict[str, Any]]) -> str | None:
    """The agent's last reply as the caller heard it in full; None if it was cut off."""
    system = next((str(m.get("content", "")) for m in messages if m.get("role") == "system"), "")
    recent = system.rpartition("## Recent conversation\n")[2]
    lines = list(_AGENT_LINE.finditer(recent))
    if not lines or lines[-1].group("cut"):
        return None
    return lines[-1].group("text")


def _knowledge(snippets: list[str]) -> list[tuple[str, str]]:
    """(title, text) of the knowledge-base snippets, best first."""
    out = []
    for snippet in snippets:
        m = _SNIPPET.match(snippet.strip())
        if m is None or m.group("source") != KNOWLEDGE_SOURCE:
            continue
        title, _, text = m.group("text").partition(": ")
        out.append((title, text) if text else ("", title))
    return out


def _fields(text: str) -> dict[str, str]:
    """``service: cleaning; price: $120`` (a YAML entry passage) as a mapping."""
    pairs = (part.partition(": ") for part in text.split("; "))
    return {k.strip().lower(): v.strip() for k, sep, v in pairs if sep}


def _answer_from(snippets: list[str], intent: str, service: str | None) -> str | None:
    """Say what the knowledge base says: the price of the service asked about when a
    snippet has it, else the best snippet. Never a number that is not in a snippet."""
    found = _knowledge(snippets)
    if not found:
        return None
    if intent == "pricing":
        for _, text in found:
            f = _fields(text)
            if f.get("service") == service and "price" in f:
                took = f" and takes {f['duration']}" if f.get("duration") else ""
                return f"A {service} is {f['price']}{took}."
    title, text = found[0]
    f = _fields(text)
    if "service" in f and "price" in f:
        return f"A {f['service']} is {f['price']}."
    said = text if len(text) <= 220 else text[:219].rsplit(" ", 1)[0] + "…"
    said = said.replace("; ", ", ").rstrip()
    if not said.endswith((".", "!", "?", "…")):
        said += "."
    return f"{title}: {said}" if title else said


def compose_reply(request: LLMRequest) -> tuple[str, list[ToolCall]]:
    """The simulated model's decision: a reply and, when the caller says yes to the booking
    details they were just read back, a ``create_booking`` tool call.

    It reasons on the session facts (later values win; ``booked`` is what a create_booking
    of this call booked), the caller's utterance, the retrieved snippets and what the
    caller heard last (from the prompt's recent conversation)."""
    facts = request.facts
    said = extract(request.user_text)
    name = facts.get("name")
    who = f", {name}" if name else ""
    missing = [s for s in BOOKING_SLOTS if not facts.get(s)]
    booked = facts.get(BOOKED_FACT)
    if said.intent in ("pricing", "hours"):
        service = said.slots.get("service") or facts.get("service")
        answer = _answer_from(request.snippets, said.intent, service)
        if answer is not None:
            return f"{answer} Anything else{who}?", []
        return f"I can't see that information right now{who}. Anything else?", []
    if booked is not None and booked == describe_booking(facts):
        return (
            f"Your {facts.get('service')} on {facts.get('date')} at {facts.get('time')} is "
            f"booked{who}. Is there anything else I can help with?",
            [],
        )
    if not missing:
        heard = _heard_last(request.messages) or ""
        if said.confirmed and heard.startswith(_read_back(facts)):
            args = {s: facts[s] for s in BOOKING_SLOTS}
            call = ToolCall(id=f"call_{request.seed}", name="create_booking", arguments=args)
            return (
                f"Done{who}: your {args['service']} is booked for {args['date']} at "
                f"{args['time']}. You'll get a confirmation by text.",
                [call],
            )
        return f"{_read_back(facts)} for {name}. Shall I book it?", []
    prompts = {
        "name": "Thanks for calling Brightsmile Dental. May I have your name?",
        "service": f"Nice to meet you{who}. What would you like to come in for?",
        "date": f"Sure{who}. What day works best for your {facts.get('service', 'visit')}?",
        "time": f"Got it{who}, {facts.get('date')}. What time would you like?",
    }
    return prompts[missing[0]], []


class SlowdownFile:
    """Local chaos runs (``loadtest chaos --fault llm-slow``): milliseconds to add to the
    simulated model's first token, read from a file whenever it changes.

    Only the simulated model has one, and only when CALLMESH_SIM_LLM_CONTROL_FILE names the
    file (the node refuses that setting with any other model), so nothing can slow a real
    model down. A missing file adds nothing; unreadable or out-of-range content adds
    nothing and is logged once per change."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._seen: int | None = None  # st_mtime_ns of the content read
        self._extra_s = 0.0

    def extra_s(self) -> float:
        # One stat a turn; the file is read only when it changed (it is a few bytes).
        try:
            stamp = os.stat(self.path).st_mtime_ns
        except OSError:
            self._seen, self._extra_s = None, 0.0
            return 0.0
        if stamp != self._seen:
            self._seen = stamp
            self._extra_s = 0.0
            try:
                with open(self.path, encoding="ascii") as f:
                    ms = float(f.read(32).strip() or 0)
            except (OSError, ValueError):
                log.warning("simulated model: unreadable slow-down file %s", self.path)
                return 0.0
            if not 0 <= ms <= MAX_SLOWDOWN_MS:
                log.warning("simulated model: slow-down %r ms out of range", ms)
                return 0.0
            self._extra_s = ms / 1000
        return self._extra_s


class SimulatedLLM:
    """A streaming rule-based "model": first token after ``llm_first_token_ms`` (plus what
    a :class:`SlowdownFile` adds), then a word every ``llm_token_ms``, then any tool
    calls."""

    name = "simulated-llm"

    def __init__(self, latency: SimulatedLatency, *, slowdown: SlowdownFile | None = None) -> None:
        self._latency = latency
        self._slowdown = slowdown

    async def stream(self, request: LLMRequest) -> AsyncIterator[LLMDelta]:
        rng = _rng(request.seed)
        text, calls = compose_reply(request)
        first = _jittered(rng, self._latency.llm_first_token_ms, self._latency.jitter)
        await asyncio.sleep(first + (self._slowdown.extra_s() if self._slowdown else 0.0))
        words = text.split(" ")
        for i, word in enumerate(words):
            if i:
                await asyncio.sleep(
                    _jittered(rng, self._latency.llm_token_ms, self._latency.jitter)
                )
            yield LLMDelta(text=word if i == 0 else " " + word)
        for call in calls:
            yield LLMDelta(tool_call=call)


# Spoken English runs at roughly 14 characters a second.
_MS_PER_CHAR = 70.0
_TONE_PERIOD = 20  # samples: a 400 Hz tone at 8 kHz


def _tone_table() -> bytes:
    # Mu-law bytes of one period of a quiet sine (precomputed: synthesis is a slice).
    period = [int(2000 * math.sin(2 * math.pi * i / _TONE_PERIOD)) for i in range(_TONE_PERIOD)]
    return mulaw_encode_array(np.array(period, dtype=np.int16))


_TONE = _tone_table()


# Sentences whose first-chunk delay is remembered. The delay follows from the text alone,
# and seeding a generator for it (~5 µs) cost more than the rest of a sentence's synthesis;
# a load test says the same few sentences over and over.
_DELAY_CACHE_SIZE = 1024


@functools.lru_cache(maxsize=_DELAY_CACHE_SIZE)
def _first_chunk_s(text: str, mean_ms: float, jitter: float) -> float:
    """How long the voice takes to its first chunk of ``text``: the same every time."""
    return _jittered(_rng(text), mean_ms, jitter)


class SimulatedTTS:
    """Streams mu-law 8 kHz tone audio as long as the sentence would take to say."""

    name = "simulated-tts"

    def __init__(
        self, latency: SimulatedLatency, chunk_ms: int = 100, *, fail: bool = False
    ) -> None:
        self._latency = latency
        self._chunk_bytes = bytes_in(chunk_ms, AudioEncoding.MULAW, TELEPHONY_RATE)
        self._fail = fail
        # A full chunk of the tone, built once: every chunk of every sentence but the last
        # of each is this one, and the last is a slice of it.
        reps = self._chunk_bytes // _TONE_PERIOD + 1
        self._block = (_TONE * reps)[: self._chunk_bytes]
        self._bytes_per_char = bytes_per_ms(AudioEncoding.MULAW, TELEPHONY_RATE) * _MS_PER_CHAR

    async def synthesize(self, text: str) -> AsyncIterator[AudioChunk]:
        if self._fail:
            raise ProviderError(self.name, "simulated outage", retryable=True)
        latency = self._latency
        mean_ms = latency.tts_first_chunk_ms
        await asyncio.sleep(_first_chunk_s(text, mean_ms, latency.jitter) if mean_ms > 0 else 0.0)
        total = int(self._bytes_per_char * len(text))
        block, chunk_bytes = self._block, self._chunk_bytes
        sent = 0
        while sent < total:
            size = min(chunk_bytes, total - sent)
            yield AudioChunk(block[:size], AudioEncoding.MULAW, TELEPHONY_RATE)
            sent += size
            await asyncio.sleep(0)
