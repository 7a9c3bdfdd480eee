"""The node's speech and language providers: which engine plays each role, its keys,
models and timeouts.

Part of the table (:mod:`callmesh.settings.table`, through
:mod:`callmesh.settings.node_table`), kept apart for size.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from callmesh.settings.kinds import Choice, ConfigError, Number, Text, Url
from callmesh.settings.model import Setting
from callmesh.settings.processes import HTTP, NODE, UP

_PROVIDERS = "Node: speech and language providers"

NODE_PROVIDER_SETTINGS: tuple[Setting, ...] = (
    # ------------------------------------------------------------------ node providers
    Setting(
        "speech",
        Choice(("offline", "simulated")),
        None,
        "speech for the roles no CALLMESH_STT/CALLMESH_TTS/CALLMESH_BACKUP_TTS or API key "
        "chooses: offline (pocketsphinx, eSpeak NG, Silero VAD; the [speech] extra) or "
        "simulated (tones)",
        (NODE, UP),
        _PROVIDERS,
        env="CALLMESH_SPEECH",
        flag="--speech",
        default_doc="offline for callmesh up (its nodes are told so), simulated for a node",
    ),
    Setting(
        "stt",
        Choice(("simulated", "deepgram", "pocketsphinx")),
        None,
        "speech-to-text provider",
        (NODE,),
        _PROVIDERS,
        env="CALLMESH_STT",
        default_doc="deepgram if DEEPGRAM_API_KEY is set, else pocketsphinx with CALLMESH_SPEECH="
        "offline, else simulated",
    ),
    Setting(
        "llm",
        Choice(("simulated", "openai")),
        None,
        "language model provider",
        (NODE,),
        _PROVIDERS,
        env="CALLMESH_LLM",
        default_doc="openai if OPENAI_API_KEY is set, else simulated",
    ),
    Setting(
        "tts",
        Choice(("simulated", "deepgram", "openai", "espeak")),
        None,
        "primary voice",
        (NODE,),
        _PROVIDERS,
        env="CALLMESH_TTS",
        default_doc="deepgram if DEEPGRAM_API_KEY is set, else openai if OPENAI_API_KEY is "
        "set, else espeak with CALLMESH_SPEECH=offline, else simulated",
    ),
    Setting(
        "backup_tts",
        Choice(("simulated", "deepgram", "openai", "espeak")),
        None,
        "voice used when the primary one misses its budget",
        (NODE,),
        _PROVIDERS,
        env="CALLMESH_BACKUP_TTS",
        default_doc="openai if OPENAI_API_KEY is set and the primary is not openai, else espeak "
        "with CALLMESH_SPEECH=offline, else simulated",
    ),
    Setting(
        "vad",
        Choice(("silero", "energy")),
        "silero",
        "voice-activity detector of the offline recognizer (pocketsphinx): Silero VAD or energy",
        (NODE,),
        _PROVIDERS,
        env="CALLMESH_VAD",
    ),
    Setting(
        "stt_lm_tenants",
        Number(int, ge=1, le=100_000),
        64,
        "tenants whose language models the offline recognizer keeps built (the least "
        "recently used beyond are dropped, rebuilt at their next call)",
        (NODE,),
        _PROVIDERS,
        env="CALLMESH_STT_LM_TENANTS",
    ),
    Setting(
        "stt_lm_check_s",
        Number(float, ge=0),
        5.0,
        "how often, at most, the offline recognizer looks for a change in a tenant's "
        "knowledge base when a call of that tenant opens; a change rebuilds its language "
        "model in the background (s)",
        (NODE,),
        _PROVIDERS,
        env="CALLMESH_STT_LM_CHECK_S",
    ),
    Setting(
        "stt_lm_startup_s",
        Number(float, ge=0),
        15.0,
        "how long a starting node waits for the offline recognizer's language models of "
        "its tenants before it announces itself; the rest are built after (s)",
        (NODE,),
        _PROVIDERS,
        env="CALLMESH_STT_LM_STARTUP_S",
    ),
    Setting(
        "espeak_voice",
        Text(),
        "en-us",
        "eSpeak NG voice of the offline voice (espeak)",
        (NODE,),
        _PROVIDERS,
        env="CALLMESH_ESPEAK_VOICE",
    ),
    Setting(
        "espeak_wpm",
        Number(int, gt=0, le=500),
        175,
        "speaking rate of the offline voice (words per minute)",
        (NODE,),
        _PROVIDERS,
        env="CALLMESH_ESPEAK_WPM",
    ),
    Setting(
        "deepgram_api_key",
        Text(),
        "",
        "Deepgram API key; switches STT and TTS to Deepgram",
        (NODE,),
        _PROVIDERS,
        env="DEEPGRAM_API_KEY",
        secret=True,
    ),
    Setting(
        "deepgram_url",
        Url(HTTP, empty_ok=True),
        "",
        "base URL of a Deepgram-compatible API (unset: Deepgram's)",
        (NODE,),
        _PROVIDERS,
        env="CALLMESH_DEEPGRAM_URL",
    ),
    Setting(
        "openai_api_key",
        Text(),
        "",
        "OpenAI API key; switches the LLM to OpenAI",
        (NODE,),
        _PROVIDERS,
        env="OPENAI_API_KEY",
        secret=True,
    ),
    Setting(
        "openai_base_url",
        Url(HTTP, empty_ok=True),
        "",
        "an OpenAI-compatible server (vLLM, Ollama, ...); with CALLMESH_LLM=openai it needs "
        "no key (unset: api.openai.com)",
        (NODE,),
        _PROVIDERS,
        env="OPENAI_BASE_URL",
    ),
    Setting(
        "llm_model",
        Text(empty_ok=False),
        "gpt-4o-mini",
        "LLM model",
        (NODE,),
        _PROVIDERS,
        env="CALLMESH_LLM_MODEL",
    ),
    Setting(
        "llm_timeout_ms",
        Number(int, gt=0),
        10_000,
        "LLM request timeout (ms)",
        (NODE,),
        _PROVIDERS,
        env="CALLMESH_LLM_TIMEOUT_MS",
    ),
    Setting(
        "openai_tts_model",
        Text(empty_ok=False),
        "gpt-4o-mini-tts",
        "OpenAI TTS model",
        (NODE,),
        _PROVIDERS,
        env="CALLMESH_OPENAI_TTS_MODEL",
    ),
    Setting(
        "openai_tts_voice",
        Text(empty_ok=False),
        "coral",
        "OpenAI TTS voice",
        (NODE,),
        _PROVIDERS,
        env="CALLMESH_OPENAI_TTS_VOICE",
    ),
    Setting(
        "deepgram_stt_model",
        Text(empty_ok=False),
        "nova-3",
        "Deepgram STT model",
        (NODE,),
        _PROVIDERS,
        env="CALLMESH_DEEPGRAM_STT_MODEL",
    ),
    Setting(
        "deepgram_tts_model",
        Text(empty_ok=False),
        "aura-2-thalia-en",
        "Deepgram TTS voice model",
        (NODE,),
        _PROVIDERS,
        env="CALLMESH_DEEPGRAM_TTS_MODEL",
    ),
    Setting(
        "stt_endpointing_ms",
        Number(int, gt=0),
        300,
        "silence that ends an utterance (ms)",
        (NODE,),
        _PROVIDERS,
        env="CALLMESH_STT_ENDPOINTING_MS",
    ),
    Setting(
        "endpointing_min_ms",
        Number(int, gt=0, le=5000),
        150,
        "adaptive endpointing: the shortest silence that ends an utterance (a complete "
        "sentence, a yes/no answer) (ms)",
        (NODE,),
        _PROVIDERS,
        env="CALLMESH_ENDPOINTING_MIN_MS",
    ),
    Setting(
        "endpointing_max_ms",
        Number(int, gt=0, le=5000),
        800,
        "adaptive endpointing: the longest silence that ends an utterance (mid-phrase) (ms)",
        (NODE,),
        _PROVIDERS,
        env="CALLMESH_ENDPOINTING_MAX_MS",
    ),
    Setting(
        "preemptive",
        Choice(("on", "off")),
        "on",
        "preemptive generation: start the reply on a stable interim transcript, adopted "
        "when the final one matches",
        (NODE,),
        _PROVIDERS,
        env="CALLMESH_PREEMPTIVE",
    ),
    Setting(
        "preemptive_stable_ms",
        Number(int, gt=0, le=5000),
        100,
        "preemptive generation: a pause this long inside an utterance makes its interim "
        "transcript stable (ms)",
        (NODE,),
        _PROVIDERS,
        env="CALLMESH_PREEMPTIVE_STABLE_MS",
    ),
    Setting(
        "preemptive_voice",
        Choice(("on", "off")),
        "off",
        "preemptive generation: the main voice also says the speculative reply's first "
        "sentence before the turn is confirmed (kept, never sent unless adopted; a "
        "cancelled one costs that sentence's synthesis)",
        (NODE,),
        _PROVIDERS,
        env="CALLMESH_PREEMPTIVE_VOICE",
    ),
    Setting(
        "sim_llm_control_file",
        Text(r"/[^\x00]{0,1000}", "an absolute path"),
        "",
        "local chaos runs only: a file holding milliseconds the simulated model adds to its "
        "first token, read as it changes (a missing file adds none); refused unless the "
        "language model is the simulated one (CALLMESH_LLM, no OPENAI_API_KEY)",
        (NODE,),
        _PROVIDERS,
        env="CALLMESH_SIM_LLM_CONTROL_FILE",
    ),
)


def providers_have_keys(values: Mapping[str, Any]) -> None:
    # A role left unset follows the keys; one set by name needs its vendor's key (a local
    # OpenAI-compatible server, OPENAI_BASE_URL, needs none).
    have = {
        "deepgram": ("DEEPGRAM_API_KEY", bool(values["deepgram_api_key"])),
        "openai": ("OPENAI_API_KEY", bool(values["openai_api_key"] or values["openai_base_url"])),
    }
    for role, env in (
        ("stt", "CALLMESH_STT"),
        ("llm", "CALLMESH_LLM"),
        ("tts", "CALLMESH_TTS"),
        ("backup_tts", "CALLMESH_BACKUP_TTS"),
    ):
        key_env, ok = have.get(values[role], ("", True))
        if not ok:
            raise ConfigError(f"{env}={values[role]!r}: needs {key_env}, which is not set")
