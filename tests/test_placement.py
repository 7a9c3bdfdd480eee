"""Placement without Redis: the real membership view over a scripted membership hash, pins
in a dict, a scripted health probe. Choice within the load bound, pins reused while their
node is routable, re-chosen when it is dead, draining or suspect, forgotten at the end."""

from __future__ import annotations

import asyncio
import math
from typing import Any, cast

import pytest
from aiohttp import web

from callmesh.config import MembershipConfig
from localcluster.servers import free_port
from router.membership import MembershipView
from router.placement import Placement, http_health_probe
from router.ring import BoundedLoadRing, NoNodeAvailable
from state_store.errors import StateStoreError
from state_store.membership import MembershipStore, NodeRecord, NodeState

DEAD_AFTER_MS = 500


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class Hash:
    """The membership hash, as nodes' heartbeats leave it."""

    def __init__(self, *nodes: str) -> None:
        self.records = {n: NodeRecord(n, f"http://{n}.test") for n in nodes}
        # Seconds the router's loop stalls between asking and handling the reply.
        self.stall_s = 0.0
        self.clock: Clock | None = None

    def beat(self, node: str, **changes: Any) -> None:
        rec = self.records[node]
        fields = {**rec.__dict__, "beat": rec.beat + 1, **changes}
        self.records[node] = NodeRecord(**fields)

    async def read_all(self) -> dict[str, NodeRecord]:
        records = dict(self.records)
        if self.clock is not None:
            self.clock.now += self.stall_s
        return records


class Pins:
    def __init__(self) -> None:
        self.pins: dict[tuple[str, str], str] = {}
        self.failing = False

    async def get(self, tenant: str, call_id: str) -> str | None:
        return self.pins.get((tenant, call_id))

    async def set(self, tenant: str, call_id: str, node_id: str) -> None:
        self.pins[(tenant, call_id)] = node_id

    async def clear(self, tenant: str, call_id: str, node_id: str) -> None:
        if self.failing:
            raise StateStoreError("redis is down")
        if self.pins.get((tenant, call_id)) == node_id:
            del self.pins[(tenant, call_id)]


class Probe:
    def __init__(self) -> None:
        self.healthy: set[str] = set()
        self.asked: list[str] = []

    async def __call__(self, url: str) -> bool:
        self.asked.append(url)
        return url in self.healthy


class Call:
    def __init__(self) -> None:
        self.told_dead = 0

    def node_died(self) -> None:
        self.told_dead += 1


class World:
    def __init__(self, monkeypatch: pytest.MonkeyPatch, *nodes: str) -> None:
        self.clock = Clock()
        monkeypatch.setattr("router.membership.time", self.clock)
        self.hash = Hash(*nodes)
        self.hash.clock = self.clock
        config = MembershipConfig(dead_after_ms=DEAD_AFTER_MS)
        self.view = MembershipView(cast(MembershipStore, self.hash), config)
        self.pins = Pins()
        self.probe = Probe()
        self.placement = Placement(self.view, self.pins, self.probe, BoundedLoadRing(0.25))

    async def later(self, ms: float, *, beating: tuple[str, ...]) -> None:
        """Time passes; only the ``beating`` nodes' heartbeats advance."""
        self.clock.now += ms / 1000
        for node in beating:
            self.hash.beat(node)
        await self.view.refresh()


@pytest.fixture
async def world(monkeypatch: pytest.MonkeyPatch) -> World:
    w = World(monkeypatch, "n1", "n2", "n3")
    await w.view.refresh()
    return w


async def test_a_new_call_is_placed_on_a_routable_node_and_pinned(world: World) -> None:
    node = await world.placement.place("acme", "c1", prefer_pin=True)
    assert node in {"n1", "n2", "n3"}
    assert world.pins.pins == {("acme", "c1"): node}
    # Unloaded, the ring's choice is stable.
    world.pins.pins.clear()
    assert await world.placement.place("acme", "c1", prefer_pin=True) == node


async def test_a_pin_is_reused_while_its_node_is_routable(world: World) -> None:
    chosen = await world.placement.place("acme", "c1", prefer_pin=True)
    other = next(n for n in ("n1", "n2", "n3") if n != chosen)
    world.pins.pins[("acme", "c1")] = other  # another router placed it there
    assert await world.placement.place("acme", "c1", prefer_pin=True) == other
    # Not preferring the pin (a relink) or excluding its node chooses again, and re-pins.
    again = await world.placement.place("acme", "c1", prefer_pin=True, exclude=other)
    assert again != other and world.pins.pins[("acme", "c1")] == again
    assert await world.placement.place("acme", "c1", prefer_pin=False) == chosen
    # A handoff moves the call off its node, whatever the ring prefers.
    moved = await world.placement.place("acme", "c1", prefer_pin=False, exclude=chosen)
    assert moved != chosen and world.pins.pins[("acme", "c1")] == moved


async def test_a_dead_nodes_calls_are_placed_again_elsewhere(world: World) -> None:
    pinned = await world.placement.place("acme", "c1", prefer_pin=True)
    alive = tuple(n for n in ("n1", "n2", "n3") if n != pinned)
    await world.later(DEAD_AFTER_MS / 2, beating=alive)
    assert await world.placement.place("acme", "c1", prefer_pin=True) == pinned
    await world.later(DEAD_AFTER_MS, beating=alive)
    moved = await world.placement.place("acme", "c1", prefer_pin=True)
    assert moved in alive and world.pins.pins[("acme", "c1")] == moved
    # Its heartbeat advancing again makes it routable again, for new calls.
    await world.later(100, beating=("n1", "n2", "n3"))
    assert pinned in world.view.routable()


