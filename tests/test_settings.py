"""The settings table: its invariants, reading a process's settings, errors and secrets."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import pytest

from callmesh import config as cfg
from callmesh import settings
from callmesh.settings import ConfigError, mask_url
from callmesh.settings import flags as settings_flags
from callmesh.settings.docs import DOC_PATH, REGENERATE, render_markdown
from callmesh.settings.table import CHECKS, NODE, PROCESSES, ROUTER, SETTINGS, WORKER
from conversation_node.providers.registry import ProviderSettings

# ---------------------------------------------------------------------- the table


def test_every_setting_has_a_meaning_a_known_process_and_a_section() -> None:
    for s in SETTINGS:
        assert s.meaning.strip(), s.key
        assert s.section.strip(), s.key
        assert s.processes and set(s.processes) <= set(PROCESSES), s.key
        assert s.env or s.flag, f"{s.key} can be set neither by env nor by flag"


def test_environment_names_are_unique_across_the_table() -> None:
    names = [s.env for s in SETTINGS if s.env]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


def test_keys_and_flags_are_unique_within_each_process() -> None:
    for process in PROCESSES:
        own = settings.settings_for(process)
        keys = [s.key for s in own]
        flags = [s.flag for s in own if s.flag]
        assert len(keys) == len(set(keys)), process
        assert len(flags) == len(set(flags)), process


def test_every_default_validates() -> None:
    for s in SETTINGS:
        if s.default is None:
            assert s.default_doc, f"{s.key}: a computed default must say what it is"
        else:
            s.kind.check(s.default)


def test_secrets_have_no_default_that_could_leak() -> None:
    for s in SETTINGS:
        if s.secret and s.default:
            assert mask_url(s.default) == s.default, s.key  # a URL without a password


def test_top_level_flags_belong_to_every_process() -> None:
    for s in SETTINGS:
        if s.top_level_flag:
            assert s.flag and set(s.processes) == set(PROCESSES), s.key


def test_cross_checks_read_only_declared_settings() -> None:
    for process, keys, _ in CHECKS:
        declared = {s.key for s in settings.settings_for(process)}
        assert set(keys) <= declared, (process, set(keys) - declared)


def test_config_fields_take_their_defaults_from_the_table() -> None:
    for cls, process in ((cfg.RouterConfig, ROUTER), (cfg.NodeConfig, NODE)):
        declared = {s.key: s for s in settings.settings_for(process)}
        built = cfg.build(cls, {})
        for f in dataclasses.fields(built):  # type: ignore[arg-type]
            s = declared.get(f.name)
            if s is not None and s.default is not None and f.name != "advertise_url":
                assert getattr(built, f.name) == s.default, f.name
        assert built.backends == cfg.Backends()
        assert built.membership == cfg.MembershipConfig()


# ---------------------------------------------------------------------- reading


def test_flag_overrides_env_which_overrides_default() -> None:
    env = {"CALLMESH_HEARTBEAT_MS": "50", "REDIS_URL": "redis://env:6379/0"}
    values = settings.load(ROUTER, env, {"redis_url": "redis://flag:6379/0", "port": "9000"})
    assert values["heartbeat_ms"] == 50 and values.source("heartbeat_ms") == "env"
    assert values["redis_url"] == "redis://flag:6379/0" and values.source("redis_url") == "flag"
    assert values["port"] == 9000 and values.source("port") == "flag"
    assert values["poll_ms"] == 100 and values.source("poll_ms") == "default"
    assert not values.given("poll_ms") and values.given("heartbeat_ms")


def test_an_empty_variable_counts_as_unset() -> None:
    values = settings.load(ROUTER, {"CALLMESH_HEARTBEAT_MS": "", "CALLMESH_PUBLIC_URL": ""})
    assert values["heartbeat_ms"] == 100 and values["public_url"] == ""


def test_build_keeps_the_behaviour_of_every_variable() -> None:
    node = cfg.build(
        cfg.NodeConfig,
        {
            "CALLMESH_TURN_BUDGET_MS": "650",
            "CALLMESH_SIM_LATENCY_SCALE": "0",
            "CALLMESH_TTS_CHUNK_MS": "40",
            "NATS_URL": "nats://n:4222",
        },
        port=9100,
        drain_timeout_s=3.0,
    )
    assert (node.turn_budget_ms, node.tts_chunk_ms, node.port) == (650.0, 40, 9100)
    assert node.sim_latency.stt_ms == 0 and node.drain_timeout_s == 3.0
    assert node.backends.nats_url == "nats://n:4222"
    assert node.advertise_url == "http://127.0.0.1:9100"
    router = cfg.build(cfg.RouterConfig, {"CALLMESH_MAX_UNACKED_AUDIO_MS": "1000"}, port=0)
    assert (router.max_unacked_audio_ms, router.port) == (1000, 0)


@pytest.mark.parametrize(
    ("process", "env", "named", "reason"),
    [
        (ROUTER, {"CALLMESH_HEARTBEAT_MS": "often"}, "CALLMESH_HEARTBEAT_MS", "not an integer"),
        (ROUTER, {"CALLMESH_HEARTBEAT_MS": "0"}, "CALLMESH_HEARTBEAT_MS", "must be > 0"),
        (ROUTER, {"CALLMESH_LINK_FLUSH_MS": "21"}, "CALLMESH_LINK_FLUSH_MS", "<= 20"),
        (ROUTER, {"CALLMESH_LINK_FLUSH_MS": "nan"}, "CALLMESH_LINK_FLUSH_MS", "not a number"),
        (ROUTER, {"REDIS_URL": "http://x"}, "REDIS_URL", "redis://"),
        (ROUTER, {"CALLMESH_TWILIO_TENANT": "a b"}, "CALLMESH_TWILIO_TENANT", "an id"),
        (ROUTER, {"CALLMESH_DEAD_AFTER_MS": "150"}, "CALLMESH_DEAD_AFTER_MS", "two heartbeats"),
        (NODE, {"CALLMESH_STT": "whisper"}, "CALLMESH_STT", "one of simulated|deepgram"),
        (NODE, {"CALLMESH_TTS": "deepgram"}, "CALLMESH_TTS", "needs DEEPGRAM_API_KEY"),
        (NODE, {"CALLMESH_STT_MIN_CONFIDENCE": "2"}, "CALLMESH_STT_MIN_CONFIDENCE", "<= 1"),
        (WORKER, {"CALLMESH_WORKER_PORT": "x"}, "CALLMESH_WORKER_PORT", "not an integer"),
        (WORKER, {"CALLMESH_EFFECTS_DURABLE": "a.b"}, "CALLMESH_EFFECTS_DURABLE", "an id"),
    ],
)
def test_a_bad_value_names_its_variable(
    process: str, env: dict[str, str], named: str, reason: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        settings.load(process, env)
    message = str(caught.value)
    assert message.startswith(named) and reason in message and "\n" not in message


def test_a_bad_flag_names_the_flag() -> None:
    with pytest.raises(ConfigError, match=r"^--port='http': not an integer"):
        settings.load(ROUTER, {}, {"port": "http"})
    with pytest.raises(ConfigError, match=r"^--epsilon='0': must be > 0"):
        cfg.build(cfg.RouterConfig, {}, balance_epsilon=0)
    with pytest.raises(ConfigError, match="not settings of the router: nodes"):
        cfg.build(cfg.RouterConfig, {}, nodes=3)


def test_configs_built_in_code_meet_the_same_bounds() -> None:
    with pytest.raises(ConfigError, match="CALLMESH_STT_MIN_CONFIDENCE"):
        cfg.NodeConfig(stt_min_confidence=1.5)
    with pytest.raises(ConfigError, match="REDIS_URL"):
        cfg.Backends(redis_url="mysql://x")
    with pytest.raises(ConfigError, match="two heartbeats"):
        cfg.MembershipConfig(heartbeat_ms=100, dead_after_ms=100)


# ---------------------------------------------------------------------- secrets


def test_mask_url_hides_passwords_and_query_strings() -> None:
    assert mask_url("redis://:s3cret@db:6379/0") == "redis://:***@db:6379/0"
    assert mask_url("nats://user:pw@n:4222") == "nats://user:***@n:4222"
    assert mask_url("https://crm/x?token=abc") == "https://crm/x?***"
    assert mask_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_secrets_are_masked_in_errors_and_reprs() -> None:
    env = {
        "TWILIO_AUTH_TOKEN": "tw-s3cret",
        "REDIS_URL": "redis://:pw-s3cret@db:6379/0",
        "CALLMESH_PUBLIC_URL": "ftp://nope",
    }
    with pytest.raises(ConfigError) as caught:
        settings.load(ROUTER, env)
    assert "CALLMESH_PUBLIC_URL" in str(caught.value)
    del env["CALLMESH_PUBLIC_URL"]
    values = settings.load(ROUTER, env)
    config = cfg.from_values(cfg.RouterConfig, values)
    assert config.twilio_auth_token == "tw-s3cret"
    for text in (repr(values), repr(config)):
        assert "s3cret" not in text
    with pytest.raises(ConfigError) as caught:
        settings.load(ROUTER, {"REDIS_URL": "http://u:pw-s3cret@db"})
    assert "s3cret" not in str(caught.value) and "REDIS_URL" in str(caught.value)
    keys = {"DEEPGRAM_API_KEY": "dg-s3cret", "OPENAI_API_KEY": "oa-s3cret"}
    assert "s3cret" not in repr(ProviderSettings.from_env(keys))


def _help(process: str) -> str:
    parser = argparse.ArgumentParser(prog=f"callmesh {process}")
    settings_flags.add_flags(parser, process)
    return parser.format_help()


def test_help_lists_every_setting_of_the_process_with_its_default() -> None:
    for process in (ROUTER, NODE, WORKER):
        text = " ".join(_help(process).split())  # argparse wraps lines
        for s in settings.settings_for(process):
            assert (s.env or s.flag or "") in text, (process, s.key)
            assert " ".join(s.shown_default().split()) in text, (process, s.key)


# ---------------------------------------------------------------------- resolve, docs


def test_resolve_fills_flags_from_env_and_defaults_once() -> None:
    parser = argparse.ArgumentParser()
    settings_flags.add_top_level_flags(parser)
    sub = parser.add_subparsers()
    settings_flags.add_flags(sub.add_parser("router"), ROUTER)
    args = parser.parse_args(["--log-level", "debug", "router", "--epsilon", "0.5"])
    values = settings_flags.resolve(args, {"REDIS_URL": "redis://r:1/0"})
    assert (args.log_level, args.balance_epsilon, args.port) == ("DEBUG", 0.5, 8080)
    assert args.redis_url == "redis://r:1/0" and args.settings is values
    assert settings_flags.resolved(args) is values


def test_docs_are_up_to_date() -> None:
    committed = DOC_PATH.read_text(encoding="utf-8") if DOC_PATH.exists() else ""
    assert committed == render_markdown(), f"docs/configuration.md is stale: run {REGENERATE}"


def _values(**overrides: Any) -> dict[str, Any]:
    return {**{s.key: s.default for s in settings.settings_for(NODE)}, **overrides}


def test_provider_keys_check_allows_a_local_openai_server() -> None:
    (check,) = [c for p, keys, c in CHECKS if p == NODE and "stt" in keys]
    check(_values(stt="simulated", llm="openai", tts="simulated", backup_tts="simulated",
                  openai_base_url="http://127.0.0.1:9/v1"))  # fmt: skip
    with pytest.raises(ConfigError, match="CALLMESH_LLM='openai': needs OPENAI_API_KEY"):
        check(_values(stt="simulated", llm="openai", tts="simulated", backup_tts="simulated"))


def test_the_node_builds_its_providers_from_the_settings_it_read_once() -> None:
    env = {"OPENAI_API_KEY": "k", "CALLMESH_LLM_MODEL": "llama", "CALLMESH_TTS": "simulated"}
    config = cfg.from_values(cfg.NodeConfig, settings.load(NODE, env))
    from_config = ProviderSettings.from_values(config.settings)
    assert from_config == ProviderSettings.from_env(env)
    assert (from_config.llm, from_config.llm_model, from_config.tts) == (
        "openai",
        "llama",
        "simulated",
    )
    assert from_config.backup_tts == "openai"  # a key, and the primary voice is not OpenAI's
    assert cfg.NodeConfig().settings == {}  # built in code: the node reads the environment
