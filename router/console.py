"""The browser console served by the router: talk to an agent, watch the call, inspect it.

Pages (static files in ``router/console_static``, no build step, no external assets):

- ``GET /console``: place a call from the browser (microphone in, agent audio out, live
  transcript, per-turn latency, fallbacks, the owner node and epoch, failover);
- ``GET /console/calls/{call_id}``: the call inspector (the replay of its event log).

API (JSON; a call token in ``Authorization: Bearer``, router/console_auth.py; the tenant
and caller are the token's):

- ``POST /console/dev-token`` ``{"tenant": T, "caller": C}``: a short-lived token.
  **Development mode only** (the router has ``CALLMESH_DEV_SECRET``, which ``callmesh up``
  generates) and only to loopback clients; elsewhere it does not exist (404);
- ``GET /console/api/calls/{call_id}/stream?token=...`` (WebSocket; scope ``call``, a call
  id the token covers): the native call protocol (docs/protocol.md), bound to the token's
  tenant and caller: a ``start`` naming others is refused and the connection closed (4403);
- ``GET /console/api/calls`` and ``GET /console/api/calls/{call_id}`` (scope ``inspect``):
  the tenant's calls and one call's replay (router/console_replay.py);
- ``POST /console/api/calls/{call_id}/kill-owner``: development mode with the local
  cluster's control (``CALLMESH_DEV_CONTROL_URL``) only: the router asks the local
  cluster (localcluster/devcontrol.py) to SIGKILL the node that owns the call.
"""

from __future__ import annotations

import json
import logging
import mimetypes
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from aiohttp import web

from callmesh.auth import SCOPE_CALL, AuthError, CallGrant
from callmesh.config import RouterConfig
from callmesh.metric_names import CONSOLE_CALLS_ACCEPTED, CONSOLE_NODES_KILLED
from callmesh.protocol import ErrorCode, In, Inbound, valid_id
from callmesh.telemetry import Metrics
from router.call_intake import CallIntake
from router.console_auth import SCOPE_INSPECT, ConsoleTokens
from router.console_replay import ReplayReader, ReplayUnavailable
from router.links import NativeLink

log = logging.getLogger("callmesh.router.console")

STATIC_DIR = Path(__file__).with_name("console_static")
CLOSE_WRONG_TENANT = 4403
MAX_BODY_BYTES = 4096
KILL_TIMEOUT_S = 3.0
_LOOPBACK = frozenset({"127.0.0.1", "::1", "::ffff:127.0.0.1"})


class _Call(Protocol):
    @property
    def node_id(self) -> str | None: ...


class Router(Protocol):
    """What the console needs of :class:`router.app.Router` (which registers it)."""

    config: RouterConfig
    metrics: Metrics

    @property
    def calls(self) -> Mapping[tuple[str, str], _Call]: ...

    @property
    def http(self) -> aiohttp.ClientSession: ...

    @property
    def intake(self) -> CallIntake: ...


class TenantBoundLink(NativeLink):
    """The native protocol, for one tenant and caller: a ``start`` naming others is
    refused."""

    kind = "console"
    resumable = True  # with the call's current resume secret

    def __init__(
        self,
        ws: web.WebSocketResponse,
        call_id: str,
        grant: CallGrant,
        metrics: Metrics,
        max_frame_bytes: int,
    ) -> None:
        super().__init__(ws, call_id, metrics, max_frame_bytes)
        self.grant = grant

    async def receive(self) -> Inbound | None:
        inbound = await super().receive()
        # Tenant and caller are the token's, never what the client writes in ``start``.
        if inbound is not None and inbound.type is In.START:
            body, grant = inbound.body, self.grant
            if (body.get("tenant"), body.get("caller", "anonymous")) == (
                grant.tenant,
                grant.caller,
            ):
                return inbound
            await self.refuse(
                ErrorCode.BAD_MESSAGE, "the token is for another tenant or caller", inbound.seq
            )
            await self.close(CLOSE_WRONG_TENANT, b"wrong tenant")
            return None
        return inbound


