"""Simulated speech: text encoded in audio, and the simulated STT that reads it back."""

from __future__ import annotations

import asyncio
import random
import time

import numpy as np
import pytest

from callmesh.audio.codec import (
    Downsampler,
    array_to_pcm16,
    mulaw_decode,
    mulaw_decode_array,
    mulaw_encode_array,
)
from callmesh.audio.format import AudioChunk, AudioEncoding
from callmesh.audio.tones import (
    SpeechDecoder,
    decode_speech,
    silence,
    speech_from_text,
    tones_for_text,
)
from conversation_node.audio.vad import EnergyVAD, VadEventKind
from conversation_node.providers.base import ProviderError, STTEvent, STTEventKind
from conversation_node.providers.simulated_audio import (
    LOW_CONFIDENCE,
    SimulatedSTT,
    SimulatedSTTStream,
)

TEXT = "I'd like to book a cleaning on Tuesday at 3 pm, please."


def test_speech_round_trips_text_including_unicode() -> None:
    for text in (TEXT, "Zoë paid 20 € — ok?", "a", ""):
        assert decode_speech(silence(100) + speech_from_text(text) + silence(100)) == text


def test_speech_length_is_30_ms_per_symbol() -> None:
    text = "hello"  # SYNC + 2 nibbles per byte + END
    assert len(speech_from_text(text)) == 8 * 30 * (2 + 2 * len(text))


def test_speech_survives_any_framing() -> None:
    audio = silence(60) + speech_from_text(TEXT) + silence(300)
    rng = random.Random(5)
    for sizes in ([160], [1], [7, 333, 160, 2]):
        decoder, i = SpeechDecoder(), 0
        while i < len(audio):
            n = rng.choice(sizes)
            decoder.push(audio[i : i + n])
            i += n
        assert decoder.take() == (TEXT, 1.0)


def test_speech_is_loud_and_not_silence() -> None:
    audio = speech_from_text("yes")
    assert b"\xff\xff" not in audio  # zero crossings only, never a stretch of silence
    level = np.sqrt(np.mean(mulaw_decode_array(audio).astype(np.float64) ** 2))
    assert 20 * np.log10(level / 32768) > -18  # about -15 dBFS, like loud speech
    events = []
    vad = EnergyVAD()
    for i in range(0, len(audio), 160):
        events += vad.push(audio[i : i + 160])
    assert [e.kind for e in events] == [VadEventKind.SPEECH_START]
    assert events[0].at_ms == 0.0


def test_decoder_reads_speech_made_at_24k_and_downsampled() -> None:
    pcm24 = array_to_pcm16(tones_for_text(TEXT, 24000))
    mulaw = Downsampler(3).process_to_mulaw(b"\0\0" * 2400 + pcm24 + b"\0\0" * 2400)
    assert decode_speech(mulaw) == TEXT


def test_decoder_skips_noise_then_reads_speech() -> None:
    rng = np.random.default_rng(3)
    noise = mulaw_encode_array(np.rint(rng.normal(0, 4000, 2400)).astype(np.int16))
    audio = noise + silence(100) + speech_from_text("after the noise") + silence(100)
    assert decode_speech(audio) == "after the noise"


def test_decoder_interim_text_grows_with_audio() -> None:
    audio = speech_from_text("abc")
    decoder = SpeechDecoder()
    seen = []
    for i in range(0, len(audio), 160):
        decoder.push(audio[i : i + 160])
        seen.append(decoder.text)
    assert [t for t in dict.fromkeys(seen)] == ["", "a", "ab", "abc"]


def test_decoder_separates_back_to_back_transmissions() -> None:
    audio = speech_from_text("one") + speech_from_text("two")
    assert decode_speech(audio) == "one two"


# ---------------------------------------------------------------- SimulatedSTT


async def _open(**kwargs: object) -> SimulatedSTTStream:
    return await SimulatedSTT(**kwargs).open(AudioEncoding.MULAW, 8000)  # type: ignore[arg-type]


async def _send(stream: SimulatedSTTStream, audio: bytes, size: int = 160) -> None:
    for i in range(0, len(audio), size):
        await stream.send_audio(AudioChunk(audio[i : i + size]))


async def _until_utterance_end(stream: SimulatedSTTStream, count: int = 1) -> list[STTEvent]:
    events: list[STTEvent] = []
    async with asyncio.timeout(5):  # a guard against hanging, not an assertion
        async for event in stream.events():
            events.append(event)
            if event.kind is STTEventKind.UTTERANCE_END:
                count -= 1
                if not count:
                    break
    return events


async def test_stt_event_sequence_for_one_utterance() -> None:
    stream = await _open()
    sent_at = time.monotonic()
    await _send(stream, silence(200) + speech_from_text(TEXT))
    speech_sent = time.monotonic()
    await _send(stream, silence(400))
    events = await _until_utterance_end(stream)
    await stream.aclose()

    kinds = [e.kind for e in events]
    assert kinds[0] is STTEventKind.SPEECH_STARTED
    assert kinds[-2:] == [STTEventKind.FINAL, STTEventKind.UTTERANCE_END]
    interims = [e.text for e in events if e.kind is STTEventKind.INTERIM]
    assert len(interims) >= 5  # prefetch can start long before the end
    assert all(TEXT.startswith(t) for t in interims)
    assert interims == sorted(interims, key=len)
    final, end = events[-2], events[-1]
    assert final.text == end.text == TEXT
    assert end.confidence >= 0.95
    assert end.speech_end_at is not None
    assert sent_at <= end.speech_end_at <= speech_sent


