"""Where a call runs: choosing its node, pinning it there, and knowing who is where.

A new call goes to a node chosen by consistent hashing with bounded loads
(:class:`~router.ring.BoundedLoadRing`) among the routable nodes: alive, not draining,
not suspect. The choice is pinned (a key in the state store) so that every router sends
the call's later connections to the same node while it lives; a pin is only replaced
when its node is no longer routable, and is forgotten when the call ends.

Placement also counts the calls this router holds on each node (a node's own count, in
its heartbeat, lags behind our latest placements) and confirms a suspicion about a node
with a health probe. It does no I/O itself: the node directory, the pin table and the
probe are given to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Protocol

import aiohttp

from callmesh import tracing
from router.ring import BoundedLoadRing
from state_store.errors import StateStoreError

# A paused node does not answer at all; a quarter second tells it from a busy one.
CONFIRM_TIMEOUT_S = 0.25
# When a node's link drops, every call on it asks at once whether the node is alive: one
# probe answers them all, and a node found not alive is taken as such, without asking
# again, for this long (a hundred probes of a dead port cost the router more than the
# relinks themselves, and delay them).
CONFIRMED_DOWN_S = 0.5

# A node's base URL → whether it answers healthy.
HealthProbe = Callable[[str], Awaitable[bool]]


class NodeDirectory(Protocol):
    """The cluster as this router sees it (:class:`router.membership.MembershipView`)."""

    def routable(self) -> list[str]:
        """Nodes new calls (and re-pins) may go to."""
        ...

    def loads(self) -> dict[str, int]:
        """Calls each known node reported in its last heartbeat."""
        ...

    def url(self, node_id: str) -> str | None: ...

    def suspect(self, node_id: str) -> None:
        """Keep new calls off the node until its heartbeat shows it is running."""
        ...


class PinTable(Protocol):
    """Call → node pins shared by every router (:class:`state_store.pins.PinStore`)."""

    async def get(self, tenant: str, call_id: str) -> str | None: ...

    async def set(self, tenant: str, call_id: str, node_id: str) -> None: ...

    async def clear(self, tenant: str, call_id: str, node_id: str) -> None:
        """Remove the pin only if it still names ``node_id``."""
        ...


class LiveCall(Protocol):
    """A call placed on a node, told when membership declares that node dead."""

    def node_died(self) -> None: ...


class Placement:
    """Chooses, pins and forgets calls' nodes; tracks the live calls on each node."""

    def __init__(
        self,
        nodes: NodeDirectory,
        pins: PinTable,
        probe: HealthProbe,
        ring: BoundedLoadRing,
    ) -> None:
        self._nodes = nodes
        self._pins = pins
        self._probe = probe
        self._ring = ring
        self._by_node: defaultdict[str, set[LiveCall]] = defaultdict(set)
        self._probing: dict[str, asyncio.Task[bool]] = {}  # node → the probe under way
        self._found_down: dict[str, float] = {}  # node → when a probe last failed

    def __repr__(self) -> str:
        live = sum(len(calls) for calls in self._by_node.values())
        return (
            f"<Placement [{len(self._nodes.routable())} routable nodes, "
            f"{live} live calls on {len(self._by_node)} nodes]>"
        )

    async def place(
        self, tenant: str, call_id: str, *, prefer_pin: bool, exclude: str | None = None
    ) -> str:
        """The node for a call: its pinned node if that is routable (and ``prefer_pin``),
        else a new choice, which is pinned. Raises :class:`~router.ring.NoNodeAvailable`."""
        attrs = {tracing.CALL_ID: call_id, tracing.TENANT: tenant, "callmesh.pin": prefer_pin}
        with tracing.span(tracing.PLACEMENT, attrs) as span:
            node = await self._place(tenant, call_id, prefer_pin=prefer_pin, exclude=exclude)
            span.set_attribute(tracing.NODE, node)
            return node

    async def _place(
        self, tenant: str, call_id: str, *, prefer_pin: bool, exclude: str | None
    ) -> str:
        if prefer_pin:
            pinned = await self._pins.get(tenant, call_id)
            if pinned and pinned != exclude and pinned in self._nodes.routable():
                return pinned
        candidates = [n for n in self._nodes.routable() if n != exclude]
        node = self._ring.choose(f"{tenant}/{call_id}", candidates, self.loads())
        await self._pins.set(tenant, call_id, node)
        return node

    async def forget(self, tenant: str, call_id: str, node: str) -> None:
        """The call ended on ``node``: drop its pin (unless another router re-pinned it).
        Best effort: a pin left behind expires, and names a node only while it lives."""
        with contextlib.suppress(StateStoreError):
            await self._pins.clear(tenant, call_id, node)

    async def confirm_alive(self, node: str) -> bool:
        """Confirm a suspicion: a dead process refuses connections at once; a draining
        node answers 503; a paused one does not answer within the timeout. Concurrent
        askers share one probe; a failed one stands for :data:`CONFIRMED_DOWN_S`."""
        url = self._nodes.url(node)
        if url is None:
            return False
        failed_at = self._found_down.get(node)
        if failed_at is not None and time.monotonic() - failed_at < CONFIRMED_DOWN_S:
            return False
        probe = self._probing.get(node)
        if probe is None:

            async def ask() -> bool:
                return await self._probe(url)

            probe = asyncio.get_running_loop().create_task(ask(), name=f"probe:{node}")
            self._probing[node] = probe
            probe.add_done_callback(lambda _: self._probing.pop(node, None))
        # Shielded: an asker that gives up must not cancel the others' answer.
        alive = await asyncio.shield(probe)
        if alive:
            self._found_down.pop(node, None)
        else:
            self._found_down[node] = time.monotonic()
        return alive

    def url(self, node: str) -> str | None:
        return self._nodes.url(node)

    def suspect(self, node: str) -> None:
        self._nodes.suspect(node)

    def loads(self) -> dict[str, int]:
        """Calls per known node: its heartbeat's count, or ours if we placed more since."""
        by_node = self._by_node
        return {n: max(c, len(by_node.get(n, ()))) for n, c in self._nodes.loads().items()}

    # ------------------------------------------------------------------ live calls

    def track(self, call: LiveCall, node: str) -> None:
        """``call`` is linked to ``node`` (until :meth:`untrack`)."""
        self._by_node[node].add(call)

    def untrack(self, call: LiveCall, node: str) -> None:
        calls = self._by_node.get(node)
        if calls is not None:
            calls.discard(call)
            if not calls:
                del self._by_node[node]

    def calls_on(self, node: str) -> list[LiveCall]:
        """The calls linked to ``node`` now (a copy: they untrack themselves as they go)."""
        return list(self._by_node.get(node, ()))


def http_health_probe(http: aiohttp.ClientSession) -> HealthProbe:
    """A probe asking a node's ``/readyz``: healthy only on a 200 within the timeout (a
    draining node is alive but not ready: the call moves on)."""

    async def probe(url: str) -> bool:
        try:
            async with http.get(
                f"{url}/readyz", timeout=aiohttp.ClientTimeout(total=CONFIRM_TIMEOUT_S)
            ) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    return probe
