"""The run benchmark's load generator: text-mode callers in a process of their own.

    python -m loadtest.run_callers --routers URL[,URL...] --first I --calls N

Run by :mod:`loadtest.run` as one of several child processes, so that the callers' CPU is
never counted as the cluster's and thousands of connections spread over several event
loops. Calls ``I`` to ``I + N - 1`` of the run are this process's; call ``i`` enters through
router ``i mod len(routers)`` (and reconnects through the others if that one goes away).
Every call shares one HTTP session (one connection pool, no cap).

Commands arrive as JSON lines on stdin, answers leave as JSON lines on stdout (logs go to
stderr). A run goes through three phases, each started by the parent once every child has
finished the one before, so all calls are live together:

- ``{"cmd": "open", "rate": R}``: connect, ``start`` and hear the greeting, R new calls a
  second; answered ``{"event": "opened", ...}`` once every call is up (or failed);
- ``{"cmd": "talk", "turns": T, "think": S}``: every call says T scripted lines, the first
  within ``S`` seconds and each next one ``S`` x uniform(0.5, 1.5) seconds after the reply
  to the last (human pacing); the calls stay up afterwards; answered ``{"event":
  "talked"}``;
- ``{"cmd": "hangup", "rate": R}`` (or end of input: all at once): every call hangs up,
  R a second; answered ``{"event": "ended", ...}`` with the results, then the process
  exits.

While calls run, ``{"event": "tick", ...}`` reports once a second what happened since the
last one (turn latencies with their times, errors, calls up), for the parent's timeline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import sys
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from callmesh.runner import install_uvloop
from callmesh_client.client import CallClient, CallError
from loadtest.callers import NAMES, script

TICK_S = 1.0
CALL_TIMEOUT_S = 120.0
_CALL_ERRORS = (CallError, aiohttp.ClientError, OSError, TimeoutError, ConnectionError)


@dataclass(slots=True)
class Seen:
    """What this process's calls saw; ticks drain ``pending``, the end reports the rest."""

    latency_ms: list[float] = field(default_factory=list)
    node_overhead_ms: list[float] = field(default_factory=list)
    # Client-observed latency minus the time the node spent in providers: callmesh's whole
    # share as the caller feels it (router, link, node, and this process's own lateness).
    e2e_overhead_ms: list[float] = field(default_factory=list)
    pending: list[tuple[float, float]] = field(default_factory=list)  # (at, latency_ms)
    pending_errors: list[float] = field(default_factory=list)
    # Times calls came up and went down since the last tick.
    pending_up: list[float] = field(default_factory=list)
    pending_down: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    duplicates: int = 0
    opened: int = 0
    open_failed: int = 0
    talked: int = 0
    completed: int = 0
    up: int = 0

    def error(self, call_id: str, text: str) -> None:
        self.errors.append(f"{call_id}: {text}"[:300])
        self.pending_errors.append(time.monotonic())


class Call:
    """One scripted caller; its phases are driven by the process's commands."""

    __slots__ = ("call_id", "client", "failed", "i", "name", "rng", "up")

    def __init__(self, i: int, call_id: str, seed: int) -> None:
        self.i = i
        self.call_id = call_id
        self.rng = random.Random(f"{seed}:{call_id}")
        self.name = self.rng.choice(NAMES)
        self.client: CallClient | None = None
        self.failed = False
        self.up = False  # started and greeted


