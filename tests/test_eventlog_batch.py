"""One event-log message per commit: encoding, splitting, reading old and new messages
together, and de-duplication of a republished batch against a real NATS."""

from __future__ import annotations

import json
from typing import Any

from nats.js import JetStreamContext
from redis.asyncio import Redis

from events import eventlog, subjects
from events.eventlog import EventType
from events.outbox import OutboxPublisher
from events.replay import build_report, list_calls, read_records
from events.streams import ensure_streams
from state_store.checkpoint import Checkpoint

T, CALL = "acme", "call-b1"
R = eventlog.record


def a_turn(n: int, text: str = "hello") -> list[dict[str, Any]]:
    return [
        R(EventType.USER_TURN, n, seq=n + 1, text=text, confidence=0.9),
        R(EventType.AGENT_REPLY, n, text=f"reply {n}", heard=f"reply {n}", interrupted=False),
        R(EventType.MEMORY, n, facts_set={}, exchange=[n, text, f"reply {n}", False]),
        R(EventType.TURN_METRICS, n, metrics={"latency_ms": 400.0}),
    ]


def strip(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in recs]


def test_a_commit_is_one_message_that_decodes_to_its_records() -> None:
    recs = a_turn(3)
    (entry,) = eventlog.to_outbox(T, CALL, recs, 17)
    assert entry.subject == subjects.call_events(T, CALL)
    assert entry.msg_id == subjects.event_msg_id(T, CALL, 17)  # the first record's index
    assert entry.turn == 3
    assert entry.data.count(b"\n") == len(recs) - 1  # JSON lines, no trailing newline
    assert eventlog.decode_message(entry.data) == recs
    # Encoding is deterministic: the same commit gives the same message and id.
    assert eventlog.to_outbox(T, CALL, recs, 17) == [entry]


def test_a_newline_inside_a_value_stays_inside_its_record() -> None:
    recs = [R(EventType.USER_TURN, 1, text="line one\nline two"), R(EventType.LLM, 1, output="x")]
    (entry,) = eventlog.to_outbox(T, CALL, recs, 0)
    assert eventlog.decode_message(entry.data) == recs


def test_a_single_record_message_is_the_old_format() -> None:
    rec = R(EventType.CALL_STARTED, 0, tenant=T, caller="bob", node="n1", epoch=1)
    (entry,) = eventlog.to_outbox(T, CALL, [rec], 0)
    assert entry.data == eventlog.encode_for_log(rec)
    assert eventlog.decode_message(eventlog.encode(rec)) == [rec]


def test_an_oversized_commit_is_split_in_order() -> None:
    recs = [R(EventType.LLM, 1, output="x" * 300, n=i) for i in range(10)]
    size = len(eventlog.encode(recs[0]))
    entries = eventlog.to_outbox(T, CALL, recs, 5, max_bytes=3 * size + 2)
    assert [len(eventlog.decode_message(e.data)) for e in entries] == [3, 3, 3, 1]
    assert [e.msg_id for e in entries] == [
        subjects.event_msg_id(T, CALL, 5 + i) for i in (0, 3, 6, 9)
    ]
    assert all(len(e.data) <= 3 * size + 2 for e in entries)
    assert [r for e in entries for r in eventlog.decode_message(e.data)] == recs


def test_message_spans_pack_lines_and_keep_an_oversized_line_alone() -> None:
    assert eventlog.message_spans([]) == []
    assert eventlog.message_spans([4, 4, 4], max_bytes=9) == [(0, 2), (2, 3)]
    assert eventlog.message_spans([4, 4, 4], max_bytes=8) == [(0, 1), (1, 2), (2, 3)]
    assert eventlog.message_spans([20, 1, 1, 20], max_bytes=10) == [(0, 1), (1, 3), (3, 4)]


