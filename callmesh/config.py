"""Configuration: frozen dataclasses validated at construction, built from the settings.

Every setting operators can change is declared once in :mod:`callmesh.settings.table`
(environment variable, flag, default, bounds, meaning); the fields here take their
defaults and bounds from it, and :func:`build` / :func:`from_values` fill them from a
process's settings (flags override environment variables, which override defaults).
Durations are milliseconds unless the name says otherwise.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, TypeVar

from callmesh import settings
from callmesh.protocol import DEFAULT_MAX_FRAME_BYTES
from callmesh.settings import ConfigError
from callmesh.settings.table import (
    NODE,
    ROUTER,
    dead_after_two_heartbeats,
    dev_control_is_local,
)

__all__ = [
    "LINK_FLUSH_MS",
    "Backends",
    "ConfigError",
    "MembershipConfig",
    "NodeConfig",
    "RouterConfig",
    "SimulatedLatency",
    "build",
    "default_host",
    "from_values",
]


def _router(key: str) -> Any:
    return settings.default(ROUTER, key)


def _node(key: str) -> Any:
    return settings.default(NODE, key)


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value}")


@dataclass(frozen=True)
class Backends:
    """Where the shared Redis-compatible server and NATS server are."""

    redis_url: str = _router("redis_url")
    nats_url: str = _router("nats_url")

    def __post_init__(self) -> None:
        settings.check_fields(self, ROUTER)

    def __repr__(self) -> str:
        # The URLs may carry passwords.
        redis, nats = settings.mask_url(self.redis_url), settings.mask_url(self.nats_url)
        return f"Backends(redis_url={redis!r}, nats_url={nats!r})"


@dataclass(frozen=True)
class MembershipConfig:
    """Heartbeats and failure detection (shared by nodes and routers)."""

    heartbeat_ms: int = _router("heartbeat_ms")
    # A node whose heartbeat has not advanced for this long is dead (issue: ≤ 500 ms).
    dead_after_ms: int = _router("dead_after_ms")
    poll_ms: int = _router("poll_ms")

    def __post_init__(self) -> None:
        settings.check_fields(self, ROUTER)
        dead_after_two_heartbeats(
            {"heartbeat_ms": self.heartbeat_ms, "dead_after_ms": self.dead_after_ms}
        )


# 2 ms: under load a write carries the frames of many calls (a frame every 20 ms per call),
# for at most 2 ms added to each direction of a 20 ms audio frame's trip.
LINK_FLUSH_MS: float = _router("link_flush_ms")


@dataclass(frozen=True)
class RouterConfig:
    backends: Backends = field(default_factory=Backends)
    membership: MembershipConfig = field(default_factory=MembershipConfig)
    host: str = _router("host")
    port: int = _router("port")
    router_id: str = field(default_factory=lambda: f"router-{uuid.uuid4().hex[:8]}")
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    # Bounded-load consistent hashing: capacity per node is ceil((1 + ε) · calls / nodes).
    balance_epsilon: float = _router("balance_epsilon")
    # How long a client waits for a node before the router gives up on the call.
    connect_timeout_ms: int = 3000
    # Frames not yet acknowledged by the node, kept for replay to a new owner.
    max_unacked_frames: int = 4096
    # Unacknowledged caller audio kept for replay; beyond it the oldest audio is dropped
    # (live audio is never refused).
    max_unacked_audio_ms: int = _router("max_unacked_audio_ms")
    # Bounds on clients (router.limits; docs/protocol.md "Limits").
    start_timeout_ms: int = _router("start_timeout_ms")
    max_connections: int = _router("max_connections")
    max_connections_per_tenant: int = _router("max_connections_per_tenant")
    max_calls_per_tenant: int = _router("max_calls_per_tenant")
    max_new_calls_per_tenant_per_s: int = _router("max_new_calls_per_tenant_per_s")
    call_lease_s: float = _router("call_lease_s")
    max_frames_per_s: float = _router("max_frames_per_s")
    frame_burst: int = _router("frame_burst")
    max_unacked_bytes: int = _router("max_unacked_bytes")
    max_relinks: int = _router("max_relinks")
    relink_window_s: float = _router("relink_window_s")
    # Public base URL of this router (https://voice.example.com), for the Twilio stream
    # URL and signature checks; empty: derived from each request (Host, X-Forwarded-Proto).
    public_url: str = _router("public_url")
    # Twilio: the auth token that signs webhooks (empty: signatures are not checked) and
    # the tenant of calls whose webhook URL names none.
    twilio_auth_token: str = field(default=_router("twilio_auth_token"), repr=False)
    twilio_default_tenant: str = _router("twilio_default_tenant")
    # Authentication (callmesh.settings.auth_table): call tokens, the node link, and the
    # explicit switches that turn checks off.
    auth_secret: str = field(default=_router("auth_secret"), repr=False)
    auth_jwks_url: str = _router("auth_jwks_url")
    auth_audience: str = _router("auth_audience")
    auth_issuer: str = _router("auth_issuer")
    auth_leeway_s: float = _router("auth_leeway_s")
    auth_max_lifetime_s: float = _router("auth_max_lifetime_s")
    auth_jwks_ttl_s: float = _router("auth_jwks_ttl_s")
    auth_jwks_min_refresh_s: float = _router("auth_jwks_min_refresh_s")
    link_secret: str = field(default=_router("link_secret"), repr=False)
    auth_disabled: int = _router("auth_disabled")
    dev_mode: int = _router("dev_mode")
    # How long the node link holds a frame so frames of other calls can share its write
    # (callmesh.mux); 0 writes on the next turn of the event loop.
    link_flush_ms: float = LINK_FLUSH_MS
    # The collector's generation-0 threshold after start-up (callmesh.gc_tuning); 0 keeps
    # CPython's default of 700.
    gc_gen0_threshold: int = _router("gc_gen0_threshold")
    # The browser console (/console, router/console.py): "on" or "off".
    console: str = _router("console")
    # Development mode, and only there: the secret that signs the console's development
    # tokens, and the local cluster's control that can kill a node (localcluster/
    # devcontrol.py). `callmesh up` sets both; a deployment sets neither.
    dev_secret: str = field(default=_router("dev_secret"), repr=False)
    dev_control_url: str = _router("dev_control_url")
    # On SIGTERM: how long callers get to move to another router before the router exits.
    router_drain_s: float = _router("router_drain_s")
    # Traces over OTLP/HTTP (callmesh.tracing): off while the endpoint is empty.
    otlp_endpoint: str = _router("otlp_endpoint")
    trace_sample_ratio: float = _router("trace_sample_ratio")

    def __post_init__(self) -> None:
        settings.check_fields(self, ROUTER)
        dev_control_is_local(
            {"dev_secret": self.dev_secret, "dev_control_url": self.dev_control_url}
        )
        _positive("max_frame_bytes", self.max_frame_bytes)
        _positive("connect_timeout_ms", self.connect_timeout_ms)


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
    host: str = _node("host")
    port: int = _node("port")
    node_id: str = field(default_factory=lambda: f"node-{uuid.uuid4().hex[:8]}")
    # URL routers use to reach this node; defaults to http://host:port.
    advertise_url: str = _node("advertise_url")
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    working_memory_turns: int = 8
    checkpoint_ttl_s: int = 24 * 3600
    # An ended call's last checkpoint stays this long for replay; the rest goes at hang-up.
    ended_call_retention_s: int = _node("ended_call_retention_s")
    # Replicas confirming a checkpoint before its turn is acknowledged (-1: by backend),
    # and how long to wait for them (state_store.store.Durability).
    checkpoint_replicas: int = _node("checkpoint_replicas")
    checkpoint_wait_ms: int = _node("checkpoint_wait_ms")
    # SIGTERM: how long live calls get to reach a turn boundary and be handed off.
    drain_timeout_s: float = _node("drain_timeout_s")
    # A call whose link ended without hangup waits this long for a reconnect, then ends.
    reconnect_grace_ms: int = _node("reconnect_grace_ms")
    # An event loop that has not run for this long withholds the heartbeat (thread).
    loop_stall_ms: int = _node("loop_stall_ms")
    sim_latency: SimulatedLatency = field(default_factory=SimulatedLatency)
    tts_chunk_ms: int = _node("tts_chunk_ms")
    # Below this STT confidence the caller is asked to repeat instead of being guessed at.
    stt_min_confidence: float = _node("stt_min_confidence")
    # The tenants' knowledge bases (one subdirectory each; "": the demo's for everyone),
    # and how long start-up waits for the offline recognizer's models built from them.
    kb_dir: str = _node("kb_dir")
    stt_lm_startup_s: float = _node("stt_lm_startup_s")
    # Caller sound during a reply must yield words to stop it (false interruptions).
    false_interruption_ms: int = _node("false_interruption_ms")
    # When caller sound during a reply clears it: once it yields words, or at once (then a
    # sound that yields none resumes the reply where the caller last heard it).
    barge_in_clear: str = _node("barge_in_clear")
    # A speculative reply voices its first sentence before its turn is confirmed too.
    preemptive_voice: str = _node("preemptive_voice")
    # Per-stage budgets (ms): a breach triggers the stage's fallback.
    llm_first_token_budget_ms: float = _node("llm_first_token_budget_ms")
    llm_total_budget_ms: float = _node("llm_total_budget_ms")
    tts_first_chunk_budget_ms: float = _node("tts_first_chunk_budget_ms")
    # A turn's end-to-end budget (end of speech → first audio; architecture: p95 < 800 ms),
    # and callmesh's own share of it (routing, state, memory, orchestration: "a few ms").
    turn_budget_ms: float = _node("turn_budget_ms")
    overhead_budget_ms: float = _node("overhead_budget_ms")
    # As RouterConfig.link_flush_ms, for what the node sends the router.
    link_flush_ms: float = _node("link_flush_ms")
    gc_gen0_threshold: int = _node("gc_gen0_threshold")
    # The router-node link secret, and the switches of callmesh.settings.auth_table.
    link_secret: str = field(default=_node("link_secret"), repr=False)
    auth_disabled: int = _node("auth_disabled")
    dev_mode: int = _node("dev_mode")
    otlp_endpoint: str = _node("otlp_endpoint")
    trace_sample_ratio: float = _node("trace_sample_ratio")
    # Every node setting as read once at start-up (settings.load), for the parts the node
    # builds from them above this module (its providers); empty when built in code.
    settings: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        settings.check_fields(self, NODE)
        _positive("max_frame_bytes", self.max_frame_bytes)
        _positive("working_memory_turns", self.working_memory_turns)
        _positive("checkpoint_ttl_s", self.checkpoint_ttl_s)
        if not self.advertise_url:
            object.__setattr__(self, "advertise_url", f"http://{self.host}:{self.port}")


T = TypeVar("T")


def from_values(cls: type[T], values: Mapping[str, Any]) -> T:
    """A RouterConfig or NodeConfig from a process's settings (``settings.load``)."""
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {k: v for k, v in values.items() if k in names and v is not None}
    kwargs["backends"] = Backends(redis_url=values["redis_url"], nats_url=values["nats_url"])
    kwargs["membership"] = MembershipConfig(
        heartbeat_ms=values["heartbeat_ms"],
        dead_after_ms=values["dead_after_ms"],
        poll_ms=values["poll_ms"],
    )
    if "sim_latency" in names:
        kwargs["sim_latency"] = SimulatedLatency().scaled(values["sim_latency_scale"])
    if "settings" in names:
        kwargs["settings"] = values
    return cls(**kwargs)


def build(cls: type[T], env: Mapping[str, str] | None = None, **flags: Any) -> T:
    """Build a config: defaults, then environment, then explicit flags (by setting key;
    None = not given). Raises ConfigError naming the variable or flag of a bad value."""
    process = {RouterConfig: ROUTER, NodeConfig: NODE}.get(cls)
    if process is None:
        raise TypeError(f"build() makes a RouterConfig or a NodeConfig, not {cls!r}")
    unknown = set(flags) - {s.key for s in settings.settings_for(process)}
    if unknown:
        raise ConfigError(f"not settings of the {process}: {', '.join(sorted(unknown))}")
    return from_values(cls, settings.load(process, env, flags))


def default_host() -> str:
    return socket.gethostname()
