"""The effects worker against a real NATS (JetStream) and a real local HTTP "CRM"."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from nats.js import JetStreamContext

from events import subjects
from events.cli import add_effects_worker_parser, make_sink
from events.delivery import backoff_delay
from events.outbox import OutboxPublisher, effect_entry
from events.replay import read_records
from events.sinks import Effect, LogSink, SinkRejected, SinkRetryable, WebhookSink
from events.streams import ensure_streams
from events.worker import EffectsWorker, WorkerState
from events.worker_config import WorkerConfig, worker_config
from loadtest.fake_crm import CRMMode, FakeCRM
from localcluster.servers import free_port
from state_store.checkpoint import OutboxEntry
from tests.exposition import assert_dashboards_use_only, parse_exposition

TENANT = "acme"
FAST = WorkerConfig(
    durable="test-effects",
    batch=8,
    concurrency=8,
    max_deliveries=50,
    ack_wait_s=2.0,
    backoff_base_s=0.02,
    backoff_max_s=0.1,
    fetch_timeout_s=0.2,
    drain_timeout_s=2.0,
)


async def eventually(pred: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait until ``pred()`` holds (a bound, not a timing assertion)."""
    async with asyncio.timeout(timeout_s):
        # Polling: the predicates read counters of several objects that have no event.
        while not pred():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


def effects(call_id: str, n: int, turn: int = 1, kind: str = "booking_create") -> list[OutboxEntry]:
    return [effect_entry(TENANT, call_id, turn, i, kind, {"slot": f"tue-{i}"}) for i in range(n)]


@pytest.fixture
async def streams(js: JetStreamContext) -> JetStreamContext:
    await ensure_streams(js)
    return js


@pytest.fixture
async def crm() -> AsyncIterator[FakeCRM]:
    async with FakeCRM() as server:
        yield server


@pytest.fixture
async def sink(crm: FakeCRM) -> AsyncIterator[WebhookSink]:
    s = WebhookSink(crm.url, timeout_s=1.0)
    yield s
    await s.aclose()


async def test_delivers_each_effect_with_its_idempotency_key(
    streams: JetStreamContext, crm: FakeCRM, sink: WebhookSink
) -> None:
    entries = effects("call-1", 3)
    await OutboxPublisher(streams).publish(entries)
    async with EffectsWorker(streams, sink, FAST) as worker:
        await crm.wait_applied(3)
        await eventually(lambda: worker.metrics.delivered == 3)
        assert "delivered: 3" in repr(worker)
    assert worker.state is WorkerState.CLOSED
    for entry in entries:
        assert crm.headers[entry.msg_id]["Idempotency-Key"] == entry.msg_id
        assert crm.headers[entry.msg_id]["X-Callmesh-Call"] == "call-1"
        assert crm.bodies[entry.msg_id] == json.loads(entry.data)
    assert crm.requests == 3
    log = await read_records(streams, TENANT, "call-1")
    assert sorted(r["msg_id"] for r in log) == sorted(e.msg_id for e in entries)
    assert {(r["type"], r["outcome"], r["attempts"], r["status"]) for r in log} == {
        ("effect_delivery", "delivered", 1, 201)
    }


@pytest.mark.parametrize("outage", [CRMMode.REFUSE, CRMMode.UNAVAILABLE, CRMMode.ABORT])
async def test_crm_outage_then_recovery_delivers_everything_once(
    streams: JetStreamContext, crm: FakeCRM, sink: WebhookSink, outage: CRMMode
) -> None:
    crm.dedupe = False  # a CRM without idempotency support: any repeat shows as a duplicate
    await crm.go_down(outage)
    entries = effects("call-2", 20)
    # Publishing (what the conversation does) is not held up by the outage.
    assert len(await OutboxPublisher(streams).publish(entries)) == 20
    async with EffectsWorker(streams, sink, FAST) as worker:
        await eventually(lambda: worker.metrics.retried >= 20)
        assert crm.applied == {}
        await crm.go_up()
        await crm.wait_applied(20)
        await eventually(lambda: worker.metrics.delivered == 20)
    assert crm.duplicates() == {}
    assert worker.metrics.dead_lettered == 0


