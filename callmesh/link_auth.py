"""Authentication of the router-node link handshake: only routers reach nodes.

A router proves it holds the cluster's link secret (``CALLMESH_LINK_SECRET``) in the
WebSocket upgrade request of its link (and of a detailed ``/v1/status``), header
``X-Callmesh-Link-Auth: v1.<unix time>.<nonce>.<hex HMAC-SHA256>``, the HMAC over the
version, time, nonce, the router's id and the request path. A node accepts it once:
within ``WINDOW_S`` of its own clock and with a nonce it has not seen in that window, so
a recorded handshake cannot be replayed (outside the window the time refuses it, inside
it the nonce does). Sans-I/O: the clock is injected, the caller reads the header.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable

HEADER = "X-Callmesh-Link-Auth"
ROUTER_HEADER = "X-Callmesh-Router"
VERSION = "v1"
WINDOW_S = 30.0
# Nonces remembered at once: far above any honest rate of link handshakes; past it the
# oldest go first (they are about to leave the window anyway).
MAX_NONCES = 100_000
_MAX_HEADER_CHARS = 256
_MIN_SECRET_CHARS = 32


class LinkAuthError(Exception):
    """The handshake does not prove the link secret (missing, stale, replayed, forged)."""


class LinkAuth:
    """Signs (router side) and checks (node side) link handshakes with one secret."""

    def __init__(self, secret: str, clock: Callable[[], float] = time.time) -> None:
        if len(secret) < _MIN_SECRET_CHARS:
            raise ValueError(f"the link secret needs {_MIN_SECRET_CHARS}+ characters")
        self._key = secret.encode()
        self._clock = clock
        self._seen: OrderedDict[str, float] = OrderedDict()

    def __repr__(self) -> str:
        return f"<LinkAuth [{len(self._seen)} nonces]>"

    def _mac(self, ts: str, nonce: str, router_id: str, path: str) -> str:
        data = "\0".join((VERSION, ts, nonce, router_id, path)).encode()
        return hmac.new(self._key, data, hashlib.sha256).hexdigest()

    def sign(self, router_id: str, path: str) -> str:
        """The header value for one request of ``router_id`` to ``path``."""
        ts, nonce = str(int(self._clock())), secrets.token_hex(16)
        return f"{VERSION}.{ts}.{nonce}.{self._mac(ts, nonce, router_id, path)}"

    def check(self, value: object, router_id: object, path: str) -> None:
        """Accept a handshake once; raise LinkAuthError otherwise."""
        if not isinstance(value, str) or not 0 < len(value) <= _MAX_HEADER_CHARS:
            raise LinkAuthError("link authentication missing")
        parts = value.split(".")
        if len(parts) != 4 or parts[0] != VERSION or not parts[1].isdigit():
            raise LinkAuthError("link authentication malformed")
        _, ts, nonce, mac = parts
        rid = router_id if isinstance(router_id, str) else ""
        expected = self._mac(ts, nonce, rid, path)
        if not hmac.compare_digest(expected.encode(), mac.encode(errors="replace")):
            raise LinkAuthError("link authentication does not verify")
        now = self._clock()
        if abs(now - int(ts)) > WINDOW_S:
            raise LinkAuthError("link authentication outside the time window")
        # A time up to WINDOW_S ahead stays acceptable until WINDOW_S after it: a nonce
        # is remembered for twice the window.
        self._forget_before(now - 2 * WINDOW_S)
        if nonce in self._seen:
            raise LinkAuthError("link authentication replayed")
        self._seen[nonce] = now
        while len(self._seen) > MAX_NONCES:
            self._seen.popitem(last=False)

    def _forget_before(self, cutoff: float) -> None:
        while self._seen:
            nonce, seen_at = next(iter(self._seen.items()))
            if seen_at >= cutoff:
                return
            del self._seen[nonce]
