"""Configuration: frozen dataclasses validated at construction, built from env in one place.

Every process reads its settings here (flags override environment variables, which override
defaults). Durations are milliseconds unless the name says otherwise.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, TypeVar

from callmesh.gc_tuning import DEFAULT_GEN0_THRESHOLD
from callmesh.protocol import DEFAULT_MAX_FRAME_BYTES, valid_id


class ConfigError(ValueError):
    """A setting is missing or out of range."""


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value}")


@dataclass(frozen=True)
class Backends:
    """Where the shared Redis-compatible server and NATS server are."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    nats_url: str = "nats://127.0.0.1:4222"

    def __post_init__(self) -> None:
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"redis_url must be a redis:// URL, got {self.redis_url!r}")
        if not self.nats_url.startswith(("nats://", "tls://")):
            raise ConfigError(f"nats_url must be a nats:// URL, got {self.nats_url!r}")


@dataclass(frozen=True)
class MembershipConfig:
    """Heartbeats and failure detection (shared by nodes and routers)."""

    heartbeat_ms: int = 100
    # A node whose heartbeat has not advanced for this long is dead (issue: ≤ 500 ms).
    dead_after_ms: int = 500
    poll_ms: int = 100

    def __post_init__(self) -> None:
        for f in fields(self):
            _positive(f.name, getattr(self, f.name))
        if self.dead_after_ms < 2 * self.heartbeat_ms:
            raise ConfigError("dead_after_ms must be at least two heartbeats")


# 2 ms: under load a write carries the frames of many calls (a frame every 20 ms per call),
# for at most 2 ms added to each direction of a 20 ms audio frame's trip.
LINK_FLUSH_MS = 2.0


def _process_settings(link_flush_ms: float, gc_gen0_threshold: int) -> None:
    if not 0.0 <= link_flush_ms <= 20.0:
        raise ConfigError(f"link_flush_ms must be within [0, 20], got {link_flush_ms}")
    if gc_gen0_threshold < 0:
        raise ConfigError(f"gc_gen0_threshold must be >= 0, got {gc_gen0_threshold}")


