"""The chaos scoring's split of failover gaps by whether the call's Valkey master was
killed in the same moment (its gap then waits for the replica's promotion)."""

from __future__ import annotations

from callmesh_client.client import Reply
from loadtest.chaos_score import ChaosCall, score


def _reply(turn: int, sent_at: float, first_frame_at: float, node: str) -> Reply:
    return Reply(
        turn=turn,
        text="Thanks, Maya.",
        metrics={"node": node, "retrieval_ms": 10, "llm_first_sentence_ms": 200},
        sent_at=sent_at,
        first_text_at=first_frame_at,
        first_audio_at=None,
        done_at=first_frame_at + 0.5,
        frame_times=[first_frame_at],
    )


def _call(call_id: str, gap_s: float) -> ChaosCall:
    call = ChaosCall(call_id, "Maya", ready_node="n1", sent=2)
    call.replies = [_reply(1, 0.0, 0.3, "n1"), _reply(2, 10.0, 10.0 + gap_s, "n2")]
    call.ended_at = 20.0
    return call


def test_gaps_are_split_by_the_killed_master_only_when_one_was_killed() -> None:
    calls = [_call("a", 0.4), _call("b", 0.3), _call("c", 2.5)]
    strikes = [(10.0, {"n1"})]
    plain = score(calls, strikes)
    assert "failover_gap_by_shard_ms" not in plain
    assert plain["affected_calls"] == 3 and plain["lost_turns"] == 0
    split = score(calls, strikes, {"c"})["failover_gap_by_shard_ms"]
    assert split["master_killed"]["n"] == 1 and round(split["master_killed"]["p50"]) == 2500
    assert split["shard_up"]["n"] == 2 and split["shard_up"]["p99"] <= 400
