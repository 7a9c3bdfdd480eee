"""The session router process: accepts client calls and keeps each on its owner node.

This module holds the router's resources and lifecycle (start, drain, close). Routes
(calls: ``router.call_intake``; probes, status and metrics: ``router.router_http``):
- ``GET /v1/calls/{call_id}`` (WebSocket): the native call protocol (docs/protocol.md);
- ``GET /v1/twilio/media`` (WebSocket): Twilio Media Streams (``router.twilio``);
- ``POST /v1/twilio/voice``: Twilio's voice webhook, answered with TwiML
  (``router.twilio_webhook``), and ``POST /v1/twilio/action``: the ``<Connect action>``
  Twilio requests when a stream ends, answered with a new stream or ``<Hangup/>``;
- ``GET /livez`` (``/healthz``: 200 while the process serves), ``GET /readyz`` (503 while
  draining or with no node live), ``GET /v1/status`` (nodes and live calls, JSON),
  ``GET /metrics``;
- ``/console``: the browser console and call inspector (``router.console``).
Any other path answers 404 with a JSON error body.

Drain (SIGTERM, :meth:`Router.drain`): new connections are refused (503) and /readyz says
503 so the load balancer stops sending any; every native caller gets ``{"type":
"reconnect","reason":"router_draining"}`` and a close with 4012, and every Twilio stream is
ended, whose ``<Connect action>`` then opens a new stream through another router. The node
keeps each call (its checkpoint and pin are in Redis) until the caller is back. The router
exits once its calls are gone, or after ``router_drain_s`` at most.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

import aiohttp
from aiohttp import web

from callmesh import metric_names as names
from callmesh import tracing
from callmesh.config import ConfigError, RouterConfig
from callmesh.link_auth import LinkAuth
from callmesh.protocol import CloseCode, Out, encode
from callmesh.telemetry import Metrics
from router.call_auth import CallAuth
from router.call_intake import CallIntake
from router.console import Console
from router.limits import Admission, ConnectionLimits
from router.links import free_connections_at_end
from router.membership import MembershipView
from router.node_links import NodeLinks
from router.placement import Placement, http_health_probe
from router.proxy import ProxySession
from router.proxy_ports import CallLimits
from router.ring import BoundedLoadRing, NoNodeAvailable
from router.router_http import RouterHttp, json_errors
from router.twilio import TwilioLink
from router.twilio_webhook import ACTION_PATH, MEDIA_PATH, VOICE_PATH
from state_store.client import connect as redis_connect
from state_store.errors import StateStoreError
from state_store.membership import MembershipStore
from state_store.pins import PinStore
from state_store.quota import CallQuota
from state_store.resume import ResumeStore
from state_store.store import StateStore

log = logging.getLogger("callmesh.router")

# Twilio streams media without a pause for the whole call (silence included), so a stream
# with no message for this long is dead; checked by one sweep instead of a WebSocket
# heartbeat, whose per-message timer reset costs more than the rest of the frame's path.
TWILIO_IDLE_S = 10.0
# The frame that asks a native caller to reconnect through another router (then 4012).
RECONNECT_FRAME = encode({"type": Out.RECONNECT.value, "reason": "router_draining"})
# A node acknowledges a caller's audio every 0.5 s while it hears no utterance
# (conversation_node.voice.QUIET_ACK_EVERY_S); more than 1 s of it unacknowledged (20 ms
# frames) means it is hearing or answering one, and a drain does not cut that stream.
UTTERANCE_UNACKED_FRAMES = 50


class Router:
    """Owns the membership view, placement, the node links and live proxy sessions."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.metrics = Metrics("callmesh_router")
        self.limits = CallLimits(
            max_unacked_frames=config.max_unacked_frames,
            max_unacked_audio_ms=config.max_unacked_audio_ms,
            connect_timeout_s=config.connect_timeout_ms / 1000,
            max_unacked_bytes=config.max_unacked_bytes,
            max_frames_per_s=config.max_frames_per_s,
            frame_burst=config.frame_burst,
            max_relinks=config.max_relinks,
            relink_window_s=config.relink_window_s,
        )
        # Raises ConfigError without a way to verify tokens, unless explicitly disabled.
        self.auth = CallAuth(config)
        self._link_auth = LinkAuth(config.link_secret) if config.link_secret else None
        if self._link_auth is None and not config.auth_disabled:
            raise ConfigError(
                "the router needs CALLMESH_LINK_SECRET to authenticate to nodes "
                "(CALLMESH_AUTH_DISABLED=1 turns authentication off)"
            )
        self.connection_limits = ConnectionLimits(
            start_timeout_s=config.start_timeout_ms / 1000,
            max_connections=config.max_connections,
            max_connections_per_tenant=config.max_connections_per_tenant,
            max_calls_per_tenant=config.max_calls_per_tenant,
            max_new_calls_per_tenant_per_s=config.max_new_calls_per_tenant_per_s,
            call_lease_s=config.call_lease_s,
        )
        self.admission = Admission(self.connection_limits, self.metrics, None)
        self._redis: Any = None
        self._http: aiohttp.ClientSession | None = None
        self._membership: MembershipView | None = None
        self._placement: Placement | None = None
        self._node_links: NodeLinks | None = None
        self.calls: dict[tuple[str, str], ProxySession] = {}
        self.draining = False
        self._calls_gone = asyncio.Event()  # set when a drain has no call left
        self._store: StateStore | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._tracing = False
        self.intake = CallIntake(self)
        self._endpoints = RouterHttp(self)

    def __repr__(self) -> str:
        return f"<Router {self.config.router_id} [{len(self.calls)} calls]>"

    @property
    def membership(self) -> MembershipView:
        if self._membership is None:
            raise RuntimeError("router not started")
        return self._membership

    @property
    def placement(self) -> Placement:
        if self._placement is None:
            raise RuntimeError("router not started")
        return self._placement

    @property
    def node_links(self) -> NodeLinks:
        if self._node_links is None:
            raise RuntimeError("router not started")
        return self._node_links

    @property
    def store(self) -> StateStore:
        if self._store is None:
            raise RuntimeError("router not started")
        return self._store

    def call_left(self) -> None:
        """A live call ended or moved away: a drain waits for the last one."""
        if self.draining and not self.calls:
            self._calls_gone.set()

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            raise RuntimeError("router not started")
        return self._http

    def _heard_from(self, node_id: str) -> float | None:
        links = self._node_links
        return None if links is None else links.heard_from(node_id)

    async def start(self) -> None:
        cfg = self.config
        self._tracing = tracing.configure(
            "callmesh-router", cfg.router_id, cfg.otlp_endpoint, cfg.trace_sample_ratio
        )
        self._redis = redis_connect(self.config.backends.redis_url)
        self.admission = Admission(self.connection_limits, self.metrics, CallQuota(self._redis))
        self._membership = MembershipView(
            MembershipStore(self._redis), self.config.membership, self._heard_from
        )
        self._store = StateStore(self._redis)
        self._membership.on_dead(self._node_dead)
        # Health checks and the node links (one multiplexed WebSocket per node).
        self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        self._placement = Placement(
            self._membership,
            PinStore(self._redis),
            http_health_probe(self._http),
            BoundedLoadRing(self.config.balance_epsilon),
        )
        self._node_links = NodeLinks(
            self._http,
            self.metrics,
            self.config.router_id,
            self.config.link_flush_ms / 1000,
            self._link_auth,
        )
        self.auth.start(self._http, ResumeStore(self._redis))
        if self.config.dev_mode:
            log.warning("development mode (CALLMESH_DEV_MODE=1): unsigned Twilio webhooks pass")
        with contextlib.suppress(StateStoreError):
            await self._membership.refresh()
        self._membership.start()
        self._spawn(self._close_idle_twilio_streams(), "twilio-idle-sweep")
        self._spawn(self.admission.renew_forever(), "quota-renewal")
        log.info("router started", extra={"fields": {"router": self.config.router_id}})

    async def drain(self) -> None:
        """Ask every caller to move to another router; return once they are gone or after
        ``router_drain_s``. New connections are refused from now on."""
        self.draining = True
        sessions = list(self.calls.values())
        log.info("router draining", extra={"fields": {"calls": len(sessions)}})
        bound = self.config.router_drain_s
        # Most of the bound for the moves (a Twilio stream waits for a pause in the agent's
        # speech); the rest for callers to leave, streams still open then are ended anyway.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(bound * 0.8):
                await asyncio.gather(*(self.move(s) for s in sessions))
        for s in sessions:
            if not s.link.closed:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await s.link.close(CloseCode.NORMAL, b"router_draining")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(bound * 0.2):
                if self.calls:
                    await self._calls_gone.wait()
        if self.calls:
            log.warning("drain bound reached", extra={"fields": {"calls": len(self.calls)}})

    async def move(self, session: ProxySession) -> None:
        """Send one caller elsewhere: a native client is told to reconnect (4012); a Twilio
        stream is ended, and Twilio requests the ``<Connect action>``, which gets a new
        stream through another router (this one answers 503 now)."""
        self.metrics.inc(names.ROUTER_DRAIN_MOVED)
        link = session.link
        try:
            if isinstance(link, TwilioLink):
                # Twilio drops what it was playing with the stream, and what the caller says
                # while no stream is open is lost: wait for a pause in the conversation, no
                # reply playing and no utterance on the node (bounded by the drain, which
                # cancels this wait). Polled: both are conditions on time.
                while not link.closed and not (  # noqa: ASYNC110
                    link.quiet() and len(session.unacked) <= UTTERANCE_UNACKED_FRAMES
                ):
                    await asyncio.sleep(0.05)
                if not link.closed:
                    await link.close(CloseCode.NORMAL, b"router_draining")
                return
            if not link.closed:
                await link.send(Out.RECONNECT.value, RECONNECT_FRAME)
                await link.close(CloseCode.ROUTER_DRAINING, b"router_draining")
        except (ConnectionError, RuntimeError):
            pass  # the caller is gone already

    async def aclose(self) -> None:
        sessions = list(self.calls.values())
        for s in sessions:
            with contextlib.suppress(Exception):
                await s.link.close(CloseCode.GOING_AWAY, b"router shutting down")
        if self._membership is not None:
            await self._membership.aclose()
        for t in list(self._background):
            t.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._node_links is not None:
            await self._node_links.aclose()
        await self.auth.aclose()
        if self._http is not None:
            await asyncio.shield(self._http.close())
            self._http = None
        if self._redis is not None:
            await asyncio.shield(self._redis.aclose())
            self._redis = None
        if self._tracing:
            tracing.shutdown()

    # ------------------------------------------------------------------ nodes

    def _node_dead(self, node: str) -> None:
        # Sessions first: they must see the death, not merely a lost link, so they do not
        # spend a health check on a node that is known to be gone.
        if self._placement is not None:
            for call in self._placement.calls_on(node):
                call.node_died()
        if self._node_links is not None:
            self._node_links.drop(node, "declared dead")

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _close_idle_twilio_streams(self) -> None:
        while True:
            await asyncio.sleep(TWILIO_IDLE_S)
            for session in list(self.calls.values()):
                link = session.link
                if isinstance(link, TwilioLink) and link.idle_since_last_check():
                    self.metrics.inc(names.TWILIO_STREAMS_IDLE_CLOSED)
                    log.info("Twilio stream idle", extra={"fields": {"call_id": link.call_id}})
                    self._spawn(link.close(CloseCode.GOING_AWAY, b"no media"), "close-idle")

    # ------------------------------------------------------------------ HTTP

    def app(self) -> web.Application:
        intake, http = self.intake, self._endpoints
        app = web.Application(middlewares=[json_errors, free_connections_at_end])
        app.router.add_get("/v1/calls/{call_id}", intake.call)
        app.router.add_get(MEDIA_PATH, intake.twilio_media)
        app.router.add_post(VOICE_PATH, intake.twilio_voice)
        app.router.add_post(ACTION_PATH, intake.twilio_action)
        app.router.add_get("/livez", http.livez)
        app.router.add_get("/healthz", http.livez)  # the liveness probe's older name
        app.router.add_get("/readyz", http.readyz)
        app.router.add_get("/v1/status", http.status)
        app.router.add_get("/metrics", http.metrics)
        if self.config.console == "on":
            Console(self).register(app)  # /console and /console/api (router/console.py)
        return app


__all__ = ["NoNodeAvailable", "Router"]
