"""Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2016).

Each node may hold at most ``ceil((1 + ε) · (calls + 1) / nodes)`` calls; a call whose
ring owner is full walks the ring to the next node with room. The ring only decides
where *new* calls land: live calls are pinned and never consulted against it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from uhashring import HashRing


class NoNodeAvailable(Exception):
    """No healthy, non-draining node to place a call on."""


class BoundedLoadRing:
    def __init__(self, epsilon: float = 0.25, vnodes: int = 160) -> None:
        if epsilon <= 0:
            raise ValueError("epsilon must be > 0")
        self.epsilon = epsilon
        self._vnodes = vnodes
        self._nodes: frozenset[str] = frozenset()
        self._ring: HashRing | None = None

    def _ring_for(self, nodes: frozenset[str]) -> HashRing:
        if nodes != self._nodes or self._ring is None:
            self._ring = HashRing(nodes={n: {"vnodes": self._vnodes} for n in nodes})
            self._nodes = nodes
        return self._ring

    def capacity(self, total_calls: int, n_nodes: int) -> int:
        return math.ceil((1 + self.epsilon) * (total_calls + 1) / n_nodes)

    def choose(self, key: str, candidates: Iterable[str], loads: Mapping[str, int]) -> str:
        """The first node on ``key``'s ring walk whose load is under the bound."""
        nodes = frozenset(candidates)
        if not nodes:
            raise NoNodeAvailable("no healthy node")
        if len(nodes) == 1:
            return next(iter(nodes))
        ring = self._ring_for(nodes)
        cap = self.capacity(sum(loads.get(n, 0) for n in nodes), len(nodes))
        walk = [d["nodename"] for d in ring.range(key, size=len(nodes), unique=True)]
        for node in walk:
            if loads.get(node, 0) < cap:
                return node
        return min(walk, key=lambda n: loads.get(n, 0))  # unreachable by the bound's maths
