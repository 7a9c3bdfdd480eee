"""Attacks on native calls through a real cluster: calls without a valid token, tokens
for another call or tenant, a takeover of a live call without its resume secret, and a
token for one caller claiming another caller's history. Each must be refused with its
close code, before any state is touched, while the legitimate call goes on.

The attacker speaks raw WebSocket frames (no client library), as a hostile script would.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from callmesh.auth import mint_dev_token
from localcluster.cluster import LocalCluster
from state_store import keys
from state_store.client import connect

pytestmark = pytest.mark.timeout(180)

SCRIPT = ["Hi, my name is Alice", "I'd like a cleaning", "Tuesday works", "How about 3pm"]


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(
        nodes=1, force_embedded=True, env={"CALLMESH_SIM_LATENCY_SCALE": "0.05"}
    ) as c:
        yield c


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def token(cluster: LocalCluster, call_id: str, tenant: str = "demo", caller: str = "bob") -> str:
    return mint_dev_token(cluster.auth_secret, tenant, call_id, caller)


class Raw:
    """One raw connection: frames sent by hand, everything received kept."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.seq = 0
        self.frames: list[dict[str, Any]] = []

    async def send(self, **body: Any) -> None:
        self.seq += 1
        await self.ws.send_str(json.dumps({**body, "seq": self.seq}))

    async def until(self, kind: str, turn: int | None = None, timeout_s: float = 20) -> dict:
        """The next frame of ``kind`` (of ``turn``); fails when the connection closes."""
        deadline = time.monotonic() + timeout_s
        while True:
            msg = await self.ws.receive(timeout=max(0.1, deadline - time.monotonic()))
            if msg.type is not aiohttp.WSMsgType.TEXT:
                raise AssertionError(f"closed {self.ws.close_code} {msg.extra!r}; {self.frames}")
            frame = json.loads(msg.data)
            self.frames.append(frame)
            if frame.get("type") == kind and (turn is None or frame.get("turn") == turn):
                return frame

    async def closed(self, timeout_s: float = 20) -> tuple[int | None, str]:
        """The close code and reason (fails if a ``ready`` arrives first)."""
        while True:
            msg = await self.ws.receive(timeout=timeout_s)
            if msg.type is aiohttp.WSMsgType.TEXT:
                frame = json.loads(msg.data)
                self.frames.append(frame)
                assert frame.get("type") != "ready", f"call was accepted: {frame}"
                continue
            return self.ws.close_code, msg.extra if isinstance(msg.extra, str) else ""


async def connect_raw(
    http: aiohttp.ClientSession, cluster: LocalCluster, call_id: str, bearer: str | None = None
) -> Raw:
    url = cluster.router_url.replace("http://", "ws://") + f"/v1/calls/{call_id}"
    headers = {"Authorization": f"Bearer {bearer}"} if bearer is not None else None
    return Raw(await http.ws_connect(url, headers=headers))


async def started(raw: Raw, **start: Any) -> dict[str, Any]:
    await raw.send(type="start", **start)
    ready = await raw.until("ready")
    await raw.until("turn_metrics", turn=0)
    return ready


async def call_keys(cluster: LocalCluster, tenant: str, call_id: str) -> list[str]:
    redis = connect(cluster.redis_url)
    try:
        found = [k for k in (keys.pin(tenant, call_id), keys.lease(tenant, call_id))]
        return [k for k in found if await redis.exists(k)]
    finally:
        await redis.aclose()


async def test_a_start_without_a_token_is_refused_before_any_state(
    cluster: LocalCluster, http: aiohttp.ClientSession
) -> None:
    raw = await connect_raw(http, cluster, "nt-1")
    await raw.send(type="start", tenant="demo", caller="bob")
    assert await raw.closed() == (4401, "token_malformed")
    assert await call_keys(cluster, "demo", "nt-1") == []


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda c: mint_dev_token("x" * 40, "demo", "bt-1", "bob"), (4401, "token_bad_signature")),
        (
            lambda c: mint_dev_token(c.auth_secret, "demo", "bt-1", "bob", now=time.time() - 7200),
            (4401, "token_expired"),
        ),
        (lambda c: token(c, "another-call"), (4403, "token_forbidden")),
        (lambda c: "not.a.token", (4401, "token_malformed")),
    ],
)
async def test_bad_tokens_are_refused_with_their_close_code(
    cluster: LocalCluster, http: aiohttp.ClientSession, make: Any, expected: tuple[int, str]
) -> None:
    raw = await connect_raw(http, cluster, "bt-1")
    await raw.send(type="start", tenant="demo", caller="bob", token=make(cluster))
    assert await raw.closed() == expected
    # The same tokens in the upgrade request: refused before the start is even read.
    raw = await connect_raw(http, cluster, "bt-1", bearer=make(cluster))
    assert await raw.closed() == expected
    assert await call_keys(cluster, "demo", "bt-1") == []


