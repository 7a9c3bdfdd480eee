"""The call core on its own: no Redis, no NATS, no sockets, no event loop.

What a live call decides (its state machine, the sequence and turn accounting that make a
failover's replay safe, and what each step emits and records) is driven here directly,
the way h11's state machine is tested: events in, frames and records out.
"""

from __future__ import annotations

import ast
import inspect
import itertools
import json
from typing import Any

import pytest

from callmesh.protocol import In, Inbound, parse_inbound
from callmesh.telemetry import TurnMetrics
from conversation_node import call_core, turn_outcomes
from conversation_node.call_core import (
    CallCore,
    CallState,
    IllegalTransition,
    Step,
)
from conversation_node.errors import CallDropped
from conversation_node.pipeline import TurnOutput
from conversation_node.prompt import INSTRUCTIONS, Greeting, build_request
from conversation_node.providers.base import ToolCall
from conversation_node.turn_outcomes import Reply
from memory.prompt import PromptBuilder
from memory.retrieval import RetrievalResult, SourceStatus
from memory.session import MemoryConfig
from state_store.checkpoint import Checkpoint, OutboxEntry

LEGAL = {
    (CallState.NEW, CallState.ACTIVE),
    (CallState.NEW, CallState.FENCED),
    (CallState.NEW, CallState.CLOSED),
    (CallState.ACTIVE, CallState.ENDED),
    (CallState.ACTIVE, CallState.FENCED),
    (CallState.ACTIVE, CallState.HANDED_OFF),
    (CallState.ACTIVE, CallState.CLOSED),
    (CallState.ENDED, CallState.FENCED),  # its final write met a newer owner
    (CallState.ENDED, CallState.CLOSED),
    (CallState.FENCED, CallState.CLOSED),
    (CallState.HANDED_OFF, CallState.CLOSED),
}
ALL_PAIRS = list(itertools.product(CallState, CallState))
BOOKING = {"name": "Maya", "service": "cleaning", "date": "Tuesday", "time": "3:00 pm"}


def core(caller: str = "maya") -> CallCore:
    return CallCore(
        "demo", "call-1", caller, node_id="node-1", memory_config=MemoryConfig(), created_ms=1000
    )


def frame(type: str, seq: int, **body: Any) -> Inbound:
    return parse_inbound(json.dumps({"type": type, "seq": seq, **body}))


def start(seq: int = 1, **body: Any) -> Inbound:
    return frame("start", seq, tenant="demo", caller="maya", **body)


def opened(c: CallCore | None = None, *, seq: int = 1, epoch: int = 1) -> CallCore:
    """A new call as the session opens it: owned, greeted, active."""
    c = c or core()
    c.owned(start(seq), epoch, None, working_memory_turns=8)
    c.greet(Greeting("Hello, how can I help?"))
    c.to(CallState.ACTIVE)
    return c


def in_state(state: CallState) -> CallCore:
    c = core()
    path = {
        CallState.NEW: [],
        CallState.ACTIVE: [CallState.ACTIVE],
        CallState.ENDED: [CallState.ACTIVE, CallState.ENDED],
        CallState.FENCED: [CallState.FENCED],
        CallState.HANDED_OFF: [CallState.ACTIVE, CallState.HANDED_OFF],
        CallState.CLOSED: [CallState.CLOSED],
    }[state]
    for s in path:
        c.to(s)
    assert c.state is state
    return c


def retrieval(text: str, **status: SourceStatus) -> RetrievalResult:
    return RetrievalResult(text, (), status or {"kb": SourceStatus.ANSWERED}, 1.0)


def answer_turn(
    c: CallCore,
    seq: int,
    text: str,
    reply: str = "Sure.",
    *,
    tool_calls: list[ToolCall] | None = None,
    heard: str | None = None,
    fallbacks: list[str] | None = None,
    result: RetrievalResult | None = None,
) -> turn_outcomes.Answer:
    """One user turn as the turn runner drives the core, with the pipeline's output given."""
    t = c.begin_user_turn(seq, text, 0.9)
    result = result or retrieval(text)
    prompt = PromptBuilder(INSTRUCTIONS).build(c.memory, text, result)
    request = build_request(prompt, text, seed=f"{c.call_id}:{t.turn}")
    output = TurnOutput(text=reply, tool_calls=tool_calls or [], fallbacks=fallbacks or [])
    said = reply if heard is None else heard
    return c.answered(t, Reply(result, 2.0, prompt, request, output, said, heard is not None))


