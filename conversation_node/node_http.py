"""The node's operational HTTP endpoints: liveness, readiness, the status summary and the
Prometheus metrics."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from aiohttp import web

from callmesh.metric_names import DRAINING, LIVE_CALLS, NATS_UP, REDIS_UP, UNSAVED_CALLS
from callmesh.mux import Mux
from conversation_node.node_services import NodeServices
from conversation_node.router_auth import RouterAuth
from conversation_node.session import CallSession

STATUS_PATH = "/v1/status"


class ObservedNode(Protocol):
    """What the endpoints read of the node
    (:class:`conversation_node.app.ConversationNode`)."""

    @property
    def node_id(self) -> str: ...

    @property
    def draining(self) -> bool: ...

    @property
    def sessions(self) -> Mapping[tuple[str, str], CallSession]: ...

    @property
    def links(self) -> Iterable[Mux]: ...

    @property
    def services(self) -> NodeServices: ...

    def redis_ok(self) -> bool: ...

    def nats_ok(self) -> bool: ...

    def provider_names(self) -> dict[str, str]: ...

    def drainer_summary(self) -> str: ...


class NodeHttp:
    """The handlers of ``/livez``, ``/readyz``, ``/v1/status`` and ``/metrics``."""

    def __init__(self, node: ObservedNode, router_auth: RouterAuth) -> None:
        self._node = node
        self._router_auth = router_auth

    async def livez(self, request: web.Request) -> web.Response:
        """Liveness: the process serves HTTP. 200 while draining too: a restart mid-drain
        would drop the calls being handed off."""
        return web.json_response({"status": "draining" if self._node.draining else "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        """Readiness: 200 while the node takes new calls: not draining, Redis reachable
        (without it no ownership can be taken or checkpoint written)."""
        draining = self._node.draining
        redis = self._node.redis_ok()
        ready = not draining and redis
        reason = "draining" if draining else "ok" if redis else "redis unreachable"
        return web.json_response({"status": reason, "redis": redis}, status=200 if ready else 503)

    async def status(self, request: web.Request) -> web.Response:
        node = self._node
        metrics = node.services.metrics
        summary: dict[str, Any] = {
            "node": node.node_id,
            "draining": node.draining,
            "calls": len(node.sessions),
            "metrics": metrics.snapshot(),
            "histograms": {name: h.to_dict() for name, h in metrics.histograms.items()},
            "providers": node.provider_names(),
            "outbox_drainer": node.drainer_summary(),
        }
        # Call ids and tenants only for routers (and operators holding the link secret).
        auth = self._router_auth
        detailed = not auth.enabled or (
            auth.offered(request) and auth.authenticated(request, STATUS_PATH)
        )
        if detailed:
            summary["sessions"] = [repr(s) for s in node.sessions.values()]
            summary["links"] = [repr(mux) for mux in node.links]
        return web.json_response(summary)

    async def metrics(self, request: web.Request) -> web.Response:
        node = self._node
        m = node.services.metrics
        m.set(LIVE_CALLS, len(node.sessions))
        m.set(UNSAVED_CALLS, sum(1 for s in node.sessions.values() if s.unsaved))
        m.set(DRAINING, float(node.draining))
        m.set(REDIS_UP, float(node.redis_ok()))
        m.set(NATS_UP, float(node.nats_ok()))
        return web.Response(text=m.render(), content_type="text/plain")
