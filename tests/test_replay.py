"""Replay against a real NATS and Redis: a call's log, as the node writes it, rebuilt and
checked against the checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
from nats.js import JetStreamContext
from redis.asyncio import Redis

from events import eventlog, subjects
from events.cli import EXIT_DIVERGED, EXIT_NOT_FOUND, EXIT_OK, add_replay_parser
from events.eventlog import EventType
from events.outbox import OutboxPublisher
from events.replay import build_report, list_calls, read_records
from events.replay_html import render_html
from events.replay_text import format_text
from events.streams import ensure_streams
from state_store.checkpoint import Checkpoint, OutboxEntry
from state_store.store import StateStore

T, CALL = "acme", "call-r1"
R = eventlog.record


def turn(
    n: int,
    seq: int,
    text: str,
    reply: str,
    facts: dict[str, str],
    *,
    effect: dict[str, Any] | None = None,
    fallback: str = "",
    heard: str | None = None,
) -> list[dict[str, Any]]:
    """The records of one answered turn, in the order the node writes them."""
    recs = [
        R(EventType.USER_TURN, n, seq=seq, text=text, confidence=0.92),
        R(
            EventType.RETRIEVAL,
            n,
            answered=["kb"],
            timed_out=[],
            from_cache=[],
            partial=False,
            snippets=["kb:hours"],
        ),
        R(
            EventType.LLM,
            n,
            prompt_digest="ab12cd34ef",
            prompt_tokens=640,
            state=facts,
            output=reply,
            tool_calls=[{"name": "create_booking", "arguments": effect}] if effect else [],
        ),
    ]
    if effect:
        recs.append(
            R(
                EventType.EFFECT,
                n,
                msg_id=subjects.effect_msg_id(T, CALL, n, 0),
                kind="booking_create",
                payload=effect,
            )
        )
    if fallback:
        recs.append(R(EventType.FALLBACK, n, kind=fallback, detail="kb slow"))
    said = reply if heard is None else heard
    recs += [
        R(EventType.AGENT_REPLY, n, text=reply, heard=said, interrupted=heard is not None),
        R(EventType.MEMORY, n, facts_set=facts, exchange=[n, text, said, heard is not None]),
        R(
            EventType.TURN_METRICS,
            n,
            metrics={
                "latency_ms": 420.0 + n,
                "stt_ms": 100.0,
                "retrieval_ms": 40.0,
                "llm_first_token_ms": 210.0,
                "tts_first_chunk_ms": 60.0,
                "intent": "booking",
                "fallbacks": [fallback] if fallback else [],
                "interrupted": heard is not None,
            },
        ),
    ]
    return recs


def call_log() -> list[dict[str, Any]]:
    """Start on node-a, two turns, node-a dies, node-b takes over (failover), a corrected
    fact ("no, Tuesday"), a barge-in, a hang-up."""
    recs = [
        R(
            EventType.CALL_STARTED,
            0,
            tenant=T,
            caller="bob",
            node="node-a",
            epoch=1,
            resumed=False,
            working_memory_turns=3,
        ),
        R(EventType.OWNERSHIP, 0, node="node-a", epoch=1, reason="start"),
        *turn(
            1,
            2,
            "A haircut on Monday, please",
            "Monday works. Booking it.",
            {"service": "haircut", "day": "Monday"},
            effect={"day": "Monday"},
        ),
        *turn(2, 4, "At 3pm", "3pm on Monday, noted.", {"time": "15:00"}),
        R(EventType.OWNERSHIP, 2, node="node-b", epoch=2, reason="failover"),
        *turn(
            3,
            7,
            "No, Tuesday",
            "Tuesday at 3pm it is, I have moved",
            {"day": "Tuesday"},
            fallback="retrieval_timeout",
            heard="Tuesday at 3pm",
        ),
        *turn(4, 9, "Thanks, bye", "Goodbye!", {}),
        R(EventType.CALL_ENDED, 4, reason="hangup", seq=10),
    ]
    for i, rec in enumerate(recs):
        rec["ts_ms"] = 1_700_000_000_000 + i * 100
    return recs


def final_checkpoint(epoch: int, **changes: Any) -> Checkpoint:
    """What node-b checkpointed at the end, written out by hand (not by the replayer)."""
    fields: dict[str, Any] = {
        "tenant": T,
        "call_id": CALL,
        "caller": "bob",
        "epoch": epoch,
        "node": "node-b",
        "last_seq": 10,
        "turn": 4,
        "status": "ended",
        "working": [
            [2, "At 3pm", "3pm on Monday, noted.", False],
            [3, "No, Tuesday", "Tuesday at 3pm", True],
            [4, "Thanks, bye", "Goodbye!", False],
        ],
        "facts": {
            "service": ["haircut", 1, None],
            "day": ["Tuesday", 3, "Monday"],
            "time": ["15:00", 2, None],
        },
        "event_cursor": len(call_log()),
    }
    fields.update(changes)
    return Checkpoint(**fields)


def commits(recs: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The records grouped as the node commits them: the start, each turn, the takeover,
    the hang-up."""
    groups: list[list[dict[str, Any]]] = []
    for rec in recs:
        own_commit = rec["type"] == "call_ended" or (
            rec["type"] == "ownership" and rec["reason"] != "start"
        )
        if not groups or own_commit or rec["turn"] != groups[-1][-1]["turn"]:
            groups.append([])
        groups[-1].append(rec)
    return groups


