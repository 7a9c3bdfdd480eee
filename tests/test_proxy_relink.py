"""When a node dies, the router relinks every call on it at once. A call with something of
the caller's unanswered (a frame, an utterance's audio) goes to its new owner at once; an
idle one after a random pause, or as soon as its caller sends something, so that the calls
with a turn in flight reach the new owners first (router.proxy)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from callmesh.protocol import Inbound, parse_inbound
from callmesh.telemetry import Metrics
from router import proxy
from router.proxy import ProxySession
from router.proxy_ports import CallLimits
from router.upstream import Outcome


class Link:
    """A native client link fed by the test."""

    kind = "native"
    resumable = True
    call_id = "c1"
    closed = False

    def __init__(self) -> None:
        self.inbound: asyncio.Queue[Inbound | None] = asyncio.Queue()
        self.sent: list[str] = []

    async def receive(self) -> Inbound | None:
        return await self.inbound.get()

    async def send(
        self, kind: str, raw: str, frame: dict[str, Any] | None = None, data: str | None = None
    ) -> None:
        self.sent.append(kind)

    async def refuse(self, code: Any, message: str, seq: int | None = None) -> None:
        pass

    async def close(self, code: int, message: bytes = b"") -> None:
        pass


class Placement:
    async def place(
        self, tenant: str, call_id: str, *, prefer_pin: bool, exclude: str | None = None
    ) -> str:
        return "n2"

    async def forget(self, tenant: str, call_id: str, node: str) -> None:
        pass

    async def confirm_alive(self, node: str) -> bool:
        return False

    def url(self, node: str) -> str | None:
        return f"http://{node}.test"

    def suspect(self, node: str) -> None:
        pass

    def track(self, call: Any, node: str) -> None:
        pass

    def untrack(self, call: Any, node: str) -> None:
        pass


def _frame(raw: str) -> Inbound:
    return parse_inbound(raw)


@pytest.fixture
def session(monkeypatch: pytest.MonkeyPatch) -> ProxySession:
    # The longest pause, always: the test sees whether the relink waits for it.
    monkeypatch.setattr(proxy, "IDLE_RELINK_SPREAD_S", 60.0)
    monkeypatch.setattr(proxy.random, "uniform", lambda a, b: b)
    limits = CallLimits(max_unacked_frames=16, max_unacked_audio_ms=5000, connect_timeout_s=3)
    s = ProxySession(Link(), Placement(), None, Metrics("test"), limits)  # type: ignore[arg-type]
    s.admit(_frame('{"type":"start","seq":1,"tenant":"t","caller":"x"}'), "t")
    s.last_client_seq = 1
    s.unacked.bound_audio(5000, None)
    return s


@pytest.mark.parametrize("unanswered", ["text", "utterance audio"])
async def test_a_call_with_something_unanswered_relinks_at_once(
    session: ProxySession, unanswered: str
) -> None:
    if unanswered == "text":
        session.unacked.keep(_frame('{"type":"user_text","seq":2,"text":"hello"}'))
    else:  # more than 2 s of audio the node never acknowledged: an utterance
        silence = "/" * 212 + "w=="  # 160 bytes of base64
        for seq in range(2, 2 + 101):
            session.unacked.keep_audio(_frame(f'{{"type":"audio","seq":{seq},"data":"{silence}"}}'))
    async with asyncio.timeout(5):
        assert await session._after(Outcome.DEAD, "n1") == ("failover", "n2")


async def test_an_idle_call_waits_until_its_caller_sends_a_frame(session: ProxySession) -> None:
    link = session.link
    assert isinstance(link, Link)
    reader = asyncio.create_task(session.read_client())
    after = asyncio.create_task(session._after(Outcome.LOST, "n1"))
    for _ in range(20):
        await asyncio.sleep(0)
    assert not after.done()  # nothing unanswered: it waits its turn (60 s here)
    await link.inbound.put(_frame('{"type":"user_text","seq":2,"text":"are you there?"}'))
    async with asyncio.timeout(5):
        assert await after == ("failover", "n2")
    assert session.unacked.frames_waiting == 1  # kept, for the new owner
    await link.inbound.put(None)
    await reader


async def test_a_handoff_moves_at_once(session: ProxySession) -> None:
    async with asyncio.timeout(5):
        assert await session._after(Outcome.HANDOFF, "n1") == ("handoff", "n2")


class NodeChannel:
    """A call's channel on a node link: what the node sends, then the link's end."""

    def __init__(self, frames: list[dict[str, Any]] | None = None) -> None:
        self._frames = [json.dumps(f) for f in frames or []]
        self.sent: list[str] = []
        self.closed = False

    async def receive(self) -> str | None:
        return self._frames.pop(0) if self._frames else None

    async def send_str(self, text: str) -> None:
        self.sent.append(text)

    async def close(self) -> None:
        self.closed = True


class NodeLinks:
    """Opens a channel on the next node; remembers the ``start`` each was opened with."""

    def __init__(self) -> None:
        self.starts: list[dict[str, Any]] = []

    async def open(self, node: str, url: str, call_id: str, start: str) -> NodeChannel:
        self.starts.append(json.loads(start))
        return NodeChannel()


DECIDED = {
    "type": "decided",
    "turn": 2,
    "seq": 3,
    "text": "Sure, Maya. What day works best for your cleaning?",
    "llm": ["simulated-llm", "simulated-llm"],
    "node": "n1",
}


@pytest.mark.parametrize("then", ["nothing", "ack", "turn_metrics"])
async def test_a_decided_text_is_passed_to_the_next_owner_until_its_turn_is_acknowledged(
    session: ProxySession, then: str
) -> None:
    links = NodeLinks()
    session._node_links = links  # type: ignore[assignment]
    frames: list[dict[str, Any]] = [
        {"type": "ready", "turn": 1, "node": "n1", "epoch": 1},
        {"type": "agent_text", "turn": 2, "n": 0, "text": "Sure, Maya."},
        DECIDED,
    ]
    if then == "ack":
        frames.append({"type": "ack", "seq": 3, "turn": 2})
    elif then == "turn_metrics":
        frames.append({"type": "turn_metrics", "turn": 2})
    session.upstream = NodeChannel(frames)  # type: ignore[assignment]
    assert await session.pump_upstream() is Outcome.LOST  # the node is gone
    assert await session.attach("n2", "failover")
    start = links.starts[-1]
    assert start["resume"] == "failover"
    if then == "nothing":
        assert start["decided"] == {k: v for k, v in DECIDED.items() if k != "type"}
    else:
        assert "decided" not in start
    # Never the caller's: the control frame is not forwarded.
    link = session.link
    assert isinstance(link, Link) and link.sent[:2] == ["ready", "agent_text"]
    assert "decided" not in link.sent


async def test_a_decided_text_is_not_passed_to_a_new_connection(session: ProxySession) -> None:
    links = NodeLinks()
    session._node_links = links  # type: ignore[assignment]
    session.upstream = NodeChannel([DECIDED])  # type: ignore[assignment]
    await session.pump_upstream()
    assert await session.attach("n2", "start")
    assert "decided" not in links.starts[-1]
