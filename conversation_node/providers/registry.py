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
``CALLMESH_STT=pocketsphinx`` (with ``CALLMESH_VAD=silero|energy`` for its endpointing, and
per-tenant language models from the knowledge bases in ``CALLMESH_KB_DIR``),
``CALLMESH_TTS=espeak`` (``CALLMESH_ESPEAK_VOICE``, ``CALLMESH_ESPEAK_WPM``).
``CALLMESH_SPEECH=offline`` (what ``callmesh up`` gives its nodes) makes them the choice
of every speech role that no name and no key chooses.

Model and voice: ``CALLMESH_LLM_MODEL``, ``CALLMESH_OPENAI_TTS_MODEL``,
``CALLMESH_OPENAI_TTS_VOICE``, ``CALLMESH_DEEPGRAM_STT_MODEL``,
``CALLMESH_DEEPGRAM_TTS_MODEL``. Timing: ``CALLMESH_LLM_TIMEOUT_MS``,
``CALLMESH_STT_ENDPOINTING_MS``, ``CALLMESH_SIM_LATENCY_SCALE``. Each is declared, with
its default and bounds, in :mod:`callmesh.settings.table` (docs/configuration.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from callmesh import settings
from callmesh.config import ConfigError, SimulatedLatency
from callmesh.settings.table import NODE
from conversation_node.providers.base import LLM, STT, TTS

__all__ = ["ProviderSettings", "Providers", "build_providers", "offline_missing"]

# Local OpenAI-compatible servers ignore the key, but the client insists on one.
_NO_KEY = "sk-no-key-needed"


def _default(key: str) -> Any:
    return settings.default(NODE, key)


@dataclass(frozen=True)
class ProviderSettings:
    """Provider choice and options. Validated at construction; see :meth:`from_env`.
    Built directly, every role is simulated."""

    stt: str = "simulated"
    llm: str = "simulated"
    tts: str = "simulated"
    backup_tts: str = "simulated"
    deepgram_api_key: str = field(default=_default("deepgram_api_key"), repr=False)
    deepgram_url: str = _default("deepgram_url")  # "" = Deepgram
    openai_api_key: str = field(default=_default("openai_api_key"), repr=False)
    openai_base_url: str = _default("openai_base_url")  # "" = api.openai.com
    llm_model: str = _default("llm_model")
    llm_timeout_ms: int = _default("llm_timeout_ms")
    openai_tts_model: str = _default("openai_tts_model")
    openai_tts_voice: str = _default("openai_tts_voice")
    deepgram_stt_model: str = _default("deepgram_stt_model")
    deepgram_tts_model: str = _default("deepgram_tts_model")
    stt_endpointing_ms: int = _default("stt_endpointing_ms")
    endpointing_min_ms: int = _default("endpointing_min_ms")
    endpointing_max_ms: int = _default("endpointing_max_ms")
    preemptive: str = _default("preemptive")
    preemptive_stable_ms: int = _default("preemptive_stable_ms")
    tts_chunk_ms: int = _default("tts_chunk_ms")
    vad: str = _default("vad")  # endpointing of the offline recognizer
    # The offline recognizer's per-tenant language models: where the knowledge bases are
    # (the node's CALLMESH_KB_DIR), how many tenants' models it keeps, how often it looks
    # for a changed knowledge base.
    kb_dir: str = _default("kb_dir")
    stt_lm_tenants: int = _default("stt_lm_tenants")
    stt_lm_check_s: float = _default("stt_lm_check_s")
    espeak_voice: str = _default("espeak_voice")
    espeak_wpm: int = _default("espeak_wpm")
    # Local chaos runs only: the simulated model's slow-down file (SimulatedLLM).
    sim_llm_control_file: str = _default("sim_llm_control_file")
    sim_latency: SimulatedLatency = field(default_factory=SimulatedLatency)

    def __post_init__(self) -> None:
        settings.check_fields(self, NODE)  # choices, URLs and bounds of the table
        if self.sim_llm_control_file and self.llm != "simulated":
            # A test control must never reach a real model: refused, not ignored.
            raise ConfigError(
                "CALLMESH_SIM_LLM_CONTROL_FILE controls the simulated model only; the language "
                f"model here is {self.llm!r}"
            )
        uses = {self.stt, self.tts, self.backup_tts, self.llm}
        if "deepgram" in uses and not self.deepgram_api_key:
            raise ConfigError("a Deepgram provider is selected but DEEPGRAM_API_KEY is not set")
        if "openai" in uses and not (self.openai_api_key or self.openai_base_url):
            raise ConfigError("an OpenAI provider is selected but OPENAI_API_KEY is not set")
        if self.endpointing_min_ms > self.endpointing_max_ms:
            raise ConfigError("CALLMESH_ENDPOINTING_MIN_MS is above CALLMESH_ENDPOINTING_MAX_MS")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ProviderSettings:
        """Settings from environment variables (``os.environ`` when ``env`` is None), as
        declared in :mod:`callmesh.settings.table`; a role left unset follows the keys."""
        return cls.from_values(settings.load(NODE, env, only=(*_FROM_TABLE, "speech")))

    @classmethod
    def from_values(cls, node_settings: Mapping[str, Any]) -> ProviderSettings:
        """From a node's settings as read (``settings.load``); a role left unset (None)
        follows the keys."""
        values = {key: node_settings[key] for key in _FROM_TABLE}
        dg_key, oa_key = values["deepgram_api_key"], values["openai_api_key"]
        # What a role no name and no key chooses: tones, or the offline engines.
        offline = node_settings.get("speech") == "offline"
        voice, hearing = ("espeak", "pocketsphinx") if offline else ("simulated", "simulated")
        tts = values["tts"] or ("deepgram" if dg_key else ("openai" if oa_key else voice))
        auto = {
            "stt": "deepgram" if dg_key else hearing,
            "llm": "openai" if oa_key else "simulated",
            "tts": tts,
            "backup_tts": "openai" if oa_key and tts != "openai" else voice,
        }
        chosen: dict[str, Any] = {role: values[role] or auto[role] for role in auto}
        scale = values["sim_latency_scale"]
        rest = {k: v for k, v in values.items() if k not in auto and k != "sim_latency_scale"}
        return cls(**chosen, **rest, sim_latency=SimulatedLatency().scaled(scale))


# The node settings a ProviderSettings is made of (all its fields but sim_latency, which
# comes from sim_latency_scale).
_FROM_TABLE = (
    "stt",
    "llm",
    "tts",
    "backup_tts",
    "deepgram_api_key",
    "deepgram_url",
    "openai_api_key",
    "openai_base_url",
    "llm_model",
    "llm_timeout_ms",
    "openai_tts_model",
    "openai_tts_voice",
    "deepgram_stt_model",
    "deepgram_tts_model",
    "stt_endpointing_ms",
    "endpointing_min_ms",
    "endpointing_max_ms",
    "preemptive",
    "preemptive_stable_ms",
    "tts_chunk_ms",
    "vad",
    "kb_dir",
    "stt_lm_tenants",
    "stt_lm_check_s",
    "espeak_voice",
    "espeak_wpm",
    "sim_llm_control_file",
    "sim_latency_scale",
)


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


def _domain_models(settings: ProviderSettings) -> Any:
    from conversation_node.providers.domain_models import DomainModels
    from memory.tenant_kb import TenantKnowledgeBases

    return DomainModels(
        TenantKnowledgeBases(Path(settings.kb_dir) if settings.kb_dir else None),
        max_tenants=settings.stt_lm_tenants,
        check_every_s=settings.stt_lm_check_s,
    )


def offline_missing(settings: ProviderSettings) -> str:
    """The packages of the ``[speech]`` extra that the chosen providers need and that are
    not installed ("" if none): what a launcher checks before starting nodes that would
    each fail with it."""
    from conversation_node.providers.espeak_tts import espeak_available
    from conversation_node.providers.pocketsphinx_stt import speech_missing

    missing = speech_missing(settings.vad) if settings.stt == "pocketsphinx" else ""
    voices = {settings.tts, settings.backup_tts}
    if "espeak" in voices and not espeak_available():
        missing = ", ".join(filter(None, (missing, "espeakng-loader")))
    return missing


def build_providers(settings: ProviderSettings | None = None) -> Providers:
    """Construct the configured providers. Opens no connection and starts no task."""
    settings = settings or ProviderSettings.from_env()
    stt: STT
    if settings.stt == "deepgram":
        from conversation_node.providers.deepgram_stt import DeepgramSTT, DeepgramSTTOptions

        stt = DeepgramSTT(
            settings.deepgram_api_key,
            options=DeepgramSTTOptions(
                model=settings.deepgram_stt_model,
                endpointing_ms=settings.stt_endpointing_ms,
                eager=settings.preemptive == "on",
            ),
            environment=_deepgram_environment(settings),
        )
    elif settings.stt == "pocketsphinx":
        from conversation_node.providers.pocketsphinx_stt import PocketsphinxSTT, speech_missing

        if missing := speech_missing(settings.vad):
            raise ConfigError(f"the pocketsphinx recognizer needs the [speech] extra ({missing})")

        stt = PocketsphinxSTT(
            models=_domain_models(settings),
            vad=settings.vad,
            end_silence_ms=settings.stt_endpointing_ms,
        )
    else:
        from conversation_node.audio.vad import VadConfig
        from conversation_node.endpointing import EndpointingConfig
        from conversation_node.providers.simulated_audio import SimulatedSTT

        stt = SimulatedSTT(
            latency_ms=settings.sim_latency.stt_ms,
            vad=VadConfig(end_silence_ms=settings.stt_endpointing_ms),
            endpointing=EndpointingConfig(
                min_ms=settings.endpointing_min_ms,
                max_ms=settings.endpointing_max_ms,
                base_ms=settings.stt_endpointing_ms,
            ),
            eager_ms=settings.preemptive_stable_ms if settings.preemptive == "on" else None,
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
        from conversation_node.providers.simulated import SimulatedLLM, SlowdownFile

        control = settings.sim_llm_control_file
        llm = SimulatedLLM(
            settings.sim_latency, slowdown=SlowdownFile(control) if control else None
        )
    return Providers(
        stt=stt,
        llm=llm,
        tts=_build_tts(settings.tts, settings),
        backup_tts=_build_tts(settings.backup_tts, settings),
    )