def outbox_entries(recs: list[dict[str, Any]]) -> list[OutboxEntry]:
    """The outbox entries of ``recs``, one message per commit, as the node encodes them."""
    entries: list[OutboxEntry] = []
    cursor = 0
    for group in commits(recs):
        entries += eventlog.to_outbox(T, CALL, group, cursor)
        cursor += len(group)
    return entries


async def publish_log(js: JetStreamContext, recs: list[dict[str, Any]]) -> None:
    """Publish as the node does: through the outbox, a message per commit with event-cursor
    dedupe ids; the effects worker's delivery record lands between turn 2 and the failover."""
    entries = outbox_entries(recs)
    failover = next(i for i, r in enumerate(recs) if r["type"] == "ownership" and r["turn"] == 2)
    split = next(
        i for i, e in enumerate(entries) if e.msg_id == subjects.event_msg_id(T, CALL, failover)
    )
    publisher = OutboxPublisher(js)
    await publisher.publish(entries[:split])
    delivery = R(
        EventType.EFFECT_DELIVERY,
        1,
        msg_id=subjects.effect_msg_id(T, CALL, 1, 0),
        outcome="delivered",
        attempts=2,
        status=201,
        lag_ms=1800,
    )
    delivery["ts_ms"] = recs[0]["ts_ms"] + 2300
    await js.publish(
        subjects.call_events(T, CALL),
        eventlog.encode(delivery),
        headers={"Nats-Msg-Id": f"{subjects.effect_msg_id(T, CALL, 1, 0)}:delivery"},
    )
    await publisher.publish(entries[split:])
    await publisher.publish(entries[split:])  # a republish after failover: de-duplicated


async def save(redis: Redis, ckpt: Checkpoint) -> None:
    store = StateStore(redis)
    assert (await store.take_ownership(T, CALL, "node-a"))[0] == 1
    epoch, _ = await store.take_ownership(T, CALL, "node-b")
    ckpt.epoch = epoch
    await store.save(ckpt)


@pytest.fixture
async def logged(js: JetStreamContext) -> JetStreamContext:
    await ensure_streams(js)
    await publish_log(js, call_log())
    return js


async def report_for(js: JetStreamContext, redis: Redis, tenant: str = T, at: int | None = None):
    records = await read_records(js, tenant, CALL)
    return build_report(tenant, CALL, records, await StateStore(redis).load(tenant, CALL), at=at)