@dataclass(frozen=True)
class RouterConfig:
    backends: Backends = field(default_factory=Backends)
    membership: MembershipConfig = field(default_factory=MembershipConfig)
    host: str = "127.0.0.1"
    port: int = 8080
    router_id: str = field(default_factory=lambda: f"router-{uuid.uuid4().hex[:8]}")
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    # Bounded-load consistent hashing: capacity per node is ceil((1 + ε) · calls / nodes).
    balance_epsilon: float = 0.25
    # How long a client waits for a node before the router gives up on the call.
    connect_timeout_ms: int = 3000
    # Frames not yet acknowledged by the node, kept for replay to a new owner.
    max_unacked_frames: int = 4096
    # Unacknowledged caller audio kept for replay; beyond it the oldest audio is dropped
    # (live audio is never refused).
    max_unacked_audio_ms: int = 30000
    # Public base URL of this router (https://voice.example.com), for the Twilio stream
    # URL and signature checks; empty: derived from each request (Host, X-Forwarded-Proto).
    public_url: str = ""
    # Twilio: the auth token that signs webhooks (empty: signatures are not checked) and
    # the tenant of calls whose webhook URL names none.
    twilio_auth_token: str = field(default="", repr=False)
    twilio_default_tenant: str = ""
    # How long the node link holds a frame so frames of other calls can share its write
    # (callmesh.mux); 0 writes on the next turn of the event loop.
    link_flush_ms: float = LINK_FLUSH_MS
    # The collector's generation-0 threshold after start-up (callmesh.gc_tuning); 0 keeps
    # CPython's default of 700.
    gc_gen0_threshold: int = DEFAULT_GEN0_THRESHOLD

    def __post_init__(self) -> None:
        _process_settings(self.link_flush_ms, self.gc_gen0_threshold)
        _positive("max_frame_bytes", self.max_frame_bytes)
        _positive("balance_epsilon", self.balance_epsilon)
        _positive("connect_timeout_ms", self.connect_timeout_ms)
        _positive("max_unacked_audio_ms", self.max_unacked_audio_ms)
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port out of range: {self.port}")
        if self.public_url and not self.public_url.startswith(("http://", "https://")):
            raise ConfigError(f"public_url must be an http(s):// URL, got {self.public_url!r}")
        if self.twilio_default_tenant and not valid_id(self.twilio_default_tenant):
            raise ConfigError("twilio_default_tenant must match [A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class SimulatedLatency:
    """Latency of the simulated providers, in ms (mean; jitter is a fraction of it)."""

    stt_ms: float = 100.0
    llm_first_token_ms: float = 200.0
    llm_token_ms: float = 8.0
    tts_first_chunk_ms: float = 80.0
    jitter: float = 0.2

    def scaled(self, factor: float) -> SimulatedLatency:
        return replace(
            self,
            stt_ms=self.stt_ms * factor,
            llm_first_token_ms=self.llm_first_token_ms * factor,
            llm_token_ms=self.llm_token_ms * factor,
            tts_first_chunk_ms=self.tts_first_chunk_ms * factor,
        )


@dataclass(frozen=True)
class NodeConfig:
    backends: Backends = field(default_factory=Backends)
    membership: MembershipConfig = field(default_factory=MembershipConfig)
    host: str = "127.0.0.1"
    port: int = 8090
    node_id: str = field(default_factory=lambda: f"node-{uuid.uuid4().hex[:8]}")
    # URL routers use to reach this node; defaults to ws://host:port.
    advertise_url: str = ""
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    working_memory_turns: int = 8
    checkpoint_ttl_s: int = 24 * 3600
    # SIGTERM: how long live calls get to reach a turn boundary and be handed off.
    drain_timeout_s: float = 20.0
    sim_latency: SimulatedLatency = field(default_factory=SimulatedLatency)
    tts_chunk_ms: int = 100
    # Below this STT confidence the caller is asked to repeat instead of being guessed at.
    stt_min_confidence: float = 0.5
    # Per-stage budgets (ms): a breach triggers the stage's fallback.
    llm_first_token_budget_ms: float = 1500.0
    llm_total_budget_ms: float = 8000.0
    tts_first_chunk_budget_ms: float = 1000.0
    # A turn's end-to-end budget (end of speech → first audio; architecture: p95 < 800 ms),
    # and callmesh's own share of it (routing, state, memory, orchestration: "a few ms").
    turn_budget_ms: float = 800.0
    overhead_budget_ms: float = 5.0
    # As RouterConfig.link_flush_ms, for what the node sends the router.
    link_flush_ms: float = LINK_FLUSH_MS
    gc_gen0_threshold: int = DEFAULT_GEN0_THRESHOLD

    def __post_init__(self) -> None:
        _process_settings(self.link_flush_ms, self.gc_gen0_threshold)
        if not 0.0 <= self.stt_min_confidence <= 1.0:
            raise ConfigError("stt_min_confidence must be within [0, 1]")
        _positive("llm_first_token_budget_ms", self.llm_first_token_budget_ms)
        _positive("llm_total_budget_ms", self.llm_total_budget_ms)
        _positive("tts_first_chunk_budget_ms", self.tts_first_chunk_budget_ms)
        _positive("working_memory_turns", self.working_memory_turns)
        _positive("checkpoint_ttl_s", self.checkpoint_ttl_s)
        _positive("tts_chunk_ms", self.tts_chunk_ms)
        if not self.advertise_url:
            object.__setattr__(self, "advertise_url", f"http://{self.host}:{self.port}")


T = TypeVar("T")


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "REDIS_URL" in env or "NATS_URL" in env:
        out["backends"] = Backends(
            redis_url=env.get("REDIS_URL", Backends.redis_url),
            nats_url=env.get("NATS_URL", Backends.nats_url),
        )
    return out


def membership_from_env(env: Mapping[str, str]) -> MembershipConfig:
    return MembershipConfig(
        heartbeat_ms=int(env.get("CALLMESH_HEARTBEAT_MS", MembershipConfig.heartbeat_ms)),
        dead_after_ms=int(env.get("CALLMESH_DEAD_AFTER_MS", MembershipConfig.dead_after_ms)),
        poll_ms=int(env.get("CALLMESH_MEMBERSHIP_POLL_MS", MembershipConfig.poll_ms)),
    )


def _process_env(env: Mapping[str, str]) -> dict[str, Any]:
    """Settings every service process has (router and node)."""
    out: dict[str, Any] = {}
    try:
        if env.get("CALLMESH_LINK_FLUSH_MS"):
            out["link_flush_ms"] = float(env["CALLMESH_LINK_FLUSH_MS"])
        if env.get("CALLMESH_GC_GEN0_THRESHOLD"):
            out["gc_gen0_threshold"] = int(env["CALLMESH_GC_GEN0_THRESHOLD"])
    except ValueError as exc:
        raise ConfigError(f"bad process setting: {exc}") from exc
    return out


def _router_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = _process_env(env)
    if "CALLMESH_MAX_UNACKED_AUDIO_MS" in env:
        out["max_unacked_audio_ms"] = int(env["CALLMESH_MAX_UNACKED_AUDIO_MS"])
    for name, var in (
        ("public_url", "CALLMESH_PUBLIC_URL"),
        ("twilio_auth_token", "TWILIO_AUTH_TOKEN"),
        ("twilio_default_tenant", "CALLMESH_TWILIO_TENANT"),
    ):
        if env.get(var):
            out[name] = env[var]
    return out


# Node budgets and thresholds settable from the environment (Kubernetes manifests, make up).
_NODE_FLOATS = {
    "stt_min_confidence": "CALLMESH_STT_MIN_CONFIDENCE",
    "llm_first_token_budget_ms": "CALLMESH_LLM_FIRST_TOKEN_BUDGET_MS",
    "llm_total_budget_ms": "CALLMESH_LLM_TOTAL_BUDGET_MS",
    "tts_first_chunk_budget_ms": "CALLMESH_TTS_FIRST_CHUNK_BUDGET_MS",
    "turn_budget_ms": "CALLMESH_TURN_BUDGET_MS",
    "overhead_budget_ms": "CALLMESH_OVERHEAD_BUDGET_MS",
}


def _node_env(env: Mapping[str, str]) -> dict[str, Any]:
    try:
        values = {k: float(env[v]) for k, v in _NODE_FLOATS.items() if env.get(v)}
    except ValueError as exc:
        raise ConfigError(f"bad number in node settings: {exc}") from exc
    return {**values, **_process_env(env)}


def build(cls: type[T], env: Mapping[str, str] | None = None, **flags: Any) -> T:
    """Build a config: defaults, then environment, then explicit flags (None = not given)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = _env_overrides(env)
    if cls in (RouterConfig, NodeConfig):
        values["membership"] = membership_from_env(env)
    if cls is RouterConfig:
        values.update(_router_env(env))
    if cls is NodeConfig:
        values.update(_node_env(env))
    if cls is NodeConfig and "CALLMESH_TTS_CHUNK_MS" in env:
        values["tts_chunk_ms"] = int(env["CALLMESH_TTS_CHUNK_MS"])
    if cls is NodeConfig and "CALLMESH_SIM_LATENCY_SCALE" in env:
        scale = float(env["CALLMESH_SIM_LATENCY_SCALE"])
        values["sim_latency"] = SimulatedLatency().scaled(scale)
    values.update({k: v for k, v in flags.items() if v is not None})
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(str(exc)) from exc


def default_host() -> str:
    return socket.gethostname()
