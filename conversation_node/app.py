"""The conversation node process: owns live calls and serves the router's call links.

Routes:
- ``GET /v1/node/link`` (WebSocket): a router's link, every call it places here
  multiplexed on it (``callmesh.mux``); the upgrade must prove the link secret
  (``callmesh.link_auth``: HMAC over a time and a nonce, accepted once);
- ``GET /v1/node/calls/{call_id}`` (WebSocket): one call on its own WebSocket (for tools
  and tests that talk to a node directly); development mode only;
- ``GET /livez`` (and ``/healthz``): 200 while the process serves;
- ``GET /readyz``: 200 while taking calls; 503 while draining or Redis is unreachable;
- ``GET /v1/status``: JSON summary of the node; its calls only for a request that
  proves the link secret (``callmesh.link_auth``);
- ``GET /metrics``: Prometheus text.

Shutdown (SIGTERM, what a Kubernetes scale-down sends): stop taking calls and say so in
the membership record, hand every live call off at its next turn boundary within
``drain_timeout_s``, then exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import nats
from aiohttp import web
from nats.aio.client import Client as NATS

from callmesh import tracing
from callmesh.config import ConfigError, NodeConfig
from callmesh.link_auth import HEADER as LINK_AUTH_HEADER
from callmesh.link_auth import ROUTER_HEADER, LinkAuth, LinkAuthError
from callmesh.metric_names import DRAINING, LIVE_CALLS, NATS_UP, REDIS_UP, UNSAVED_CALLS
from callmesh.mux import LINK_PATH, MAX_MESSAGE_BYTES, Channel, Mux
from callmesh.protocol import (
    CloseCode,
    ErrorCode,
    In,
    ProtocolError,
    error_frame,
    parse_inbound,
    valid_id,
)
from conversation_node.call_links import CallLink, WebSocketCallLink
from conversation_node.heartbeat import Heartbeat
from conversation_node.node_services import HISTORY_MAX_CALLS, MemoryServices, NodeServices
from conversation_node.outbox_drain import OutboxDrainer
from conversation_node.outbox_sweep import OutboxSweep
from conversation_node.pipeline import Budgets, TurnPipeline
from conversation_node.providers.registry import Providers, ProviderSettings, build_providers
from conversation_node.session import CallDropped, CallSession, CallState
from events.connection import server_urls
from events.outbox import OutboxPublisher
from events.streams import ensure_streams
from memory.history import RedisHistoryStore
from state_store.client import connect as redis_connect
from state_store.client import connect_sync as redis_connect_sync
from state_store.ended_outbox import EndedOutboxIndex
from state_store.errors import StateStoreError
from state_store.membership import MembershipWriter, NodeState
from state_store.store import Durability, StateStore

log = logging.getLogger("callmesh.node")

START_TIMEOUT_S = 10.0
STATUS_PATH = "/v1/status"


class ConversationNode:
    """Holds the node's resources and live sessions; ``start()`` / idempotent ``aclose()``."""

    def __init__(
        self,
        config: NodeConfig,
        providers: Providers | None = None,
        memory: MemoryServices | None = None,
    ) -> None:
        self.config = config
        # Injected by tests (failure injection); built from the environment otherwise.
        self._providers = providers
        self._memory = memory
        self.sessions: dict[tuple[str, str], CallSession] = {}
        self.draining = False
        self._links: set[Mux] = set()
        self._call_tasks: set[asyncio.Task[None]] = set()
        # Detached calls waiting out their reconnect grace, by (tenant, call_id).
        self._graces: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._services: NodeServices | None = None
        self._drainer: OutboxDrainer | None = None
        self._sweep: OutboxSweep | None = None
        self._heartbeat: Heartbeat | None = None
        self._nc: NATS | None = None
        self._redis: Any = None
        self._drain_redis: Any = None
        self._closed = False
        self._link_auth = LinkAuth(config.link_secret) if config.link_secret else None
        if self._link_auth is None and not config.auth_disabled:
            raise ConfigError(
                "a node needs CALLMESH_LINK_SECRET to authenticate routers "
                "(CALLMESH_AUTH_DISABLED=1 turns authentication off)"
            )
        self._tracing = False

    @property
    def services(self) -> NodeServices:
        if self._services is None:
            raise RuntimeError("node not started")
        return self._services

    def __repr__(self) -> str:
        state = "draining" if self.draining else "active"
        return f"<ConversationNode {self.config.node_id} [{state}, {len(self.sessions)} calls]>"

    async def start(self) -> None:
        cfg = self.config
        self._tracing = tracing.configure(
            "callmesh-node", cfg.node_id, cfg.otlp_endpoint, cfg.trace_sample_ratio
        )
        self._redis = redis_connect(cfg.backends.redis_url)
        self._nc = await nats.connect(
            server_urls(cfg.backends.nats_url),
            name=cfg.node_id,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.25,
            connect_timeout=2,
        )
        js = self._nc.jetstream()
        await ensure_streams(js)
        if self._providers is None:
            # Real providers where keys are set (registry); the node's own latency flags
            # drive the simulated ones.
            read = ProviderSettings.from_values(cfg.settings) if cfg.settings else None
            settings = dataclasses.replace(
                read or ProviderSettings.from_env(),
                sim_latency=cfg.sim_latency,
                tts_chunk_ms=cfg.tts_chunk_ms,
            )
            self._providers = build_providers(settings)
        providers = self._providers
        budgets = Budgets(
            llm_first_token_ms=cfg.llm_first_token_budget_ms,
            llm_total_ms=cfg.llm_total_budget_ms,
            tts_first_chunk_ms=cfg.tts_first_chunk_budget_ms,
        )
        pipeline = TurnPipeline(providers.llm, providers.tts, providers.backup_tts, budgets)
        log.info("providers", extra={"fields": providers.names()})
        # The knowledge base is indexed once, here; its caches are shared by the calls.
        memory = self._memory or MemoryServices.build(
            RedisHistoryStore(self._redis, max_calls=HISTORY_MAX_CALLS),
            working_turns=cfg.working_memory_turns,
        )
        self._services = NodeServices(
            config=cfg,
            store=StateStore(
                self._redis,
                ttl_s=cfg.checkpoint_ttl_s,
                durability=Durability.for_url(
                    cfg.backends.redis_url,
                    cfg.checkpoint_replicas,
                    cfg.checkpoint_wait_ms,
                ),
            ),
            publisher=OutboxPublisher(js),
            pipeline=pipeline,
            memory=memory,
            stt=providers.stt,
        )
        # What ended calls leave in their outboxes: drained here, swept up by any node. On
        # a client of its own, as the heartbeat: its retries against a failed shard must
        # not make the live calls' client re-read its slot map under their commands.
        self._drain_redis = redis_connect(cfg.backends.redis_url)
        drain_store = StateStore(
            self._drain_redis,
            ttl_s=cfg.checkpoint_ttl_s,
            durability=self._services.store.durability,
        )
        index = EndedOutboxIndex(self._drain_redis)
        self._drainer = OutboxDrainer(
            drain_store, self._services.publisher, self._services.metrics, index
        )
        self._sweep = OutboxSweep(index, drain_store, self._drainer, cfg.node_id)
        # The heartbeat has a thread and a (blocking) client of its own: a busy loop must
        # not make the node look dead, nor must a Redis Cluster shard failing over (a
        # client re-reading its slot map stalls and resets every command in flight on it).
        self._heartbeat = Heartbeat(
            MembershipWriter(redis_connect_sync(cfg.backends.redis_url)),
            cfg,
            lambda: len(self.sessions),
            self.services.metrics,
        )
        await self._heartbeat.beat_once()
        self._heartbeat.start()
        if cfg.auth_disabled:
            log.warning(
                "AUTHENTICATION IS DISABLED (CALLMESH_AUTH_DISABLED=1): anyone who reaches "
                "this node's port can open calls on it"
            )
        if cfg.dev_mode:
            log.warning("development mode (CALLMESH_DEV_MODE=1): /v1/node/calls/{id} is open")
        self._sweep.start()
        log.info("node started", extra={"fields": {"node": cfg.node_id, "url": cfg.advertise_url}})

    async def drain(self) -> None:
        """Stop taking calls, hand live calls off at turn boundaries, and get out what ended
        calls left in their outboxes, bounded in time."""
        if self.draining:
            return
        self.draining = True
        deadline = time.monotonic() + self.config.drain_timeout_s
        # Detached calls are saved; their clients resume them on another node.
        for grace in list(self._graces.values()):
            grace.cancel()
        await asyncio.gather(*self._graces.values(), return_exceptions=True)
        if self._heartbeat is not None:
            await self._heartbeat.set_state(NodeState.DRAINING)
        sessions = list(self.sessions.values())
        log.info("draining", extra={"fields": {"calls": len(sessions)}})
        if sessions:
            waiters = [
                asyncio.create_task(s.handoff(), name=f"handoff:{s.call_id}") for s in sessions
            ]
            _, pending = await asyncio.wait(waiters, timeout=self.config.drain_timeout_s)
            for t in pending:
                t.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
            if pending:
                log.warning(
                    "drain bound reached", extra={"fields": {"not_handed_off": len(pending)}}
                )
        # Give the router a moment to move the links before we close them.
        settle = time.monotonic() + 2.0
        while self.sessions and time.monotonic() < settle:  # noqa: ASYNC110 (bounded poll)
            await asyncio.sleep(0.02)
        if self._drainer is not None and not await self._drainer.wait_idle(
            deadline - time.monotonic()
        ):
            log.warning(
                "drain bound reached", extra={"fields": {"outbox_calls": len(self._drainer)}}
            )

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._heartbeat is not None:
            await self._heartbeat.aclose()
        if self._sweep is not None:
            await self._sweep.aclose()
        for grace in list(self._graces.values()):
            grace.cancel()
        await asyncio.gather(*self._graces.values(), return_exceptions=True)
        for s in list(self.sessions.values()):
            await s.aclose()
        for mux in list(self._links):
            await mux.aclose()
        for t in list(self._call_tasks):
            t.cancel()
        await asyncio.gather(*self._call_tasks, return_exceptions=True)
        if self._drainer is not None:
            await self._drainer.aclose()
        if self._services is not None:
            await self._services.memory.aclose()
        if self._providers is not None:
            with contextlib.suppress(Exception):
                await self._providers.aclose()
        if self._nc is not None:
            # A connection that is reconnecting (NATS down) cannot drain: close it.
            if self._nc.is_connected:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._nc.drain())
            if not self._nc.is_closed:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._nc.close())
        for client in (self._redis, self._drain_redis):
            if client is not None:
                await asyncio.shield(client.aclose())
        if self._tracing:
            tracing.shutdown()

    # ------------------------------------------------------------------ HTTP

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(LINK_PATH, self.router_link)
        app.router.add_get("/v1/node/calls/{call_id}", self.call_link)
        app.router.add_get("/livez", self.livez)
        app.router.add_get("/healthz", self.livez)  # the liveness probe's older name
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get(STATUS_PATH, self.status)
        app.router.add_get("/metrics", self.metrics)
        return app

    async def livez(self, request: web.Request) -> web.Response:
        """Liveness: the process serves HTTP. 200 while draining too: a restart mid-drain
        would drop the calls being handed off."""
        return web.json_response({"status": "draining" if self.draining else "ok"})

    def _redis_ok(self) -> bool:
        return self._heartbeat is not None and self._heartbeat.redis_ok

    async def readyz(self, request: web.Request) -> web.Response:
        """Readiness: 200 while the node takes new calls: not draining, Redis reachable
        (without it no ownership can be taken or checkpoint written)."""
        redis = self._redis_ok()
        ready = not self.draining and redis
        reason = "draining" if self.draining else "ok" if redis else "redis unreachable"
        return web.json_response({"status": reason, "redis": redis}, status=200 if ready else 503)

    def _router_authenticated(self, request: web.Request, path: str) -> bool:
        """Whether the request proves the link secret (always true with authentication
        explicitly disabled)."""
        if self._link_auth is None:
            return True
        try:
            self._link_auth.check(
                request.headers.get(LINK_AUTH_HEADER), request.headers.get(ROUTER_HEADER), path
            )
        except LinkAuthError as exc:
            log.warning(
                "unauthenticated request refused",
                extra={"fields": {"path": path, "remote": request.remote, "why": str(exc)}},
            )
            return False
        return True

    async def status(self, request: web.Request) -> web.Response:
        metrics = self.services.metrics
        summary: dict[str, Any] = {
            "node": self.config.node_id,
            "draining": self.draining,
            "calls": len(self.sessions),
            "metrics": metrics.snapshot(),
            "histograms": {name: h.to_dict() for name, h in metrics.histograms.items()},
            "providers": self._providers.names() if self._providers else {},
            "outbox_drainer": repr(self._drainer),
        }
        # Call ids and tenants only for routers (and operators holding the link secret).
        detailed = self._link_auth is None or (
            LINK_AUTH_HEADER in request.headers and self._router_authenticated(request, STATUS_PATH)
        )
        if detailed:
            summary["sessions"] = [repr(s) for s in self.sessions.values()]
            summary["links"] = [repr(mux) for mux in self._links]
        return web.json_response(summary)

    async def metrics(self, request: web.Request) -> web.Response:
        m = self.services.metrics
        m.set(LIVE_CALLS, len(self.sessions))
        m.set(UNSAVED_CALLS, sum(1 for s in self.sessions.values() if s.unsaved))
        m.set(DRAINING, float(self.draining))
        m.set(REDIS_UP, float(self._redis_ok()))
        m.set(NATS_UP, float(self._nc is not None and self._nc.is_connected))
        return web.Response(text=m.render(), content_type="text/plain")

    async def router_link(self, request: web.Request) -> web.StreamResponse:
        """A router's link: calls arrive as channels and are served like direct calls.
        Refused (401, before the upgrade) unless the router proves the link secret."""
        if not self._router_authenticated(request, LINK_PATH):
            raise web.HTTPUnauthorized(text="link authentication required\n")
        ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE_BYTES)
        await ws.prepare(request)
        mux = Mux(
            ws,
            f"router@{request.remote}",
            self.services.metrics,
            on_open=self._open_call,
            flush_delay_s=self.config.link_flush_ms / 1000,
        )
        self._links.add(mux)
        try:
            await mux.serve()
        finally:
            self._links.discard(mux)
        return ws

    def _open_call(self, channel: Channel) -> None:
        task = asyncio.get_running_loop().create_task(
            self._serve_channel(channel), name=f"call:{channel.call_id}"
        )
        self._call_tasks.add(task)
        task.add_done_callback(self._call_tasks.discard)

    async def _serve_channel(self, channel: Channel) -> None:
        try:
            if not valid_id(channel.call_id):
                await channel.send_str(error_frame(ErrorCode.BAD_MESSAGE, "invalid call id"))
                await channel.close(CloseCode.BAD_REQUEST, "invalid call id")
            elif self.draining:
                await channel.send_str(error_frame(ErrorCode.UNAVAILABLE, "node is draining"))
                await channel.close(CloseCode.UNAVAILABLE, "draining")
            else:
                await self._serve(channel, channel.call_id)
        except (ConnectionError, RuntimeError):
            pass  # the link is gone: the router moves the call
        finally:
            await channel.close()

    async def call_link(self, request: web.Request) -> web.StreamResponse:
        # A call on its own socket skips the router and its checks: development only.
        if not self.config.dev_mode:
            raise web.HTTPNotFound(text="single-call sockets are off outside development mode\n")
        call_id = request.match_info["call_id"]
        if not valid_id(call_id):
            raise web.HTTPBadRequest(text="invalid call id")
        ws = web.WebSocketResponse(max_msg_size=self.config.max_frame_bytes)
        await ws.prepare(request)
        if self.draining:
            await ws.send_str(error_frame(ErrorCode.UNAVAILABLE, "node is draining"))
            await ws.close(code=CloseCode.UNAVAILABLE, message=b"draining")
            return ws
        try:
            await self._serve(WebSocketCallLink(ws), call_id)
        finally:
            if not ws.closed:
                await ws.close()
        return ws

    async def _serve(self, link: CallLink, call_id: str) -> None:
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                first = await link.receive()
        except TimeoutError:
            await link.send_str(error_frame(ErrorCode.NOT_STARTED, "no start frame"))
            return
        if first is None:
            return
        try:
            start = parse_inbound(first, self.config.max_frame_bytes)
        except ProtocolError as exc:
            await link.send_str(error_frame(exc.code, exc.message, seq=exc.seq))
            return
        if start.type is not In.START:
            await link.send_str(error_frame(ErrorCode.NOT_STARTED, "first frame must be start"))
            return
        tenant, caller = start.body["tenant"], start.body.get("caller", "anonymous")
        session = CallSession(self.services, tenant, call_id, caller, link.send_str)
        key = (tenant, call_id)
        previous = self.sessions.get(key)
        self.sessions[key] = session
        heard = None
        try:
            if previous is not None:
                # Before its grace ends (which closes it): the turn the caller finished
                # before the old link ended commits, and this owner says what they missed.
                heard = await previous.settle()
            grace = self._graces.pop(key, None)
            if grace is not None:
                grace.cancel()  # the caller is back in time
                await asyncio.gather(grace, return_exceptions=True)
            if previous is not None:
                await previous.aclose()  # superseded by this link; its epoch is stale anyway
            await session.open(start, heard)
            await self._pump(link, session)
        except CallDropped as exc:
            log.info("call dropped", extra={"fields": {"call_id": call_id, "reason": str(exc)}})
        except StateStoreError as exc:
            log.error(
                "state store failed", extra={"fields": {"call_id": call_id, "error": str(exc)}}
            )
            with contextlib.suppress(ConnectionError, RuntimeError):
                await link.send_str(error_frame(ErrorCode.UNAVAILABLE, "state store unavailable"))
        except (ConnectionError, RuntimeError) as exc:
            log.info("router link lost", extra={"fields": {"call_id": call_id, "error": str(exc)}})
        finally:
            if self.sessions.get(key) is session and self._may_come_back(session):
                session.link_ended()
                self._graces[key] = asyncio.get_running_loop().create_task(
                    self._grace(key, session), name=f"grace:{call_id}"
                )
            else:
                await session.aclose()
                if self.sessions.get(key) is session:
                    del self.sessions[key]
                self._adopt_leftover(session)

    def _adopt_leftover(self, session: CallSession) -> None:
        """An ended call whose final checkpoint or outbox is not out yet goes to the drainer."""
        if session.leftover is not None and self._drainer is not None:
            self._drainer.adopt(session.leftover[0], saved=session.leftover[1])

    def _may_come_back(self, session: CallSession) -> bool:
        """A live call whose link ended without a hangup (the client or its router went
        away) waits for a reconnect, through any router, for the grace."""
        return (
            session.detached
            and self.config.reconnect_grace_ms > 0
            and not self.draining
            and not self._closed
        )

    async def _grace(self, key: tuple[str, str], session: CallSession) -> None:
        """Wait out the reconnect grace of a detached call, then end it and release it."""
        try:
            await asyncio.sleep(self.config.reconnect_grace_ms / 1000)
            log.info("call abandoned", extra={"fields": {"call_id": session.call_id}})
            await session.abandon()
        except (CallDropped, StateStoreError) as exc:
            # Fenced: the call lives on elsewhere; or the store is down: a later
            # reconnect finds the call and goes on.
            log.info(
                "abandoned call not ended here",
                extra={"fields": {"call_id": session.call_id, "reason": str(exc)}},
            )
        finally:
            if self._graces.get(key) is asyncio.current_task():
                del self._graces[key]
            await session.aclose()
            if self.sessions.get(key) is session:
                del self.sessions[key]
            self._adopt_leftover(session)

    async def _pump(self, link: CallLink, session: CallSession) -> None:
        if isinstance(link, Channel):
            link.fast_path = self._audio_now(link, session)
        try:
            await self._read_frames(link, session)
        finally:
            if isinstance(link, Channel):
                link.fast_path = None

    def _audio_now(self, channel: Channel, session: CallSession) -> Callable[[str], bool]:
        """The channel's fast path: most frames are audio the session can take at once,
        without a wake-up of this call's task per frame (50 a second per call)."""
        max_bytes = self.config.max_frame_bytes

        def audio_now(text: str) -> bool:
            try:
                inbound = parse_inbound(text, max_bytes)
            except ProtocolError:
                return False  # answered by _read_frames, which parses it again
            try:
                return session.handle_audio_now(inbound)
            except Exception:
                # As in _read_frames: a bug in one frame must not take the call (or, here,
                # every call on the link) down with it. The frame was taken.
                log.exception("turn failed", extra={"fields": {"call_id": session.call_id}})
                with contextlib.suppress(ConnectionError):
                    channel.send_nowait(
                        error_frame(
                            ErrorCode.INTERNAL, "internal error in this turn", turn=session.turn
                        )
                    )
                return True

        return audio_now

    async def _read_frames(self, link: CallLink, session: CallSession) -> None:
        max_bytes = self.config.max_frame_bytes
        while (text := await link.receive()) is not None:
            try:
                inbound = parse_inbound(text, max_bytes)
            except ProtocolError as exc:
                await link.send_str(
                    error_frame(exc.code, exc.message, seq=exc.seq, turn=session.turn)
                )
                continue
            try:
                await session.handle(inbound)
            except CallDropped:
                raise
            except (StateStoreError, ConnectionError):
                raise
            except Exception:
                # A bug in one turn must not take the call (or the node) down with it.
                log.exception("turn failed", extra={"fields": {"call_id": session.call_id}})
                await link.send_str(
                    error_frame(
                        ErrorCode.INTERNAL,
                        "internal error in this turn",
                        seq=inbound.seq,
                        turn=session.turn,
                    )
                )
                continue
            if session.state in (CallState.ENDED, CallState.HANDED_OFF):
                return