async def test_rebuilds_the_call_and_verifies_it_against_the_checkpoint(
    logged: JetStreamContext, redis: Redis
) -> None:
    await save(redis, final_checkpoint(2))
    report = await report_for(logged, redis)
    assert len(report.records) == len(call_log()) + 1
    assert report.verified is True and report.divergences == [] and report.warnings == []
    st = report.final
    assert (st.turn, st.last_seq, st.status, st.ended_reason) == (4, 10, "ended", "hangup")
    assert st.facts.to_state()["day"] == ["Tuesday", 3, "Monday"]
    assert [(o["node"], o["epoch"], o["reason"]) for o in st.ownership] == [
        ("node-a", 1, "start"),
        ("node-b", 2, "failover"),
    ]
    [effect] = st.effects.values()
    assert (effect.kind, effect.outcome, effect.attempts) == ("booking_create", "delivered", 2)
    text = format_text(report)
    for expected in (
        "owner node-b epoch 2 (failover)",
        "fact day = Tuesday (turn 3, was Monday)",
        "fallback retrieval_timeout",
        "interrupted, heard",
        "verified",
        f"effect {T}:{CALL}:1:0 delivered after 2 attempt(s)",
    ):
        assert expected in text
    doc = report.to_dict()
    assert json.loads(json.dumps(doc))["verified"] is True
    assert [t["turn"] for t in doc["turns"]] == [0, 1, 2, 3, 4]


async def test_at_turn_shows_the_state_as_of_that_turn(
    logged: JetStreamContext, redis: Redis
) -> None:
    await save(redis, final_checkpoint(2))
    report = await report_for(logged, redis, at=1)
    st = report.state
    assert (st.turn, st.last_seq, st.status, st.node, st.epoch) == (1, 2, "active", "node-a", 1)
    assert st.facts.values() == {"service": "haircut", "day": "Monday"}
    assert st.working.to_state() == [
        [1, "A haircut on Monday, please", "Monday works. Booking it.", False]
    ]
    assert [t for t, _ in report.turns()] == [0, 1]
    assert report.verified is True  # verification always uses the whole log
    assert "state as of turn 1" in format_text(report)
    at2 = (await report_for(logged, redis, at=2)).state
    assert (at2.node, at2.epoch, at2.facts.get("time")) == ("node-b", 2, "15:00")


async def test_divergence_from_the_checkpoint_is_reported_field_by_field(
    logged: JetStreamContext, redis: Redis
) -> None:
    # As if the new owner had lost the correction and the last turn.
    wrong = final_checkpoint(
        2,
        turn=3,
        facts={
            "service": ["haircut", 1, None],
            "day": ["Monday", 1, None],
            "time": ["15:00", 2, None],
        },
    )
    await save(redis, wrong)
    report = await report_for(logged, redis)
    assert report.verified is False
    by_field = {d.field: d for d in report.divergences}
    assert set(by_field) == {"turn", "facts.day"}
    assert by_field["facts.day"].rebuilt == ["Tuesday", 3, "Monday"]
    assert by_field["facts.day"].checkpoint == ["Monday", 1, None]
    assert "DIVERGED from the checkpoint in 2 field(s)" in format_text(report)


async def test_replay_is_scoped_to_the_tenant(logged: JetStreamContext, redis: Redis) -> None:
    await save(redis, final_checkpoint(2))
    assert await read_records(logged, "globex", CALL) == []
    report = await report_for(logged, redis, tenant="globex")
    assert not report.found
    # Messages: one per commit, and the effect's delivery.
    assert await list_calls(logged, T) == {CALL: len(commits(call_log())) + 1}
    assert await list_calls(logged, "globex") == {}
    for bad in ("*", ">", "acme.call-r1", ""):
        with pytest.raises(ValueError):
            await read_records(logged, bad, CALL)


async def test_records_still_in_the_outbox_are_shown_as_pending(
    js: JetStreamContext, redis: Redis
) -> None:
    # The node committed the hang-up and died before publishing it; nobody took over.
    await ensure_streams(js)
    recs = call_log()
    await publish_log(js, recs[:-1])
    ended = outbox_entries(recs)[-1:]
    await save(redis, final_checkpoint(2, outbox=ended))
    report = await report_for(js, redis)
    assert report.verified is True
    assert report.records[-1]["type"] == "call_ended" and report.records[-1]["_pending"]
    assert any("not published yet" in w for w in report.warnings)


