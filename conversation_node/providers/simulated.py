"""Simulated language model and voice: deterministic, offline, with configurable latency.

They stand in for real providers in local runs, tests and load tests. They are honest
stand-ins: the "model" is a small rule-based booking assistant for the demo domain (a
dental clinic), and the "voice" is a tone whose length follows the text. Determinism
matters for failover: the same request (same seed) streams the same reply, so a turn
re-answered by a new owner is identical to what the dead node had started to say.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
from collections.abc import AsyncIterator

from callmesh.config import SimulatedLatency
from conversation_node.providers.base import (
    AudioChunk,
    Encoding,
    LLMDelta,
    LLMRequest,
    ProviderError,
    ToolCall,
)
from memory.extract import extract

BOOKING_SLOTS = ("name", "service", "date", "time")


def _rng(seed: str) -> random.Random:
    return random.Random(int.from_bytes(hashlib.blake2b(seed.encode(), digest_size=8).digest()))


def _jittered(rng: random.Random, mean_ms: float, jitter: float) -> float:
    if mean_ms <= 0:
        return 0.0
    return max(0.0, rng.gauss(mean_ms, mean_ms * jitter)) / 1000.0


def compose_reply(request: LLMRequest) -> tuple[str, list[ToolCall]]:
    """The simulated model's decision: a reply and, when the caller confirms a complete
    booking, a ``create_booking`` tool call."""
    facts = request.facts
    said = extract(request.user_text)
    name = facts.get("name")
    who = f", {name}" if name else ""
    if facts.get("booking") == "confirmed" and said.intent not in ("pricing", "hours"):
        return (
            f"Your {facts.get('service')} on {facts.get('date')} at {facts.get('time')} is "
            f"booked{who}. Is there anything else I can help with?",
            [],
        )
    if said.intent in ("pricing", "hours"):
        if request.snippets:
            return f"{request.snippets[0].strip()} Anything else{who}?", []
        return f"I don't have that information at hand right now{who}. Anything else?", []
    missing = [s for s in BOOKING_SLOTS if not facts.get(s)]
    if not missing and said.confirmed:
        args = {s: facts[s] for s in BOOKING_SLOTS}
        call = ToolCall(id=f"call_{request.seed}", name="create_booking", arguments=args)
        return (
            f"Done{who}: your {args['service']} is booked for {args['date']} at {args['time']}. "
            "You'll get a confirmation by text.",
            [call],
        )
    if not missing:
        return (
            f"So that's a {facts['service']} on {facts['date']} at {facts['time']} for "
            f"{name}. Shall I book it?",
            [],
        )
    prompts = {
        "name": "Thanks for calling Bright Smile Dental. May I have your name?",
        "service": f"Nice to meet you{who}. What would you like to come in for?",
        "date": f"Sure{who}. What day works best for your {facts.get('service', 'visit')}?",
        "time": f"Got it{who}, {facts.get('date')}. What time would you like?",
    }
    return prompts[missing[0]], []


class SimulatedLLM:
    """A streaming rule-based "model": first token after ``llm_first_token_ms``, then a
    word every ``llm_token_ms``, then any tool calls."""

    name = "simulated-llm"

    def __init__(self, latency: SimulatedLatency) -> None:
        self._latency = latency

    async def stream(self, request: LLMRequest) -> AsyncIterator[LLMDelta]:
        rng = _rng(request.seed)
        text, calls = compose_reply(request)
        await asyncio.sleep(_jittered(rng, self._latency.llm_first_token_ms, self._latency.jitter))
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
    out = bytearray()
    for i in range(_TONE_PERIOD):
        sample = int(2000 * math.sin(2 * math.pi * i / _TONE_PERIOD))
        out.append(_linear_to_ulaw(sample))
    return bytes(out)


def _linear_to_ulaw(sample: int) -> int:
    bias, clip = 0x84, 32635
    sign = 0x80 if sample < 0 else 0
    sample = min(abs(sample), clip) + bias
    exponent = 7
    for exp in range(7, -1, -1):
        if sample & (0x4000 >> (7 - exp)):
            exponent = exp
            break
    mantissa = (sample >> (exponent + 3)) & 0x0F
    return ~(sign | (exponent << 4) | mantissa) & 0xFF


_TONE = _tone_table()


class SimulatedTTS:
    """Streams mu-law 8 kHz tone audio as long as the sentence would take to say."""

    name = "simulated-tts"

    def __init__(
        self, latency: SimulatedLatency, chunk_ms: int = 100, *, fail: bool = False
    ) -> None:
        self._latency = latency
        self._chunk_bytes = 8 * chunk_ms
        self._fail = fail

    async def synthesize(self, text: str) -> AsyncIterator[AudioChunk]:
        if self._fail:
            raise ProviderError(self.name, "simulated outage", retryable=True)
        rng = _rng(text)
        await asyncio.sleep(_jittered(rng, self._latency.tts_first_chunk_ms, self._latency.jitter))
        total = int(8 * _MS_PER_CHAR * len(text))
        reps = self._chunk_bytes // _TONE_PERIOD + 1
        block = (_TONE * reps)[: self._chunk_bytes]
        sent = 0
        while sent < total:
            size = min(self._chunk_bytes, total - sent)
            yield AudioChunk(block[:size], Encoding.MULAW, 8000)
            sent += size
            await asyncio.sleep(0)
