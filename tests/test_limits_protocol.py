"""Bounds at parse: integers in frames are range-checked and typed utterances are capped,
so a hostile number or text is refused with a clear error instead of breaking the call."""

from __future__ import annotations

import json

import pytest
from node_harness import node_call, running_node, simulated_providers
from redis.asyncio import Redis

from callmesh.protocol import (
    MAX_INT,
    MAX_USER_TEXT_CHARS,
    ErrorCode,
    ProtocolError,
    parse_inbound,
)


@pytest.mark.parametrize("seq", [2**63 + 1, 2**63, MAX_INT + 1, 10**30])
def test_a_seq_out_of_range_is_refused(seq: int) -> None:
    with pytest.raises(ProtocolError) as err:
        parse_inbound(json.dumps({"type": "user_text", "seq": seq, "text": "hi"}))
    assert err.value.code is ErrorCode.BAD_SEQ


@pytest.mark.parametrize("seq", [MAX_INT + 1, 10**17])
def test_an_audio_frame_in_the_fast_spelling_is_range_checked_too(seq: int) -> None:
    with pytest.raises(ProtocolError) as err:
        parse_inbound(f'{{"type":"audio","seq":{seq},"data":"AAAA"}}')
    assert err.value.code is ErrorCode.BAD_SEQ


def test_the_largest_seq_and_ts_are_accepted() -> None:
    assert parse_inbound(f'{{"type":"audio","seq":{MAX_INT},"data":"AAAA"}}').seq == MAX_INT
    raw = f'{{"type":"audio","seq":1,"data":"AAAA","ts":{MAX_INT}}}'
    assert parse_inbound(raw).body["ts"] == MAX_INT


def test_a_ts_out_of_range_is_refused() -> None:
    with pytest.raises(ProtocolError) as err:
        parse_inbound(f'{{"type":"audio","seq":1,"data":"AAAA","ts":{2**64}}}')
    assert err.value.code is ErrorCode.BAD_MESSAGE


def test_a_typed_utterance_over_the_cap_is_refused() -> None:
    ok = json.dumps({"type": "user_text", "seq": 1, "text": "a" * MAX_USER_TEXT_CHARS})
    assert parse_inbound(ok).body["text"]
    with pytest.raises(ProtocolError) as err:
        parse_inbound(ok.replace('"a', '"aa', 1))
    assert err.value.code is ErrorCode.BAD_MESSAGE


async def test_a_huge_seq_is_refused_and_the_call_goes_on(
    redis_url: str, nats_url: str, redis: Redis
) -> None:
    async with (
        running_node(redis_url, nats_url, simulated_providers()) as (_, url),
        node_call(url, "huge-seq") as call,
    ):
        await call.start(audio=False)
        await call.wire.send(json.dumps({"type": "user_text", "seq": 2**63 + 5, "text": "hi"}))
        err = await call.wait_for(lambda f: f["type"] == "error")
        assert err["code"] == ErrorCode.BAD_SEQ
        for turn, line in enumerate(["My name is Ann", "I'd like a cleaning"], start=1):
            await call.send(type="user_text", text=line)
            metrics = await call.turn(turn)
            assert "internal" not in json.dumps(metrics)
        assert not [f for f in call.frames if f.get("code") == ErrorCode.INTERNAL]