def kinds(records: list[dict[str, Any]]) -> list[str]:
    return [r["type"] for r in records]


# ---------------------------------------------------------------- the state machine


@pytest.mark.parametrize(("old", "new"), ALL_PAIRS)
def test_a_transition_is_allowed_exactly_when_the_table_says(
    old: CallState, new: CallState
) -> None:
    c = in_state(old)
    if (old, new) in LEGAL:
        c.to(new)
        assert c.state is new
        assert c.active is (new is CallState.ACTIVE)
    else:
        with pytest.raises(IllegalTransition):
            c.to(new)
        assert c.state is old, "a refused transition changes nothing"


def test_a_call_is_opened_once() -> None:
    c = opened()
    with pytest.raises(IllegalTransition):
        c.owned(start(), 2, None, working_memory_turns=8)


def test_fence_and_close_are_idempotent_and_an_ended_calls_final_write_can_be_fenced() -> None:
    c = opened()
    c.fence()
    c.fence()
    assert c.state is CallState.FENCED
    c.close()
    c.close()
    assert c.state is CallState.CLOSED
    ended = opened()
    ended.hangup(5)
    ended.fence()  # a newer owner fenced the final checkpoint out: the call lives there
    assert ended.state is CallState.FENCED
    handed_off = in_state(CallState.HANDED_OFF)
    with pytest.raises(IllegalTransition):
        handed_off.fence()


@pytest.mark.parametrize(
    "state", [CallState.NEW, CallState.ENDED, CallState.FENCED, CallState.CLOSED]
)
def test_only_an_active_call_takes_frames(state: CallState) -> None:
    with pytest.raises(CallDropped, match=str(state)):
        in_state(state).receive(frame("user_text", 9, text="hi"))


# ---------------------------------------------------------------- sequence accounting


def test_each_inbound_type_has_its_step() -> None:
    c = opened(seq=1)
    steps = {
        "audio": (Step.AUDIO, {"data": "AAAA"}),
        "mark": (Step.MARK, {"name": "0.1"}),
        "dtmf": (Step.DTMF, {"digit": "5"}),
        "user_text": (Step.USER_TEXT, {"text": "hi"}),
        "hangup": (Step.HANGUP, {}),
        "start": (Step.REFUSE_START, {"tenant": "demo"}),
    }
    assert {t.value for t in In} == set(steps)
    for type_, (step, body) in steps.items():
        assert c.receive(frame(type_, 2, **body)) is step


def test_frames_applied_before_are_skipped_and_only_a_turn_moves_last_seq() -> None:
    c = opened(seq=1)
    assert c.last_seq == 1
    assert c.receive(frame("user_text", 1, text="again")) is Step.SKIP  # the start's seq
    assert c.receive(frame("user_text", 2, text="hi")) is Step.USER_TEXT
    assert c.last_seq == 1, "receiving is not applying"
    answer_turn(c, 2, "hi")
    assert c.last_seq == 2
    assert c.receive(frame("user_text", 2, text="hi")) is Step.SKIP  # a duplicate
    assert c.receive(frame("audio", 2, data="AAAA")) is Step.SKIP
    # A gap is the router's business (it numbers frames); the node takes what comes next.
    assert c.receive(frame("user_text", 9, text="later")) is Step.USER_TEXT


def test_a_voice_turn_applies_the_audio_it_heard_never_moving_last_seq_back() -> None:
    c = opened(seq=1)
    c.applied(40)  # audio accepted unheard (no recognizer)
    assert c.last_seq == 40
    c.applied(30)
    assert c.last_seq == 40
    answer_turn(c, 35, "hi")  # an utterance heard up to frame 35, answered later
    assert c.last_seq == 40
    answer_turn(c, 55, "and then")
    assert c.last_seq == 55


def test_quiet_audio_is_acknowledged_only_beyond_what_a_turn_acknowledged() -> None:
    c = opened(seq=1)
    answer_turn(c, 10, "hi")
    assert c.quiet_ack(10) is None
    assert c.quiet_ack(7) is None
    assert json.loads(c.quiet_ack(12) or "") == {"type": "ack", "seq": 12, "turn": 1}
    assert c.last_seq == 10, "a quiet ack is sent, not applied"
    assert json.loads(c.ack()) == {"type": "ack", "seq": 10, "turn": 1}


