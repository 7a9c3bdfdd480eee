"""The router's bounds on what a client may hold or send (docs/protocol.md, "Limits").

- a connection must send ``start`` within ``start_timeout_s`` (else close 4408);
- open connections per router and per tenant are capped (else close 4429);
- per-tenant concurrent calls and new calls per second are enforced across every router,
  in Redis (:class:`state_store.quota.CallQuota`; else an ``over_limit`` error, close 4429);
- each connection's frame rate is a token bucket (:class:`FrameRate`): a frame over it is
  refused with one ``rate_limited`` error per second, and a client that keeps sending at
  twice the rate for a second is closed with 4429.

Every check is O(1) on the connection's own state, so a client over a bound costs no other
call anything. Only :class:`Admission` does I/O (the quota and closing connections).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from callmesh import metric_names as names
from callmesh.protocol import CloseCode, ErrorCode
from callmesh.telemetry import Metrics
from router.links import ClientLink
from state_store.errors import StateStoreError
from state_store.quota import CallQuota, QuotaVerdict

log = logging.getLogger("callmesh.router.limits")


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """From :class:`callmesh.config.RouterConfig`; 0 turns a cap off."""

    start_timeout_s: float = 5.0
    max_connections: int = 10_000
    max_connections_per_tenant: int = 10_000
    max_calls_per_tenant: int = 10_000
    max_new_calls_per_tenant_per_s: int = 500
    call_lease_s: float = 60.0
    max_frames_per_s: float = 200.0
    frame_burst: int = 400


class Rate(Enum):
    ADMIT = "admit"
    REFUSE = "refuse"  # drop the frame; tell the client (``tell``)
    CLOSE = "close"  # sustained: close the connection with 4429


class FrameRate:
    """A connection's frame budget: a token bucket of ``burst`` frames refilled at
    ``per_s``. Refusals are counted per one-second window; more refusals in a window than
    ``per_s`` (the client sends at over twice the rate) means it does not slow down."""

    __slots__ = ("_burst", "_per_s", "_refused", "_stamp", "_tokens", "_window", "told")

    def __init__(self, per_s: float, burst: int) -> None:
        self._per_s = per_s
        self._burst = float(max(1, burst))
        self._tokens = self._burst
        self._stamp = time.monotonic()
        self._window = self._stamp
        self._refused = 0
        # True when the client was already told about this window's refusals.
        self.told = False

    def admit(self, now: float) -> Rate:
        if self._per_s <= 0:
            return Rate.ADMIT
        tokens = self._tokens + (now - self._stamp) * self._per_s
        self._stamp = now
        if tokens >= 1.0:
            self._tokens = min(tokens, self._burst) - 1.0
            return Rate.ADMIT
        self._tokens = tokens
        if now - self._window >= 1.0:
            self._window, self._refused, self.told = now, 0, False
        self._refused += 1
        return Rate.CLOSE if self._refused > self._per_s else Rate.REFUSE


class RelinkCap:
    """A call's relinks within a sliding window: one that keeps losing its link is ended
    instead of looping (``max_relinks`` 0: no cap)."""

    __slots__ = ("_max", "_relinks", "_window_s")

    def __init__(self, max_relinks: int, window_s: float) -> None:
        self._max = max_relinks
        self._window_s = window_s
        self._relinks: deque[float] = deque()

    def exceeded(self, now: float) -> bool:
        """Count one more relink; True when there were more than ``max_relinks`` in the
        window."""
        if not self._max:
            return False
        relinks = self._relinks
        relinks.append(now)
        while relinks and now - relinks[0] > self._window_s:
            relinks.popleft()
        return len(relinks) > self._max


class Session(Protocol):
    """What admission needs of a proxied call (:class:`router.proxy.ProxySession`)."""

    link: ClientLink
    tenant: str
    call_id: str

    async def wait_start(self) -> bool: ...

    @property
    def ended(self) -> bool: ...


class Admission:
    """Connections, start deadlines and call quotas of one router."""

    def __init__(self, limits: ConnectionLimits, metrics: Metrics, quota: CallQuota | None) -> None:
        self.limits = limits
        self._metrics = metrics
        self._quota = quota
        self.connections = 0
        self.by_tenant: Counter[str] = Counter()
        # Calls holding a quota slot, renewed while they are here: (tenant, call_id).
        self._held: set[tuple[str, str]] = set()

    def connect(self) -> bool:
        """A new client connection; False (not counted) over the router's cap."""
        cap = self.limits.max_connections
        if cap and self.connections >= cap:
            self._metrics.inc(names.REFUSED, bound="connections")
            return False
        self.connections += 1
        return True

    async def start(self, session: Session) -> bool:
        """Wait for the session's ``start`` (bounded), then admit its tenant and call.
        False when the connection was refused (and closed) or the client left."""
        return await self.wait_start(session) and await self.admit(session)

    async def wait_start(self, session: Session) -> bool:
        """Wait for the session's ``start``, bounded. False when the connection was refused
        (and closed) or the client left."""
        try:
            async with asyncio.timeout(self.limits.start_timeout_s):
                return await session.wait_start()
        except TimeoutError:
            self._metrics.inc(names.REFUSED, bound="start_timeout")
            await _close(session.link, CloseCode.START_TIMEOUT, "start_timeout")
            return False

    async def admit(self, session: Session) -> bool:
        """Admit a started session's tenant and call against the caps and quotas (its
        tenant must be the verified one: the router authenticates first). False when
        refused (and closed)."""
        tenant = session.tenant
        cap = self.limits.max_connections_per_tenant
        if cap and self.by_tenant[tenant] >= cap:
            return await self._refuse(session, "tenant_connections", "too many connections")
        self.by_tenant[tenant] += 1
        if self._quota is None:
            return True
        try:
            verdict = await self._quota.acquire(
                tenant,
                session.call_id,
                max_calls=self.limits.max_calls_per_tenant,
                max_new_per_s=self.limits.max_new_calls_per_tenant_per_s,
                lease_ms=int(self.limits.call_lease_s * 1000),
            )
        except StateStoreError:
            # Quotas protect the cluster; without Redis no call can be placed anyway,
            # and the proxy reports that as it always has.
            return True
        if verdict is QuotaVerdict.TOO_MANY_CALLS:
            return await self._refuse(session, "tenant_calls", "too many calls for the tenant")
        if verdict is QuotaVerdict.TOO_FAST:
            return await self._refuse(session, "tenant_call_rate", "too many new calls a second")
        self._held.add((tenant, session.call_id))
        return True

    async def _refuse(self, session: Session, what: str, message: str) -> bool:
        self._metrics.inc(names.REFUSED, bound=what)
        await session.link.refuse(ErrorCode.OVER_LIMIT, message)
        await _close(session.link, CloseCode.OVER_LIMIT, what)
        if what != "tenant_connections":
            self.by_tenant[session.tenant] -= 1
        return False

    async def release(self, session: Session, *, started: bool) -> None:
        """The connection closed. The call's quota slot goes with it if the call ended;
        a caller who left without hanging up keeps it until its lease runs out (the node
        ends the call after the reconnect grace, and a reconnect renews the slot)."""
        self.connections -= 1
        if not started:
            return
        tenant = session.tenant
        self.by_tenant[tenant] -= 1
        if self.by_tenant[tenant] <= 0:
            del self.by_tenant[tenant]
        key = (tenant, session.call_id)
        if key not in self._held:
            return
        self._held.discard(key)
        if session.ended and self._quota is not None:
            with contextlib.suppress(StateStoreError):
                await self._quota.release(tenant, session.call_id)

    async def renew_forever(self) -> None:
        """Renew the leases of the calls held here (a crashed router's lapse)."""
        if self._quota is None:
            return
        every = max(0.05, self.limits.call_lease_s / 3)
        while True:
            await asyncio.sleep(every)
            try:
                await self._quota.renew(list(self._held), int(self.limits.call_lease_s * 1000))
            except StateStoreError as exc:
                log.warning("quota lease renewal failed", extra={"fields": {"error": str(exc)}})


async def _close(link: ClientLink, code: int, reason: str) -> None:
    with contextlib.suppress(ConnectionError, RuntimeError):
        await link.close(code, reason.encode())