async def test_tenant_and_caller_come_from_the_token_never_from_start(
    cluster: LocalCluster, http: aiohttp.ClientSession
) -> None:
    raw = await connect_raw(http, cluster, "tt-1")
    await raw.send(type="start", tenant="globex", caller="bob", token=token(cluster, "tt-1"))
    assert await raw.closed() == (4403, "token_forbidden")
    raw = await connect_raw(http, cluster, "tt-1")
    await raw.send(type="start", tenant="demo", caller="mallory", token=token(cluster, "tt-1"))
    assert await raw.closed() == (4403, "token_forbidden")
    assert await call_keys(cluster, "globex", "tt-1") == []
    # The upgrade's token: ``start`` carries none, and the call is the token's.
    raw = await connect_raw(http, cluster, "tt-1", bearer=token(cluster, "tt-1"))
    ready = await started(raw, tenant="demo")
    assert ready["resume"].startswith("rs1_")
    assert await call_keys(cluster, "demo", "tt-1") != []
    await raw.ws.close()


async def test_a_takeover_without_the_resume_secret_is_refused_and_the_caller_keeps_the_call(
    cluster: LocalCluster, http: aiohttp.ClientSession
) -> None:
    caller = await connect_raw(http, cluster, "to-1")
    await started(caller, tenant="demo", caller="bob", token=token(cluster, "to-1"))
    await caller.send(type="user_text", text=SCRIPT[0])
    await caller.until("turn_metrics", turn=1)
    # A valid token for the call (leaked, or a prefix token) is not enough: 4403.
    for resume in (None, "rs1_" + "A" * 43):
        attacker = await connect_raw(http, cluster, "to-1")
        body = {"tenant": "demo", "caller": "bob", "token": token(cluster, "to-1")}
        if resume is not None:
            body["resume"] = resume
        await attacker.send(type="start", **body)
        assert await attacker.closed() == (4403, "resume_denied")
    # The caller's connection was not replaced: the call goes on.
    await caller.send(type="user_text", text=SCRIPT[1])
    metrics = await caller.until("turn_metrics", turn=2)
    assert not caller.ws.closed and metrics["turn"] == 2
    await caller.ws.close()


async def test_a_reconnect_with_the_secret_resumes_and_rotates_it(
    cluster: LocalCluster, http: aiohttp.ClientSession
) -> None:
    first = await connect_raw(http, cluster, "rs-1")
    ready = await started(first, tenant="demo", caller="bob", token=token(cluster, "rs-1"))
    await first.send(type="user_text", text=SCRIPT[0])
    await first.until("turn_metrics", turn=1)
    await first.ws.close()

    second = await connect_raw(http, cluster, "rs-1")
    body = {"tenant": "demo", "caller": "bob", "token": token(cluster, "rs-1")}
    await second.send(type="start", **body, resume=ready["resume"])
    resumed = await second.until("ready")
    assert resumed["resumed"] is True and resumed["resume"] != ready["resume"]
    second.seq = max(second.seq, resumed["last_seq"])  # continue after what was applied
    # The secret used once is spent: a third client replaying it is refused.
    third = await connect_raw(http, cluster, "rs-1")
    await third.send(type="start", **body, resume=ready["resume"])
    assert await third.closed() == (4403, "resume_denied")
    await second.send(type="hangup")
    await second.until("call_ended")
    # The ended call's resume record is gone with it.
    redis = connect(cluster.redis_url)
    try:
        assert not await redis.exists(keys.resume("demo", "rs-1"))
    finally:
        await redis.aclose()


async def test_a_token_for_one_caller_cannot_read_or_write_another_callers_history(
    cluster: LocalCluster, http: aiohttp.ClientSession
) -> None:
    owner = await connect_raw(http, cluster, "hi-1")
    await started(
        owner, tenant="demo", caller="cust-b", token=token(cluster, "hi-1", caller="cust-b")
    )
    for turn, line in enumerate([*SCRIPT, "Yes, book it"], start=1):
        await owner.send(type="user_text", text=line)
        await owner.until("turn_metrics", turn=turn)
    await owner.send(type="hangup")
    await owner.until("call_ended")

    # Mallory's token names her; claiming cust-b in start is refused...
    mallory = token(cluster, "hi-2", caller="mallory")
    raw = await connect_raw(http, cluster, "hi-2")
    await raw.send(type="start", tenant="demo", caller="cust-b", token=mallory)
    assert await raw.closed() == (4403, "token_forbidden")
    # ...and without a caller in start she is herself: no "welcome back" with cust-b's booking.
    raw = await connect_raw(http, cluster, "hi-2", bearer=mallory)
    await raw.send(type="start", tenant="demo")
    await raw.until("ready")
    greeting = " ".join(f["text"] for f in [await raw.until("agent_text", turn=0)] if "text" in f)
    assert "Alice" not in greeting and "back" not in greeting.lower()
    await raw.send(type="hangup")
    await raw.until("call_ended")
    # cust-b's own next call still finds their history.
    raw = await connect_raw(http, cluster, "hi-3")
    await raw.send(
        type="start", tenant="demo", caller="cust-b", token=token(cluster, "hi-3", caller="cust-b")
    )
    await raw.until("ready")
    assert "back" in (await raw.until("agent_text", turn=0))["text"].lower()
    await raw.ws.close()