def test_a_replay_after_failover_is_skipped_up_to_the_checkpoint() -> None:
    first = opened(seq=1, epoch=1)
    answer_turn(first, 2, "Hi, my name is Maya")
    answer_turn(first, 5, "I'd like a cleaning")
    ckpt = first.snapshot([], 7, now_ms=5000)
    # The new owner restores it; the router replays every frame it did not see acked.
    second = core(caller="someone-else")
    opening = second.owned(start(1, resume="failover"), 2, ckpt, working_memory_turns=8)
    second.to(CallState.ACTIVE)
    assert opening.resumed
    assert (second.turn, second.last_seq, second.caller) == (2, 5, "maya")
    for seq in range(1, 6):
        assert second.receive(frame("user_text", seq, text="replayed")) is Step.SKIP
    assert second.receive(frame("user_text", 6, text="new")) is Step.USER_TEXT


# ---------------------------------------------------------------- turn accounting


def test_turns_count_up_and_a_failed_turn_rolls_back_turn_and_memory() -> None:
    c = opened()
    answer_turn(c, 2, "Hi, my name is Maya")
    assert c.turn == 1
    before = (c.turn, c.memory.to_state(), c.last_seq)
    savepoint = c.savepoint()
    c.begin_user_turn(3, "Actually my name is Dora", 1.0)
    assert c.turn == 2 and c.memory.facts.get("name") == "Dora"
    c.rollback(savepoint)
    assert (c.turn, c.memory.to_state(), c.last_seq) == before
    answer_turn(c, 3, "I'd like a cleaning")
    assert c.turn == 2


def test_a_repeat_turn_counts_but_takes_nothing_from_what_was_heard() -> None:
    c = opened(seq=1)
    t = c.begin_repeat_turn(4, "my name is mumble", 0.2)
    assert (t.turn, t.intent, t.ops) == (1, "repeat", [])
    records = c.repeated(
        t,
        line="Say again?",
        heard="Say again?",
        interrupted=False,
        fallbacks=["stt_low_confidence"],
    )
    assert kinds(records) == ["user_turn", "fallback", "agent_reply", "memory"]
    assert records[0]["understood"] is False and records[0]["text"] == "my name is mumble"
    assert c.memory.facts.get("name") is None
    assert (c.turn, c.last_seq) == (1, 4)


def test_the_last_reply_is_said_again_only_if_the_caller_missed_it() -> None:
    c = opened()
    answer_turn(c, 2, "Hi, my name is Maya", reply="Nice to meet you, Maya.")
    restored = core()
    restored.owned(start(), 2, c.snapshot([], 0, 0), working_memory_turns=8)
    assert restored.reply_to_repeat(0) == "Nice to meet you, Maya."
    assert restored.reply_to_repeat(1) is None  # delivered in full
    assert restored.reply_to_repeat(None) is None  # the client did not say
    assert restored.reply_to_repeat("0") is None


# ---------------------------------------------------------------- what is emitted and recorded


def test_start_records_the_call_and_its_ownership_then_greets() -> None:
    c = core()
    opening = c.owned(
        start(3, audio={"encoding": "mulaw", "sample_rate": 8000}), 4, None, working_memory_turns=6
    )
    assert not opening.resumed and opening.refusal is None
    assert kinds(opening.records) == ["call_started", "ownership"]
    started, owner = opening.records
    assert (started["seq"], started["epoch"], started["node"]) == (3, 4, "node-1")
    assert started["working_memory_turns"] == 6 and started["audio"]["encoding"] == "mulaw"
    assert (owner["reason"], owner["epoch"], owner["turn"]) == ("start", 4, 0)
    assert (c.last_seq, c.epoch, c.state) == (3, 4, CallState.NEW)
    greeting = c.greet(Greeting("Welcome back, Maya.", {"name": "Maya"}, ("old-call",)))
    assert kinds(greeting) == ["agent_reply", "memory"]
    assert greeting[1]["facts_set"] == {"name": "Maya"} and greeting[1]["history"] == ["old-call"]
    assert c.memory.facts.get("name") == "Maya"
    c.to(CallState.ACTIVE)
    assert json.loads(c.ready(resumed=False)) == {
        "type": "ready",
        "turn": 0,
        "call_id": "call-1",
        "node": "node-1",
        "epoch": 4,
        "resumed": False,
        "last_seq": 3,
    }