def test_an_undecodable_line_does_not_lose_the_others() -> None:
    good = a_turn(1)[:2]
    data = eventlog.encode(good[0]) + b"\n\xff not json\n[1]\n" + eventlog.encode(good[1])
    recs = eventlog.decode_message(data)
    assert [r["type"] for r in recs] == ["user_turn", "undecodable", "undecodable", "agent_reply"]
    assert recs[1]["raw"] == "\ufffd not json" and recs[2]["raw"] == "[1]"
    assert eventlog.decode_message(b"") == [eventlog.undecodable(b"")]
    deep = b"[" * 100_000 + b"]" * 100_000
    assert eventlog.decode_message(deep)[0]["type"] == "undecodable"


async def test_old_single_record_and_new_batch_messages_read_as_one_log(
    js: JetStreamContext,
) -> None:
    await ensure_streams(js)
    start = [
        R(EventType.CALL_STARTED, 0, tenant=T, caller="bob", node="n1", epoch=1),
        R(EventType.OWNERSHIP, 0, node="n1", epoch=1, reason="start"),
    ]
    turns = [a_turn(1), a_turn(2)]
    publisher = OutboxPublisher(js)
    # Written by an older node: one message per record, each under its own index.
    subject = subjects.call_events(T, CALL)
    for i, rec in enumerate(start + turns[0]):
        await js.publish(
            subject,
            eventlog.encode_for_log(rec),
            headers={"Nats-Msg-Id": subjects.event_msg_id(T, CALL, i)},
        )
    cursor = len(start) + len(turns[0])
    await publisher.publish(eventlog.to_outbox(T, CALL, turns[1], cursor))
    got = await read_records(js, T, CALL)
    assert strip(got) == start + turns[0] + turns[1]
    old_seqs = [r["_seq"] for r in got[:cursor]]
    assert len(set(old_seqs)) == cursor  # a message each
    batch = got[cursor:]
    assert {r["_seq"] for r in batch} == {cursor + 1}
    assert {r["_msg_id"] for r in batch} == {subjects.event_msg_id(T, CALL, cursor)}
    assert await list_calls(js, T) == {CALL: cursor + 1}  # messages, not records


async def test_a_republished_batch_is_stored_once(js: JetStreamContext, redis: Redis) -> None:
    await ensure_streams(js)
    first, second = a_turn(1), a_turn(2)
    entries = eventlog.to_outbox(T, CALL, first, 0)
    later = eventlog.to_outbox(T, CALL, second, len(first))
    publisher = OutboxPublisher(js)
    assert await publisher.publish(entries + later) == [entries[0].msg_id, later[0].msg_id]
    # A retry, and a new owner republishing the same entries from the checkpoint.
    await publisher.publish(entries + later)
    await OutboxPublisher(js).publish(later)
    assert await list_calls(js, T) == {CALL: 2}
    assert strip(await read_records(js, T, CALL)) == first + second


async def test_a_pending_batch_is_shown_whole_and_not_twice(js: JetStreamContext) -> None:
    await ensure_streams(js)
    first, second = a_turn(1), a_turn(2)
    published = eventlog.to_outbox(T, CALL, first, 0)
    pending = eventlog.to_outbox(T, CALL, second, len(first))
    await OutboxPublisher(js).publish(published)
    ckpt = Checkpoint(T, CALL, "bob", 1, "n1", turn=2, outbox=published + pending, event_cursor=8)
    report = build_report(T, CALL, await read_records(js, T, CALL), ckpt)
    assert strip(report.records) == json.loads(json.dumps(first + second))
    assert [r.get("_pending", False) for r in report.records] == [False] * 4 + [True] * 4
    assert any("4 committed records were not published yet" in w for w in report.warnings)


async def test_a_bad_line_in_a_stored_batch_is_flagged_and_the_rest_kept(
    js: JetStreamContext,
) -> None:
    await ensure_streams(js)
    good = a_turn(1)
    lines = [eventlog.encode(r) for r in good]
    lines.insert(2, b"\xff not json")
    await js.publish(subjects.call_events(T, CALL), b"\n".join(lines))
    report = build_report(T, CALL, await read_records(js, T, CALL), None)
    assert [r["type"] for r in report.records] == [
        "user_turn",
        "agent_reply",
        "undecodable",
        "memory",
        "turn_metrics",
    ]
    assert any("could not be decoded" in w for w in report.warnings)
    assert report.final.turn == 1
