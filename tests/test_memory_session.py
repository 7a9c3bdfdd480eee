"""Session memory as part of the per-turn checkpoint: bounded, restorable, replay-safe."""

from __future__ import annotations

import pytest

from memory.errors import InvalidScope
from memory.session import MemoryConfig, SessionMemory
from memory.working import Exchange, WorkingMemory
from state_store.checkpoint import Checkpoint

CHECKPOINT_LIMIT = 32 * 1024
MONOLOGUE = "So what happened was, and I want to explain this properly, " * 60  # ~3.5 KB


def checkpoint_of(memory: SessionMemory, turn: int) -> Checkpoint:
    state = memory.to_state()
    return Checkpoint("acme", "call-1", memory.caller, epoch=1, node="n1", turn=turn,
                      working=state.working, facts=state.facts, extra=state.extra)  # fmt: skip


def drive(memory: SessionMemory, start: int, end: int) -> None:
    for turn in range(start, end + 1):
        user = f"{MONOLOGUE} my name is Anna Smith, book a cleaning on Monday at {turn % 12 + 1}pm"
        memory.observe_turn(turn, user, MONOLOGUE, interrupted=turn % 5 == 0)


def test_working_memory_keeps_the_last_k_turns() -> None:
    wm = WorkingMemory(3)
    for turn in range(1, 8):
        wm.add(Exchange(turn, f"u{turn}", f"a{turn}"))
    assert [e.turn for e in wm] == [5, 6, 7] and len(wm) == 3
    assert wm.last() == Exchange(7, "u7", "a7")
    assert list(WorkingMemory.from_state(3, wm.to_state())) == list(wm)
    with pytest.raises(ValueError):
        WorkingMemory(0)


def test_working_memory_keeps_what_the_caller_heard() -> None:
    memory = SessionMemory("acme", "alice", MemoryConfig(working_turns=4))
    memory.observe_user(1, "what are your hours")
    generated = "We are open from eight to six on weekdays and nine to one on Saturdays."
    memory.observe_agent(1, generated[:22], interrupted=True)
    last = memory.working.last()
    assert last == Exchange(1, "what are your hours", "We are open from eight", True)


def test_checkpoint_is_bounded_at_1000_turns() -> None:
    memory = SessionMemory("acme", "alice")
    drive(memory, 1, 100)
    at_100 = len(checkpoint_of(memory, 100).to_bytes())
    drive(memory, 101, 1000)
    at_1000 = len(checkpoint_of(memory, 1000).to_bytes())
    assert at_1000 <= CHECKPOINT_LIMIT
    assert at_1000 <= at_100 + 64  # turn numbers get a digit longer; nothing else grows
    assert len(memory.working) == memory.config.working_turns
    limit = memory.config.max_utterance_chars
    assert all(len(e.user) <= limit and len(e.agent) <= limit for e in memory.working)
    assert len(memory.notes) <= memory.config.max_notes


def test_state_round_trips_through_a_checkpoint() -> None:
    memory = SessionMemory("acme", "alice")
    drive(memory, 1, 20)
    memory.observe_user(21, "no, Tuesday")  # a turn whose reply was not played yet
    restored_ckpt = Checkpoint.from_bytes(checkpoint_of(memory, 21).to_bytes())
    restored = SessionMemory.from_state("acme", "alice", restored_ckpt.working,
                                        restored_ckpt.facts, restored_ckpt.extra)  # fmt: skip
    assert list(restored.working) == list(memory.working)
    assert list(restored.facts) == list(memory.facts)
    assert list(restored.notes) == list(memory.notes)
    assert restored.to_state() == memory.to_state()
    # The pending user turn survives: the new owner records it with the reply it plays.
    restored.observe_agent(21, "Tuesday it is.")
    assert restored.working.last() == Exchange(21, "no, Tuesday", "Tuesday it is.", False)


def test_restoring_an_older_checkpoint_without_extras() -> None:
    memory = SessionMemory("acme", "alice")
    drive(memory, 1, 3)
    state = memory.to_state()
    restored = SessionMemory.from_state("acme", "alice", state.working, state.facts, {})
    assert restored.facts.values() == memory.facts.values()


def test_a_replayed_turn_is_not_applied_twice() -> None:
    memory = SessionMemory("acme", "alice")
    memory.observe_turn(1, "book a cleaning on Monday", "Which time?")
    memory.observe_turn(2, "no, Tuesday", "Tuesday it is.")
    before = memory.to_state()
    update = memory.observe_turn(2, "no, Tuesday", "Tuesday it is.")
    assert update.replayed and not update.changes
    assert memory.to_state() == before


def test_ids_that_could_reach_other_keys_are_refused() -> None:
    for tenant, caller in [("acme:caller:{bob}", "x"), ("acme", "bob}:history"), ("", "x"),
                           ("acme", "a b"), ("acme", "*")]:  # fmt: skip
        with pytest.raises(InvalidScope):
            SessionMemory(tenant, caller)


def test_summary_and_call_record() -> None:
    memory = SessionMemory("acme", "alice")
    memory.observe_turn(1, "Hi, my name is Anna Smith, book a cleaning on Monday", "Which time?")
    memory.observe_turn(2, "no, Tuesday at 3pm", "Shall I book Tuesday at 3 pm?")
    memory.observe_turn(3, "yes please", "Booked.")
    record = memory.call_record("call-1", 1_700_000_000_000)
    assert record.summary == (
        "Caller Anna Smith. Last topic: booking. Confirmed booking: cleaning, Tuesday, 3:00 pm. "
        "Date corrected from Monday to Tuesday."
    )
    assert record.facts["confirmed"] == "booking: cleaning, Tuesday, 3:00 pm"
    assert (record.tenant, record.caller) == ("acme", "alice")
