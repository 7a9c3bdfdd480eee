"""Every setting of every callmesh process, declared once.

Add a setting here (and, if a config dataclass holds it, a field of the same name whose
default is ``default(process, key)``); help, validation and docs/configuration.md follow.
Regenerate the docs with ``.venv/bin/python -m callmesh.settings.docs``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from callmesh import redaction
from callmesh.gc_tuning import DEFAULT_GEN0_THRESHOLD
from callmesh.settings.auth_table import AUTH_SETTINGS
from callmesh.settings.kinds import Choice, ConfigError, Number, Text, Url
from callmesh.settings.model import Setting
from callmesh.settings.node_providers_table import providers_have_keys
from callmesh.settings.node_table import NODE_SETTINGS
from callmesh.settings.processes import (
    CALL,
    HTTP,
    ID,
    NODE,
    PORT,
    PROCESSES,
    REPLAY,
    ROUTER,
    SERVICES,
    STATUS,
    UP,
    WORKER,
)
from callmesh.settings.router_table import ROUTER_SETTINGS

# The process names are re-exported: callers import them with the table.
__all__ = [
    "CALL",
    "CHECKS",
    "NODE",
    "PROCESSES",
    "REPLAY",
    "ROUTER",
    "SETTINGS",
    "STATUS",
    "UP",
    "WORKER",
    "dead_after_two_heartbeats",
    "dev_control_is_local",
]

_LEVELS = ("CRITICAL", "FATAL", "ERROR", "WARN", "WARNING", "INFO", "DEBUG", "NOTSET")

_BACKENDS = "Backends"
_CLUSTER = "Membership and node links"
_WORKER = "Effects worker"
_TOOLS = "Tools"
_PRIVACY = "Privacy"
_TELEMETRY = "Telemetry"
# Every process that writes logs or the event log redacts the same way (callmesh.redaction
# reads these variables itself: its log filter sits below this package).
_REDACTING = (ROUTER, NODE, WORKER, REPLAY)

SETTINGS: tuple[Setting, ...] = (
    # ------------------------------------------------------------------ backends
    Setting(
        "redis_url",
        Url(("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")),
        "redis://127.0.0.1:6379/0",
        "Redis-compatible server holding checkpoints, pins and membership; a Redis Cluster "
        "as redis+cluster://HOST:PORT,HOST:PORT,... (any reachable node finds the rest) "
        "(callmesh up: unset starts an embedded server)",
        (ROUTER, NODE, REPLAY, UP),
        _BACKENDS,
        env="REDIS_URL",
        flag="--redis",
        secret=True,
    ),
    Setting(
        "nats_url",
        Url(("nats", "tls")),
        "nats://127.0.0.1:4222",
        "NATS server with JetStream for the event log and side effects; a cluster as all "
        "its servers' URLs, comma-separated, so clients reconnect to another when one dies "
        "(callmesh up: unset starts an embedded server)",
        (ROUTER, NODE, WORKER, REPLAY, UP),
        _BACKENDS,
        env="NATS_URL",
        flag="--nats",
        secret=True,
    ),
    Setting(
        "log_level",
        Choice(_LEVELS, upper=True),
        "INFO",
        "log level (case-insensitive)",
        PROCESSES,
        _BACKENDS,
        env="CALLMESH_LOG_LEVEL",
        flag="--log-level",
        top_level_flag=True,
    ),
    Setting(
        "jetstream_replicas",
        Number(int, ge=1, le=5),
        1,
        "copies JetStream keeps of each stream when this process creates them: 3 on a "
        "3-server NATS cluster, 1 for a single server (JetStream allows 1 to 5)",
        (NODE, WORKER),
        _BACKENDS,
        env="CALLMESH_JETSTREAM_REPLICAS",
    ),
    Setting(
        "checkpoint_replicas",
        Number(int, ge=-1, le=5),
        -1,
        "Redis replicas that must confirm a checkpoint (WAIT) before its turn is "
        "acknowledged, so a master failover cannot lose it; -1: 1 on a Redis Cluster, 0 on "
        "one server",
        (NODE,),
        _BACKENDS,
        env="CALLMESH_CHECKPOINT_REPLICAS",
    ),
    Setting(
        "ended_call_retention_s",
        Number(int, gt=0),
        3600,
        "how long an ended call's final checkpoint stays in Redis: replay verifies the event "
        "log against it (callmesh replay, the console's inspector) and a client reconnecting "
        "to the call is told it ended; the rest of the call (ownership lease, pin, resume "
        "record) is deleted at hang-up (s)",
        (NODE,),
        _BACKENDS,
        env="CALLMESH_ENDED_CALL_RETENTION_S",
    ),
    Setting(
        "checkpoint_wait_ms",
        Number(int, gt=0),
        200,
        "how long a checkpoint waits for those replicas; past it the turn stays "
        "unacknowledged and the write is retried (ms)",
        (NODE,),
        _BACKENDS,
        env="CALLMESH_CHECKPOINT_WAIT_MS",
    ),
    # ------------------------------------------------------------------ membership, links
    Setting(
        "heartbeat_ms",
        Number(int, gt=0),
        100,
        "how often a node refreshes its heartbeat (ms)",
        SERVICES,
        _CLUSTER,
        env="CALLMESH_HEARTBEAT_MS",
    ),
    Setting(
        "dead_after_ms",
        Number(int, gt=0),
        500,
        "a node whose heartbeat has not advanced for this long is dead (ms; at least two "
        "heartbeats)",
        SERVICES,
        _CLUSTER,
        env="CALLMESH_DEAD_AFTER_MS",
    ),
    Setting(
        "loop_stall_ms",
        Number(int, gt=0),
        3000,
        "a node whose event loop has not run for this long stops heartbeating, so routers "
        "move its calls after dead_after_ms more; a loop that is merely busy keeps the "
        "node alive (ms)",
        (NODE,),
        _CLUSTER,
        env="CALLMESH_LOOP_STALL_MS",
    ),
    Setting(
        "poll_ms",
        Number(int, gt=0),
        100,
        "how often membership is read (ms)",
        SERVICES,
        _CLUSTER,
        env="CALLMESH_MEMBERSHIP_POLL_MS",
    ),
    Setting(
        "link_flush_ms",
        Number(float, ge=0, le=20),
        2.0,
        "how long after its last write a router-node link holds a frame, so frames of other "
        "calls share the next write; a link quiet that long writes at once (ms; 0 writes "
        "on the next turn of the event loop)",
        SERVICES,
        _CLUSTER,
        env="CALLMESH_LINK_FLUSH_MS",
    ),
    Setting(
        "gc_gen0_threshold",
        Number(int, ge=0),
        DEFAULT_GEN0_THRESHOLD,
        "the garbage collector's generation-0 threshold after start-up (0 keeps CPython's 700)",
        SERVICES,
        _CLUSTER,
        env="CALLMESH_GC_GEN0_THRESHOLD",
    ),
    # ------------------------------------------------------------------ telemetry
    Setting(
        "otlp_endpoint",
        Url(("http", "https"), empty_ok=True),
        "",
        "OpenTelemetry collector (OTLP/HTTP) base URL; traces go to its /v1/traces "
        "(unset: no tracing, at no cost)",
        SERVICES,
        _TELEMETRY,
        env="OTEL_EXPORTER_OTLP_ENDPOINT",
    ),
    Setting(
        "trace_sample_ratio",
        Number(float, ge=0, le=1),
        1.0,
        "share of calls traced, parent-based (a call's spans are kept or dropped together; "
        "0.05 suits production)",
        SERVICES,
        _TELEMETRY,
        env="CALLMESH_TRACE_SAMPLE_RATIO",
    ),
    Setting(
        "heap_probe_dir",
        Text(),
        "",
        "diagnostics: on SIGUSR1 write an object census and the allocators' figures into "
        "this directory; SIGUSR2 also traces allocations (tracemalloc: slow, never in "
        "production) and writes heap snapshots (callmesh.heap_probe; loadtest soak "
        "--heap-probe)",
        (ROUTER, NODE, WORKER),
        _TELEMETRY,
        env="CALLMESH_HEAP_PROBE_DIR",
    ),
    *ROUTER_SETTINGS,
    *AUTH_SETTINGS,
    *NODE_SETTINGS,
    # ------------------------------------------------------------------ privacy
    Setting(
        "redaction_mode",
        Choice(tuple(m.value for m in redaction.RedactionMode)),
        redaction.RedactionMode.MASK.value,
        "how phone numbers, e-mail addresses and card numbers are redacted in the event "
        "log and logs: mask ([phone ••••0123]) or hash ([phone#a1b2c3d4], HMAC-SHA256 with "
        "the redaction key, stable per value)",
        _REDACTING,
        _PRIVACY,
        env=redaction.ENV_MODE,
    ),
    Setting(
        "redaction_key",
        Text(rf".{{{redaction.MIN_KEY_BYTES},}}", f"{redaction.MIN_KEY_BYTES}+ characters"),
        "",
        "HMAC key of the hash redaction mode (the same in every process of a cluster)",
        _REDACTING,
        _PRIVACY,
        env=redaction.ENV_KEY,
        secret=True,
    ),
    # ------------------------------------------------------------------ effects worker
    Setting(
        "webhook_url",
        Url(HTTP, empty_ok=True),
        "",
        "CRM endpoint; may contain {tenant} and {kind} (unset: effects are only logged)",
        (WORKER,),
        _WORKER,
        env="CALLMESH_WEBHOOK_URL",
        flag="--webhook-url",
        secret=True,
    ),
    Setting(
        "durable",
        ID,
        "callmesh-effects",
        "JetStream durable consumer; workers with the same one share the work",
        (WORKER,),
        _WORKER,
        env="CALLMESH_EFFECTS_DURABLE",
        flag="--durable",
    ),
    Setting(
        "events_max_age_s",
        Number(float, gt=0),
        float(7 * 24 * 3600),
        "event log retention if this worker creates the streams (s)",
        (WORKER,),
        _WORKER,
        env="CALLMESH_EVENTS_MAX_AGE_S",
        flag="--events-max-age-s",
    ),
    Setting(
        "host",
        Text(empty_ok=False),
        "0.0.0.0",
        "bind address of /metrics, /livez and /readyz",
        (WORKER,),
        _WORKER,
        flag="--host",
    ),
    Setting(
        "port",
        PORT,
        9090,
        "port of /metrics, /livez and /readyz (0: any free port)",
        (WORKER,),
        _WORKER,
        env="CALLMESH_WORKER_PORT",
        flag="--port",
    ),
    # ------------------------------------------------------------------ tools
    Setting(
        "port",
        PORT,
        8080,
        "the local cluster's router port",
        (UP,),
        _TOOLS,
        env="CALLMESH_PORT",
        flag="--port",
    ),
    Setting(
        "nodes",
        Number(int, ge=1),
        2,
        "conversation nodes of the local cluster",
        (UP,),
        _TOOLS,
        flag="--nodes",
    ),
    Setting(
        "routers",
        Number(int, ge=1, le=16),
        1,
        "routers of the local cluster (the first on --port, the others on free ports)",
        (UP,),
        _TOOLS,
        flag="--routers",
    ),
    Setting(
        "router",
        Url(HTTP),
        "http://127.0.0.1:8080",
        "the router to call or ask",
        (CALL, STATUS),
        _TOOLS,
        env="CALLMESH_ROUTER",
        flag="--router",
    ),
)


def dead_after_two_heartbeats(values: Mapping[str, Any]) -> None:
    if values["dead_after_ms"] < 2 * values["heartbeat_ms"]:
        raise ConfigError(
            f"CALLMESH_DEAD_AFTER_MS={values['dead_after_ms']}: must be at least two "
            f"heartbeats (CALLMESH_HEARTBEAT_MS={values['heartbeat_ms']})"
        )


_LOOPBACK_HTTP = ("http://127.0.0.1:", "http://localhost:", "http://[::1]:")


def dev_control_is_local(values: Mapping[str, Any]) -> None:
    url = values["dev_control_url"]
    if url and not values["dev_secret"]:
        raise ConfigError("CALLMESH_DEV_CONTROL_URL needs CALLMESH_DEV_SECRET (development mode)")
    # The control kills processes: it must be the local cluster's, on this machine.
    if url and not url.startswith(_LOOPBACK_HTTP):
        raise ConfigError(f"CALLMESH_DEV_CONTROL_URL must be a loopback http:// URL, got {url!r}")


def hash_redaction_has_a_key(values: Mapping[str, Any]) -> None:
    if values["redaction_mode"] == redaction.RedactionMode.HASH and not values["redaction_key"]:
        raise ConfigError(f"{redaction.ENV_MODE}=hash needs {redaction.ENV_KEY}")


# Checks across settings: (process, the keys they read, the check). ``load`` runs those
# whose keys it read.
CHECKS: tuple[tuple[str, tuple[str, ...], Callable[[Mapping[str, Any]], None]], ...] = (
    (ROUTER, ("heartbeat_ms", "dead_after_ms"), dead_after_two_heartbeats),
    (ROUTER, ("dev_secret", "dev_control_url"), dev_control_is_local),
    *((p, ("redaction_mode", "redaction_key"), hash_redaction_has_a_key) for p in _REDACTING),
    (NODE, ("heartbeat_ms", "dead_after_ms"), dead_after_two_heartbeats),
    (
        NODE,
        (
            "stt",
            "llm",
            "tts",
            "backup_tts",
            "deepgram_api_key",
            "openai_api_key",
            "openai_base_url",
        ),
        providers_have_keys,
    ),
)
