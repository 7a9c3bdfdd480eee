"""The conversation node process: its resources and its lifecycle (start, drain, close).

Routes (served by ``conversation_node.call_serving`` and ``conversation_node.node_http``):
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
from pathlib import Path
from typing import Any

import nats
from aiohttp import web
from nats.aio.client import Client as NATS

from callmesh import tracing
from callmesh.config import ConfigError, NodeConfig
from callmesh.link_auth import LinkAuth
from callmesh.mux import LINK_PATH, Mux
from conversation_node.call_serving import CallServer
from conversation_node.heartbeat import Heartbeat
from conversation_node.node_http import STATUS_PATH, NodeHttp
from conversation_node.node_services import HISTORY_MAX_CALLS, MemoryServices, NodeServices
from conversation_node.outbox_drain import OutboxDrainer
from conversation_node.outbox_sweep import OutboxSweep
from conversation_node.pipeline import Budgets, TurnPipeline
from conversation_node.providers.registry import Providers, ProviderSettings, build_providers
from conversation_node.router_auth import RouterAuth
from conversation_node.session import CallSession
from events.connection import server_urls
from events.outbox import OutboxPublisher
from events.streams import ensure_streams
from memory.history import RedisHistoryStore
from memory.tenant_kb import TenantKnowledgeBases
from state_store.client import connect as redis_connect
from state_store.client import connect_sync as redis_connect_sync
from state_store.ended_outbox import EndedOutboxIndex
from state_store.membership import MembershipWriter, NodeState
from state_store.store import Durability, StateStore

log = logging.getLogger("callmesh.node")


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
        self.draining = False
        self._services: NodeServices | None = None
        self._drainer: OutboxDrainer | None = None
        self._sweep: OutboxSweep | None = None
        self._heartbeat: Heartbeat | None = None
        self._nc: NATS | None = None
        self._redis: Any = None
        self._drain_redis: Any = None
        self._closed = False
        link_auth = LinkAuth(config.link_secret) if config.link_secret else None
        if link_auth is None and not config.auth_disabled:
            raise ConfigError(
                "a node needs CALLMESH_LINK_SECRET to authenticate routers "
                "(CALLMESH_AUTH_DISABLED=1 turns authentication off)"
            )
        router_auth = RouterAuth(link_auth)
        self._calls = CallServer(self, router_auth)
        self._http = NodeHttp(self, router_auth)
        # The same objects as the call server's: the node reports and drains them.
        self.sessions = self._calls.sessions
        self._tracing = False

    @property
    def services(self) -> NodeServices:
        if self._services is None:
            raise RuntimeError("node not started")
        return self._services

    @property
    def node_id(self) -> str:
        return self.config.node_id

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def links(self) -> set[Mux]:
        return self._calls.links

    def redis_ok(self) -> bool:
        return self._heartbeat is not None and self._heartbeat.redis_ok

    def nats_ok(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    def provider_names(self) -> dict[str, str]:
        return self._providers.names() if self._providers else {}

    def drainer_summary(self) -> str:
        return repr(self._drainer)

    def adopt_leftover(self, session: CallSession) -> None:
        """An ended call whose final checkpoint or outbox is not out yet goes to the drainer."""
        if session.leftover is not None and self._drainer is not None:
            self._drainer.adopt(session.leftover[0], saved=session.leftover[1])

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
        # The knowledge bases are indexed once, here; their caches are shared by the calls.
        memory = self._memory or MemoryServices.build(
            RedisHistoryStore(self._redis, max_calls=HISTORY_MAX_CALLS),
            working_turns=cfg.working_memory_turns,
            tenants=TenantKnowledgeBases(Path(cfg.kb_dir)) if cfg.kb_dir else None,
        )
        self._services = NodeServices(
            config=cfg,
            store=StateStore(
                self._redis,
                ttl_s=cfg.checkpoint_ttl_s,
                ended_retention_s=cfg.ended_call_retention_s,
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
            ended_retention_s=cfg.ended_call_retention_s,
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
        # The recognizer's models of the tenants this node knows (offline speech), built in
        # a thread before the node is announced, within a bound (the rest follow).
        prepare = getattr(providers.stt, "prepare", None)
        if prepare is not None:
            await prepare(cfg.stt_lm_startup_s)
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
        await self._calls.end_graces()
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
        await self._calls.aclose()
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
        calls, http = self._calls, self._http
        app = web.Application()
        app.router.add_get(LINK_PATH, calls.router_link)
        app.router.add_get("/v1/node/calls/{call_id}", calls.call_link)
        app.router.add_get("/livez", http.livez)
        app.router.add_get("/healthz", http.livez)  # the liveness probe's older name
        app.router.add_get("/readyz", http.readyz)
        app.router.add_get(STATUS_PATH, http.status)
        app.router.add_get("/metrics", http.metrics)
        return app
