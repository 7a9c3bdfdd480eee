"""Whether an HTTP request to the node comes from a router: it proves the link secret."""

from __future__ import annotations

import logging

from aiohttp import web

from callmesh.link_auth import HEADER as LINK_AUTH_HEADER
from callmesh.link_auth import ROUTER_HEADER, LinkAuth, LinkAuthError

log = logging.getLogger("callmesh.node")


class RouterAuth:
    """Checks the link-secret proof a router sends (``callmesh.link_auth``); with no
    secret (authentication explicitly disabled) every request passes."""

    def __init__(self, link_auth: LinkAuth | None) -> None:
        self._link_auth = link_auth

    @property
    def enabled(self) -> bool:
        return self._link_auth is not None

    def authenticated(self, request: web.Request, path: str) -> bool:
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

    def offered(self, request: web.Request) -> bool:
        """Whether the request carries a proof at all (a router's, or an operator's)."""
        return LINK_AUTH_HEADER in request.headers
