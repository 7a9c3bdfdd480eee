"""Simulated callers: scripted conversations over the native protocol. A caller given
several routers reconnects through the next one when its router goes away
(callmesh_client.reconnect)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from callmesh_client.client import CallClient, CallError, Reply
from loadtest.timeline import Timeline

NAMES = ["Alice", "Bruno", "Chen", "Dara", "Emil", "Fatima", "Gus", "Hana", "Ivan", "June"]
BOOKING = [
    "Hi, my name is {name}",
    "I'd like a cleaning",
    "Tuesday works",
    "How about 3pm",
    "Yes, book it",
]
SMALL_TALK = ["Thanks, that's great", "What time do you open?", "Perfect, thank you"]


def script(turns: int) -> list[str]:
    lines = list(BOOKING[:turns])
    while len(lines) < turns:
        lines.append(SMALL_TALK[len(lines) % len(SMALL_TALK)])
    return lines


@dataclass
class CallResult:
    call_id: str
    name: str
    replies: list[Reply] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    duplicates: int = 0
    completed: bool = False


async def scripted_call(
    router_url: str | Sequence[str],
    call_id: str,
    turns: int,
    *,
    tenant: str = "demo",
    seed: int = 0,
    think_s: float = 0.0,
    on_turn: Callable[[], None] | None = None,
    timeline: Timeline | None = None,
    caller: str | None = None,
) -> CallResult:
    """One call of ``turns`` scripted lines by ``caller`` (default: a caller of its own,
    ``caller-{call_id}``); ``timeline`` (if given) sees it start, each answered turn with
    its latency, its error and its end."""
    rng = random.Random(f"{seed}:{call_id}")
    name = rng.choice(NAMES)
    result = CallResult(call_id, name)
    started = False
    try:
        async with CallClient(router_url, call_id, timeout_s=60) as client:
            await client.start(tenant, caller or f"caller-{call_id}")
            if timeline is not None:
                timeline.call_started()
                started = True
            for line in script(turns):
                reply = await client.say(line.format(name=name))
                result.replies.append(reply)
                if timeline is not None:
                    timeline.turn(reply.latency_ms)
                if on_turn is not None:
                    on_turn()
                if think_s:
                    await asyncio.sleep(rng.uniform(0.5, 1.5) * think_s)
            await client.hangup()
            result.duplicates = client.duplicates
            result.completed = client.ended
    except (CallError, OSError, TimeoutError) as exc:
        result.errors.append(f"{type(exc).__name__}: {exc}")
        if timeline is not None:
            timeline.error()
    finally:
        if started and timeline is not None:
            timeline.call_ended()
    return result
