"""The router's operational HTTP endpoints (liveness, readiness, status, metrics) and the
JSON body of its HTTP errors."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from aiohttp import web

from callmesh import metric_names as names
from callmesh.config import RouterConfig
from callmesh.protocol import Out
from callmesh.telemetry import Metrics
from router.membership import MembershipView


class LinkSummary(Protocol):
    def summary(self) -> Any: ...


class ObservedRouter(Protocol):
    """What the endpoints read of the router (:class:`router.app.Router`)."""

    config: RouterConfig
    metrics: Metrics

    @property
    def draining(self) -> bool: ...

    @property
    def calls(self) -> Mapping[tuple[str, str], object]: ...

    @property
    def membership(self) -> MembershipView: ...

    @property
    def node_links(self) -> LinkSummary: ...


class RouterHttp:
    """The handlers of ``/livez``, ``/readyz``, ``/v1/status`` and ``/metrics``."""

    def __init__(self, router: ObservedRouter) -> None:
        self._r = router

    async def livez(self, request: web.Request) -> web.Response:
        """Liveness: the process serves HTTP (a restart would not help otherwise)."""
        return web.json_response({"status": "draining" if self._r.draining else "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        """Readiness: 200 only while a new call could be placed: not draining, and at
        least one node live (routable)."""
        if self._r.draining:
            return web.json_response({"status": "draining"}, status=503)
        nodes = len(self._r.membership.routable())
        body = {"status": "ok" if nodes else "no live node", "nodes": nodes}
        return web.json_response(body, status=200 if nodes else 503)

    async def status(self, request: web.Request) -> web.Response:
        r = self._r
        nodes = [
            {
                "node": n,
                "url": v.record.url,
                "state": v.record.state,
                "alive": v.alive,
                "suspect": v.suspect_since is not None,
                "calls": v.record.calls,
            }
            for n, v in sorted(r.membership.nodes.items())
        ]
        return web.json_response(
            {
                "router": r.config.router_id,
                "draining": r.draining,
                "redis": r.membership.redis_ok,
                "calls": len(r.calls),
                "nodes": nodes,
                "links": r.node_links.summary(),
            }
        )

    async def metrics(self, request: web.Request) -> web.Response:
        r = self._r
        r.metrics.set(names.LIVE_CALLS, len(r.calls))
        r.metrics.set(names.DRAINING, float(r.draining))
        r.metrics.set(names.REDIS_UP, float(r.membership.redis_ok))
        return web.Response(text=r.metrics.render(), content_type="text/plain")


@web.middleware
async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every HTTP error (4xx, 5xx) answered with a JSON error body."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return web.json_response(
            {"type": Out.ERROR.value, "code": "http_" + str(exc.status), "message": exc.reason},
            status=exc.status,
        )
