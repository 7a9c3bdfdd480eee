"""When a node dies, the router relinks every call on it at once. A call with something of
the caller's unanswered (a frame, an utterance's audio) goes to its new owner at once; an
idle one after a random pause, or as soon as its caller sends something, so that the calls
with a turn in flight reach the new owners first (router.proxy)."""

from __future__ import annotations

import asyncio
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

    async def receive(self) -> Inbound | None:
        return await self.inbound.get()

    async def send(self, kind: str, raw: str, frame: dict[str, Any] | None = None) -> None:
        pass

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
