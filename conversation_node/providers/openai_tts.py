"""OpenAI streaming text-to-speech, converted to telephony audio on the fly.

``response_format="pcm"`` is raw 24 kHz 16-bit little-endian mono, the one format that
needs no decoder and streams byte by byte. Each network read is low-pass filtered,
decimated 3:1 and mu-law encoded as it arrives (odd byte boundaries and the filter state
are carried across reads), so the first 8 kHz chunk leaves as soon as the first bytes do.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass

import httpx2
import openai

from callmesh.audio.codec import Downsampler
from callmesh.audio.format import MULAW_FRAME_BYTES, TELEPHONY_RATE, AudioChunk, AudioEncoding
from conversation_node.providers.base import ProviderError
from conversation_node.providers.openai_llm import make_client, translate_error

__all__ = ["OpenAITTS", "OpenAITTSOptions"]

SOURCE_RATE = 24000
TARGET_RATE = TELEPHONY_RATE


@dataclass(frozen=True, slots=True)
class OpenAITTSOptions:
    model: str = "gpt-4o-mini-tts"
    voice: str = "coral"
    instructions: str | None = None
    timeout_s: float = 10.0
    max_retries: int = 0
    # Smallest chunk worth sending on (one 20 ms frame): avoids a flood of tiny messages.
    min_chunk_bytes: int = MULAW_FRAME_BYTES

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.max_retries < 0 or self.min_chunk_bytes <= 0:
            raise ValueError("timeout_s and min_chunk_bytes must be > 0, max_retries >= 0")


class OpenAITTS:
    """``audio.speech`` streaming → mu-law 8 kHz chunks. Implements ``TTS``."""

    name = "openai-tts"

    def __init__(
        self,
        api_key: str,
        *,
        base_url: str | None = None,
        options: OpenAITTSOptions | None = None,
        client: openai.AsyncOpenAI | None = None,
    ) -> None:
        self.options = options or OpenAITTSOptions()
        self._client = client or make_client(
            api_key,
            base_url=base_url,
            timeout_s=self.options.timeout_s,
            max_retries=self.options.max_retries,
        )

    async def synthesize(self, text: str) -> AsyncGenerator[AudioChunk, None]:
        """Stream one sentence as mu-law 8 kHz audio."""
        if not text.strip():
            return
        opts = self.options
        downsampler = Downsampler(SOURCE_RATE // TARGET_RATE)
        pending = b""
        try:
            async with self._client.audio.speech.with_streaming_response.create(
                model=opts.model,
                voice=opts.voice,
                input=text,
                response_format="pcm",
                instructions=opts.instructions or openai.omit,
            ) as response:
                async for data in response.iter_bytes():
                    pending += downsampler.process_to_mulaw(data)
                    if len(pending) >= opts.min_chunk_bytes:
                        yield AudioChunk(pending, AudioEncoding.MULAW, TARGET_RATE)
                        pending = b""
        except ProviderError:
            raise
        except (openai.OpenAIError, httpx2.HTTPError, TimeoutError) as exc:
            raise translate_error(self.name, exc) from exc
        if pending:
            yield AudioChunk(pending, AudioEncoding.MULAW, TARGET_RATE)

    async def aclose(self) -> None:
        """Close the HTTP connection pool (idempotent)."""
        await self._client.close()

    def __repr__(self) -> str:
        return f"<OpenAITTS [{self.options.model}/{self.options.voice}]>"