class Callers:
    def __init__(self, routers: list[str], first: int, calls: int, seed: int, tenant: str) -> None:
        self.routers = routers
        self.tenant = tenant
        self.seen = Seen()
        prefix = uuid.uuid4().hex[:6]
        self.calls = [Call(i, f"run-{prefix}-{i}", seed) for i in range(first, first + calls)]
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Callers:
        # No connection cap: every call holds its WebSocket for the whole run.
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        self._session = aiohttp.ClientSession(connector=connector)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    def _fail(self, call: Call, text: str) -> None:
        call.failed = True
        self.seen.error(call.call_id, text)

    # ------------------------------------------------------------------ phases

    async def _paced(self, step: Callable[[Call], Coroutine[Any, Any, None]], rate: float) -> None:
        """``step`` for every call, started ``rate`` a second (0: all at once), awaited
        together."""
        gap = 1.0 / rate if rate > 0 else 0.0
        tasks: list[asyncio.Task[None]] = []
        t0 = time.monotonic()
        for k, call in enumerate(self.calls):
            if (delay := t0 + k * gap - time.monotonic()) > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(step(call)))
        await asyncio.gather(*tasks)

    async def open(self, rate: float) -> dict[str, Any]:
        await self._paced(self._open_one, rate)
        s = self.seen
        return {"event": "opened", "opened": s.opened, "failed": s.open_failed}

    async def _open_one(self, call: Call) -> None:
        urls = (
            self.routers[call.i % len(self.routers) :] + self.routers[: call.i % len(self.routers)]
        )
        client = CallClient(urls, call.call_id, timeout_s=CALL_TIMEOUT_S, session=self._session)
        try:
            await client.__aenter__()
        except _CALL_ERRORS as exc:
            self.seen.open_failed += 1
            self._fail(call, f"connect: {type(exc).__name__}: {exc}")
            return
        call.client = client
        try:
            await client.start(self.tenant, f"caller-{call.i}")
            await client.wait_greeting()
        except _CALL_ERRORS as exc:
            self.seen.open_failed += 1
            self._fail(call, f"start: {type(exc).__name__}: {exc}")
            return
        call.up = True
        self.seen.opened += 1
        self.seen.up += 1
        self.seen.pending_up.append(time.monotonic())

    async def talk(self, turns: int, think: float) -> dict[str, Any]:
        await asyncio.gather(*(self._talk_one(c, turns, think) for c in self.calls))
        return {"event": "talked", "talked": self.seen.talked}

    async def _talk_one(self, call: Call, turns: int, think: float) -> None:
        client = call.client
        if client is None or call.failed:
            return
        rng, seen = call.rng, self.seen
        try:
            if think:
                await asyncio.sleep(rng.uniform(0, think))
            for k, line in enumerate(script(turns)):
                if k and think:
                    await asyncio.sleep(rng.uniform(0.5, 1.5) * think)
                reply = await client.say(line.format(name=call.name))
                latency = reply.latency_ms
                seen.latency_ms.append(latency)
                seen.pending.append((time.monotonic(), latency))
                m = reply.metrics
                if m.get("spoke", True):
                    seen.node_overhead_ms.append(float(m.get("overhead_ms", 0.0)))
                    provider = m.get("provider_ms")
                    if isinstance(provider, (int, float)):
                        seen.e2e_overhead_ms.append(max(0.0, latency - provider))
            seen.talked += 1
        except _CALL_ERRORS as exc:
            self._fail(call, f"turn: {type(exc).__name__}: {exc}")

    async def hangup(self, rate: float = 0.0) -> dict[str, Any]:
        """Every call hangs up, ``rate`` a second (0: all at once): calls end over time as
        they arrived, not in one instant."""
        await self._paced(self._hangup_one, rate)
        s = self.seen
        return {
            "event": "ended",
            "calls": len(self.calls),
            "opened": s.opened,
            "completed": s.completed,
            "turns": len(s.latency_ms),
            "latency_ms": s.latency_ms,
            "node_overhead_ms": s.node_overhead_ms,
            "e2e_overhead_ms": s.e2e_overhead_ms,
            "errors": len(s.errors),
            "error_samples": s.errors[:5],
            "duplicates": s.duplicates,
        }

    async def _hangup_one(self, call: Call) -> None:
        client = call.client
        if client is None:
            return
        try:
            if not call.failed:
                await client.hangup()
                if client.ended and not client.errors:
                    self.seen.completed += 1
                elif not call.failed:
                    self._fail(call, f"hangup: ended={client.ended} errors={client.errors[:1]}")
            self.seen.duplicates += client.duplicates
        except _CALL_ERRORS as exc:
            self._fail(call, f"hangup: {type(exc).__name__}: {exc}")
        finally:
            if call.up:
                call.up = False
                self.seen.up -= 1
                self.seen.pending_down.append(time.monotonic())
            with contextlib.suppress(*_CALL_ERRORS):
                await client.aclose()

    def tick(self) -> dict[str, Any]:
        s = self.seen
        pending, s.pending = s.pending, []
        errors, s.pending_errors = s.pending_errors, []
        up, s.pending_up = s.pending_up, []
        down, s.pending_down = s.pending_down, []
        return {"event": "tick", "turns": pending, "errors": errors, "up": up, "down": down}


def raise_fd_limit() -> int:
    """Every call holds a socket: take the hard limit of open files as the soft one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _emit(msg: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


async def _ticker(callers: Callers) -> None:
    while True:
        await asyncio.sleep(TICK_S)
        _emit(callers.tick())


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    routers = [u for u in args.routers.split(",") if u]
    async with Callers(routers, args.first, args.calls, args.seed, args.tenant) as callers:
        ticker = asyncio.create_task(_ticker(callers), name="run-callers-tick")
        hangup_rate = 0.0
        _emit({"event": "hello", "pid": os.getpid(), "nofile": raise_fd_limit()})
        try:
            while line := await reader.readline():
                cmd = json.loads(line)
                kind = cmd.get("cmd")
                if kind == "open":
                    _emit(await callers.open(float(cmd.get("rate", 0))))
                elif kind == "talk":
                    _emit(await callers.talk(int(cmd["turns"]), float(cmd.get("think", 0))))
                elif kind == "hangup":
                    hangup_rate = float(cmd.get("rate", 0))
                    break
                else:
                    _emit({"event": "error", "message": f"unknown command {kind!r}"})
        finally:
            # The ticks go on while calls hang up: the parent's time line is built from
            # them in the order they arrive.
            try:
                ended = await callers.hangup(hangup_rate)
            finally:
                ticker.cancel()
                await asyncio.gather(ticker, return_exceptions=True)
            _emit(callers.tick())
            _emit(ended)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.run_callers", description=__doc__)
    p.add_argument("--routers", required=True, help="router base URLs, comma-separated")
    p.add_argument("--first", type=int, default=0, help="index of this process's first call")
    p.add_argument("--calls", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tenant", default="demo")
    args = p.parse_args(argv)
    install_uvloop()
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