def test_restore_records_only_the_ownership_and_keeps_the_checkpointed_call() -> None:
    ckpt = Checkpoint(
        "demo", "call-1", "maya", epoch=3, node="node-2", last_seq=11, turn=4, created_ms=77
    )
    c = core(caller="anonymous")
    opening = c.owned(start(1), 4, ckpt, working_memory_turns=8)
    assert opening.resumed and kinds(opening.records) == ["ownership"]
    assert (opening.records[0]["reason"], opening.records[0]["turn"]) == ("reconnect", 4)
    assert (c.turn, c.last_seq, c.created_ms, c.caller) == (4, 11, 77, "maya")
    c.to(CallState.ACTIVE)
    ready = json.loads(c.ready(resumed=True))
    assert (ready["resumed"], ready["last_seq"], ready["turn"]) == (True, 11, 4)
    failover = core().owned(start(1, resume="failover"), 5, ckpt, working_memory_turns=8)
    assert failover.records[0]["reason"] == "failover"


def test_an_ended_call_is_refused_and_closed() -> None:
    ckpt = Checkpoint("demo", "call-1", "maya", epoch=3, node="node-2", status="ended")
    c = core()
    opening = c.owned(start(1), 4, ckpt, working_memory_turns=8)
    assert opening.records == [] and c.state is CallState.CLOSED
    assert json.loads(opening.refusal or "")["code"] == "call_ended"
    with pytest.raises(CallDropped):
        c.receive(frame("user_text", 2, text="hello?"))


def test_a_user_turn_records_what_it_saw_did_and_booked() -> None:
    c = opened(seq=1)
    booking = ToolCall("t1", "create_booking", BOOKING)
    answer = answer_turn(
        c,
        2,
        "Yes, book the cleaning",
        reply="Booked.",
        tool_calls=[booking, ToolCall("t2", "unknown_tool", {})],
        fallbacks=["llm_timeout"],
        result=retrieval("x", kb=SourceStatus.ANSWERED, history=SourceStatus.TIMED_OUT),
    )
    assert kinds(answer.records) == [
        "user_turn",
        "retrieval",
        "llm",
        "effect",
        "fallback",
        "fallback",
        "agent_reply",
        "memory",
    ]
    user, _, llm, effect, *_ = answer.records
    assert (user["seq"], user["text"], user["confidence"], user["turn"]) == (
        2,
        "Yes, book the cleaning",
        0.9,
        1,
    )
    assert [t["name"] for t in llm["tool_calls"]] == ["create_booking", "unknown_tool"]
    assert answer.fallbacks == ["retrieval_partial", "llm_timeout"]
    assert [e.turn for e in answer.effects] == [1] and effect["msg_id"] == answer.effects[0].msg_id
    assert effect["kind"] == "booking_create" and effect["payload"] == BOOKING
    assert answer.records[-1]["facts_set"]["booked"] == "cleaning for Tuesday at 3:00 pm"
    assert c.memory.facts.get("booked") == "cleaning for Tuesday at 3:00 pm"
    assert c.last_seq == 2


def test_an_interrupted_reply_is_remembered_as_heard_and_a_later_barge_in_amends() -> None:
    c = opened()
    answer = answer_turn(
        c, 2, "What are your hours?", reply="We open at 8. We close at 6.", heard="We open at 8."
    )
    reply = answer.records[-2]
    assert (reply["text"], reply["heard"], reply["interrupted"]) == (
        "We open at 8. We close at 6.",
        "We open at 8.",
        True,
    )
    assert c.memory.working.last().agent == "We open at 8."  # type: ignore[union-attr]
    answer_turn(c, 3, "And on Saturday?", reply="Saturday 9 to 1. Sunday closed.")
    assert c.amend_heard(1, "x") is None, "only the last turn can be amended"
    amended = c.amend_heard(2, "Saturday 9 to 1.")
    assert amended is not None and kinds(amended) == ["barge_in", "memory"]
    assert amended[1]["exchange"] == [2, "And on Saturday?", "Saturday 9 to 1.", True]
    assert c.amend_heard(2, "Saturday") is None, "already interrupted"
    c.hangup(9)
    assert c.amend_heard(2, "Saturday") is None


