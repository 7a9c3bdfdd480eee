"""OpenAI LLM and TTS adapters against a local OpenAI-compatible server (SSE, streamed PCM)."""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import AsyncIterator

import pytest
from fakes.openai_server import API_KEY, ChatReply, FakeOpenAI, SpeechReply

from callmesh.audio.codec import Downsampler, array_to_pcm16
from callmesh.audio.format import AudioEncoding
from callmesh.audio.tones import decode_speech, tones_for_text
from conversation_node.providers.base import (
    LLMDelta,
    LLMRequest,
    ProviderError,
    ProviderTimeout,
    ToolCall,
)
from conversation_node.providers.openai_llm import OpenAILLM, OpenAILLMOptions
from conversation_node.providers.openai_tts import OpenAITTS, OpenAITTSOptions

BOOKING_TOOL = {
    "type": "function",
    "function": {
        "name": "create_booking",
        "parameters": {"type": "object", "properties": {"date": {"type": "string"}}},
    },
}
REQUEST = LLMRequest(
    messages=[
        {"role": "system", "content": "You book dental appointments."},
        {"role": "user", "content": "Book me for Tuesday at 3."},
    ],
    tools=[BOOKING_TOOL],
)


@pytest.fixture
async def oa() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as server:
        yield server


@pytest.fixture
async def llm(oa: FakeOpenAI) -> AsyncIterator[OpenAILLM]:
    model = OpenAILLM(API_KEY, base_url=oa.base_url, options=OpenAILLMOptions(model="test-model"))
    yield model
    await model.aclose()


async def _run(llm: OpenAILLM, request: LLMRequest = REQUEST) -> list[LLMDelta]:
    return [delta async for delta in llm.stream(request)]


async def test_llm_streams_text_tokens(llm: OpenAILLM, oa: FakeOpenAI) -> None:
    oa.chat_script.append(ChatReply(text="Sure, Tuesday at three works."))
    deltas = await _run(llm)
    assert [d.text for d in deltas] == ["Sure,", " Tuesday", " at", " three", " works."]
    assert all(d.tool_call is None for d in deltas)
    body = oa.chat_requests[0]
    assert body["model"] == "test-model"
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["messages"] == REQUEST.messages
    assert body["tools"] == [BOOKING_TOOL]
    assert llm.last_usage is not None and llm.last_usage["prompt_tokens"] == 12


async def test_llm_assembles_tool_calls_from_fragments(llm: OpenAILLM, oa: FakeOpenAI) -> None:
    booking = {"name": "Ann Lee", "service": "cleaning", "date": "2026-03-03", "time": "15:00"}
    sms = {"to": "+15550100", "text": "See you Tuesday — 3 pm"}
    oa.chat_script.append(
        ChatReply(
            text="Booking it now.",
            tool_calls=[("call_a", "create_booking", booking), ("call_b", "send_sms", sms)],
            fragment_chars=3,  # arguments arrive in many pieces
        )
    )
    deltas = await _run(llm)
    assert "".join(d.text for d in deltas) == "Booking it now."
    calls = [d.tool_call for d in deltas if d.tool_call is not None]
    assert calls == [
        ToolCall(id="call_a", name="create_booking", arguments=booking),
        ToolCall(id="call_b", name="send_sms", arguments=sms),
    ]
    # Text comes first, calls after: the sentence can be spoken while the call is built.
    assert deltas[0].text == "Booking"


async def test_llm_without_tools_or_usage(oa: FakeOpenAI) -> None:
    options = OpenAILLMOptions(include_usage=False, temperature=0.2, max_tokens=50)
    llm = OpenAILLM(API_KEY, base_url=oa.base_url, options=options)
    deltas = await _run(llm, LLMRequest(messages=[{"role": "user", "content": "hello"}]))
    await llm.aclose()
    assert "".join(d.text for d in deltas) == "You said: hello"
    body = oa.chat_requests[0]
    assert "tools" not in body and "stream_options" not in body
    assert body["temperature"] == 0.2 and body["max_completion_tokens"] == 50
    assert llm.last_usage is None


async def test_llm_invalid_tool_arguments(llm: OpenAILLM, oa: FakeOpenAI) -> None:
    oa.chat_script.append(ChatReply(tool_calls=[("c1", "create_booking", '{"date": "Tue')]))
    with pytest.raises(ProviderError) as info:
        await _run(llm)
    assert "invalid JSON" in str(info.value)


