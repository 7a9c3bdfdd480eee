"""A local OpenAI-compatible API: streaming chat completions (SSE) and streaming speech.

``POST /v1/chat/completions`` with ``stream=true`` answers with
``data: {chat.completion.chunk}`` events, content split into word tokens, tool calls
split into an opening delta (id, name) and argument fragments accumulated by ``index``,
a ``finish_reason`` chunk, a usage chunk with empty ``choices`` when
``stream_options.include_usage`` is set, then ``data: [DONE]``.

``POST /v1/audio/speech`` with ``response_format=pcm`` streams raw 24 kHz PCM16 (the
simulated speech of ``input``) in odd-sized pieces.

Replies are scripted per request (``chat_script``/``speech_script``): delays before the
headers, stalls mid-stream, and HTTP errors (500, 429...) on demand. With an empty
script the chat model echoes the last user message.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from callmesh.audio.codec import array_to_pcm16
from callmesh.audio.tones import tones_for_text

from . import LocalServer

API_KEY = "sk-test-openai"


@dataclass
class ChatReply:
    text: str = ""
    # (id, name, arguments) per tool call, streamed after the text; arguments given as a
    # string are sent verbatim (to test malformed JSON).
    tool_calls: list[tuple[str, str, dict[str, Any] | str]] = field(default_factory=list)
    status: int = 200
    delay_s: float = 0.0  # before the response headers
    stall_after_chunks: int | None = None  # stop sending (without closing) after N chunks
    fragment_chars: int = 5  # size of argument fragments


@dataclass
class SpeechReply:
    status: int = 200
    delay_s: float = 0.0
    piece_bytes: int = 1001  # odd on purpose: PCM16 samples straddle network reads


class FakeOpenAI(LocalServer):
    def __init__(self, *, api_key: str = API_KEY) -> None:
        super().__init__()
        self.api_key = api_key
        self.chat_script: deque[ChatReply] = deque()
        self.speech_script: deque[SpeechReply] = deque()
        self.chat_requests: list[dict[str, Any]] = []
        self.speech_requests: list[dict[str, Any]] = []
        self._unstall = asyncio.Event()  # set on close: stalled responses give up
        self.app.router.add_post("/v1/chat/completions", self._chat)
        self.app.router.add_post("/v1/audio/speech", self._speech)

    @property
    def base_url(self) -> str:
        return f"{self.http_url}/v1"

    def _auth_error(self, request: web.Request) -> web.Response | None:
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return _error(401, "Incorrect API key provided.", "invalid_request_error")
        return None

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        denied = self._auth_error(request)
        if denied is not None:
            return denied
        body = await request.json()
        self.chat_requests.append(body)
        reply = self.chat_script.popleft() if self.chat_script else _echo(body)
        await asyncio.sleep(reply.delay_s)
        if reply.status != 200:
            kind = "rate_limit_error" if reply.status == 429 else "server_error"
            if reply.status < 500 and reply.status != 429:
                kind = "invalid_request_error"
            return _error(reply.status, f"scripted {reply.status}", kind)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        chunks = _chunks(body.get("model", "fake"), reply, include_usage)
        for n, chunk in enumerate(chunks):
            if reply.stall_after_chunks is not None and n >= reply.stall_after_chunks:
                await self._unstall.wait()  # the client times out meanwhile
                return response
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def aclose(self) -> None:
        self._unstall.set()
        await super().aclose()

    async def _speech(self, request: web.Request) -> web.StreamResponse:
        denied = self._auth_error(request)
        if denied is not None:
            return denied
        body = await request.json()
        self.speech_requests.append(body)
        reply = self.speech_script.popleft() if self.speech_script else SpeechReply()
        await asyncio.sleep(reply.delay_s)
        if reply.status != 200:
            return _error(reply.status, f"scripted {reply.status}", "server_error")
        if body.get("response_format") != "pcm":
            return _error(400, "fake supports response_format=pcm only", "invalid_request_error")
        pcm = array_to_pcm16(tones_for_text(body["input"], 24000))
        response = web.StreamResponse(headers={"Content-Type": "audio/pcm"})
        await response.prepare(request)
        for i in range(0, len(pcm), reply.piece_bytes):
            await response.write(pcm[i : i + reply.piece_bytes])
            await asyncio.sleep(0)
        await response.write_eof()
        return response


def _error(status: int, message: str, kind: str) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return web.json_response(body, status=status)


def _echo(body: dict[str, Any]) -> ChatReply:
    users = [m for m in body.get("messages", []) if m.get("role") == "user"]
    last = users[-1]["content"] if users else ""
    return ChatReply(text=f"You said: {last}")


def _chunks(model: str, reply: ChatReply, include_usage: bool) -> list[dict[str, Any]]:
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }

    out = [chunk({"role": "assistant", "content": "", "refusal": None})]
    words = reply.text.split(" ") if reply.text else []
    out += [chunk({"content": w if i == 0 else " " + w}) for i, w in enumerate(words)]
    for index, (call_id, name, args) in enumerate(reply.tool_calls):
        opening = {"index": index, "id": call_id, "type": "function"}
        opening["function"] = {"name": name, "arguments": ""}
        out.append(chunk({"tool_calls": [opening]}))
        text = args if isinstance(args, str) else json.dumps(args)
        size = reply.fragment_chars
        for i in range(0, len(text), size):
            piece = {"index": index, "function": {"arguments": text[i : i + size]}}
            out.append(chunk({"tool_calls": [piece]}))
    out.append(chunk({}, "tool_calls" if reply.tool_calls else "stop"))
    if include_usage:
        usage = {"prompt_tokens": 12, "completion_tokens": len(out), "total_tokens": 12 + len(out)}
        out.append({**chunk({}), "choices": [], "usage": usage})
    return out
