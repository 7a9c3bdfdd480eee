"""The fault injector and runner of ``loadtest chaos --fault`` against a fake cluster: what
each strike does, what the time line says, and that every window is ended."""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from loadtest import chaos_faults
from loadtest.fault_injector import FaultInjector, FaultRunner
from loadtest.fault_schedule import Occurrence, parse_fault, parse_faults
from loadtest.timeline import Timeline


@dataclass
class FakeProc:
    name: str
    calls: int = 0
    signals: list[int] = field(default_factory=list)
    popen: Any = None

    def alive(self) -> bool:
        return signal.SIGKILL not in self.signals

    def signal(self, sig: int) -> None:
        self.signals.append(sig)


@dataclass
class FakeSwitch:
    """Stands in for a server, the link proxy or the model's slow-down files."""

    log: list[str] = field(default_factory=list)
    name: str = "nats"

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self.log.append(f"stop {signal.Signals(sig).name}")

    def start(self) -> None:
        self.log.append("start")

    def set(self, delay_ms: float, jitter_ms: float = 0.0) -> None:
        self.log.append(f"set {delay_ms:g} {jitter_ms:g}")


def _cluster(nodes: int = 3, **backends: Any) -> Any:
    procs = [FakeProc(f"node-{i + 1}", calls=i) for i in range(nodes)]
    llm = FakeSwitch()
    servers = {"redis": None, "nats": None, "redis_nodes": None, "nats_nodes": None, **backends}
    return SimpleNamespace(
        nodes=procs,
        backends=SimpleNamespace(**servers),
        link_proxy=None,
        llm=llm,
        slow_llm=lambda ms: llm.log.append(f"slow {ms:g}"),
        status=lambda: {"nodes": [{"node": p.name, "calls": p.calls} for p in procs]},
    )


def _strike(inj: FaultInjector, text: str) -> None:
    spec = parse_fault(text)
    inj.strike(Occurrence(spec, 0, spec.at))


async def test_a_window_starts_ends_and_is_marked_with_both() -> None:
    nats = FakeSwitch()
    tl = Timeline()
    inj = FaultInjector(_cluster(nats=nats), tl)
    _strike(inj, "nats-outage@1s+0.05s")
    await asyncio.sleep(0.3)
    assert nats.log == ["stop SIGTERM", "start"]
    [event] = tl.events()
    assert event["kind"] == "nats-outage" and event["target"] == "nats"
    assert event["end_s"] >= event["t_s"] + 0.05  # type: ignore[operator]
    await inj.aclose()


async def test_windows_still_on_are_ended_when_the_calls_are_over() -> None:
    cluster = _cluster()
    tl = Timeline()
    inj = FaultInjector(cluster, tl)
    _strike(inj, "llm-slow:700ms@1s+60s")
    await asyncio.sleep(0.05)
    _strike(inj, "llm-slow:100ms@2s+1s")  # the same kind while it is on: skipped
    await asyncio.sleep(0.05)
    await inj.aclose()
    assert cluster.llm.log == ["slow 700", "slow 0"]
    window, skipped = tl.events()
    assert "ended early" in str(window["detail"]) and "end_s" in window
    assert "skipped: the same fault is still on" in str(skipped["detail"])


async def test_faults_this_cluster_cannot_have_are_skipped_in_words() -> None:
    tl = Timeline()
    inj = FaultInjector(_cluster(), tl)
    for text in ("crm-outage@1s", "link-latency@1s", "redis-restart@1s", "nats-outage@1s"):
        _strike(inj, text)
    await asyncio.sleep(0.05)
    await inj.aclose()
    assert [e["detail"].startswith("skipped: ") for e in tl.events()] == [True] * 4  # type: ignore[union-attr]


async def test_a_valkey_master_is_named_once_struck(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chaos_faults, "kill_redis_master", lambda cluster, ids: "redis-2")
    tl = Timeline()
    inj = FaultInjector(_cluster(redis_nodes=object()), tl)
    _strike(inj, "redis-restart@1s")
    await asyncio.sleep(0.1)
    await inj.aclose()
    assert [(e["kind"], e["target"]) for e in tl.events()] == [("redis-restart", "redis-2")]


async def test_node_kills_take_the_busiest_and_never_the_last_node() -> None:
    cluster = _cluster(nodes=2)
    tl = Timeline()
    inj = FaultInjector(cluster, tl)
    _strike(inj, "node-kill:5@1s")
    await asyncio.sleep(0.05)
    _strike(inj, "node-kill@2s")
    await asyncio.sleep(0.05)
    await inj.aclose()
    assert [p.name for p in cluster.nodes if not p.alive()] == ["node-2"]  # the busiest
    assert [names for _, names in inj.node_strikes] == [{"node-2"}]
    assert "would leave no live node" in str(tl.events()[1]["detail"])


async def test_the_runner_strikes_on_turns_and_on_time_and_reports_what_never_came() -> None:
    cluster = _cluster()
    inj = FaultInjector(cluster, Timeline())
    specs = parse_faults(["llm-slow@50%+0.05s", "link-latency@0.1s+0.05s", "node-kill@90%"])
    cluster.link_proxy = FakeSwitch()
    async with FaultRunner(specs, inj, total_turns=10) as runner:
        for _ in range(5):
            runner.turn_done()
        await asyncio.sleep(0.4)
    assert cluster.llm.log == ["slow 2000", "slow 0"]
    assert cluster.link_proxy.log == ["set 50 20", "set 0 0"]
    assert runner.report() == [
        {"spec": "llm-slow@50%+0.05s", "struck": 1, "missed": 0},
        {"spec": "link-latency@0.1s+0.05s", "struck": 1, "missed": 0},
        {"spec": "node-kill@90%", "struck": 0, "missed": 1},
    ]