async def test_lost_answer_is_retried_and_recognised_as_already_applied(
    streams: JetStreamContext, crm: FakeCRM, sink: WebhookSink
) -> None:
    await crm.go_down(CRMMode.LOST_RESPONSE)
    entries = effects("call-3", 1)
    await OutboxPublisher(streams).publish(entries)
    async with EffectsWorker(streams, sink, FAST) as worker:
        await crm.wait_applied(1)
        await crm.go_up()
        await eventually(lambda: worker.metrics.delivered == 1)
    assert crm.applied[entries[0].msg_id] == 1
    assert worker.metrics.already_applied == 1
    assert [r.status for r in crm.received][-1] == 409


async def test_dead_letter_after_max_deliveries(
    streams: JetStreamContext, crm: FakeCRM, sink: WebhookSink, caplog: pytest.LogCaptureFixture
) -> None:
    await crm.go_down(CRMMode.UNAVAILABLE)
    entry = effects("call-4", 1)[0]
    await OutboxPublisher(streams).publish([entry])
    config = replace(FAST, max_deliveries=3)
    with caplog.at_level(logging.ERROR, logger="events.worker"):
        async with EffectsWorker(streams, sink, config) as worker:
            await eventually(lambda: worker.metrics.dead_lettered == 1)
            assert worker.snapshot()["dead_lettered"] == 1
    assert crm.requests == 3
    assert worker.metrics.retried == 2
    dead = await streams.get_msg(
        subjects.DEAD_LETTER_STREAM, subject=subjects.dead_letter(TENANT, "booking_create")
    )
    assert dead.headers is not None and dead.headers["Nats-Msg-Id"] == f"{entry.msg_id}:dead"
    body = json.loads(dead.data or b"")
    assert body["id"] == entry.msg_id and body["payload"] == {"slot": "tue-0"}
    assert body["dead_letter"]["reason"] == "max_deliveries"
    assert body["dead_letter"]["attempts"] == 3 and body["dead_letter"]["status"] == 503
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("call=call-4" in m and f"effect={entry.msg_id}" in m for m in errors)
    [rec] = await read_records(streams, TENANT, "call-4")
    assert rec["outcome"] == "dead_lettered" and rec["reason"] == "max_deliveries"


async def test_rejected_effect_is_dead_lettered_at_once(
    streams: JetStreamContext, crm: FakeCRM, sink: WebhookSink
) -> None:
    entries = effects("call-5", 3)
    crm.reject_keys.add(entries[1].msg_id)
    await OutboxPublisher(streams).publish(entries)
    async with EffectsWorker(streams, sink, FAST) as worker:
        await eventually(
            lambda: worker.metrics.delivered == 2 and worker.metrics.dead_lettered == 1
        )
    assert worker.metrics.rejected == 1 and worker.metrics.retried == 0
    assert [r.status for r in crm.received if r.key == entries[1].msg_id] == [422]
    body = json.loads(
        (
            await streams.get_msg(
                subjects.DEAD_LETTER_STREAM, subject=subjects.dead_letter(TENANT, "booking_create")
            )
        ).data
        or b""
    )
    assert body["id"] == entries[1].msg_id
    assert body["dead_letter"]["reason"] == "rejected" and body["dead_letter"]["status"] == 422


async def test_effect_past_its_deadline_is_dead_lettered(
    streams: JetStreamContext, crm: FakeCRM, sink: WebhookSink
) -> None:
    await crm.go_down(CRMMode.UNAVAILABLE)
    await OutboxPublisher(streams).publish(effects("call-6", 1))
    config = replace(FAST, deadline_s=0.3, backoff_base_s=0.05)
    async with EffectsWorker(streams, sink, config) as worker:
        await eventually(lambda: worker.metrics.dead_lettered == 1)
    [rec] = await read_records(streams, TENANT, "call-6")
    assert rec["reason"] == "deadline"