class Console:
    """The console's routes; registered by :meth:`router.app.Router.app`."""

    def __init__(self, router: Router) -> None:
        self._r = router
        self._config = router.config
        self._replay = ReplayReader(router.config.backends)
        self._token_keys: ConsoleTokens | None = None
        # A few small files, read once: serving them never touches the disk.
        self._files = {p.name: p.read_bytes() for p in STATIC_DIR.iterdir() if p.is_file()}

    @property
    def dev(self) -> bool:
        return bool(self._config.dev_secret)

    def register(self, app: web.Application) -> None:
        add = app.router.add_get
        add("/console", self.index)
        add("/console/", self.index)
        add("/console/calls/{call_id}", self.inspector)
        add("/console/static/{name}", self.static)
        add("/console/api/config", self.api_config)
        add("/console/api/calls", self.api_calls)
        add("/console/api/calls/{call_id}", self.api_call)
        add("/console/api/calls/{call_id}/stream", self.stream)
        app.router.add_post("/console/dev-token", self.dev_token)
        app.router.add_post("/console/api/calls/{call_id}/kill-owner", self.kill_owner)
        app.on_cleanup.append(self._cleanup)

    async def _cleanup(self, _app: web.Application) -> None:
        await self._replay.aclose()

    # ------------------------------------------------------------------ pages

    def _file(self, name: str) -> web.Response:
        body = self._files.get(name)
        if body is None:
            raise web.HTTPNotFound(reason="no such console file")
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype.endswith("javascript"):
            ctype += "; charset=utf-8"
        resp = web.Response(body=body, headers={"Content-Type": ctype})
        _secure(resp)
        return resp

    async def index(self, request: web.Request) -> web.Response:
        return self._file("index.html")

    async def inspector(self, request: web.Request) -> web.Response:
        if not valid_id(request.match_info["call_id"]):
            raise web.HTTPBadRequest(reason="call id must match [A-Za-z0-9_-]{1,64}")
        return self._file("inspector.html")

    async def static(self, request: web.Request) -> web.Response:
        return self._file(request.match_info["name"])

    async def api_config(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "dev": self.dev,
                "kill": self.dev and bool(self._config.dev_control_url),
                "router": self._config.router_id,
            }
        )

    # ------------------------------------------------------------------ tokens

    def _dev_only(self, request: web.Request) -> None:
        # Outside development mode these routes do not exist; in it, only this machine.
        if not self.dev:
            raise web.HTTPNotFound(reason="not found")
        if request.remote not in _LOOPBACK:
            raise web.HTTPForbidden(reason="development endpoints answer loopback clients only")

    async def dev_token(self, request: web.Request) -> web.Response:
        self._dev_only(request)
        body = await _json_body(request)
        tenant = body.get("tenant", "demo")
        caller = body.get("caller", "console")
        if not (valid_id(tenant) and valid_id(caller)):
            raise web.HTTPBadRequest(reason="tenant and caller must match [A-Za-z0-9_-]{1,64}")
        tokens = self._tokens()
        token = tokens.mint(tenant, caller)
        grant = await tokens.verify(token, scope=SCOPE_CALL)
        return web.json_response(
            {
                "token": token,
                "tenant": tenant,
                "caller": caller,
                "call_prefix": grant.call_prefix,
                "expires_at": int(grant.expires_at),
            },
            headers={"Cache-Control": "no-store"},
        )

    def _tokens(self) -> ConsoleTokens:
        if not self.dev:
            # No signing key outside development mode yet (see router/console_auth.py).
            raise web.HTTPUnauthorized(reason="console tokens need development mode for now")
        if self._token_keys is None:
            self._token_keys = ConsoleTokens(self._config.dev_secret)
        return self._token_keys

    async def _grant(
        self,
        request: web.Request,
        scope: str,
        call_id: str | None = None,
        token: str | None = None,
    ) -> CallGrant:
        tokens = self._tokens()
        if token is None:
            kind, _, token = request.headers.get("Authorization", "").partition(" ")
            if kind.lower() != "bearer":
                raise web.HTTPUnauthorized(reason="send Authorization: Bearer TOKEN")
        try:
            return await tokens.verify(token, scope=scope, call_id=call_id)
        except AuthError as exc:
            raise _refused(exc.refusal.http_status, exc.refusal.reason) from None

    # ------------------------------------------------------------------ calls

    async def stream(self, request: web.Request) -> web.StreamResponse:
        call_id = request.match_info["call_id"]
        if not valid_id(call_id):
            raise web.HTTPBadRequest(reason="call id must match [A-Za-z0-9_-]{1,64}")
        grant = await self._grant(request, SCOPE_CALL, call_id, request.query.get("token", ""))
        cfg = self._config
        ws = web.WebSocketResponse(max_msg_size=cfg.max_frame_bytes * 4, heartbeat=20)
        await ws.prepare(request)
        self._r.metrics.inc(CONSOLE_CALLS_ACCEPTED)
        link = TenantBoundLink(ws, call_id, grant, self._r.metrics, cfg.max_frame_bytes)
        return await self._r.intake.serve(ws, link, grant, token_in_start=False)

    async def api_calls(self, request: web.Request) -> web.Response:
        tenant = (await self._grant(request, SCOPE_INSPECT)).tenant
        try:
            calls = await self._replay.calls(tenant)
        except ReplayUnavailable as exc:
            raise web.HTTPServiceUnavailable(reason=str(exc)) from None
        live = {cid for (t, cid) in self._r.calls if t == tenant}
        # Messages in the call's log: one per committed turn (or effect delivery), not records.
        rows = [{"call_id": c, "messages": n, "live": c in live} for c, n in calls.items()]
        return web.json_response({"tenant": tenant, "calls": rows})

    async def api_call(self, request: web.Request) -> web.Response:
        call_id = request.match_info["call_id"]
        if not valid_id(call_id):
            raise web.HTTPBadRequest(reason="call id must match [A-Za-z0-9_-]{1,64}")
        tenant = (await self._grant(request, SCOPE_INSPECT)).tenant
        try:
            report = await self._replay.report(tenant, call_id)
        except ReplayUnavailable as exc:
            raise web.HTTPServiceUnavailable(reason=str(exc)) from None
        if report is None:
            # Another tenant's call is as unknown as a call that never was.
            raise web.HTTPNotFound(reason=f"no call {call_id} for tenant {tenant}")
        report["live"] = (tenant, call_id) in self._r.calls
        return web.Response(
            text=json.dumps(report, ensure_ascii=False, default=str),
            content_type="application/json",
        )

    async def kill_owner(self, request: web.Request) -> web.Response:
        self._dev_only(request)
        call_id = request.match_info["call_id"]
        if not valid_id(call_id):
            raise web.HTTPBadRequest(reason="call id must match [A-Za-z0-9_-]{1,64}")
        grant = await self._grant(request, SCOPE_CALL, call_id)
        control = self._config.dev_control_url
        if not control:
            raise web.HTTPNotFound(reason="no local cluster control: run `callmesh up`")
        session = self._r.calls.get((grant.tenant, call_id))
        node = session.node_id if session is not None else None
        if not node or not valid_id(node):
            raise web.HTTPNotFound(reason="no live call with an owner on this router")
        try:
            async with self._r.http.post(
                f"{control}/v1/dev/nodes/{node}/kill",
                headers={"Authorization": f"Bearer {self._config.dev_secret}"},
                timeout=aiohttp.ClientTimeout(total=KILL_TIMEOUT_S),
            ) as resp:
                answer = await resp.json(content_type=None)
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise web.HTTPBadGateway(reason=f"local cluster control: {exc}") from None
        if status != 200:
            reason = str(answer.get("message") if isinstance(answer, dict) else answer)
            raise web.HTTPBadGateway(reason=f"local cluster control refused: {reason}")
        self._r.metrics.inc(CONSOLE_NODES_KILLED)
        log.warning("owner node killed from the console", extra={"fields": {"node": node}})
        return web.json_response({"killed": node, **answer})


async def _json_body(request: web.Request) -> dict[str, Any]:
    if (request.content_length or 0) > MAX_BODY_BYTES:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY_BYTES, actual_size=0)
    raw = await request.content.read(MAX_BODY_BYTES + 1)
    if len(raw) > MAX_BODY_BYTES:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY_BYTES, actual_size=len(raw))
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise web.HTTPBadRequest(reason="body must be JSON") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(reason="body must be a JSON object")
    return body


def _refused(status: int, reason: str) -> web.HTTPException:
    return (
        web.HTTPForbidden(reason=reason) if status == 403 else web.HTTPUnauthorized(reason=reason)
    )


def _secure(resp: web.Response) -> None:
    # Same-origin scripts only; the call WebSocket is same-origin too (ws: and wss: of
    # this host are covered by 'self' in CSP level 3 browsers).
    resp.headers["Content-Security-Policy"] = (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; media-src 'self' blob:; frame-ancestors 'none'; base-uri 'none'"
    )
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Referrer-Policy"] = "no-referrer"
    resp.headers["Cache-Control"] = "no-cache"
