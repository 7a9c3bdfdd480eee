"""The capacity benchmark's load generator: simulated phone callers in their own process.

    python -m loadtest.capacity_callers --router URL [--transport twilio|native]

Run by :mod:`loadtest.capacity` as a child process, so that the callers' CPU is never
counted as the router's or the node's. Each caller is a
:class:`callmesh_client.voice_client.VoiceCaller` streaming real-time 20 ms mu-law frames; it
waits for the greeting, then loops: say the next line of the loadtest script, wait until
the reply has finished playing, think 1-3 s.

Commands arrive as JSON lines on stdin, answers leave as JSON lines on stdout (nothing else
is written there; logs go to stderr):

- ``{"cmd": "grow", "calls": N, "ramp_s": 2}``: start callers until N are live, spread
  over ``ramp_s``; answered with ``{"event": "grown", ...}`` once every new call has
  connected (or failed to);
- ``{"cmd": "window"}``: start a measurement window (``{"event": "window"}``);
- ``{"cmd": "report"}``: what happened since the window started (``{"event": "report"}``):
  turns and their response times, this process's own send lateness and event-loop lag
  (so a load generator that cannot keep real time is visible and separable from
  callmesh), errors and clears;
- ``{"cmd": "stop"}`` or end of input: hang every call up and exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import queue
import random
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import aiohttp

from callmesh.config import NodeConfig
from callmesh.protocol import Out
from callmesh.runner import install_uvloop
from callmesh_client.reconnect import ReconnectPolicy
from callmesh_client.twilio_phone import TwilioPhone
from callmesh_client.voice_client import FRAME_MS, TurnResult, VoiceCaller, VoiceCallError
from callmesh_client.voice_wire import Heard
from loadtest.callers import NAMES, script
from loadtest.stats import percentiles

SCRIPT_TURNS = 8
THINK_S = (1.0, 3.0)
# Before its first line a caller waits up to about one turn cycle (speak ~1.5 s, reply
# ~0.8 s, playback ~4 s, think 1-3 s), so calls started together do not speak together.
FIRST_PAUSE_S = (0.0, 8.0)
HANGUP_TIMEOUT_S = 5.0
# The node's default turn budget and callmesh's share of it (the benchmark keeps both):
# a turn is over budget by callmesh's doing when the providers left room and callmesh took
# more than its share (the node's turns_over_budget_by_callmesh, recomputed per turn).
TURN_BUDGET_MS = NodeConfig.turn_budget_ms
OWN_BUDGET_MS = NodeConfig.overhead_budget_ms
_CALL_ERRORS = (VoiceCallError, aiohttp.ClientError, OSError, TimeoutError, ConnectionError)


@dataclass
class Window:
    """What the callers saw since the last ``window`` command."""

    started_at: float = field(default_factory=time.monotonic)
    response_ms: list[float] = field(default_factory=list)
    loop_lag_ms: list[float] = field(default_factory=list)
    # Per turn, from the node's own turn_metrics (native only; Twilio does not carry them).
    node_overhead_ms: list[float] = field(default_factory=list)
    node_latency_minus_provider_ms: list[float] = field(default_factory=list)
    # Turns over budget by callmesh's doing: (latency_ms, provider_ms), to see by how much.
    over_budget_by_callmesh: list[tuple[float, float]] = field(default_factory=list)
    turns: int = 0
    timed_out: int = 0
    superseded: int = 0
    cleared_turns: int = 0
    errors: list[str] = field(default_factory=list)
    # SendStats totals over every caller when the window started, to report deltas.
    send_base: tuple[int, float, int] = (0, 0.0, 0)

    def turn(self, r: TurnResult) -> None:
        self.turns += 1
        if r.timed_out:
            self.timed_out += 1
        if r.superseded:
            self.superseded += 1
        if r.cleared:
            self.cleared_turns += 1
        if r.response_ms is not None:
            self.response_ms.append(r.response_ms)


class CallerPool:
    """The live callers of this process and the window being measured."""

    def __init__(self, router_url: str, transport: Literal["twilio", "native"], seed: int) -> None:
        self.router_url = router_url
        self.transport: Literal["twilio", "native"] = transport
        self.seed = seed
        self.prefix = uuid.uuid4().hex[:6]
        self.callers: dict[int, VoiceCaller] = {}
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.connected: dict[int, asyncio.Event] = {}
        self.window = Window()
        self.started = 0
        self.failed = 0
        self.ended = 0
        self.error_total = 0
        self.stopping = False

    def __repr__(self) -> str:
        return f"<CallerPool {self.transport} live={self.live} started={self.started}>"

    @property
    def live(self) -> int:
        return sum(1 for t in self.tasks.values() if not t.done())

    # ------------------------------------------------------------------ calls

    def _error(self, text: str) -> None:
        self.error_total += 1
        self.window.errors.append(text)

    def _tap_turn_metrics(self, caller: VoiceCaller) -> None:
        """Native only: keep each reply's ``turn_metrics`` (VoiceCaller reads them but does
        not expose them), to cross-check the node's overhead histogram per turn."""
        decode = caller.wire.decode

        def tapped(raw: str) -> Heard:
            heard = decode(raw)
            f = heard.frame
            # A turn cut off before its first audio has no latency to compare.
            if heard.kind == Out.TURN_METRICS and f is not None and f.get("spoke", True):
                latency, provider = f.get("latency_ms"), f.get("provider_ms")
                if isinstance(latency, (int, float)) and isinstance(provider, (int, float)):
                    self.window.node_latency_minus_provider_ms.append(max(0.0, latency - provider))
                    self.window.node_overhead_ms.append(float(f.get("overhead_ms", 0.0)))
                    if latency > TURN_BUDGET_MS >= provider and latency - provider > OWN_BUDGET_MS:
                        self.window.over_budget_by_callmesh.append((latency, provider))
            return heard

        setattr(caller.wire, "decode", tapped)  # noqa: B010 (a method, not a field)

    async def _call(self, i: int) -> None:
        rng = random.Random(f"{self.seed}:{i}")
        name = rng.choice(NAMES)
        lines = script(SCRIPT_TURNS)
        call_id = f"cap-{self.prefix}-{i}"
        # Timestamps say when each frame was actually sent: this process shares the
        # machine and is sometimes late, and that lateness is reported on its own
        # (send_late_pct, loop_lag_ms), not counted as the node's frame lag.
        # ``--router`` may list several routers (comma-separated): then a caller whose
        # router goes away re-opens its stream through another (Twilio: through the
        # webhook and <Connect action>; native: reconnect and resume).
        urls = self.router_url.split(",")
        phone = None
        if self.transport == "twilio" and len(urls) > 1:
            phone = TwilioPhone(urls[i % len(urls) :] + urls[: i % len(urls)], call_id, "demo")
        caller = VoiceCaller(
            urls[i % len(urls)],
            call_id,
            "demo",
            f"caller-{i}",
            transport=self.transport,
            timestamps="sent",
            phone=phone,
            routers=[u for u in urls if u != urls[i % len(urls)]],
            reconnect=ReconnectPolicy(),
        )
        if self.transport == "native":
            self._tap_turn_metrics(caller)
        self.callers[i] = caller
        reported = 0  # caller.errors already counted

        def check(problem: str | None = None) -> None:
            nonlocal reported
            if self.stopping:
                return  # hanging up: what happens now is not the load's doing
            if problem is not None:
                self._error(f"{call_id}: {problem}")
            for err in caller.errors[reported:]:
                self._error(f"{call_id}: {json.dumps(err)[:200]}")
            reported = len(caller.errors)

        try:
            async with caller:
                self.connected[i].set()
                greeting = await caller.wait_greeting()
                check("no greeting" if greeting.timed_out else None)
                await asyncio.sleep(rng.uniform(*FIRST_PAUSE_S))
                k = rng.randrange(len(lines))
                while True:
                    result = await caller.say(lines[k % len(lines)].format(name=name))
                    k += 1
                    self.window.turn(result)
                    check(f"no reply to {result.text!r}" if result.timed_out else None)
                    if caller.close_code is not None:
                        check(f"closed by callmesh ({caller.close_code})")
                        return
                    await asyncio.sleep(rng.uniform(*THINK_S))
        except _CALL_ERRORS as exc:
            if not self.stopping:
                self.failed += 1
            check(f"{type(exc).__name__}: {exc}")
        finally:
            self.connected[i].set()
            self.ended += 1
            check()

    async def grow(self, calls: int, ramp_s: float) -> dict[str, Any]:
        new = list(range(self.started, max(self.started, calls)))
        gap = ramp_s / len(new) if new else 0.0
        for n, i in enumerate(new):
            if n:
                await asyncio.sleep(gap)
            self.connected[i] = asyncio.Event()
            self.tasks[i] = asyncio.create_task(self._call(i), name=f"capacity-call:{i}")
            self.started += 1
        for i in new:
            await self.connected[i].wait()
        return {"event": "grown", "calls": self.live, "started": self.started, **self._totals()}

    async def stop(self) -> dict[str, Any]:
        self.stopping = True
        callers = [self.callers[i] for i, t in self.tasks.items() if not t.done()]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(c.hangup() for c in callers), return_exceptions=True),
                HANGUP_TIMEOUT_S,
            )
        # Hung up, each call ends by itself (its next line finds the call over); cancelling
        # one that is closing its connection would leak its HTTP session.
        running = [t for t in self.tasks.values() if not t.done()]
        if running:
            await asyncio.wait(running, timeout=HANGUP_TIMEOUT_S)
        for t in self.tasks.values():
            t.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        return {"event": "stopped", **self._totals()}

    def _totals(self) -> dict[str, int]:
        return {"failed": self.failed, "ended": self.ended, "errors_total": self.error_total}

    # ------------------------------------------------------------------ measuring

    def _send_totals(self) -> tuple[int, float, int]:
        frames, lag, late = 0, 0.0, 0
        for c in self.callers.values():
            frames += c.stats.frames
            lag += c.stats.lag_sum_ms
            late += c.stats.late_frames
        return frames, lag, late

    def start_window(self) -> None:
        self.window = Window(send_base=self._send_totals())

    def report(self) -> dict[str, Any]:
        w = self.window
        frames, lag, late = (a - b for a, b in zip(self._send_totals(), w.send_base, strict=True))
        return {
            "event": "report",
            "seconds": round(time.monotonic() - w.started_at, 3),
            "live": self.live,
            "turns": w.turns,
            "response_ms": percentiles(w.response_ms, (50, 95, 99)),
            "timed_out": w.timed_out,
            "superseded": w.superseded,
            "cleared_turns": w.cleared_turns,
            "clears_total": sum(len(c.clears) for c in self.callers.values()),
            "frames_sent": int(frames),
            "send_lag_ms_mean": round(lag / frames, 3) if frames else 0.0,
            "send_late_frames": int(late),
            "send_late_pct": round(100 * late / frames, 3) if frames else 0.0,
            "loop_lag_ms": percentiles(w.loop_lag_ms, (50, 99)),
            "node_overhead_ms": percentiles(w.node_overhead_ms, (50, 99)),
            "node_latency_minus_provider_ms": percentiles(
                w.node_latency_minus_provider_ms, (50, 99)
            ),
            "over_budget_by_callmesh_turns": [
                {"latency_ms": round(lat, 1), "provider_ms": round(prov, 1)}
                for lat, prov in w.over_budget_by_callmesh[:10]
            ],
            "errors": len(w.errors),
            "error_samples": w.errors[:5],
            **self._totals(),
        }

    async def tick(self) -> None:
        """This process's own event-loop lag, sampled every frame period: a caller's frame
        is sent at the first loop iteration after its due time, so this is its lateness."""
        period = FRAME_MS / 1000
        due = time.monotonic() + period
        while True:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            now = time.monotonic()
            self.window.loop_lag_ms.append((now - due) * 1000)
            due = max(due + period, now)