async def test_two_workers_sharing_the_durable_never_double_apply(
    streams: JetStreamContext, crm: FakeCRM, sink: WebhookSink
) -> None:
    crm.dedupe = False
    crm.delay_s = 0.01
    crm.fail_next(10)  # some retries in the mix, so redeliveries cross workers too
    await OutboxPublisher(streams).publish(effects("call-7", 60))
    config = replace(FAST, batch=2, concurrency=4)
    async with (
        EffectsWorker(streams, sink, config, name="w1") as w1,
        EffectsWorker(streams, sink, config, name="w2") as w2,
    ):
        await crm.wait_applied(60)
        await eventually(lambda: w1.metrics.delivered + w2.metrics.delivered == 60)
    assert crm.duplicates() == {}
    infos = await streams.consumers_info(subjects.EFFECTS_STREAM)
    assert [i.name for i in infos] == ["test-effects"]


async def test_duplicate_publishes_are_stored_and_delivered_once(
    streams: JetStreamContext, crm: FakeCRM, sink: WebhookSink
) -> None:
    entries = effects("call-8", 4)
    publisher = OutboxPublisher(streams)
    await publisher.publish(entries)
    await publisher.publish(entries)  # a new owner republishing the same pending outbox
    ack = await streams.publish(
        entries[0].subject, entries[0].data, headers={"Nats-Msg-Id": entries[0].msg_id}
    )
    assert ack.duplicate
    info = await streams.stream_info(subjects.EFFECTS_STREAM)
    assert info.state.messages == 4
    async with EffectsWorker(streams, sink, FAST) as worker:
        await eventually(lambda: worker.metrics.delivered == 4)
    assert crm.requests == 4


async def test_malformed_effect_goes_to_the_dead_letter_stream(
    streams: JetStreamContext, crm: FakeCRM, sink: WebhookSink
) -> None:
    await streams.publish(subjects.effect(TENANT, "booking_create"), b"{not json")
    # A body claiming another tenant must not be delivered (or logged) as that tenant.
    forged = effect_entry("other", "call-9", 1, 0, "booking_create", {})
    await streams.publish(subjects.effect(TENANT, "booking_create"), forged.data)
    async with EffectsWorker(streams, sink, FAST) as worker:
        await eventually(lambda: worker.metrics.dead_lettered == 2)
    assert worker.metrics.malformed == 2 and crm.requests == 0
    assert await read_records(streams, "other", "call-9") == []


async def test_drain_finishes_in_flight_deliveries_and_aclose_is_idempotent(
    streams: JetStreamContext, crm: FakeCRM, sink: WebhookSink
) -> None:
    crm.delay_s = 0.3
    await OutboxPublisher(streams).publish(effects("call-10", 2))
    worker = EffectsWorker(streams, sink, FAST)
    await worker.start()
    try:
        await crm.wait_requests(2)
        assert worker.metrics.in_flight == 2
    finally:
        await worker.aclose()
    assert worker.state is WorkerState.CLOSED
    assert worker.metrics.delivered == 2 and worker.metrics.in_flight == 0
    await worker.aclose()
    with pytest.raises(Exception, match="closed"):
        await worker.start()


async def test_drain_cut_short_hands_messages_back(
    streams: JetStreamContext, crm: FakeCRM, sink: WebhookSink
) -> None:
    crm.delay_s = 5.0
    await OutboxPublisher(streams).publish(effects("call-11", 1))
    worker = EffectsWorker(streams, sink, replace(FAST, drain_timeout_s=0.1, ack_wait_s=30.0))
    await worker.start()
    try:
        await crm.wait_requests(1)
    finally:
        await worker.aclose()
    assert worker.metrics.delivered == 0
    crm.delay_s = 0.0
    # The nak on cancellation makes the effect available again at once (not after 30 s).
    async with EffectsWorker(streams, sink, FAST) as again:
        await eventually(lambda: again.metrics.delivered == 1, timeout_s=5.0)


async def test_cancelled_aclose_still_drains(
    streams: JetStreamContext, crm: FakeCRM, sink: WebhookSink
) -> None:
    crm.delay_s = 0.2
    await OutboxPublisher(streams).publish(effects("call-12", 1))
    worker = EffectsWorker(streams, sink, FAST)
    await worker.start()
    try:
        await crm.wait_requests(1)
    except BaseException:
        await worker.aclose()
        raise
    closing = asyncio.create_task(worker.aclose())
    await asyncio.sleep(0)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    await worker.aclose()  # the shielded drain went on; this waits for the same drain
    assert worker.state is WorkerState.CLOSED and worker.metrics.delivered == 1


