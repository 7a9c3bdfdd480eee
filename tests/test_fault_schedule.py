"""``loadtest chaos --fault`` specs: parsed, bounded, scheduled; bad ones refused in words
with exit status 2, before any process starts."""

from __future__ import annotations

import argparse

import pytest

from loadtest import chaos
from loadtest.fault_schedule import (
    FaultSpecError,
    Kind,
    Schedule,
    When,
    parse_fault,
    parse_faults,
)


def test_a_node_kill_at_a_share_of_the_turns() -> None:
    spec = parse_fault("node-kill@40%")
    assert spec.kind is Kind.NODE_KILL and spec.at == When(share=0.4)
    assert spec.count == 1 and spec.target == "" and not spec.window
    assert spec.moments() == [When(share=0.4)]


def test_arguments_of_each_kind() -> None:
    assert parse_fault("node-drain:2@12s").count == 2
    assert parse_fault("node-kill:node-2@5s").target == "node-2"
    assert parse_fault("router-kill:1@30%").kind is Kind.ROUTER_KILL
    assert parse_fault("crm-outage:abort@10s+8s").crm_mode == "abort"
    assert parse_fault("redis-restart:kill@50%").hard
    slow = parse_fault("llm-slow:1500ms@10s+4s")
    assert slow.extra_s == 1.5 and slow.duration_s == 4.0 and slow.window
    link = parse_fault("link-latency:80ms~30ms@20%+10s")
    assert (link.delay_s, link.jitter_s, link.duration_s) == (0.08, 0.03, 10.0)
    assert parse_fault("link-latency:100ms@1m").jitter_s == 0.0
    assert parse_fault("link-latency:100ms@1m").at == When(seconds=60.0)


def test_window_kinds_have_default_durations() -> None:
    assert parse_fault("nats-outage@30%").duration_s == 5.0
    assert parse_fault("crm-outage@30%").duration_s == 10.0
    assert parse_fault("redis-restart@30%").duration_s == 0.0
    assert parse_fault("llm-slow@30%").extra_s == 2.0


def test_repeats_in_the_unit_of_when() -> None:
    assert [m.share for m in parse_fault("node-kill@20%/20%").moments()] == [
        0.2,
        0.4,
        0.6,
        0.8,
    ]
    assert [m.seconds for m in parse_fault("nats-outage@10s+2s/30sx3").moments()] == [
        10.0,
        40.0,
        70.0,
    ]
    assert len(parse_fault("llm-slow@1s+0.5s/1s").moments()) == 100  # bounded


def test_the_schedule_hands_each_strike_out_once_in_order() -> None:
    specs = parse_faults(["node-kill@50%", "nats-outage@2s+1s/3sx2", "llm-slow@90%"])
    schedule = Schedule(specs)
    assert schedule.total == 4
    assert schedule.due(0.1, 1.0) == []
    first = schedule.due(0.5, 2.0)
    assert [(o.spec.kind, o.n) for o in first] == [(Kind.NODE_KILL, 0), (Kind.NATS_OUTAGE, 0)]
    assert schedule.due(0.6, 2.5) == []
    assert [o.n for o in schedule.due(0.6, 5.0)] == [1]
    assert [o.spec.kind for o in schedule.missed()] == [Kind.LLM_SLOW]


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("node-kill", "is not KIND"),
        ("volcano@10s", "unknown fault 'volcano'"),
        ("node-kill@140%", "between 0% and 100%"),
        ("node-kill@0%", "between 0% and 100%"),
        ("node-kill@soon", "is not a share of turns"),
        ("node-kill@2h", "is not a share of turns"),
        ("node-kill@10s+5s", "instant"),
        ("node-kill:0@10s", "not in 1.."),
        ("node-kill:Node 2@10s", "is not a count or a node name"),
        ("router-kill:router-2@10s", "is not a count"),
        ("router-drain@10%/10%", "strikes once"),
        ("nats-outage:all@10s", "takes no argument"),
        ("nats-outage@10s+0s", "a window of 0 s"),
        ("nats-outage@10s+5%", "is not a time"),
        ("nats-outage@10s+20m", "above 600s"),
        ("crm-outage:teapot@10s", "not one of 503, abort"),
        ("redis-restart:gently@10s", "not term or kill"),
        ("llm-slow:2m@10s", "above 60s"),
        ("link-latency:9s@10s", "above 5s"),
        ("link-latency:50ms~abc@10s", "is not a time"),
        ("nats-outage@10s/20%", "unit of @WHEN"),
        ("nats-outage@10s+5s/5s", "shorter than /EVERY"),
        ("node-kill@10s/0.5s", "at least 1s"),
        ("node-kill@10%/10%x0", "xTIMES is not in"),
        ("node-kill@10%/10%x101", "xTIMES is not in"),
        ("node-kill@2h", "is not"),
        ("node-kill@7200s", "above 3600s"),
        ("n" * 300, "longer than"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec: str, says: str) -> None:
    with pytest.raises(FaultSpecError, match=None) as err:
        parse_fault(spec)
    assert says in str(err.value)


def test_a_run_has_bounded_faults_and_one_router_fault() -> None:
    with pytest.raises(FaultSpecError, match="at most 20"):
        parse_faults(["node-kill@10%"] * 21)
    with pytest.raises(FaultSpecError, match="one router fault"):
        parse_faults(["router-kill@10%", "router-drain@50%"])


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    chaos.add_parser(parser.add_subparsers(dest="scenario", required=True))
    args = parser.parse_args(["chaos", *argv])
    return int(args.func(args))


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--fault", "node-kill@soon"], "--fault: node-kill: when 'soon'"),
        (["--fault", "router-kill@10%", "--kill-router", "1"], "not both"),
        (["--fault", "router-kill@10%", "--fault", "node-kill@10%", "--routers", "2"], "nodes"),
        (["--fault", "router-kill@10%"], "would leave none"),
    ],
)
def test_chaos_refuses_bad_faults_with_exit_status_2(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _main([*argv, "--no-progress"]) == 2
    assert says in capsys.readouterr().err