async def test_html_page_is_self_contained(logged: JetStreamContext, redis: Redis) -> None:
    await save(redis, final_checkpoint(2))
    page = render_html(await report_for(logged, redis))
    assert page.startswith("<!doctype html>") and "<svg" in page and "</svg>" in page
    assert page.count("<rect") >= 4 * 4  # four turns, four stages each
    assert "turn 3" in page and "owner node-b epoch 2 (failover)" in page
    assert "Verified" in page
    assert "<script" not in page and "src=" not in page and "href=" not in page
    assert "&quot;No, Tuesday&quot;" in page  # text is escaped


def replay_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_replay_parser(parser.add_subparsers())
    return parser.parse_args(["replay", *argv])


async def test_cli_replay_json_html_and_exit_codes(
    logged: JetStreamContext,
    redis: Redis,
    redis_url: str,
    nats_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await save(redis, final_checkpoint(2))
    backends = ("--redis", redis_url, "--nats", nats_url)
    page = tmp_path / "call.html"
    args = replay_args(CALL, "--tenant", T, "--json", "--html", str(page), *backends)
    assert await args.func(args) == EXIT_OK
    doc = json.loads(capsys.readouterr().out)
    assert doc["verified"] is True and doc["final_state"]["facts"]["day"][0] == "Tuesday"
    assert "<svg" in page.read_text(encoding="utf-8")

    args = replay_args(CALL, "--tenant", T, "--at", "2", *backends)
    assert await args.func(args) == EXIT_OK
    assert "state as of turn 2" in capsys.readouterr().out

    args = replay_args(CALL, "--tenant", "globex", *backends)
    assert await args.func(args) == EXIT_NOT_FOUND

    await StateStore(redis).save(final_checkpoint(2, turn=5))
    args = replay_args(CALL, "--tenant", T, *backends)
    assert await args.func(args) == EXIT_DIVERGED
    assert "turn: log 4" in capsys.readouterr().out


def test_a_delivery_logged_before_its_effect_record_still_settles_it() -> None:
    # The node publishes the effect before the turn's records, so a fast worker's
    # EFFECT_DELIVERY can precede the EFFECT record in the log.
    recs = call_log()
    first_effect = next(i for i, r in enumerate(recs) if r["type"] == "effect")
    delivery = R(
        EventType.EFFECT_DELIVERY,
        1,
        msg_id=subjects.effect_msg_id(T, CALL, 1, 0),
        outcome="dead_lettered",
        attempts=10,
        status=503,
        lag_ms=90_000,
        reason="max_deliveries",
    )
    recs.insert(first_effect, delivery)
    state = build_report(T, CALL, recs, None).final
    assert state.effects[subjects.effect_msg_id(T, CALL, 1, 0)].outcome == "dead_lettered"


async def test_undecodable_records_are_kept_and_flagged(
    logged: JetStreamContext, redis: Redis
) -> None:
    await logged.publish(subjects.call_events(T, CALL), b"\xff not json")
    await save(redis, final_checkpoint(2))
    report = await report_for(logged, redis)
    assert report.records[-1]["type"] == "undecodable"
    assert any("could not be decoded" in w for w in report.warnings)
    assert report.verified is True


def test_withdrawn_fact_is_cleared_on_rebuild() -> None:
    from events.eventlog import EventType, record
    from events.replay_state import rebuild

    records = [
        record(EventType.MEMORY, 1, facts_set={"confirmed": "booking: cleaning"}, exchange=None),
        record(
            EventType.MEMORY,
            2,
            facts_set={"date": "Wednesday"},
            facts_cleared=["confirmed"],
            exchange=None,
        ),
    ]
    state = rebuild("demo", "c1", records)
    assert state.facts.get("confirmed") is None
    assert state.facts.get("date") == "Wednesday"
