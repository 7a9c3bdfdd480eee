"""Deepgram STT and TTS adapters against a local double speaking Deepgram's wire protocol."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator

import pytest
from fakes.deepgram_server import API_KEY, FakeDeepgram

from callmesh.audio.format import AudioChunk, AudioEncoding
from callmesh.audio.tones import decode_speech, silence, speech_from_text
from conversation_node.providers.base import ProviderError, STTEvent, STTEventKind
from conversation_node.providers.deepgram_stt import (
    DeepgramClientEnvironment,
    DeepgramSTT,
    DeepgramSTTOptions,
    DeepgramSTTStream,
)
from conversation_node.providers.deepgram_tts import DeepgramTTS, DeepgramTTSOptions

TEXT = "I would like to book a cleaning"


@pytest.fixture
async def dg() -> AsyncIterator[FakeDeepgram]:
    async with FakeDeepgram() as server:
        yield server


async def _send(stream: DeepgramSTTStream, audio: bytes) -> None:
    for i in range(0, len(audio), 160):
        await stream.send_audio(AudioChunk(audio[i : i + 160]))


async def _collect(stream: DeepgramSTTStream, until: STTEventKind) -> list[STTEvent]:
    events: list[STTEvent] = []
    async with asyncio.timeout(5):  # a guard against hanging, not an assertion
        async for event in stream.events():
            events.append(event)
            if event.kind is until:
                break
    return events


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- STT


async def test_stt_streams_interims_final_and_one_utterance_end(dg: FakeDeepgram) -> None:
    stt = DeepgramSTT(API_KEY, environment=dg.environment)
    stream = await stt.open(AudioEncoding.MULAW, 8000)
    started = time.monotonic()
    await _send(stream, silence(200) + speech_from_text(TEXT))
    speech_sent = time.monotonic()
    # 1.2 s of silence: endpointing (300 ms) and then UtteranceEnd (1000 ms) both fire.
    await _send(stream, silence(1200))
    events = await _collect(stream, STTEventKind.UTTERANCE_END)
    await stream.aclose()
    await stream.aclose()

    assert events[0].kind is STTEventKind.SPEECH_STARTED
    interims = [e.text for e in events if e.kind is STTEventKind.INTERIM]
    assert len(interims) >= 3 and all(TEXT.startswith(t) for t in interims)
    assert [e.text for e in events if e.kind is STTEventKind.FINAL] == [TEXT]
    end = events[-1]
    assert end.text == TEXT and end.confidence == 1.0
    assert end.speech_end_at is not None and started <= end.speech_end_at <= speech_sent

    record = dg.listens[0]
    assert record.params == {
        "model": "nova-3",
        "encoding": "mulaw",
        "sample_rate": "8000",
        "channels": "1",
        "interim_results": "true",
        "endpointing": "300",
        "utterance_end_ms": "1000",
        "vad_events": "true",
        "smart_format": "true",
    }
    # The double did send the late UtteranceEnd; the adapter reported the utterance once.
    assert any(m["type"] == "UtteranceEnd" for m in record.sent)
    assert record.close_stream
    assert record.audio_bytes == len(silence(200) + speech_from_text(TEXT) + silence(1200))


async def test_stt_two_utterances_and_confidence(dg: FakeDeepgram) -> None:
    dg.confidence = 0.42
    stream = await DeepgramSTT(API_KEY, environment=dg.environment).open(AudioEncoding.MULAW, 8000)
    await _send(stream, speech_from_text("first") + silence(400))
    await _send(stream, speech_from_text("second one") + silence(400))
    first = await _collect(stream, STTEventKind.UTTERANCE_END)
    second = await _collect(stream, STTEventKind.UTTERANCE_END)
    await stream.aclose()
    assert (first[-1].text, first[-1].confidence) == ("first", 0.42)
    assert (second[-1].text, second[-1].confidence) == ("second one", 0.42)
    assert second[0].kind is STTEventKind.SPEECH_STARTED


async def test_stt_finalize_ends_the_utterance_now(dg: FakeDeepgram) -> None:
    stream = await DeepgramSTT(API_KEY, environment=dg.environment).open(AudioEncoding.MULAW, 8000)
    await _send(stream, speech_from_text("press one"))  # no trailing silence: no endpoint
    await stream.finalize()
    events = await _collect(stream, STTEventKind.UTTERANCE_END)
    await stream.aclose()
    assert events[-1].text == "press one"
    assert dg.listens[0].finalizes == 1


async def test_stt_linear16(dg: FakeDeepgram) -> None:
    from callmesh.audio.codec import mulaw_decode

    stream = await DeepgramSTT(API_KEY, environment=dg.environment).open(AudioEncoding.PCM16, 8000)
    pcm = mulaw_decode(speech_from_text("linear") + silence(400))
    for i in range(0, len(pcm), 320):
        await stream.send_audio(AudioChunk(pcm[i : i + 320], AudioEncoding.PCM16, 8000))
    events = await _collect(stream, STTEventKind.UTTERANCE_END)
    await stream.aclose()
    assert events[-1].text == "linear"
    assert dg.listens[0].params["encoding"] == "linear16"


async def test_stt_sends_keepalives_when_idle(dg: FakeDeepgram) -> None:
    options = DeepgramSTTOptions(keepalive_s=0.02)
    stream = await DeepgramSTT(API_KEY, options=options, environment=dg.environment).open(
        AudioEncoding.MULAW, 8000
    )
    async with asyncio.timeout(5):
        for _ in range(2):
            await dg.listens[0].keepalive_received.wait()
            dg.listens[0].keepalive_received.clear()
    await stream.aclose()
    assert dg.listens[0].keepalives >= 2


async def test_stt_rejected_credentials_are_not_retryable(dg: FakeDeepgram) -> None:
    with pytest.raises(ProviderError) as info:
        await DeepgramSTT("wrong-key", environment=dg.environment).open(AudioEncoding.MULAW, 8000)
    assert not info.value.retryable
    assert "401" in str(info.value)


async def test_stt_server_errors_are_retryable(dg: FakeDeepgram) -> None:
    dg.reject_status = 503
    with pytest.raises(ProviderError) as info:
        await DeepgramSTT(API_KEY, environment=dg.environment).open(AudioEncoding.MULAW, 8000)
    assert info.value.retryable


async def test_stt_connection_refused_is_retryable() -> None:
    url = f"127.0.0.1:{_free_port()}"
    env = DeepgramClientEnvironment(
        base=f"http://{url}", production=f"ws://{url}", agent=f"ws://{url}", agent_rest=""
    )
    with pytest.raises(ProviderError) as info:
        await DeepgramSTT(API_KEY, environment=env).open(AudioEncoding.MULAW, 8000)
    assert info.value.retryable


async def test_stt_dropped_connection_surfaces_as_retryable_error(dg: FakeDeepgram) -> None:
    dg.drop_listen_after_bytes = 1600
    stream = await DeepgramSTT(API_KEY, environment=dg.environment).open(AudioEncoding.MULAW, 8000)
    await _send(stream, silence(200))
    with pytest.raises(ProviderError) as info:
        await _collect(stream, STTEventKind.UTTERANCE_END)
    assert info.value.retryable
    assert "1011" in str(info.value)
    with pytest.raises(ProviderError):
        await stream.send_audio(AudioChunk(silence(20)))
    await stream.aclose()


async def test_stt_aclose_while_consumer_waits(dg: FakeDeepgram) -> None:
    stream = await DeepgramSTT(API_KEY, environment=dg.environment).open(AudioEncoding.MULAW, 8000)
    consumer = asyncio.create_task(_collect(stream, STTEventKind.UTTERANCE_END), name="consumer")
    await asyncio.sleep(0.01)
    await stream.aclose()
    assert await consumer == []  # events() ends cleanly when the stream is closed
    with pytest.raises(ProviderError):
        await stream.send_audio(AudioChunk(silence(20)))


# ---------------------------------------------------------------- TTS


async def _say(tts: DeepgramTTS, text: str) -> bytes:
    audio = b""
    async with contextlib.aclosing(tts.synthesize(text)) as chunks:
        async for chunk in chunks:
            assert (chunk.encoding, chunk.sample_rate) == (AudioEncoding.MULAW, 8000)
            audio += chunk.data
    return audio


async def test_tts_reuses_one_socket_across_sentences(dg: FakeDeepgram) -> None:
    tts = DeepgramTTS(API_KEY, environment=dg.environment)
    sentences = ["Thanks for calling.", "How can I help?", "Tuesday at three works."]
    for text in sentences:
        audio = await _say(tts, text)
        assert decode_speech(audio) == text
        assert len(audio) == len(speech_from_text(text))
    await tts.aclose()
    await tts.aclose()
    assert tts.opened == 1 and len(dg.speaks) == 1
    assert dg.speaks[0].params == {
        "model": "aura-2-thalia-en",
        "encoding": "mulaw",
        "sample_rate": "8000",
    }
    assert dg.speaks[0].flushed_texts == sentences
    assert dg.speaks[0].closed_by_client


async def test_tts_barge_in_clears_and_the_socket_stays_clean(dg: FakeDeepgram) -> None:
    dg.speak_chunk_pause_s = 0.005  # the Clear arrives while audio is still flowing
    tts = DeepgramTTS(API_KEY, environment=dg.environment)
    async with contextlib.aclosing(tts.synthesize("A long answer that gets cut off")) as chunks:
        async for _ in chunks:
            break
    audio = await _say(tts, "Sure, go ahead.")
    await tts.aclose()
    assert decode_speech(audio) == "Sure, go ahead."  # nothing left over from the old sentence
    assert dg.speaks[0].clears == 1 and tts.opened == 1


async def test_tts_cancelled_consumer(dg: FakeDeepgram) -> None:
    dg.speak_chunk_pause_s = 0.005
    tts = DeepgramTTS(API_KEY, environment=dg.environment)
    first_chunk = asyncio.Event()

    async def listen() -> None:
        async for _ in tts.synthesize("This sentence is interrupted by a cancel"):
            first_chunk.set()

    task = asyncio.create_task(listen(), name="listener")
    await first_chunk.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert decode_speech(await _say(tts, "Next.")) == "Next."
    await tts.aclose()


async def test_tts_flush_limit_rotates_sockets(dg: FakeDeepgram) -> None:
    options = DeepgramTTSOptions(flush_limit=2)
    tts = DeepgramTTS(API_KEY, options=options, environment=dg.environment)
    for text in ("one", "two", "three"):
        assert decode_speech(await _say(tts, text)) == text
    await tts.aclose()
    assert tts.opened == 2
    assert [s.flushed_texts for s in dg.speaks] == [["one", "two"], ["three"]]


async def test_tts_retries_a_pooled_socket_the_server_dropped(dg: FakeDeepgram) -> None:
    tts = DeepgramTTS(API_KEY, environment=dg.environment)
    assert decode_speech(await _say(tts, "first")) == "first"
    for ws in list(dg._sockets):
        await ws.close(code=1011)
    assert decode_speech(await _say(tts, "second")) == "second"
    await tts.aclose()
    assert tts.opened == 2


async def test_tts_errors(dg: FakeDeepgram) -> None:
    tts = DeepgramTTS("wrong-key", environment=dg.environment)
    with pytest.raises(ProviderError) as info:
        await _say(tts, "hello")
    assert not info.value.retryable
    await tts.aclose()
    with pytest.raises(ProviderError):
        await _say(tts, "closed")
    dg.reject_status = 500
    tts = DeepgramTTS(API_KEY, environment=dg.environment)
    with pytest.raises(ProviderError) as info:
        await _say(tts, "hello")
    assert info.value.retryable
    await tts.aclose()
