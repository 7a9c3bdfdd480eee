"""What the run benchmark derives from its resource samples: per-call memory, per-turn CPU,
system calls and Valkey commands."""

from __future__ import annotations

import os

from loadtest.run_cluster import per_call, syscalls


def _sample(at: float, cpu: float, calls_made: int, commands: int, rss_kb: int) -> dict:
    return {
        "at": at,
        "machine_busy_s": at,
        "rss_kb": {"router": [rss_kb], "node": [rss_kb, rss_kb]},
        "fds": {"router": [10], "node": [5, 7]},
        "cpu_s": {"router": [cpu], "node": [cpu, cpu]},
        "syscalls": {"router": [calls_made], "node": [calls_made, calls_made]},
        "redis_used_memory_b": 1000 + commands,
        "redis_keys": 4,
        "redis_commands": {"evalsha": commands},
    }


def test_per_turn_figures_come_from_the_talk_phase_only() -> None:
    samples = {
        "baseline": _sample(0.0, 1.0, 100, 0, 1000),
        "idle": _sample(10.0, 2.0, 500, 10, 1100),
        "after_turns": _sample(20.0, 4.0, 2500, 210, 1200),
    }
    out = per_call(samples, calls=10, turns=100)
    # 2 s of CPU per process over 100 turns; the nodes are summed.
    assert out["talk_cpu_ms_per_turn"] == {"router": 20.0, "node": 40.0}
    assert out["talk_syscalls_per_turn"] == {"router": 20.0, "node": 40.0}
    assert out["redis_commands_per_turn"] == {"evalsha": 2.0}
    assert out["router_rss_per_call_kb"] == 10.0
    assert out["fds_max"] == {"router": 10, "node": 7}


def test_system_calls_are_counted_for_a_live_process_and_zero_for_a_gone_one() -> None:
    before = syscalls(os.getpid())
    r, w = os.pipe()
    for _ in range(5):
        os.write(w, b"x")
        os.read(r, 1)
    os.close(r)
    os.close(w)
    assert syscalls(os.getpid()) >= before + 10
    assert syscalls(2**22 + 12345) == 0