@pytest.mark.parametrize(
    ("status", "retryable"), [(500, True), (503, True), (429, True), (400, False)]
)
async def test_llm_http_errors(
    llm: OpenAILLM, oa: FakeOpenAI, status: int, retryable: bool
) -> None:
    oa.chat_script.append(ChatReply(status=status))
    with pytest.raises(ProviderError) as info:
        await _run(llm)
    assert info.value.retryable is retryable
    assert str(status) in str(info.value)
    assert len(oa.chat_requests) == 1  # no hidden retries: the node decides


async def test_llm_bad_key_is_not_retryable(oa: FakeOpenAI) -> None:
    llm = OpenAILLM("sk-wrong", base_url=oa.base_url)
    with pytest.raises(ProviderError) as info:
        await _run(llm)
    await llm.aclose()
    assert not info.value.retryable


async def test_llm_stalled_stream_times_out(oa: FakeOpenAI) -> None:
    oa.chat_script.append(ChatReply(text="one two three four", stall_after_chunks=3))
    llm = OpenAILLM(API_KEY, base_url=oa.base_url, options=OpenAILLMOptions(timeout_s=0.2))
    got: list[str] = []
    with pytest.raises(ProviderTimeout) as info:
        async for delta in llm.stream(REQUEST):
            got.append(delta.text)
    await llm.aclose()
    assert got == ["one", " two"]  # what arrived before the stall was delivered
    assert info.value.retryable


async def test_llm_connection_refused_is_retryable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    llm = OpenAILLM(API_KEY, base_url=f"http://127.0.0.1:{port}/v1")
    with pytest.raises(ProviderError) as info:
        await _run(llm)
    await llm.aclose()
    assert info.value.retryable


async def test_llm_consumer_stops_early(llm: OpenAILLM, oa: FakeOpenAI) -> None:
    oa.chat_script.append(ChatReply(text="a long answer that the caller interrupts"))
    async with contextlib.aclosing(llm.stream(REQUEST)) as deltas:
        async for delta in deltas:
            assert delta.text == "a"
            break
    # The connection is usable again afterwards.
    assert "".join(d.text for d in await _run(llm)).startswith("You said:")


# ---------------------------------------------------------------- TTS


async def test_tts_streams_mulaw_8k_of_the_right_length_and_content(oa: FakeOpenAI) -> None:
    text = "Your cleaning is booked for Tuesday."
    tts = OpenAITTS(API_KEY, base_url=oa.base_url, options=OpenAITTSOptions(voice="sage"))
    chunks = [c async for c in tts.synthesize(text)]
    await tts.aclose()
    audio = b"".join(c.data for c in chunks)
    source = tones_for_text(text, 24000)
    assert len(audio) == -(-len(source) // 3)  # exactly one 8 kHz sample per 3 at 24 kHz
    assert all((c.encoding, c.sample_rate) == (AudioEncoding.MULAW, 8000) for c in chunks)
    assert len(chunks) > 10 and all(len(c.data) >= 160 for c in chunks[:-1])
    # Streaming over odd network reads gives the same bytes as converting in one go.
    assert audio == Downsampler(3).process_to_mulaw(array_to_pcm16(source))
    assert decode_speech(audio) == text
    body = oa.speech_requests[0]
    assert body == {
        "input": text,
        "model": "gpt-4o-mini-tts",
        "voice": "sage",
        "response_format": "pcm",
    }


async def test_tts_errors_are_translated(oa: FakeOpenAI) -> None:
    tts = OpenAITTS(API_KEY, base_url=oa.base_url)
    oa.speech_script.append(SpeechReply(status=500))
    with pytest.raises(ProviderError) as info:
        _ = [c async for c in tts.synthesize("hello")]
    assert info.value.retryable
    oa.speech_script.append(SpeechReply(status=400))
    with pytest.raises(ProviderError) as info:
        _ = [c async for c in tts.synthesize("hello")]
    assert not info.value.retryable
    assert [c async for c in tts.synthesize("   ")] == []  # nothing to say, no request
    assert len(oa.speech_requests) == 2
    await tts.aclose()


def test_fake_chunks_follow_the_wire_shape() -> None:
    from fakes.openai_server import _chunks

    chunks = _chunks("m", ChatReply(text="hi", tool_calls=[("c", "f", {"a": 1})]), True)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"] == [] and "usage" in chunks[-1]
    arguments = "".join(
        tc["function"]["arguments"]
        for c in chunks[:-1]
        for tc in c["choices"][0]["delta"].get("tool_calls", [])
    )
    assert json.loads(arguments) == {"a": 1}
