"""How a call comes in: the native and Twilio endpoints, the authentication and limits
checked before a call starts, and the proxied call's registration until it ends."""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Protocol

from aiohttp import web

from callmesh import metric_names as names
from callmesh.auth import AuthError, CallGrant
from callmesh.config import RouterConfig
from callmesh.protocol import CloseCode, ErrorCode, valid_id
from callmesh.telemetry import Metrics
from router.call_auth import CallAuth, bearer_token, sanitized_start
from router.limits import Admission
from router.links import ClientLink, NativeLink
from router.proxy import ProxySession
from router.proxy_ports import CallLimits, CallPlacement, NodeLinkOpener
from router.twilio import TwilioLink
from router.twilio_webhook import action_webhook, voice_webhook
from state_store.errors import StateStoreError
from state_store.store import StateStore

log = logging.getLogger("callmesh.router")


class IntakeHost(Protocol):
    """What taking calls needs of the router (:class:`router.app.Router`)."""

    config: RouterConfig
    metrics: Metrics
    limits: CallLimits
    auth: CallAuth
    admission: Admission
    calls: dict[tuple[str, str], ProxySession]

    @property
    def draining(self) -> bool: ...

    @property
    def placement(self) -> CallPlacement: ...

    @property
    def node_links(self) -> NodeLinkOpener: ...

    @property
    def store(self) -> StateStore: ...

    async def move(self, session: ProxySession) -> None: ...

    def call_left(self) -> None: ...


class CallIntake:
    """The router's call endpoints; every call runs as a :class:`ProxySession` registered
    in the router's ``calls`` while it is live."""

    def __init__(self, host: IntakeHost) -> None:
        self._host = host

    async def call(self, request: web.Request) -> web.StreamResponse:
        host = self._host
        call_id = request.match_info["call_id"]
        if not valid_id(call_id):
            raise web.HTTPBadRequest(reason="call id must match [A-Za-z0-9_-]{1,64}")
        self._refuse_if_draining()
        # The hard cap closes with 1009; frames between the limit and the cap get an error
        # frame and the call goes on.
        ws = web.WebSocketResponse(max_msg_size=host.config.max_frame_bytes * 4, heartbeat=20)
        await ws.prepare(request)
        host.metrics.inc(names.CALLS_ACCEPTED)
        link = NativeLink(ws, call_id, host.metrics, host.config.max_frame_bytes)
        grant: CallGrant | None = None
        header = request.headers.get("Authorization")
        if header is not None and not host.auth.disabled:
            # Checked before anything else is read or touched.
            try:
                grant = await host.auth.grant(bearer_token(header), call_id)
            except AuthError as exc:
                return await self._refuse(ws, link, exc)
        return await self.serve(ws, link, grant, token_in_start=header is None)

    async def twilio_media(self, request: web.Request) -> web.StreamResponse:
        # Twilio does not negotiate compression; refusing it keeps 50 frames/s cheap.
        # No heartbeat: see router.app.TWILIO_IDLE_S.
        host = self._host
        self._refuse_if_draining()
        ws = web.WebSocketResponse(max_msg_size=host.config.max_frame_bytes * 4, compress=False)
        await ws.prepare(request)
        host.metrics.inc(names.TWILIO_STREAMS_ACCEPTED)
        link = TwilioLink(ws, host.metrics, host.config.max_frame_bytes, host.auth.stream_key)
        return await self.serve(ws, link, None, token_in_start=False)

    async def twilio_voice(self, request: web.Request) -> web.Response:
        self._refuse_if_draining()
        host = self._host
        return await voice_webhook(request, host.config, host.metrics, host.auth.stream_key)

    async def twilio_action(self, request: web.Request) -> web.Response:
        # A draining router still answers the action of a stream it just ended: the TwiML
        # names the stream URL of the public base, which the load balancer sends elsewhere.
        host = self._host
        return await action_webhook(
            request, host.config, host.metrics, host.store, host.auth.stream_key
        )

    def _refuse_if_draining(self) -> None:
        if self._host.draining:
            self._host.metrics.inc(names.ROUTER_DRAIN_REFUSED)
            raise web.HTTPServiceUnavailable(reason="router draining: use another router")

    async def _refuse(
        self, ws: web.WebSocketResponse, link: ClientLink, exc: AuthError
    ) -> web.WebSocketResponse:
        refusal = exc.refusal
        self._host.metrics.inc(names.CALLS_REFUSED, reason=refusal.reason)
        # The cause for the operator; never the token or secret itself.
        log.info(
            "call refused",
            extra={"fields": {"call_id": link.call_id, "reason": refusal.reason, "why": str(exc)}},
        )
        if not ws.closed:
            await link.close(refusal.close_code, refusal.reason.encode())
        return ws

    async def serve(
        self,
        ws: web.WebSocketResponse,
        link: ClientLink,
        grant: CallGrant | None,
        *,
        token_in_start: bool,
    ) -> web.WebSocketResponse:
        """One call on an upgraded client socket, from its ``start`` until it ends."""
        host = self._host
        if not host.admission.connect():
            await ws.close(code=CloseCode.OVER_LIMIT, message=b"connections")
            return ws
        session = ProxySession(link, host.placement, host.node_links, host.metrics, host.limits)
        key: tuple[str, str] | None = None
        admitted = False
        try:
            # Bounded start (router.limits); the tenant's caps and quotas once it is verified.
            if not await host.admission.wait_start(session):
                return ws
            if host.draining:
                # Before admission: a client moved elsewhere keeps its current resume secret.
                await host.move(session)
                return ws
            start = session.start
            assert start is not None
            try:
                if token_in_start and not host.auth.disabled:
                    grant = await host.auth.grant(start.body.get("token"), link.call_id)
                admission = await host.auth.admit(
                    grant,
                    start,
                    link.call_id,
                    resumable=link.resumable,
                    proven=link.kind == "twilio",
                )
            except AuthError as exc:
                return await self._refuse(ws, link, exc)
            except StateStoreError as exc:
                # The call's records could not be read (Redis away, or every pooled
                # connection busy under load): a refusal the client may retry, not an
                # unhandled error.
                log.warning(
                    "call not admitted: state store unavailable",
                    extra={"fields": {"call_id": link.call_id, "error": str(exc)}},
                )
                await link.refuse(ErrorCode.UNAVAILABLE, "state store unavailable; try again")
                await link.close(CloseCode.UNAVAILABLE, b"state_store")
                return ws
            session.admit(
                sanitized_start(start, admission.tenant, admission.caller),
                admission.tenant,
                admission.secret,
            )
            session.on_ended = functools.partial(host.auth.release, admission)
            admitted = await host.admission.admit(session)
            if not admitted:
                # Over a quota: the call never went live, so neither does its resume record.
                await asyncio.shield(host.auth.release(admission))
                return ws
            key = (session.tenant, session.call_id)
            old = host.calls.get(key)
            if old is not None:
                # The call's own client reconnected (it proved the resume secret): the
                # newest connection wins.
                await old.link.close(CloseCode.GOING_AWAY, b"replaced")
            host.calls[key] = session
            await session.run()
        finally:
            if key is not None and host.calls.get(key) is session:
                del host.calls[key]
                host.call_left()
            await asyncio.shield(host.admission.release(session, started=admitted))
            if not ws.closed:
                await ws.close()
        return ws
