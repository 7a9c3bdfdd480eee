"""The whole cluster as real processes: router + two nodes over real WebSockets, with
real Redis and NATS JetStream, holding concurrent multi-turn calls; once on single servers,
once on a Redis Cluster and a NATS cluster."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import aiohttp
import nats
import pytest

from callmesh.auth import mint_dev_token
from callmesh_client.client import CallClient, CallError
from events import eventlog, subjects
from events.connection import server_urls
from localcluster.cluster import LocalCluster
from state_store.client import connect
from state_store.store import StateStore
from tests.backend_modes import MODES, cluster_kwargs
from tests.cluster_helpers import BOOKING_SCRIPT, eventually, run_call
from tests.exposition import assert_dashboards_use_only, parse_exposition

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module", params=MODES)
def cluster(request: pytest.FixtureRequest) -> Iterator[LocalCluster]:
    with LocalCluster(
        nodes=2,
        force_embedded=True,
        env={"CALLMESH_SIM_LATENCY_SCALE": "0.05"},
        **cluster_kwargs(request.param),
    ) as c:
        yield c


async def test_concurrent_calls_checkpoint_and_publish(cluster: LocalCluster) -> None:
    names = ["Alice", "Bruno", "Chen", "Dara", "Emil", "Fatima"]
    results = await asyncio.gather(
        *(run_call(cluster.router_url, f"e2e-{i}", name=n) for i, n in enumerate(names))
    )
    for name, replies in zip(names, results, strict=True):
        assert [r.turn for r in replies] == [1, 2, 3, 4, 5]
        # Context carried across turns: the name from turn 1 is used in later replies.
        assert name in replies[2].text
        assert "booked" in replies[-1].text and "Tuesday" in replies[-1].text
        assert all(r.audio_bytes > 0 for r in replies)

    redis = connect(cluster.redis_url)
    try:
        ckpt = await StateStore(redis).load("demo", "e2e-0")
    finally:
        await redis.aclose()
    assert ckpt is not None
    assert (ckpt.turn, ckpt.status, ckpt.last_seq) == (5, "ended", len(BOOKING_SCRIPT) + 2)
    assert ckpt.facts["name"][0] == "Alice"
    # Session memory's confirmation, and what the booking effect of that turn booked.
    assert ckpt.facts["confirmed"][0] == "booking: cleaning, Tuesday, 3:00 pm"
    assert ckpt.facts["booked"][0] == "cleaning for Tuesday at 3:00 pm"
    assert ckpt.working[0][0] == 0 and "Brightsmile" in ckpt.working[0][2]  # the greeting
    assert ckpt.outbox == []  # everything acknowledged by JetStream

    nc = await nats.connect(server_urls(cluster.nats_url))
    try:
        js = nc.jetstream()
        effect = await js.get_last_msg(
            subjects.EFFECTS_STREAM, subjects.effect("demo", "booking_create")
        )
        assert effect.data is not None
        info = await js.stream_info(subjects.EFFECTS_STREAM)
        assert info.state.messages == len(names)  # one booking per call, none doubled
        events = await js.get_last_msg(
            subjects.EVENTS_STREAM, subjects.call_events("demo", "e2e-0")
        )
        assert events.data is not None
        assert eventlog.decode_message(events.data)[-1]["type"] == "call_ended"
    finally:
        await nc.drain()


async def test_every_process_is_ready_and_exports_what_the_dashboards_use(
    cluster: LocalCluster,
) -> None:
    await run_call(cluster.router_url, "e2e-metrics", name="Gita")
    assert cluster.router is not None
    procs = [(cluster.router, "callmesh_router"), *((n, "callmesh_node") for n in cluster.nodes)]
    turns = 0.0
    async with aiohttp.ClientSession() as http:
        for proc, prefix in procs:
            for path in ("/livez", "/readyz"):
                async with http.get(proc.url + path) as resp:
                    assert resp.status == 200, (proc.name, path)
            async with http.get(proc.url + "/metrics") as resp:
                exposed = parse_exposition(await resp.text())
            assert_dashboards_use_only(exposed, prefix)
            turns += exposed.get("callmesh_node_turns_total", {}).get((), 0.0)
    assert turns >= 6  # the greeting and five turns, counted by the node that owned them


async def _next_frame(ws: aiohttp.ClientWebSocketResponse) -> dict[str, object]:
    """The next frame that is not part of the turn-0 greeting (spoken right after ready,
    so it interleaves with the answers to whatever the client sends meanwhile)."""
    while True:
        frame: dict[str, object] = json.loads((await ws.receive()).data)
        if frame.get("turn") != 0 or frame["type"] not in GREETING_TYPES:
            return frame


GREETING_TYPES = ("agent_text", "agent_audio", "turn_metrics")


async def test_bad_input_gets_errors_and_other_calls_go_on(cluster: LocalCluster) -> None:
    url = cluster.router_url.replace("http", "ws")
    good = [asyncio.create_task(run_call(cluster.router_url, f"ok-{i}")) for i in range(3)]
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{cluster.router_url}/v2/nowhere") as resp:
            assert resp.status == 404 and (await resp.json())["code"] == "http_404"
        async with http.ws_connect(f"{url}/v1/calls/bad-1") as ws:
            await ws.send_str('{"type": "user_text", "seq": 1, "text": "hello"}')
            assert json.loads((await ws.receive()).data)["code"] == "not_started"
            await ws.send_str("{oops")
            assert json.loads((await ws.receive()).data)["code"] == "bad_json"
            token = mint_dev_token(cluster.auth_secret, "demo", "bad-1", "anonymous")
            start = {"type": "start", "seq": 2, "tenant": "demo", "token": token}
            await ws.send_str(json.dumps(start))
            assert (await _next_frame(ws))["type"] == "ready"
            await ws.send_str(json.dumps({"type": "teleport", "seq": 3}))
            assert (await _next_frame(ws))["code"] == "unknown_type"
            await ws.send_str(json.dumps({"type": "user_text", "seq": 4, "text": "x" * 300_000}))
            assert (await _next_frame(ws))["code"] == "frame_too_large"
            await ws.send_str(json.dumps({"type": "user_text", "seq": 2, "text": "replayed"}))
            assert (await _next_frame(ws))["code"] == "bad_seq"
            # The call still works after all of that.
            await ws.send_str(json.dumps({"type": "user_text", "seq": 5, "text": "my name is Zoe"}))
            frames = []
            while not frames or frames[-1]["type"] != "turn_metrics":
                frames.append(await _next_frame(ws))
            assert any(f["type"] == "agent_text" and "Zoe" in f["text"] for f in frames)
    for replies in await asyncio.gather(*good):
        assert len(replies) == len(BOOKING_SCRIPT)


async def test_a_call_that_ended_cannot_be_resumed(cluster: LocalCluster) -> None:
    await run_call(cluster.router_url, "done-1", script=["hello"])
    async with CallClient(cluster.router_url, "done-1") as client:
        with pytest.raises(CallError) as info:
            await client.start("demo")
        assert info.value.code == "call_ended"


async def test_membership_follows_nodes_joining_and_leaving(cluster: LocalCluster) -> None:
    def nodes() -> dict[str, dict[str, object]]:
        st = cluster.status() or {}
        return {str(n["node"]): n for n in st.get("nodes", [])}  # type: ignore[union-attr]

    node = cluster.add_node(wait=False)
    await eventually(lambda: node.name in nodes() and bool(nodes()[node.name]["alive"]))
    # New calls may now land on it.
    placed = set()
    for i in range(12):
        async with CallClient(cluster.router_url, f"spread-{i}") as client:
            placed.add((await client.start("demo"))["node"])
            await client.hangup()
    assert len(placed) >= 2
    node.stop()  # SIGTERM: drains (no calls) and deregisters
    await eventually(lambda: node.name not in nodes())
    cluster.nodes.remove(node)