def test_a_turn_closes_with_its_metrics_and_a_deferred_effect_sink_is_named() -> None:
    c = opened()
    answer = answer_turn(c, 2, "hi")
    metrics = TurnMetrics(call_id="call-1", turn=1)
    c.close_turn(answer.records, metrics, effects_waiting=True)
    assert kinds(answer.records)[-2:] == ["fallback", "turn_metrics"]
    assert answer.records[-2]["kind"] == "effects_deferred"
    assert answer.records[-1]["metrics"]["fallbacks"] == ["effects_deferred"]
    records: list[dict[str, Any]] = []
    c.close_turn(records, TurnMetrics(call_id="call-1", turn=1), effects_waiting=False)
    assert kinds(records) == ["turn_metrics"]
    assert kinds(c.greeted(["tts_backup"])) == ["fallback"]


def test_hangup_ends_the_call_with_its_record_and_frame() -> None:
    c = opened(seq=1)
    answer_turn(c, 2, "hi")
    records = c.hangup(3)
    assert kinds(records) == ["call_ended"]
    assert (records[0]["seq"], records[0]["turn"], records[0]["reason"]) == (3, 1, "hangup")
    assert (c.state, c.last_seq) == (CallState.ENDED, 3)
    assert json.loads(c.ended()) == {"type": "call_ended", "turn": 1}
    assert c.snapshot([], 9, 0).status == "ended"
    with pytest.raises(CallDropped):
        c.receive(frame("user_text", 4, text="still there?"))
    with pytest.raises(IllegalTransition):
        c.hangup(5)


def test_handoff_is_a_frame_and_a_state_and_only_from_an_active_call() -> None:
    c = opened()
    answer_turn(c, 2, "hi")
    assert json.loads(c.hand_off()) == {"type": "handoff", "turn": 1}
    assert c.state is CallState.HANDED_OFF
    assert c.snapshot([], 0, 0).status == "active", "the next owner continues the call"
    with pytest.raises(IllegalTransition):
        c.hand_off()


def test_a_fenced_call_takes_no_more_frames() -> None:
    c = opened()
    c.fence()
    with pytest.raises(CallDropped, match="fenced"):
        c.receive(frame("user_text", 2, text="hi"))


def test_a_second_start_is_refused_with_the_current_turn() -> None:
    c = opened()
    answer_turn(c, 2, "hi")
    refusal = json.loads(c.refuse_start(3))
    assert (refusal["code"], refusal["seq"], refusal["turn"]) == ("already_started", 3, 1)


def test_the_snapshot_is_the_call_and_restores_to_the_same_call() -> None:
    c = opened(epoch=6)
    answer_turn(c, 2, "Hi, my name is Maya")
    answer_turn(c, 4, "I'd like a cleaning on Tuesday")
    outbox = [OutboxEntry("subject", "id-1", b"{}", 2)]
    ckpt = c.snapshot(outbox, 12, now_ms=9000)
    assert (ckpt.epoch, ckpt.node, ckpt.turn, ckpt.last_seq) == (6, "node-1", 2, 4)
    assert (ckpt.event_cursor, ckpt.updated_ms, ckpt.created_ms) == (12, 9000, 1000)
    assert ckpt.outbox == outbox and ckpt.outbox is not outbox
    again = core()
    again.owned(start(), 7, Checkpoint.from_bytes(ckpt.to_bytes()), working_memory_turns=8)
    assert again.memory.to_state() == c.memory.to_state()
    assert again.snapshot(outbox, 12, now_ms=9000).facts == ckpt.facts


# ---------------------------------------------------------------- no I/O


@pytest.mark.parametrize("module", [call_core, turn_outcomes])
def test_the_core_neither_awaits_nor_imports_io(module: Any) -> None:
    tree = ast.parse(inspect.getsource(module))
    imported = {
        name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for name in (
            [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        )
    }
    assert not imported & {"asyncio", "redis", "nats", "aiohttp", "socket", "time"}
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.AsyncFunctionDef | ast.Await)]
