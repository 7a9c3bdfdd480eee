"""The router's settings: its listener, placement, Twilio entry and the limits it enforces.

Part of the table (:mod:`callmesh.settings.table`), kept apart for size.
"""

from __future__ import annotations

from callmesh.settings.kinds import Choice, Number, Text, Url
from callmesh.settings.model import Setting
from callmesh.settings.processes import HTTP, NODE, PORT, ROUTER

_ROUTER = "Router"
_LIMITS = "Limits"
_ID_OR_EMPTY = Text(r"[A-Za-z0-9_-]{1,64}", "empty or an id matching [A-Za-z0-9_-]{1,64}")

ROUTER_SETTINGS: tuple[Setting, ...] = (
    # ------------------------------------------------------------------ router
    Setting(
        "host",
        Text(empty_ok=False),
        "127.0.0.1",
        "address to listen on",
        (ROUTER,),
        _ROUTER,
        flag="--host",
    ),
    Setting("port", PORT, 8080, "port to listen on", (ROUTER,), _ROUTER, flag="--port"),
    Setting(
        "balance_epsilon",
        Number(float, gt=0),
        0.25,
        "bounded-load factor ε: a node takes at most ceil((1 + ε) · calls / nodes) calls",
        (ROUTER,),
        _ROUTER,
        flag="--epsilon",
    ),
    Setting(
        "max_unacked_audio_ms",
        Number(int, gt=0),
        30000,
        "caller audio kept for replay to a new node; beyond it the oldest is dropped (ms)",
        (ROUTER,),
        _ROUTER,
        env="CALLMESH_MAX_UNACKED_AUDIO_MS",
    ),
    # ------------------------------------------------------------------ limits
    Setting(
        "start_timeout_ms",
        Number(int, gt=0, le=60_000),
        5000,
        "a connection that sends no valid start for this long is closed with 4408 (ms)",
        (ROUTER,),
        _LIMITS,
        env="CALLMESH_START_TIMEOUT_MS",
    ),
    Setting(
        "max_connections",
        Number(int, ge=0),
        10_000,
        "client connections one router holds; more are closed with 4429 (0: no cap)",
        (ROUTER,),
        _LIMITS,
        env="CALLMESH_MAX_CONNECTIONS",
    ),
    Setting(
        "max_connections_per_tenant",
        Number(int, ge=0),
        10_000,
        "client connections of one tenant on one router; more are closed with 4429 (0: no cap)",
        (ROUTER,),
        _LIMITS,
        env="CALLMESH_MAX_CONNECTIONS_PER_TENANT",
    ),
    Setting(
        "max_calls_per_tenant",
        Number(int, ge=0),
        10_000,
        "live calls of one tenant across all routers (in Redis); more are refused with "
        "over_limit and 4429 (0: no cap)",
        (ROUTER,),
        _LIMITS,
        env="CALLMESH_MAX_CALLS_PER_TENANT",
    ),
    Setting(
        "max_new_calls_per_tenant_per_s",
        Number(int, ge=0),
        500,
        "new calls of one tenant a second across all routers (in Redis); more are refused "
        "with over_limit and 4429 (0: no cap)",
        (ROUTER,),
        _LIMITS,
        env="CALLMESH_MAX_NEW_CALLS_PER_TENANT_PER_S",
    ),
    Setting(
        "call_lease_s",
        Number(float, gt=0),
        60.0,
        "lease of a call's slot in its tenant's quota, renewed while a router holds the "
        "call: a crashed router's slots free themselves after this long (s)",
        (ROUTER,),
        _LIMITS,
        env="CALLMESH_CALL_LEASE_S",
    ),
    Setting(
        "max_frames_per_s",
        Number(float, ge=0),
        200.0,
        "frames a connection may send a second (token bucket; 0: no cap); over it frames "
        "are refused with rate_limited, and twice it for a second closes with 4429",
        (ROUTER,),
        _LIMITS,
        env="CALLMESH_MAX_FRAMES_PER_S",
    ),
    Setting(
        "frame_burst",
        Number(int, gt=0),
        400,
        "frames a connection may send at once above its rate (the token bucket's size)",
        (ROUTER,),
        _LIMITS,
        env="CALLMESH_FRAME_BURST",
    ),
    Setting(
        "max_unacked_bytes",
        Number(int, gt=0),
        1024 * 1024,
        "bytes of unacknowledged frames other than audio a call may hold on the router; "
        "beyond it frames are refused with over_limit until the node catches up",
        (ROUTER,),
        _LIMITS,
        env="CALLMESH_MAX_UNACKED_BYTES",
    ),
    Setting(
        "max_relinks",
        Number(int, ge=0),
        20,
        "relinks of one call to a node within relink_window_s; one more ends the call with "
        "relink_limit (0: no cap)",
        (ROUTER,),
        _LIMITS,
        env="CALLMESH_MAX_RELINKS",
    ),
    Setting(
        "relink_window_s",
        Number(float, gt=0),
        60.0,
        "the window of max_relinks (s)",
        (ROUTER,),
        _LIMITS,
        env="CALLMESH_RELINK_WINDOW_S",
    ),
    Setting(
        "reconnect_grace_ms",
        Number(int, ge=0),
        30_000,
        "a call whose client left without hangup waits this long for it to reconnect "
        "(through any router), then ends and its state on the node is released (ms)",
        (NODE,),
        _LIMITS,
        env="CALLMESH_RECONNECT_GRACE_MS",
    ),
    Setting(
        "router_drain_s",
        Number(float, ge=0, le=300),
        10.0,
        "on SIGTERM, how long the router waits for its callers to move to another router "
        "after asking them to (native: reconnect frame and close 4012; Twilio: stream ended, "
        "the <Connect action> opens a new one) before it exits (s)",
        (ROUTER,),
        _ROUTER,
        env="CALLMESH_ROUTER_DRAIN_S",
        flag="--drain-timeout",
    ),
    Setting(
        "public_url",
        Url(HTTP, empty_ok=True),
        "",
        "public base URL of this router, for Twilio stream URLs and signatures "
        "(required by the Twilio webhook; never derived from a request's Host)",
        (ROUTER,),
        _ROUTER,
        env="CALLMESH_PUBLIC_URL",
    ),
    Setting(
        "twilio_auth_token",
        Text(),
        "",
        "Twilio auth token that signs webhooks (unset: the voice webhook refuses every "
        "request, unless CALLMESH_DEV_MODE=1)",
        (ROUTER,),
        _ROUTER,
        env="TWILIO_AUTH_TOKEN",
        secret=True,
    ),
    Setting(
        "twilio_default_tenant",
        _ID_OR_EMPTY,
        "",
        "tenant of Twilio calls whose webhook URL names none",
        (ROUTER,),
        _ROUTER,
        env="CALLMESH_TWILIO_TENANT",
    ),
    Setting(
        "console",
        Choice(("on", "off")),
        "on",
        "the browser console and call inspector at /console (docs/console.md)",
        (ROUTER,),
        _ROUTER,
        env="CALLMESH_CONSOLE",
    ),
    Setting(
        "dev_secret",
        Text(r".{32,}", "32+ characters"),
        "",
        "development mode: signs the console's development tokens (callmesh up generates "
        "one per start; never set in a deployment)",
        (ROUTER,),
        _ROUTER,
        env="CALLMESH_DEV_SECRET",
        secret=True,
    ),
    Setting(
        "dev_control_url",
        Url(("http",), empty_ok=True),
        "",
        "development mode: the local cluster's control that kills a node for the console "
        "(callmesh up sets it; loopback only)",
        (ROUTER,),
        _ROUTER,
        env="CALLMESH_DEV_CONTROL_URL",
    ),
)
