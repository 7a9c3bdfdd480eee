"""Only routers reach nodes: the link handshake proves the link secret (and cannot be
replayed), a node's status lists no calls to others, and the per-call socket is off
outside development mode. Against a real node process-in-test (tests/node_harness)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from redis.asyncio import Redis

from callmesh.link_auth import HEADER, ROUTER_HEADER, WINDOW_S, LinkAuth, LinkAuthError
from callmesh.mux import LINK_PATH
from conversation_node.app import ConversationNode
from tests.node_harness import LINK_SECRET, node_call, running_node, simulated_providers

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def node(
    redis_url: str, nats_url: str, redis: Redis
) -> AsyncIterator[tuple[ConversationNode, str]]:
    async with running_node(redis_url, nats_url, simulated_providers(), dev_mode=0) as n:
        yield n


async def upgrade_status(base: str, headers: dict[str, str] | None = None) -> int:
    async with aiohttp.ClientSession() as http:
        try:
            ws = await http.ws_connect(f"{base}{LINK_PATH}", headers=headers)
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status
        await ws.close()
        return 101


async def test_a_link_without_the_secret_is_refused_before_the_upgrade(
    node: tuple[ConversationNode, str],
) -> None:
    _, base = node
    assert await upgrade_status(base) == 401
    forged = LinkAuth("not-the-link-secret-but-long-enough-0123").sign("r1", LINK_PATH)
    assert await upgrade_status(base, {HEADER: forged, ROUTER_HEADER: "r1"}) == 401
    good = LinkAuth(LINK_SECRET).sign("r1", LINK_PATH)
    # Signed for another router id: refused.
    assert await upgrade_status(base, {HEADER: good, ROUTER_HEADER: "r2"}) == 401
    assert await upgrade_status(base, {HEADER: good, ROUTER_HEADER: "r1"}) == 101
    # The same handshake replayed: refused.
    assert await upgrade_status(base, {HEADER: good, ROUTER_HEADER: "r1"}) == 401


async def test_the_router_side_link_carries_calls(node: tuple[ConversationNode, str]) -> None:
    _, base = node
    async with node_call(base, "la-1") as call:
        await call.start("demo", "bob")
        assert any(f["type"] == "ready" for f in call.frames)


async def test_status_lists_calls_only_to_holders_of_the_link_secret(
    node: tuple[ConversationNode, str],
) -> None:
    _, base = node
    async with node_call(base, "st-1") as call, aiohttp.ClientSession() as http:
        await call.start("secret-tenant", "bob")
        async with http.get(f"{base}/v1/status") as resp:
            public = await resp.json()
        assert public["calls"] == 1 and "sessions" not in public
        assert "secret-tenant" not in str(public) and "st-1" not in str(public)
        headers = {HEADER: LinkAuth(LINK_SECRET).sign("ops", "/v1/status"), ROUTER_HEADER: "ops"}
        async with http.get(f"{base}/v1/status", headers=headers) as resp:
            detailed = await resp.json()
        assert "st-1" in str(detailed["sessions"])


async def test_the_per_call_socket_is_off_outside_development_mode(
    node: tuple[ConversationNode, str],
) -> None:
    _, base = node
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(f"{base}/v1/node/calls/sock-1")
    assert refused.value.status == 404


def test_a_handshake_outside_the_window_or_seen_before_is_refused() -> None:
    now = [1_000_000.0]
    auth = LinkAuth(LINK_SECRET, clock=lambda: now[0])
    old = auth.sign("r1", LINK_PATH)
    now[0] += WINDOW_S + 1
    with pytest.raises(LinkAuthError, match="window"):
        auth.check(old, "r1", LINK_PATH)
    # A router whose clock is ahead by most of the window: accepted once, and refused
    # as a replay for as long as its time stays acceptable to the node.
    ahead = LinkAuth(LINK_SECRET, clock=lambda: now[0] + WINDOW_S - 1).sign("r1", LINK_PATH)
    auth.check(ahead, "r1", LINK_PATH)
    for _ in range(3):
        now[0] += WINDOW_S * 2 / 3 - 1
        with pytest.raises(LinkAuthError):
            auth.check(ahead, "r1", LINK_PATH)
    with pytest.raises(LinkAuthError, match="verify"):
        auth.check(auth.sign("r1", "/v1/status"), "r1", LINK_PATH)  # signed for another path
    with pytest.raises(LinkAuthError, match="missing"):
        auth.check(None, "r1", LINK_PATH)
    with pytest.raises(LinkAuthError, match="malformed"):
        auth.check("v1.x.y.z", "r1", LINK_PATH)