def _emit(msg: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


async def serve(pool: CallerPool) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    ticker = asyncio.create_task(pool.tick(), name="capacity-loop-lag")
    try:
        _emit({"event": "hello", "pid": os.getpid()})
        while line := await reader.readline():
            cmd = json.loads(line)
            kind = cmd.get("cmd")
            if kind == "grow":
                _emit(await pool.grow(int(cmd["calls"]), float(cmd.get("ramp_s", 2.0))))
            elif kind == "window":
                pool.start_window()
                _emit({"event": "window"})
            elif kind == "report":
                _emit(pool.report())
            elif kind == "stop":
                break
            else:
                _emit({"event": "error", "message": f"unknown command {kind!r}"})
    finally:
        ticker.cancel()
        await asyncio.gather(ticker, return_exceptions=True)
        _emit(await pool.stop())


# ---------------------------------------------------------------- the parent's side


class CallerProcess:
    """``python -m loadtest.capacity_callers`` as a child: JSON commands in, JSON out."""

    def __init__(self, router_url: str, transport: str, seed: int, log_path: Path) -> None:
        self._argv = [sys.executable, "-m", "loadtest.capacity_callers", "--router", router_url]
        self._argv += ["--transport", transport, "--seed", str(seed)]
        self._log_path = log_path
        self._popen: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str] = queue.Queue()
        self._reader: threading.Thread | None = None
        self.pid = 0

    def __enter__(self) -> CallerProcess:
        with open(self._log_path, "ab") as log:
            self._popen = subprocess.Popen(
                self._argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                # One BLAS thread: the callers' speech synthesis must not spin extra cores.
                env={**os.environ, "PYTHONUNBUFFERED": "1", "OPENBLAS_NUM_THREADS": "1"},
            )
        stdout = self._popen.stdout
        assert stdout is not None
        self._reader = threading.Thread(
            target=self._read, args=(stdout,), name="capacity-callers-out", daemon=True
        )
        self._reader.start()
        try:
            self.pid = int(self._expect("hello", 30.0)["pid"])
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self, stdout: IO[str]) -> None:
        for line in stdout:
            self._lines.put(line)
        self._lines.put("")  # EOF

    def _expect(self, event: str, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self._lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"callers: no {event!r} after {timeout_s}s") from None
            if not line:
                tail = self._log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the caller process exited:\n{tail}")
            msg: dict[str, Any] = json.loads(line)
            if msg.get("event") == event:
                return msg

    def command(self, cmd: dict[str, Any], answer: str, timeout_s: float = 60.0) -> dict[str, Any]:
        if self._popen is None or self._popen.stdin is None:
            raise RuntimeError("the caller process is not running")
        self._popen.stdin.write(json.dumps(cmd) + "\n")
        self._popen.stdin.flush()
        return self._expect(answer, timeout_s)

    def close(self) -> dict[str, Any] | None:
        """Hang every call up and wait for the process; idempotent."""
        popen, self._popen = self._popen, None
        if popen is None:
            return None
        final: dict[str, Any] | None = None
        try:
            if popen.stdin is not None:
                with contextlib.suppress(OSError):
                    popen.stdin.write(json.dumps({"cmd": "stop"}) + "\n")
                    popen.stdin.close()
            with contextlib.suppress(TimeoutError, RuntimeError):
                final = self._expect("stopped", 15.0)
            popen.wait(10)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()
        finally:
            if self._reader is not None:
                self._reader.join(5.0)  # it ends at the pipe's EOF, now that the child exited
            if popen.stdout is not None:
                popen.stdout.close()
        return final


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.capacity_callers", description=__doc__)
    p.add_argument(
        "--router", required=True, help="the router's base URL (several: comma-separated)"
    )
    p.add_argument("--transport", choices=("twilio", "native"), default="twilio")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    install_uvloop()
    asyncio.run(serve(CallerPool(args.router, args.transport, args.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