async def test_a_router_that_stalls_does_not_take_its_own_stall_for_dead_nodes(
    world: World,
) -> None:
    await world.later(100, beating=("n1", "n2", "n3"))
    # The reply was read before the stall and handled 3 s later: beats look frozen.
    world.hash.stall_s = 3.0
    await world.later(100, beating=())
    world.hash.stall_s = 0.0
    assert sorted(world.view.routable()) == ["n1", "n2", "n3"]
    # A node that really stopped is still found dead at the next ask.
    await world.later(100, beating=("n1", "n2"))
    assert sorted(world.view.routable()) == ["n1", "n2"]


async def test_draining_and_suspect_nodes_take_no_new_calls(world: World) -> None:
    world.hash.beat("n1", state=NodeState.DRAINING.value)
    await world.view.refresh()
    world.placement.suspect("n2")
    for i in range(20):
        assert await world.placement.place("acme", f"c{i}", prefer_pin=True) == "n3"
    # A pin to a draining node is not followed either.
    world.pins.pins[("acme", "c0")] = "n1"
    assert await world.placement.place("acme", "c0", prefer_pin=True) == "n3"
    world.placement.suspect("n3")
    with pytest.raises(NoNodeAvailable):
        await world.placement.place("acme", "c99", prefer_pin=True)


async def test_loads_stay_within_the_bound_counting_our_own_placements(world: World) -> None:
    # Heartbeats report no calls yet: the calls this router placed since are counted.
    calls = [Call() for _ in range(60)]
    for i, call in enumerate(calls):
        node = await world.placement.place("acme", f"c{i}", prefer_pin=True)
        world.placement.track(call, node)
    loads = world.placement.loads()
    assert sum(loads.values()) == 60
    assert max(loads.values()) <= math.ceil(1.25 * 60 / 3)
    # A node whose heartbeat reports more than we placed there counts that many.
    world.hash.beat("n1", calls=100)
    await world.view.refresh()
    assert world.placement.loads()["n1"] == 100
    assert await world.placement.place("acme", "one-more", prefer_pin=True) != "n1"


async def test_live_calls_are_tracked_per_node(world: World) -> None:
    a, b = Call(), Call()
    world.placement.track(a, "n1")
    world.placement.track(b, "n1")
    assert set(world.placement.calls_on("n1")) == {a, b}
    assert repr(world.placement) == "<Placement [3 routable nodes, 2 live calls on 1 nodes]>"
    world.placement.untrack(a, "n1")
    world.placement.untrack(a, "n1")  # twice is harmless
    assert world.placement.calls_on("n1") == [b]
    world.placement.untrack(b, "n1")
    assert world.placement.calls_on("n1") == [] and world.placement.loads()["n1"] == 0
    assert repr(world.placement) == "<Placement [3 routable nodes, 0 live calls on 0 nodes]>"


async def test_forget_clears_only_a_pin_that_still_names_the_node(world: World) -> None:
    world.pins.pins[("acme", "c1")] = "n2"  # re-pinned by another router meanwhile
    await world.placement.forget("acme", "c1", "n1")
    assert world.pins.pins == {("acme", "c1"): "n2"}
    await world.placement.forget("acme", "c1", "n2")
    assert world.pins.pins == {}
    world.pins.pins[("acme", "c2")] = "n1"
    world.pins.failing = True
    await world.placement.forget("acme", "c2", "n1")  # best effort: the pin expires


async def test_confirm_alive_asks_the_nodes_health(world: World) -> None:
    world.probe.healthy.add("http://n1.test")
    assert await world.placement.confirm_alive("n1")
    assert not await world.placement.confirm_alive("n2")
    assert not await world.placement.confirm_alive("gone")  # unknown: not even asked
    assert world.probe.asked == ["http://n1.test", "http://n2.test"]
    assert world.placement.url("n3") == "http://n3.test" and world.placement.url("x") is None


async def test_calls_of_a_lost_link_share_one_probe_and_a_failed_one_stands(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("router.placement.time", world.clock)
    # Every call on a node whose link dropped asks at once: one probe answers them all.
    answers = await asyncio.gather(*(world.placement.confirm_alive("n2") for _ in range(50)))
    assert answers == [False] * 50 and world.probe.asked == ["http://n2.test"]
    # A node just found not alive is not asked again at once...
    assert not await world.placement.confirm_alive("n2")
    assert world.probe.asked == ["http://n2.test"]
    # ...but after a while it is, and one found alive is asked every time.
    world.clock.now += 1.0
    world.probe.healthy.add("http://n2.test")
    assert await world.placement.confirm_alive("n2")
    assert await world.placement.confirm_alive("n2")
    assert world.probe.asked == ["http://n2.test"] * 3


async def test_the_http_probe_wants_a_200_in_time() -> None:
    import aiohttp

    status = {"code": 200}

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({}, status=status["code"])

    app = web.Application()
    app.router.add_get("/readyz", healthz)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as http:
            probe = http_health_probe(http)
            assert await probe(f"http://127.0.0.1:{port}")
            status["code"] = 503  # draining
            assert not await probe(f"http://127.0.0.1:{port}")
            assert not await probe(f"http://127.0.0.1:{free_port()}")  # nothing listens
    finally:
        await runner.cleanup()
