"""Helpers for tests that run the cluster as real processes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from callmesh_client.client import CallClient, Reply

BOOKING_SCRIPT = [
    "Hi, my name is {name}",
    "I'd like a cleaning",
    "Tuesday works",
    "How about 3pm",
    "Yes, book it",
]


async def run_call(
    router_url: str,
    call_id: str,
    tenant: str = "demo",
    name: str = "Alice",
    script: list[str] | None = None,
    hangup: bool = True,
) -> list[Reply]:
    replies = []
    async with CallClient(router_url, call_id) as client:
        await client.start(tenant, f"caller-{call_id}")
        for line in script or BOOKING_SCRIPT:
            replies.append(await client.say(line.format(name=name)))
        if hangup:
            await client.hangup()
    return replies


async def eventually(pred: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait until ``pred()`` holds; a bound against hangs, not a timing assertion."""
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)
