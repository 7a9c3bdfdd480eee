"""JetStream on a 3-server NATS cluster: streams at three replicas, and a server killed
(SIGKILL) while effects and event-log records are being published and the effects worker
is consuming. Nothing acknowledged may be lost and nothing may be stored or applied twice:
publishers republish what was not acknowledged under the same ``Nats-Msg-Id`` (as a
call's outbox does), and the worker's redeliveries carry the same Idempotency-Key."""

from __future__ import annotations

import asyncio
import signal
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from events import eventlog, subjects
from events.connection import server_urls
from events.errors import EventsUnavailable
from events.eventlog import EventType
from events.outbox import OutboxPublisher, effect_entry
from events.sinks import WebhookSink
from events.streams import ensure_streams
from events.worker import EffectsWorker
from events.worker_config import WorkerConfig
from loadtest.fake_crm import FakeCRM
from localcluster.server_clusters import NatsClusterServers, nats_cluster
from state_store.checkpoint import OutboxEntry
from tests.backend_modes import cluster_unavailable

pytestmark = pytest.mark.timeout(180)

TENANT = "acme"
CALLS = 12
TURNS = 8
WORKER = WorkerConfig(
    durable="cluster-effects",
    batch=8,
    concurrency=16,
    max_deliveries=100,
    ack_wait_s=2.0,
    backoff_base_s=0.05,
    backoff_max_s=0.5,
    fetch_timeout_s=0.2,
    drain_timeout_s=2.0,
)


@pytest.fixture
def nats_nodes() -> Iterator[NatsClusterServers]:
    """A cluster of its own: the test kills one of its servers."""
    reason = cluster_unavailable()
    if reason is not None:
        pytest.skip(reason)
    with tempfile.TemporaryDirectory(prefix="callmesh-nats-") as tmp:
        servers = nats_cluster(Path(tmp))
        try:
            servers.start()
            yield servers
        finally:
            servers.stop()


async def _connect(url: str) -> NATS:
    return await nats.connect(
        server_urls(url), max_reconnect_attempts=-1, reconnect_time_wait=0.1, connect_timeout=2
    )


@pytest.fixture
async def clients(nats_nodes: NatsClusterServers) -> AsyncIterator[tuple[NATS, NATS]]:
    """(publisher's connection, worker's connection), like a node and a worker process."""
    pub, sub = await _connect(nats_nodes.url), await _connect(nats_nodes.url)
    try:
        yield pub, sub
    finally:
        for nc in (pub, sub):
            await nc.close()


def test_a_cluster_url_lists_every_server() -> None:
    three = "nats://a:4222, nats://b:4222,nats://c:4222"
    assert server_urls(three) == ["nats://a:4222", "nats://b:4222", "nats://c:4222"]
    assert server_urls("nats://127.0.0.1:4222") == ["nats://127.0.0.1:4222"]
    with pytest.raises(ValueError):
        server_urls(" , ")


def _turn(call_id: str, turn: int, cursor: int) -> list[OutboxEntry]:
    """What one committed turn puts in the outbox: its effect and one event-log message
    holding two records."""
    effect = effect_entry(TENANT, call_id, turn, 0, "booking_create", {"turn": turn})
    records = [
        eventlog.record(EventType.USER_TURN, turn, text=f"turn {turn}"),
        eventlog.record(EventType.AGENT_REPLY, turn, text=f"reply {turn}"),
    ]
    return [effect, *eventlog.to_outbox(TENANT, call_id, records, cursor)]


async def _call(publisher: OutboxPublisher, call_id: str, progress: Counter[str]) -> None:
    """A call's turns, each published as its outbox is: in order, republishing whatever
    JetStream did not acknowledge (the same ids) until all of it is."""
    cursor = 0
    for turn in range(1, TURNS + 1):
        pending = _turn(call_id, turn, cursor)
        cursor += 2
        while pending:
            try:
                acked = set(await publisher.publish(pending))
            except EventsUnavailable:
                progress["retries"] += 1
                await asyncio.sleep(0.1)
                continue
            pending = [e for e in pending if e.msg_id not in acked]
        progress["turns"] += 1
        await asyncio.sleep(0.02)


