"""Offline speech on real speech: eSpeak NG speaks, Silero VAD hears, pocketsphinx recognises.

Sentences a caller of the demo clinic would say are synthesised by the eSpeak provider and
recognised back by the pocketsphinx provider with the demo tenant's domain language model.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from redis.asyncio import Redis

from bench.offline_speech import (
    CALLER_SENTENCES,
    OUT_OF_DOMAIN,
    edit_distance,
    hear,
    samples_of,
    speak,
    words,
)
from callmesh.audio.codec import pcm16_to_array
from callmesh.audio.format import AudioChunk, AudioEncoding
from conversation_node.providers.base import STTEventKind
from conversation_node.providers.espeak_tts import EspeakTTS, espeak_available
from conversation_node.providers.pocketsphinx_stt import PocketsphinxSTT, pocketsphinx_available
from conversation_node.providers.silero_vad import SileroVAD, silero_available
from state_store.store import StateStore

pytestmark = pytest.mark.skipif(
    not (pocketsphinx_available() and espeak_available() and silero_available()),
    reason="needs the [speech] extra: pip install -e '.[speech]'",
)


async def test_confidence_is_the_share_of_words_callers_say_in_that_context() -> None:
    from conversation_node.providers.domain_models import DomainModels
    from memory.tenant_kb import TenantKnowledgeBases

    models = DomainModels(TenantKnowledgeBases(default=None))
    try:
        model = await models.get("bare")
        known, odd = "how much does a filling cost", "the week o'clock over the link"
        assert model.context_share(known.split(" ")) == 1.0
        assert model.context_share(["yes"]) == 1.0 and model.context_share(["cost"]) == 0.0
        assert model.context_share(odd.split(" ")) < 0.5
    finally:
        await models.aclose()


def test_spoken_and_written_forms() -> None:
    from conversation_node.providers.domain_corpus import spoken, written

    said = "third floor eleven hundred dollars at nine thirty a.m."
    assert spoken("3rd floor, $1,100 at 9:30 am") == said.split(" ")
    heard = "my name is maria at ten oh five p.m. on tuesday"
    assert written(heard.split(" ")) == "my name is Maria at 10:05 pm on Tuesday"


def test_edit_distance() -> None:
    assert edit_distance(["a", "b", "c"], ["a", "x", "c", "d"]) == 2
    assert edit_distance([], ["a", "b"]) == 2
    assert words("At 3:30 pm, I'd say.") == ["at", "3:30", "pm", "i'd", "say"]


@pytest.fixture
async def stt():
    recognizer = PocketsphinxSTT()
    yield recognizer
    await recognizer.aclose()


@pytest.mark.parametrize(
    ("encoding", "rate"), [(AudioEncoding.PCM16, 16000), (AudioEncoding.MULAW, 8000)]
)
async def test_tts_speaks_in_the_call_format(encoding: AudioEncoding, rate: int) -> None:
    tts = EspeakTTS(encoding=encoding, sample_rate=rate)
    text = "Your cleaning is booked for Tuesday at 3 pm."
    chunks = [chunk async for chunk in tts.synthesize(text)]
    assert chunks and all(c.encoding is encoding and c.sample_rate == rate for c in chunks)
    samples = samples_of(b"".join(c.data for c in chunks), encoding).astype(np.float64)
    seconds = len(samples) / rate
    assert 0.15 * len(text.split()) < seconds < 0.6 * len(text.split())
    rms_dbfs = 20 * np.log10(np.sqrt(np.mean(samples**2)) / 32768)
    assert rms_dbfs > -35, "speech, not silence"


async def test_tts_stops_when_the_listener_stops() -> None:
    tts = EspeakTTS()
    stream = tts.synthesize("A long sentence. " * 20)
    first = await anext(stream)
    await stream.aclose()  # a barge-in: the rest is never synthesised into the void
    assert first.data
    assert [c async for c in tts.synthesize("Still speaking.")], "the engine is usable after"


async def test_silero_vad_hears_speech_not_silence_or_noise() -> None:
    pcm = pcm16_to_array(await speak(EspeakTTS(), "Hello, I would like to book a cleaning."))
    vad = SileroVAD()
    quiet = np.zeros(8000, dtype=np.int16)
    kinds = [e.kind.value for e in vad.push_samples(np.concatenate([quiet, pcm, quiet, quiet]))]
    assert kinds == ["speech_start", "speech_end"]
    noise = np.random.default_rng(7).normal(0, 1500, 16000 * 3).astype(np.int16)
    hum = (3000 * np.sin(2 * np.pi * 60 * np.arange(16000 * 2) / 16000)).astype(np.int16)
    other = SileroVAD()
    assert other.push_samples(np.concatenate([np.zeros(16000, np.int16), noise, hum])) == []
    vad.close()
    other.close()


async def test_word_error_rate_over_caller_sentences(stt: PocketsphinxSTT) -> None:
    tts = EspeakTTS()
    errors = total = 0
    misheard = []
    for sentence in CALLER_SENTENCES:
        events = await hear(stt, await speak(tts, sentence))
        text = events[-1].text
        ref = words(sentence)
        errors += edit_distance(ref, words(text))
        total += len(ref)
        if words(text) != ref:
            misheard.append((sentence, text))
    wer = errors / total
    assert wer <= 0.15, f"WER {wer:.3f}; misheard: {misheard}"


async def test_a_new_decoders_first_utterance_is_heard_from_its_first_word() -> None:
    # A fresh recognizer: its one decoder has never heard speech (its cepstral mean is the
    # library's initial one, which lost the first words: "the is Sarah Johnson").
    fresh = PocketsphinxSTT(workers=1)
    try:
        tts = EspeakTTS()
        for sentence in ("My name is Sarah Johnson.", "Can I come in on Tuesday at 3 pm?"):
            events = await hear(fresh, await speak(tts, sentence))
            assert words(events[-1].text) == words(sentence)
    finally:
        await fresh.aclose()


def test_only_a_new_decoders_first_utterance_is_decoded_again_and_within_a_bound() -> None:
    from conversation_node.providers import sphinx_worker

    class Decoder:
        def __init__(self) -> None:
            self.fed: list[int] = []  # bytes per utterance decoded

        def start_utt(self) -> None:
            self.fed.append(0)

        def process_raw(self, pcm: bytes) -> None:
            self.fed[-1] += len(pcm)

        def end_utt(self) -> None:
            pass

        def seg(self) -> list[Any]:
            return []

    host = sphinx_worker._Host()
    second = 16000 * 2  # bytes of one second of 16 kHz pcm16
    for stream, utterances in ((1, [3, 2]), (2, [25])):
        decoder = Decoder()
        host.decoders[stream] = (("lm", "dict"), decoder)
        for seconds in utterances:
            host.handle("start", stream, None)
            for _ in range(seconds):
                host.handle("feed", stream, b"\0" * second)
            host.handle("end", stream, None)
        host.handle("close", stream, None)
        if stream == 1:  # the first utterance twice, the next once
            assert decoder.fed == [3 * second, 3 * second, 2 * second]
        else:  # longer than 20 s: heard once, its audio not kept past the bound
            assert decoder.fed == [25 * second]
    assert host.first_utterance == {}


async def test_a_stream_loads_its_models_off_the_event_loop(
    stt: PocketsphinxSTT, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A Silero model's ONNX session took 0.2-0.35 s to load: on the event loop, every
    # call of the node stalled (and the node missed its heartbeats).
    made_on: list[threading.Thread] = []
    endpointer = stt._endpointer

    def spy() -> Any:
        made_on.append(threading.current_thread())
        return endpointer()

    monkeypatch.setattr(stt, "_endpointer", spy)
    stream = await stt.open(AudioEncoding.PCM16, 16000, tenant="demo")
    await stream.aclose()
    assert made_on and threading.main_thread() not in made_on


async def test_speech_ends_at_the_last_voiced_audio_not_at_the_endpoint(
    stt: PocketsphinxSTT,
) -> None:
    # Turn latency is measured from speech_end_at: the caller's wait includes the silence
    # the endpointer needs (end_silence_ms) to know they stopped.
    speech = await speak(EspeakTTS(), "I would like to book a cleaning.")
    frame = 640  # 20 ms of 16 kHz pcm16
    stream = await stt.open(AudioEncoding.PCM16, 16000, tenant="demo")
    try:
        for part in (b"\0" * 12800, speech):
            for i in range(0, len(part), frame):
                chunk = AudioChunk(part[i : i + frame], AudioEncoding.PCM16, 16000)
                stream.send_audio_nowait(chunk)
                await asyncio.sleep(0.02)
        # The endpoint cannot be known before this much silence has come in.
        endpoint_known_at = time.monotonic() + stt.end_silence_ms / 1000
        for _ in range(60):
            stream.send_audio_nowait(AudioChunk(b"\0" * frame, AudioEncoding.PCM16, 16000))
            await asyncio.sleep(0.02)
        async with asyncio.timeout(10):
            ends = [e async for e in _until_end(stream)]
    finally:
        await stream.aclose()
    assert ends[-1].speech_end_at is not None
    assert ends[-1].speech_end_at < endpoint_known_at


async def _until_end(stream: Any) -> Any:
    async for event in stream.events():
        yield event
        if event.kind is STTEventKind.UTTERANCE_END:
            return


async def test_interim_results_come_before_the_final(stt: PocketsphinxSTT) -> None:
    audio = await speak(EspeakTTS(), "I'd like to book a consultation for Wednesday at 9 am.")
    events = await hear(stt, audio)
    kinds = [e.kind for e in events]
    assert kinds[0] is STTEventKind.SPEECH_STARTED
    assert STTEventKind.INTERIM in kinds
    assert kinds.index(STTEventKind.INTERIM) < kinds.index(STTEventKind.FINAL)
    assert kinds[-1] is STTEventKind.UTTERANCE_END
    assert events[-1].speech_end_at is not None


async def test_telephone_audio_goes_through_the_recognizer(stt: PocketsphinxSTT) -> None:
    # 8 kHz mu-law is upsampled for the 16 kHz acoustic model, whose upper filters then
    # hear nothing: narrow-band accuracy is far lower (bench/offline_speech.py measures it);
    # this checks the path: decoding, upsampling, endpointing and events.
    tts = EspeakTTS(encoding=AudioEncoding.MULAW, sample_rate=8000)
    events = await hear(stt, await speak(tts, "Do you take insurance?"), AudioEncoding.MULAW, 8000)
    kinds = [e.kind for e in events]
    assert kinds[0] is STTEventKind.SPEECH_STARTED and kinds[-1] is STTEventKind.UTTERANCE_END
    assert events[-1].text, "something in-domain was heard"


async def test_out_of_domain_speech_has_low_confidence(stt: PocketsphinxSTT) -> None:
    tts = EspeakTTS()
    for sentence in OUT_OF_DOMAIN:
        end = (await hear(stt, await speak(tts, sentence)))[-1]
        assert end.confidence < 0.5, (sentence, end.text, end.confidence)
    end = (await hear(stt, await speak(tts, "How much does a filling cost?")))[-1]
    assert end.confidence >= 0.5, end


async def test_closing_a_stream_releases_its_decoding(stt: PocketsphinxSTT) -> None:
    audio = await speak(EspeakTTS(), "Can I come in on Tuesday?")
    tasks_before = len(asyncio.all_tasks())
    for _ in range(6):
        stream = await stt.open(AudioEncoding.PCM16, 16000, tenant="demo")
        for i in range(0, len(audio), 640):
            stream.send_audio_nowait(AudioChunk(audio[i : i + 640], AudioEncoding.PCM16, 16000))
        await stream.aclose()  # mid-utterance: pending audio is dropped
        assert stream._job is None and stream._decoder is None
        async with asyncio.timeout(5):  # the event stream ends, it does not hang
            left = [e async for e in stream.events()]
        assert STTEventKind.FINAL not in [e.kind for e in left], "dropped, not decoded"
    decoding = [t for t in threading.enumerate() if t.name.startswith("pocketsphinx")]
    assert len(decoding) <= 2 * stt._workers, "a pool, not a thread per stream"
    processes = list(stt._processes)
    assert 1 <= len(processes) <= stt._workers
    assert all(p.streams == 0 for p in processes), "every decoder handed back"
    assert len(asyncio.all_tasks()) == tasks_before
    await stt.aclose()
    assert not [t for t in threading.enumerate() if t.name.startswith("pocketsphinx")]
    assert all(p._proc.poll() is not None for p in processes), "worker processes ended"


async def test_a_dead_decoding_process_fails_its_streams_not_the_recognizer(
    stt: PocketsphinxSTT,
) -> None:
    from conversation_node.providers.base import ProviderError

    audio = await speak(EspeakTTS(), "Do you see children?")
    stream = await stt.open(AudioEncoding.PCM16, 16000, tenant="demo")
    stream._decoder.worker._proc.kill()  # type: ignore[union-attr]
    stream._decoder.worker._proc.wait()  # type: ignore[union-attr]
    stream.send_audio_nowait(AudioChunk(b"\x00\x00" * 8000 + audio, AudioEncoding.PCM16, 16000))
    with pytest.raises(ProviderError, match="decoding failed"):
        async with asyncio.timeout(10):
            async for _ in stream.events():
                pass
    await stream.aclose()
    events = await hear(stt, audio)  # a new stream gets a live process
    assert words(events[-1].text) == ["do", "you", "see", "children"]


def test_registry_selects_offline_providers() -> None:
    from callmesh.config import ConfigError
    from conversation_node.providers.registry import ProviderSettings, build_providers

    env = {"CALLMESH_STT": "pocketsphinx", "CALLMESH_TTS": "espeak", "CALLMESH_VAD": "energy"}
    providers = build_providers(ProviderSettings.from_env(env))
    assert isinstance(providers.stt, PocketsphinxSTT) and providers.stt.vad == "energy"
    assert providers.stt.models.knowledge.root is None  # every tenant: the demo's
    kbs = {"CALLMESH_KB_DIR": "/srv/kb", "CALLMESH_STT_LM_TENANTS": "7"}
    stt = build_providers(ProviderSettings.from_env({**env, **kbs})).stt
    assert isinstance(stt, PocketsphinxSTT) and stt.models.max_tenants == 7
    assert stt.models.knowledge.root == Path("/srv/kb")
    assert isinstance(providers.tts, EspeakTTS)
    assert build_providers(ProviderSettings.from_env({})).names()["stt"] == "simulated-stt"
    with pytest.raises(ConfigError):
        ProviderSettings.from_env({"CALLMESH_VAD": "psychic"})


async def test_a_node_call_is_heard_and_answered_offline(
    redis: Redis, redis_url: str, nats_url: str
) -> None:
    """A 16 kHz PCM call to a real node on the offline providers: an in-domain request is
    understood (a fact is taken from it), an out-of-domain one makes the agent ask again."""
    import base64

    from node_harness import node_call, running_node, simulated_providers

    stt = PocketsphinxSTT()
    providers = simulated_providers(stt=stt, tts=EspeakTTS())
    tts = EspeakTTS()
    quiet = b"\x00\x00" * 8000  # 0.5 s
    async with (
        running_node(redis_url, nats_url, providers) as (_, url),
        node_call(url, "offline-1", via="socket") as call,
    ):
        await call.send(
            type="start", tenant="demo", audio={"encoding": "pcm16", "sample_rate": 16000}
        )
        await call.turn(0, timeout_s=30)
        greeting = call.of_turn(0, "agent_audio")
        assert greeting and all(a["encoding"] == "pcm16" for a in greeting)
        await call.echo_marks(0)
        for turn, sentence in ((1, "I'd like to book a cleaning."), (2, OUT_OF_DOMAIN[2])):
            data = quiet + await speak(tts, sentence) + quiet * 2
            for i in range(0, len(data), 640):  # 20 ms frames
                await call.send(type="audio", data=base64.b64encode(data[i : i + 640]).decode())
            metrics = await call.turn(turn, timeout_s=30)
            await call.echo_marks(turn)
            ckpt = await StateStore(redis).load("demo", "offline-1")
            assert ckpt is not None
            if turn == 1:
                assert "stt_low_confidence" not in metrics["fallbacks"], metrics
                assert ckpt.facts["service"][0] == "cleaning", "understood: a fact taken"
            else:
                assert "stt_low_confidence" in metrics["fallbacks"], metrics


@pytest.mark.parametrize(("rate_in", "rate_out"), [(22050, 16000), (22050, 8000), (8000, 16000)])
def test_resampler_is_chunking_independent_and_accurate(rate_in: int, rate_out: int) -> None:
    from conversation_node.audio.resample import Resampler

    t = np.arange(rate_in) / rate_in
    tone = np.rint(8000 * np.sin(2 * np.pi * 1000 * t)).astype(np.int16)
    whole_r = Resampler(rate_in, rate_out)
    whole = np.concatenate([whole_r.process(tone), whole_r.flush()])
    parts_r = Resampler(rate_in, rate_out)
    parts = [parts_r.process(tone[i : i + 777]) for i in range(0, len(tone), 777)]
    assert np.array_equal(whole, np.concatenate([*parts, parts_r.flush()]))
    assert len(whole) == rate_out  # one second in, one second out
    expected = 8000 * np.sin(2 * np.pi * 1000 * np.arange(rate_out) / rate_out)
    assert np.abs(whole[50:-50] - expected[50:-50]).max() < 50  # -44 dB of the tone
    if rate_out == 8000:  # above the new Nyquist frequency: filtered out, not aliased
        high = np.rint(8000 * np.sin(2 * np.pi * 5000 * t)).astype(np.int16)
        assert np.abs(Resampler(rate_in, rate_out).process(high)[100:]).max() < 100