async def test_webhook_sink_classifies_answers(crm: FakeCRM, sink: WebhookSink) -> None:
    effect = Effect("c:1:0", TENANT, "c", 1, 0, "note", {"x": 1})
    assert (await sink.deliver(effect)).status == 201
    assert (await sink.deliver(effect)).already_applied
    crm.fail_next(1)
    with pytest.raises(SinkRetryable) as retry:
        await sink.deliver(effect)
    assert retry.value.retryable and retry.value.status == 503
    crm.reject_keys.add("c:1:1")
    with pytest.raises(SinkRejected) as rejected:
        await sink.deliver(replace(effect, id="c:1:1"))
    assert not rejected.value.retryable and rejected.value.status == 422
    await crm.go_down(CRMMode.REFUSE)
    with pytest.raises(SinkRetryable):
        await sink.deliver(effect)
    assert (await LogSink().deliver(effect)).status == 200


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    assert backoff_delay(1, 1.0, 60.0, rand=lambda: 0.0) == 0.5
    assert backoff_delay(1, 1.0, 60.0, rand=lambda: 1.0) == 1.0
    assert backoff_delay(4, 1.0, 60.0, rand=lambda: 0.0) == 4.0
    assert backoff_delay(100, 1.0, 60.0, rand=lambda: 1.0) == 60.0


@pytest.mark.parametrize(
    "bad",
    [
        {"max_deliveries": 0},
        {"ack_wait_s": 0},
        {"durable": "a.b"},
        {"filter_subject": "calls.>"},
        {"backoff_max_s": 0.001},
    ],
)
def test_worker_config_is_validated(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        WorkerConfig(**bad)  # type: ignore[arg-type]


def worker_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_effects_worker_parser(parser.add_subparsers())
    return parser.parse_args(["effects-worker", *argv])


def test_cli_flags_build_the_worker_config() -> None:
    args = worker_args(
        "--tenant",
        TENANT,
        "--durable",
        "crm-a",
        "--max-deliveries",
        "7",
        "--webhook-url",
        "http://crm.local/{tenant}/{kind}",
        "--webhook-header",
        "Authorization: Bearer t0k",
    )
    config = worker_config(args)
    assert (config.filter_subject, config.durable, config.max_deliveries) == (
        "effects.acme.>",
        "crm-a",
        7,
    )
    sink = make_sink(args)
    assert isinstance(sink, WebhookSink)
    assert sink.url_for(Effect("c:1:0", TENANT, "c", 1, 0, "note")) == "http://crm.local/acme/note"
    assert isinstance(make_sink(worker_args()), LogSink)
    with pytest.raises(ValueError):
        worker_config(worker_args("--max-deliveries", "0"))


async def test_worker_process_delivers_serves_metrics_and_drains_on_sigterm(
    streams: JetStreamContext, crm: FakeCRM, nats_url: str, tmp_path: Path
) -> None:
    port = free_port()
    log_file = (tmp_path / "worker.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "callmesh",
        "effects-worker",
        "--nats",
        nats_url,
        "--webhook-url",
        crm.url,
        "--durable",
        "proc-test",
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--backoff-base-s",
        "0.05",
        "--backoff-max-s",
        "0.2",
        stdout=log_file,
        stderr=log_file,
        cwd=Path(__file__).parent.parent,
    )
    log_file.close()
    try:
        await OutboxPublisher(streams).publish(effects("call-p", 5))
        await crm.wait_applied(5, timeout_s=30)
        async with aiohttp.ClientSession() as http:
            for path in ("/livez", "/healthz", "/readyz"):
                async with http.get(f"http://127.0.0.1:{port}{path}") as resp:
                    assert resp.status == 200, path
                    assert (await resp.json())["state"] == "running"
            async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                exposed = parse_exposition(await resp.text())
        assert exposed["callmesh_effects_deliveries_total"][(("outcome", "delivered"),)] == 5
        assert exposed["callmesh_effects_dead_letters_total"][()] == 0
        assert_dashboards_use_only(exposed, "callmesh_effects")
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert crm.duplicates() == {}
