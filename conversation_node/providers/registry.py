"""Which speech and language providers a node uses, chosen from configuration.

Simulated providers by default, so a laptop (and every test) runs offline. An API key
switches the matching real provider on; ``CALLMESH_STT``/``CALLMESH_LLM``/``CALLMESH_TTS``/
``CALLMESH_BACKUP_TTS`` override the choice:

=========================  =================================================
``DEEPGRAM_API_KEY``       STT and primary TTS become Deepgram (nova-3, Aura)
``OPENAI_API_KEY``         LLM becomes OpenAI; OpenAI TTS is the backup voice
                           (the primary one when there is no Deepgram key)
``OPENAI_BASE_URL``        any OpenAI-compatible server (vLLM, Ollama, ...);
                           with ``CALLMESH_LLM=openai`` it needs no key
``CALLMESH_DEEPGRAM_URL``  a Deepgram-compatible endpoint (e.g. a local double)
=========================  =================================================

Offline speech (the ``[speech]`` extra, no key, models in the wheels):
``CALLMESH_STT=pocketsphinx`` (with ``CALLMESH_VAD=silero|energy`` for its endpointing),
``CALLMESH_TTS=espeak`` (``CALLMESH_ESPEAK_VOICE``, ``CALLMESH_ESPEAK_WPM``).

Model and voice: ``CALLMESH_LLM_MODEL``, ``CALLMESH_OPENAI_TTS_MODEL``,
``CALLMESH_OPENAI_TTS_VOICE``, ``CALLMESH_DEEPGRAM_STT_MODEL``,
``CALLMESH_DEEPGRAM_TTS_MODEL``. Timing: ``CALLMESH_LLM_TIMEOUT_MS``,
``CALLMESH_STT_ENDPOINTING_MS``, ``CALLMESH_SIM_LATENCY_SCALE``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from callmesh.config import ConfigError, SimulatedLatency
from conversation_node.providers.base import LLM, STT, TTS

__all__ = ["ProviderSettings", "Providers", "build_providers"]

STT_CHOICES = ("simulated", "deepgram", "pocketsphinx")
LLM_CHOICES = ("simulated", "openai")
TTS_CHOICES = ("simulated", "deepgram", "openai", "espeak")
VAD_CHOICES = ("silero", "energy")
# Local OpenAI-compatible servers ignore the key, but the client insists on one.
_NO_KEY = "sk-no-key-needed"


@dataclass(frozen=True)
class ProviderSettings:
    """Provider choice and options. Validated at construction; see :meth:`from_env`."""

    stt: str = "simulated"
    llm: str = "simulated"
    tts: str = "simulated"
    backup_tts: str = "simulated"
    deepgram_api_key: str = ""
    deepgram_url: str = ""  # http(s):// base of a Deepgram-compatible API; "" = Deepgram
    openai_api_key: str = ""
    openai_base_url: str = ""  # "" = api.openai.com
    llm_model: str = "gpt-4o-mini"
    llm_timeout_ms: int = 10_000
    openai_tts_model: str = "gpt-4o-mini-tts"
    openai_tts_voice: str = "coral"
    deepgram_stt_model: str = "nova-3"
    deepgram_tts_model: str = "aura-2-thalia-en"
    stt_endpointing_ms: int = 300
    tts_chunk_ms: int = 100
    vad: str = "silero"  # endpointing of the offline recognizer
    espeak_voice: str = "en-us"
    espeak_wpm: int = 175
    sim_latency: SimulatedLatency = field(default_factory=SimulatedLatency)

    def __post_init__(self) -> None:
        for role, value, choices in (
            ("stt", self.stt, STT_CHOICES),
            ("llm", self.llm, LLM_CHOICES),
            ("tts", self.tts, TTS_CHOICES),
            ("backup_tts", self.backup_tts, TTS_CHOICES),
            ("vad", self.vad, VAD_CHOICES),
        ):
            if value not in choices:
                raise ConfigError(f"{role} must be one of {'|'.join(choices)}, got {value!r}")
        uses = {self.stt, self.tts, self.backup_tts, self.llm}
        if "deepgram" in uses and not self.deepgram_api_key:
            raise ConfigError("a Deepgram provider is selected but DEEPGRAM_API_KEY is not set")
        if "openai" in uses and not (self.openai_api_key or self.openai_base_url):
            raise ConfigError("an OpenAI provider is selected but OPENAI_API_KEY is not set")
        if self.deepgram_url and not self.deepgram_url.startswith(("http://", "https://")):
            raise ConfigError(f"deepgram_url must be http(s)://, got {self.deepgram_url!r}")
        for name in ("llm_timeout_ms", "stt_endpointing_ms", "tts_chunk_ms", "espeak_wpm"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ProviderSettings:
        """Settings from environment variables (``os.environ`` when ``env`` is None)."""
        env = os.environ if env is None else env
        dg_key = env.get("DEEPGRAM_API_KEY", "")
        oa_key = env.get("OPENAI_API_KEY", "")
        default_tts = "deepgram" if dg_key else ("openai" if oa_key else "simulated")
        tts = env.get("CALLMESH_TTS", default_tts)
        default_backup = "openai" if oa_key and tts != "openai" else "simulated"
        values: dict[str, Any] = {
            "stt": env.get("CALLMESH_STT", "deepgram" if dg_key else "simulated"),
            "llm": env.get("CALLMESH_LLM", "openai" if oa_key else "simulated"),
            "tts": tts,
            "backup_tts": env.get("CALLMESH_BACKUP_TTS", default_backup),
            "deepgram_api_key": dg_key,
            "deepgram_url": env.get("CALLMESH_DEEPGRAM_URL", ""),
            "openai_api_key": oa_key,
            "openai_base_url": env.get("OPENAI_BASE_URL", ""),
        }
        strings = {
            "llm_model": "CALLMESH_LLM_MODEL",
            "openai_tts_model": "CALLMESH_OPENAI_TTS_MODEL",
            "openai_tts_voice": "CALLMESH_OPENAI_TTS_VOICE",
            "deepgram_stt_model": "CALLMESH_DEEPGRAM_STT_MODEL",
            "deepgram_tts_model": "CALLMESH_DEEPGRAM_TTS_MODEL",
            "vad": "CALLMESH_VAD",
            "espeak_voice": "CALLMESH_ESPEAK_VOICE",
        }
        values.update({k: env[v] for k, v in strings.items() if env.get(v)})
        integers = {
            "llm_timeout_ms": "CALLMESH_LLM_TIMEOUT_MS",
            "stt_endpointing_ms": "CALLMESH_STT_ENDPOINTING_MS",
            "tts_chunk_ms": "CALLMESH_TTS_CHUNK_MS",
            "espeak_wpm": "CALLMESH_ESPEAK_WPM",
        }
        try:
            values.update({k: int(env[v]) for k, v in integers.items() if env.get(v)})
            if env.get("CALLMESH_SIM_LATENCY_SCALE"):
                scale = float(env["CALLMESH_SIM_LATENCY_SCALE"])
                values["sim_latency"] = SimulatedLatency().scaled(scale)
        except ValueError as exc:
            raise ConfigError(f"bad number in provider settings: {exc}") from exc
        return cls(**values)


@dataclass
class Providers:
    """The providers of one node. ``aclose`` closes those holding connections."""

    stt: STT
    llm: LLM
    tts: TTS
    backup_tts: TTS

    def names(self) -> dict[str, str]:
        return {role: getattr(self, role).name for role in ("stt", "llm", "tts", "backup_tts")}

    async def aclose(self) -> None:
        seen: set[int] = set()
        for provider in (self.stt, self.llm, self.tts, self.backup_tts):
            close = getattr(provider, "aclose", None)
            if close is not None and id(provider) not in seen:
                seen.add(id(provider))
                await close()


def _deepgram_environment(settings: ProviderSettings) -> Any:
    if not settings.deepgram_url:
        return None
    from conversation_node.providers.deepgram_stt import DeepgramClientEnvironment

    base = settings.deepgram_url.rstrip("/")
    ws = "ws" + base.removeprefix("http")  # http→ws, https→wss
    return DeepgramClientEnvironment(base=base, production=ws, agent=ws, agent_rest=base)


def _openai_kwargs(settings: ProviderSettings) -> dict[str, Any]:
    return {
        "api_key": settings.openai_api_key or _NO_KEY,
        "base_url": settings.openai_base_url or None,
    }


def _build_tts(kind: str, settings: ProviderSettings) -> TTS:
    # Imports are lazy: a node on simulated providers never loads the vendor SDKs.
    if kind == "deepgram":
        from conversation_node.providers.deepgram_tts import DeepgramTTS, DeepgramTTSOptions

        return DeepgramTTS(
            settings.deepgram_api_key,
            options=DeepgramTTSOptions(model=settings.deepgram_tts_model),
            environment=_deepgram_environment(settings),
        )
    if kind == "openai":
        from conversation_node.providers.openai_tts import OpenAITTS, OpenAITTSOptions

        options = OpenAITTSOptions(model=settings.openai_tts_model, voice=settings.openai_tts_voice)
        return OpenAITTS(**_openai_kwargs(settings), options=options)
    if kind == "espeak":
        from conversation_node.providers.espeak_tts import EspeakTTS, espeak_available

        if not espeak_available():
            raise ConfigError("the espeak voice needs the [speech] extra (espeakng-loader)")

        return EspeakTTS(
            voice=settings.espeak_voice,
            words_per_minute=settings.espeak_wpm,
            chunk_ms=settings.tts_chunk_ms,
        )
    from conversation_node.providers.simulated import SimulatedTTS

    return SimulatedTTS(settings.sim_latency, chunk_ms=settings.tts_chunk_ms)


def build_providers(settings: ProviderSettings | None = None) -> Providers:
    """Construct the configured providers. Opens no connection and starts no task."""
    settings = settings or ProviderSettings.from_env()
    stt: STT
    if settings.stt == "deepgram":
        from conversation_node.providers.deepgram_stt import DeepgramSTT, DeepgramSTTOptions

        stt = DeepgramSTT(
            settings.deepgram_api_key,
            options=DeepgramSTTOptions(
                model=settings.deepgram_stt_model, endpointing_ms=settings.stt_endpointing_ms
            ),
            environment=_deepgram_environment(settings),
        )
    elif settings.stt == "pocketsphinx":
        from conversation_node.providers.pocketsphinx_stt import PocketsphinxSTT, speech_missing

        if missing := speech_missing(settings.vad):
            raise ConfigError(f"the pocketsphinx recognizer needs the [speech] extra ({missing})")

        stt = PocketsphinxSTT(vad=settings.vad, end_silence_ms=settings.stt_endpointing_ms)
    else:
        from conversation_node.audio.vad import VadConfig
        from conversation_node.providers.simulated_audio import SimulatedSTT

        stt = SimulatedSTT(
            latency_ms=settings.sim_latency.stt_ms,
            vad=VadConfig(end_silence_ms=settings.stt_endpointing_ms),
        )
    llm: LLM
    if settings.llm == "openai":
        from conversation_node.providers.openai_llm import OpenAILLM, OpenAILLMOptions

        llm = OpenAILLM(
            **_openai_kwargs(settings),
            options=OpenAILLMOptions(
                model=settings.llm_model, timeout_s=settings.llm_timeout_ms / 1000
            ),
        )
    else:
        from conversation_node.providers.simulated import SimulatedLLM

        llm = SimulatedLLM(settings.sim_latency)
    return Providers(
        stt=stt,
        llm=llm,
        tts=_build_tts(settings.tts, settings),
        backup_tts=_build_tts(settings.backup_tts, settings),
    )
