"""Serving calls as they arrive: a router's link and its channels, the development-mode
single-call socket, the start handshake, and the reconnect grace of a detached call."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

from aiohttp import web

from callmesh.coalesced_writes import coalesce_writes
from callmesh.config import NodeConfig
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
from conversation_node.frame_pump import pump
from conversation_node.node_services import NodeServices
from conversation_node.router_auth import RouterAuth
from conversation_node.session import CallDropped, CallSession
from state_store.errors import StateStoreError

log = logging.getLogger("callmesh.node")

START_TIMEOUT_S = 10.0


class CallHost(Protocol):
    """What serving calls needs of the node that holds them
    (:class:`conversation_node.app.ConversationNode`)."""

    @property
    def config(self) -> NodeConfig: ...

    @property
    def services(self) -> NodeServices: ...

    @property
    def draining(self) -> bool: ...

    @property
    def closed(self) -> bool: ...

    def adopt_leftover(self, session: CallSession) -> None: ...


class CallServer:
    """Owns the node's live sessions, router links, call tasks and reconnect graces; the
    node drains and closes them through it."""

    def __init__(self, host: CallHost, router_auth: RouterAuth) -> None:
        self._host = host
        self._router_auth = router_auth
        self.sessions: dict[tuple[str, str], CallSession] = {}
        self.links: set[Mux] = set()
        self._call_tasks: set[asyncio.Task[None]] = set()
        # Detached calls waiting out their reconnect grace, by (tenant, call_id).
        self._graces: dict[tuple[str, str], asyncio.Task[None]] = {}

    async def end_graces(self) -> None:
        """Stop waiting for detached calls: they are saved, and their clients resume them
        on another node."""
        for grace in list(self._graces.values()):
            grace.cancel()
        await asyncio.gather(*self._graces.values(), return_exceptions=True)

    async def aclose(self) -> None:
        await self.end_graces()
        for s in list(self.sessions.values()):
            await s.aclose()
        for mux in list(self.links):
            await mux.aclose()
        for t in list(self._call_tasks):
            t.cancel()
        await asyncio.gather(*self._call_tasks, return_exceptions=True)

    # ------------------------------------------------------------------ routes

    async def router_link(self, request: web.Request) -> web.StreamResponse:
        """A router's link: calls arrive as channels and are served like direct calls.
        Refused (401, before the upgrade) unless the router proves the link secret."""
        if not self._router_auth.authenticated(request, LINK_PATH):
            raise web.HTTPUnauthorized(text="link authentication required\n")
        ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE_BYTES)
        await ws.prepare(request)
        coalesce_writes(ws)  # a batch's header and payload in one write
        mux = Mux(
            ws,
            f"router@{request.remote}",
            self._host.services.metrics,
            on_open=self._open_call,
            flush_delay_s=self._host.config.link_flush_ms / 1000,
        )
        self.links.add(mux)
        try:
            await mux.serve()
        finally:
            self.links.discard(mux)
        return ws

    async def call_link(self, request: web.Request) -> web.StreamResponse:
        # A call on its own socket skips the router and its checks: development only.
        config = self._host.config
        if not config.dev_mode:
            raise web.HTTPNotFound(text="single-call sockets are off outside development mode\n")
        call_id = request.match_info["call_id"]
        if not valid_id(call_id):
            raise web.HTTPBadRequest(text="invalid call id")
        ws = web.WebSocketResponse(max_msg_size=config.max_frame_bytes)
        await ws.prepare(request)
        if self._host.draining:
            await ws.send_str(error_frame(ErrorCode.UNAVAILABLE, "node is draining"))
            await ws.close(code=CloseCode.UNAVAILABLE, message=b"draining")
            return ws
        try:
            await self._serve(WebSocketCallLink(ws), call_id)
        finally:
            if not ws.closed:
                await ws.close()
        return ws

    # ------------------------------------------------------------------ one call

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
            elif self._host.draining:
                await channel.send_str(error_frame(ErrorCode.UNAVAILABLE, "node is draining"))
                await channel.close(CloseCode.UNAVAILABLE, "draining")
            else:
                await self._serve(channel, channel.call_id)
        except (ConnectionError, RuntimeError):
            pass  # the link is gone: the router moves the call
        finally:
            await channel.close()

    async def _serve(self, link: CallLink, call_id: str) -> None:
        max_frame_bytes = self._host.config.max_frame_bytes
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                first = await link.receive()
        except TimeoutError:
            await link.send_str(error_frame(ErrorCode.NOT_STARTED, "no start frame"))
            return
        if first is None:
            return
        try:
            start = parse_inbound(first, max_frame_bytes)
        except ProtocolError as exc:
            await link.send_str(error_frame(exc.code, exc.message, seq=exc.seq))
            return
        if start.type is not In.START:
            await link.send_str(error_frame(ErrorCode.NOT_STARTED, "first frame must be start"))
            return
        tenant, caller = start.body["tenant"], start.body.get("caller", "anonymous")
        session = CallSession(self._host.services, tenant, call_id, caller, link.send_str)
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
            await pump(link, session, max_frame_bytes)
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
                self._host.adopt_leftover(session)

    def _may_come_back(self, session: CallSession) -> bool:
        """A live call whose link ended without a hangup (the client or its router went
        away) waits for a reconnect, through any router, for the grace."""
        return (
            session.detached
            and self._host.config.reconnect_grace_ms > 0
            and not self._host.draining
            and not self._host.closed
        )

    async def _grace(self, key: tuple[str, str], session: CallSession) -> None:
        """Wait out the reconnect grace of a detached call, then end it and release it."""
        try:
            await asyncio.sleep(self._host.config.reconnect_grace_ms / 1000)
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
            self._host.adopt_leftover(session)