async def test_stt_splits_a_burst_into_utterances() -> None:
    stream = await _open(latency_ms=5.0)
    audio = speech_from_text("first") + silence(400) + speech_from_text("second") + silence(400)
    await stream.send_audio(AudioChunk(audio))  # all at once, faster than real time
    events = await _until_utterance_end(stream, count=2)
    await stream.aclose()
    ends = [e.text for e in events if e.kind is STTEventKind.UTTERANCE_END]
    starts = [e for e in events if e.kind is STTEventKind.SPEECH_STARTED]
    assert ends == ["first", "second"]
    assert len(starts) == 2


async def test_stt_low_confidence_marker() -> None:
    stream = await _open()
    await _send(stream, speech_from_text("[mumble] tuesday maybe") + silence(400))
    events = await _until_utterance_end(stream)
    await stream.aclose()
    end = events[-1]
    assert end.text == "tuesday maybe"
    assert end.confidence == LOW_CONFIDENCE
    assert all("[" not in e.text for e in events)


async def test_stt_noise_ends_with_an_empty_utterance() -> None:
    rng = np.random.default_rng(9)
    noise = mulaw_encode_array(np.rint(rng.normal(0, 3000, 4000)).astype(np.int16))
    stream = await _open()
    await _send(stream, noise + silence(400))
    events = await _until_utterance_end(stream)
    await stream.aclose()
    assert [e.kind for e in events] == [STTEventKind.SPEECH_STARTED, STTEventKind.UTTERANCE_END]
    assert events[-1].text == ""
    assert events[-1].confidence == 0.0


async def test_stt_finalize_cuts_the_utterance_short() -> None:
    stream = await _open()
    audio = speech_from_text("cancel my appointment")
    await _send(stream, audio[: len(audio) // 2])
    await stream.finalize()
    events = await _until_utterance_end(stream)
    await stream.aclose()
    text = events[-1].text
    assert text and "cancel my appointment".startswith(text)
    assert len(text) < len("cancel my appointment")


async def test_stt_accepts_pcm16_with_odd_chunks() -> None:
    stream = await SimulatedSTT().open(AudioEncoding.PCM16, 8000)
    pcm = mulaw_decode(speech_from_text("pcm works") + silence(400))
    for i in range(0, len(pcm), 321):
        await stream.send_audio(AudioChunk(pcm[i : i + 321], AudioEncoding.PCM16, 8000))
    events = await _until_utterance_end(stream)
    await stream.aclose()
    assert events[-1].text == "pcm works"


async def test_stt_close_is_idempotent_and_final() -> None:
    stream = await _open()
    await stream.aclose()
    await stream.aclose()
    assert [e async for e in stream.events()] == []
    with pytest.raises(ProviderError):
        await stream.send_audio(AudioChunk(silence(20)))


async def test_stt_rejects_rates_it_cannot_decimate_to_8khz() -> None:
    with pytest.raises(ProviderError):
        await SimulatedSTT().open(AudioEncoding.PCM16, 11025)
    stream = await SimulatedSTT().open(AudioEncoding.PCM16, 16000)
    with pytest.raises(ProviderError):  # a stream takes the rate it was opened with
        await stream.send_audio(AudioChunk(b"\0\0" * 80, AudioEncoding.PCM16, 8000))
    await stream.aclose()
    with pytest.raises(ValueError):
        SimulatedSTT(latency_ms=-1)


async def test_stt_consumer_cancellation_leaves_stream_usable() -> None:
    stream = await _open()
    consumer = asyncio.create_task(_until_utterance_end(stream), name="consumer")
    await asyncio.sleep(0)
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    await _send(stream, speech_from_text("still here") + silence(400))
    events = await _until_utterance_end(stream)
    await stream.aclose()
    assert events[-1].text == "still here"


async def test_stt_silence_fast_path_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Quiet frames skip signal processing; the events must be those of the slow path."""
    rng = random.Random(7)
    noise = bytes(0xFF - rng.randrange(4) for _ in range(8000))  # line hiss, far below -45 dBFS
    audio = silence(300) + speech_from_text("one") + noise + speech_from_text("two") + silence(500)

    async def run(fast: bool) -> list[tuple[str, str, float]]:
        stream = await _open()
        if not fast:
            monkeypatch.setattr(stream, "_skip_if_quiet", lambda chunk: False)
        await _send(stream, audio)
        events = await _until_utterance_end(stream, count=2)
        await stream.aclose()
        return [(e.kind.value, e.text, e.confidence) for e in events]

    slow = await run(fast=False)
    assert await run(fast=True) == slow
    assert [t for k, t, _ in slow if k == "utterance_end"] == ["one", "two"]
