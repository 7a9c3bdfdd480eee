"""The session router process: accepts client calls and keeps each on its owner node.

Routes:
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
import functools
import logging
from collections.abc import Coroutine
from typing import Any

import aiohttp
from aiohttp import web

from callmesh import metric_names as names
from callmesh import tracing
from callmesh.auth import AuthError, CallGrant
from callmesh.config import ConfigError, RouterConfig
from callmesh.link_auth import LinkAuth
from callmesh.protocol import CloseCode, Out, encode, valid_id
from callmesh.telemetry import Metrics
from router.call_auth import CallAuth, bearer_token, sanitized_start
from router.console import Console
from router.limits import Admission, ConnectionLimits
from router.links import ClientLink, NativeLink
from router.membership import MembershipView
from router.node_links import NodeLinks
from router.placement import Placement, http_health_probe
from router.proxy import ProxySession
from router.proxy_ports import CallLimits
from router.ring import BoundedLoadRing, NoNodeAvailable
from router.twilio import TwilioLink
from router.twilio_webhook import ACTION_PATH, MEDIA_PATH, VOICE_PATH, action_webhook, voice_webhook
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
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            raise RuntimeError("router not started")
        return self._http

    async def start(self) -> None:
        cfg = self.config
        self._tracing = tracing.configure(
            "callmesh-router", cfg.router_id, cfg.otlp_endpoint, cfg.trace_sample_ratio
        )
        self._redis = redis_connect(self.config.backends.redis_url)
        self.admission = Admission(self.connection_limits, self.metrics, CallQuota(self._redis))
        self._membership = MembershipView(MembershipStore(self._redis), self.config.membership)
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
                await asyncio.gather(*(self._move(s) for s in sessions))
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

    async def _move(self, session: ProxySession) -> None:
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
        app = web.Application(middlewares=[_json_errors])
        app.router.add_get("/v1/calls/{call_id}", self.call)
        app.router.add_get(MEDIA_PATH, self.twilio_media)
        app.router.add_post(VOICE_PATH, self.twilio_voice)
        app.router.add_post(ACTION_PATH, self.twilio_action)
        app.router.add_get("/livez", self.livez)
        app.router.add_get("/healthz", self.livez)  # the liveness probe's older name
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/v1/status", self.status)
        app.router.add_get("/metrics", self.metrics_endpoint)
        if self.config.console == "on":
            Console(self).register(app)  # /console and /console/api (router/console.py)
        return app

    async def call(self, request: web.Request) -> web.StreamResponse:
        call_id = request.match_info["call_id"]
        if not valid_id(call_id):
            raise web.HTTPBadRequest(reason="call id must match [A-Za-z0-9_-]{1,64}")
        self._refuse_if_draining()
        # The hard cap closes with 1009; frames between the limit and the cap get an error
        # frame and the call goes on.
        ws = web.WebSocketResponse(max_msg_size=self.config.max_frame_bytes * 4, heartbeat=20)
        await ws.prepare(request)
        self.metrics.inc(names.CALLS_ACCEPTED)
        link = NativeLink(ws, call_id, self.metrics, self.config.max_frame_bytes)
        grant: CallGrant | None = None
        header = request.headers.get("Authorization")
        if header is not None and not self.auth.disabled:
            # Checked before anything else is read or touched.
            try:
                grant = await self.auth.grant(bearer_token(header), call_id)
            except AuthError as exc:
                return await self._refuse(ws, link, exc)
        return await self._serve(ws, link, grant, token_in_start=header is None)

    async def twilio_media(self, request: web.Request) -> web.StreamResponse:
        # Twilio does not negotiate compression; refusing it keeps 50 frames/s cheap.
        # No heartbeat: see TWILIO_IDLE_S.
        self._refuse_if_draining()
        ws = web.WebSocketResponse(max_msg_size=self.config.max_frame_bytes * 4, compress=False)
        await ws.prepare(request)
        self.metrics.inc(names.TWILIO_STREAMS_ACCEPTED)
        link = TwilioLink(ws, self.metrics, self.config.max_frame_bytes, self.auth.stream_key)
        return await self._serve(ws, link, None, token_in_start=False)

    async def twilio_voice(self, request: web.Request) -> web.Response:
        self._refuse_if_draining()
        return await voice_webhook(request, self.config, self.metrics, self.auth.stream_key)

    async def twilio_action(self, request: web.Request) -> web.Response:
        # A draining router still answers the action of a stream it just ended: the TwiML
        # names the stream URL of the public base, which the load balancer sends elsewhere.
        if self._store is None:
            raise RuntimeError("router not started")
        return await action_webhook(
            request, self.config, self.metrics, self._store, self.auth.stream_key
        )

    def _refuse_if_draining(self) -> None:
        if self.draining:
            self.metrics.inc(names.ROUTER_DRAIN_REFUSED)
            raise web.HTTPServiceUnavailable(reason="router draining: use another router")

    async def _refuse(
        self, ws: web.WebSocketResponse, link: ClientLink, exc: AuthError
    ) -> web.WebSocketResponse:
        refusal = exc.refusal
        self.metrics.inc(names.CALLS_REFUSED, reason=refusal.reason)
        # The cause for the operator; never the token or secret itself.
        log.info(
            "call refused",
            extra={"fields": {"call_id": link.call_id, "reason": refusal.reason, "why": str(exc)}},
        )
        if not ws.closed:
            await link.close(refusal.close_code, refusal.reason.encode())
        return ws

    async def _serve(
        self,
        ws: web.WebSocketResponse,
        link: ClientLink,
        grant: CallGrant | None,
        *,
        token_in_start: bool,
    ) -> web.WebSocketResponse:
        if not self.admission.connect():
            await ws.close(code=CloseCode.OVER_LIMIT, message=b"connections")
            return ws
        session = ProxySession(link, self.placement, self.node_links, self.metrics, self.limits)
        key: tuple[str, str] | None = None
        admitted = False
        try:
            # Bounded start (router.limits); the tenant's caps and quotas once it is verified.
            if not await self.admission.wait_start(session):
                return ws
            if self.draining:
                # Before admission: a client moved elsewhere keeps its current resume secret.
                await self._move(session)
                return ws
            start = session.start
            assert start is not None
            try:
                if token_in_start and not self.auth.disabled:
                    grant = await self.auth.grant(start.body.get("token"), link.call_id)
                admission = await self.auth.admit(
                    grant,
                    start,
                    link.call_id,
                    resumable=link.resumable,
                    proven=link.kind == "twilio",
                )
            except AuthError as exc:
                return await self._refuse(ws, link, exc)
            session.admit(
                sanitized_start(start, admission.tenant, admission.caller),
                admission.tenant,
                admission.secret,
            )
            session.on_ended = functools.partial(self.auth.release, admission)
            admitted = await self.admission.admit(session)
            if not admitted:
                # Over a quota: the call never went live, so neither does its resume record.
                await asyncio.shield(self.auth.release(admission))
                return ws
            key = (session.tenant, session.call_id)
            old = self.calls.get(key)
            if old is not None:
                # The call's own client reconnected (it proved the resume secret): the
                # newest connection wins.
                await old.link.close(CloseCode.GOING_AWAY, b"replaced")
            self.calls[key] = session
            await session.run()
        finally:
            if key is not None and self.calls.get(key) is session:
                del self.calls[key]
                if self.draining and not self.calls:
                    self._calls_gone.set()
            await asyncio.shield(self.admission.release(session, started=admitted))
            if not ws.closed:
                await ws.close()
        return ws

    async def livez(self, request: web.Request) -> web.Response:
        """Liveness: the process serves HTTP (a restart would not help otherwise)."""
        return web.json_response({"status": "draining" if self.draining else "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        """Readiness: 200 only while a new call could be placed: not draining, and at
        least one node live (routable)."""
        if self.draining:
            return web.json_response({"status": "draining"}, status=503)
        nodes = len(self.membership.routable())
        body = {"status": "ok" if nodes else "no live node", "nodes": nodes}
        return web.json_response(body, status=200 if nodes else 503)

    async def status(self, request: web.Request) -> web.Response:
        nodes = [
            {
                "node": n,
                "url": v.record.url,
                "state": v.record.state,
                "alive": v.alive,
                "suspect": v.suspect_since is not None,
                "calls": v.record.calls,
            }
            for n, v in sorted(self.membership.nodes.items())
        ]
        return web.json_response(
            {
                "router": self.config.router_id,
                "draining": self.draining,
                "redis": self.membership.redis_ok,
                "calls": len(self.calls),
                "nodes": nodes,
                "links": self.node_links.summary(),
            }
        )

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        self.metrics.set(names.LIVE_CALLS, len(self.calls))
        self.metrics.set(names.DRAINING, float(self.draining))
        self.metrics.set(names.REDIS_UP, float(self.membership.redis_ok))
        return web.Response(text=self.metrics.render(), content_type="text/plain")


@web.middleware
async def _json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return web.json_response(
            {"type": Out.ERROR.value, "code": "http_" + str(exc.status), "message": exc.reason},
            status=exc.status,
        )


__all__ = ["NoNodeAvailable", "Router"]