async def _stored(js: JetStreamContext, stream: str) -> Counter[str]:
    """How often each Nats-Msg-Id is stored in ``stream``."""
    info = await js.stream_info(stream)
    ids: Counter[str] = Counter()
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            msg = await js.get_msg(stream, seq)
        except NotFoundError:
            continue
        ids[(msg.headers or {}).get("Nats-Msg-Id", f"no-id:{seq}")] += 1
    return ids


async def test_killing_a_server_under_load_loses_and_doubles_nothing(
    nats_nodes: NatsClusterServers, clients: tuple[NATS, NATS]
) -> None:
    pub_nc, worker_nc = clients
    js = pub_nc.jetstream()
    await ensure_streams(js, replicas=3)  # CALLMESH_JETSTREAM_REPLICAS=3 on a cluster
    info = await js.stream_info(subjects.EFFECTS_STREAM)
    assert info.config.num_replicas == 3 and info.cluster is not None
    assert len(info.cluster.replicas or []) == 2  # a leader and two followers

    progress: Counter[str] = Counter()
    async with FakeCRM() as crm:
        sink = WebhookSink(crm.url, timeout_s=1.0)
        try:
            async with EffectsWorker(worker_nc.jetstream(), sink, WORKER):
                publisher = OutboxPublisher(js, timeout_s=1.0)
                calls = asyncio.gather(
                    *(_call(publisher, f"nc-{i}", progress) for i in range(CALLS))
                )
                # Kill the server leading the effects stream, a third of the way in: the
                # worst case, a leader election (4-9 s) on top of clients reconnecting.
                while progress["turns"] < CALLS * TURNS // 3:  # noqa: ASYNC110 (a counter)
                    await asyncio.sleep(0.01)
                leader = (await js.stream_info(subjects.EFFECTS_STREAM)).cluster
                assert leader is not None and leader.leader is not None
                victim = nats_nodes.servers[int(leader.leader.removeprefix("n")) - 1]
                victim.stop(signal.SIGKILL)
                await calls
                await crm.wait_applied(CALLS * TURNS, timeout_s=60)
        finally:
            await sink.aclose()

    expected_effects = {
        subjects.effect_msg_id(TENANT, f"nc-{i}", t, 0)
        for i in range(CALLS)
        for t in range(1, TURNS + 1)
    }
    expected_events = {
        # One message per turn's two records, named after the first.
        subjects.event_msg_id(TENANT, f"nc-{i}", k)
        for i in range(CALLS)
        for k in range(0, 2 * TURNS, 2)
    }
    effects = await _stored(js, subjects.EFFECTS_STREAM)
    events = await _stored(js, subjects.EVENTS_STREAM)
    # Every effect stored once, and applied: answered 201 exactly once. A redelivery (an
    # ack lost with the server) is answered 409 by its Idempotency-Key, as a real CRM
    # must; it is no double application.
    assert set(effects) == expected_effects and max(effects.values()) == 1
    created = Counter(r.key for r in crm.received if r.status == 201)
    assert set(created) == expected_effects and max(created.values()) == 1
    # Every event-log record stored once; besides them, the worker's delivery outcomes
    # (one per effect, de-duplicated by their own ids).
    outcomes = {k: n for k, n in events.items() if k not in expected_events}
    assert expected_events <= set(events)
    assert max(events.values()) == 1
    assert len(outcomes) == len(expected_effects)
    # The kill did hit the load: the stream has another leader, publishes had to wait.
    after = (await js.stream_info(subjects.EFFECTS_STREAM)).cluster
    assert after is not None and after.leader not in (None, victim.name.replace("nats-", "n"))
    last = await js.get_last_msg(subjects.EVENTS_STREAM, subjects.call_events(TENANT, "nc-0"))
    assert last.data is not None and eventlog.decode_message(last.data)[-1]["type"] in (
        EventType.AGENT_REPLY.value,
        EventType.EFFECT_DELIVERY.value,
    )
