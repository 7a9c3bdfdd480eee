"""Streaming chat completions with the ``openai`` package, against any compatible server.

Text deltas are yielded as they arrive. Tool calls stream as an opening delta (id and
name) followed by argument fragments, keyed by ``index``; a call is yielded once it is
complete: when a later call starts, when ``finish_reason`` arrives, or when the stream
ends (some compatible servers never send ``finish_reason`` for tool calls). The usage
chunk (``choices == []``) is kept as :attr:`OpenAILLM.last_usage`.

The same base URL works with OpenAI, vLLM, Ollama and llama.cpp servers. This module also
holds what the OpenAI TTS adapter shares: client construction and error translation.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import httpx2
import openai

from conversation_node.providers.base import (
    LLMDelta,
    LLMRequest,
    ProviderError,
    ProviderTimeout,
    ToolCall,
)

__all__ = ["OpenAILLM", "OpenAILLMOptions", "make_client", "translate_error"]

log = logging.getLogger(__name__)


def make_client(
    api_key: str, *, base_url: str | None = None, timeout_s: float = 10.0, max_retries: int = 0
) -> openai.AsyncOpenAI:
    """An ``AsyncOpenAI`` client. Retries default to 0: the node's own budget and fallback
    policy decides what happens after a failure, and a hidden retry would spend the budget."""
    return openai.AsyncOpenAI(
        api_key=api_key, base_url=base_url, timeout=timeout_s, max_retries=max_retries
    )


def translate_error(provider: str, exc: BaseException) -> ProviderError:
    """Map ``openai``/``httpx2`` failures to :class:`ProviderError`: timeouts, connection
    failures, 408/409/429 and 5xx are retryable; other 4xx are not."""
    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, openai.APITimeoutError | httpx2.TimeoutException | TimeoutError):
        return ProviderTimeout(provider)
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        retryable = status in (408, 409, 429) or status >= 500
        return ProviderError(provider, f"HTTP {status}: {exc.message}", retryable=retryable)
    if isinstance(exc, openai.APIConnectionError | httpx2.TransportError):
        return ProviderError(provider, f"connection failed: {exc}", retryable=True)
    if isinstance(exc, openai.APIError):  # e.g. an error event inside the stream
        return ProviderError(provider, f"API error: {exc.message}", retryable=True)
    return ProviderError(provider, f"unexpected error: {exc!r}")


@dataclass(frozen=True, slots=True)
class OpenAILLMOptions:
    model: str = "gpt-4o-mini"
    temperature: float | None = None
    max_tokens: int | None = None
    # httpx timeout: bounds the connect and each read, so a stalled stream fails too.
    timeout_s: float = 10.0
    max_retries: int = 0
    # Some OpenAI-compatible servers reject ``stream_options``; turn it off for them.
    include_usage: bool = True
    extra_body: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.max_retries < 0:
            raise ValueError("timeout_s must be > 0 and max_retries >= 0")


class _ToolCallAccumulator:
    """Argument fragments of the tool calls in one stream, by ``index``."""

    def __init__(self, provider: str) -> None:
        self._provider = provider
        self._calls: dict[int, dict[str, str]] = {}
        self._emitted: set[int] = set()

    def add(self, delta: Any) -> list[ToolCall]:
        """Record one fragment; returns calls that a later index has completed."""
        index = int(delta.index)
        call = self._calls.setdefault(index, {"id": "", "name": "", "arguments": ""})
        if delta.id:
            call["id"] = delta.id
        function = delta.function
        if function is not None:
            if function.name:
                call["name"] += function.name
            if function.arguments:
                call["arguments"] += function.arguments
        return self.complete(below=index)

    def complete(self, below: int | None = None) -> list[ToolCall]:
        """Calls not yet emitted (only those with an index < ``below`` if given)."""
        done = []
        for index in sorted(self._calls):
            if index in self._emitted or (below is not None and index >= below):
                continue
            self._emitted.add(index)
            done.append(self._parse(index, self._calls[index]))
        return done

    def _parse(self, index: int, call: dict[str, str]) -> ToolCall:
        try:
            arguments = json.loads(call["arguments"] or "{}")
        except json.JSONDecodeError as exc:
            raise ProviderError(
                self._provider,
                f"tool call {call['name']!r} has invalid JSON arguments: {exc}",
                retryable=True,
            ) from exc
        if not isinstance(arguments, dict):
            message = f"tool call {call['name']!r}: arguments are not an object"
            raise ProviderError(self._provider, message)
        return ToolCall(id=call["id"] or f"call_{index}", name=call["name"], arguments=arguments)


class OpenAILLM:
    """Streaming chat completions. Implements ``LLM``; close with :meth:`aclose`."""

    name = "openai-llm"

    def __init__(
        self,
        api_key: str,
        *,
        base_url: str | None = None,
        options: OpenAILLMOptions | None = None,
        client: openai.AsyncOpenAI | None = None,
    ) -> None:
        self.options = options or OpenAILLMOptions()
        self._client = client or make_client(
            api_key,
            base_url=base_url,
            timeout_s=self.options.timeout_s,
            max_retries=self.options.max_retries,
        )
        self.last_usage: dict[str, int] | None = None

    def _params(self, request: LLMRequest) -> dict[str, Any]:
        opts = self.options
        params: dict[str, Any] = {"model": opts.model, "messages": request.messages, "stream": True}
        if request.tools:
            params["tools"] = request.tools
        if opts.include_usage:
            params["stream_options"] = {"include_usage": True}
        if opts.temperature is not None:
            params["temperature"] = opts.temperature
        if opts.max_tokens is not None:
            params["max_completion_tokens"] = opts.max_tokens
        if opts.extra_body:
            params["extra_body"] = opts.extra_body
        return params

    async def stream(self, request: LLMRequest) -> AsyncGenerator[LLMDelta, None]:
        """Yield text deltas as tokens arrive and each tool call once it is complete."""
        calls = _ToolCallAccumulator(self.name)
        try:
            response = await self._client.chat.completions.create(**self._params(request))
            # ``async with`` closes the HTTP response if the consumer stops early.
            async with response:
                async for chunk in response:
                    if chunk.usage is not None:
                        self.last_usage = chunk.usage.model_dump(exclude_none=True)
                    for choice in chunk.choices[:1]:
                        delta = choice.delta
                        if delta.content:
                            yield LLMDelta(text=delta.content)
                        for fragment in delta.tool_calls or ():
                            for call in calls.add(fragment):
                                yield LLMDelta(tool_call=call)
                        if choice.finish_reason is not None:
                            for call in calls.complete():
                                yield LLMDelta(tool_call=call)
        except ProviderError:
            raise
        except (openai.OpenAIError, httpx2.HTTPError, TimeoutError) as exc:
            raise translate_error(self.name, exc) from exc
        for call in calls.complete():
            yield LLMDelta(tool_call=call)

    async def aclose(self) -> None:
        """Close the HTTP connection pool (idempotent)."""
        await self._client.close()

    def __repr__(self) -> str:
        return f"<OpenAILLM [{self.options.model} @ {self._client.base_url}]>"
