"""A fake CRM: a real local HTTP server that effects are delivered to.

It is a fake, honestly named: the effects tests and ``python -m loadtest effects`` point
the effects worker at it because no real CRM is reachable from a test or a laptop.

It speaks what :class:`events.sinks.WebhookSink` expects of a CRM's API: ``POST`` a JSON
effect with an ``Idempotency-Key``; 201 when applied, 409 when that key was applied
before. It can be switched down on demand (503, dropped connections, or a closed port so
connections are refused), can reject chosen keys with 422, and records every request
and every *application* per key, so tests and benchmarks can tell a harmless retry (a
409) from a duplicate (one key applied twice).

In-process: ``async with FakeCRM() as crm: ...; await crm.go_down("refuse")``.
Standalone (for benchmarks in another process): ``python -m loadtest.fake_crm --port 8099``;
``POST /_control/mode {"mode": "503"}`` switches it, ``GET /_stats`` reads the counts and
``GET /_applied`` every applied key with its count and first application time ("refuse"
cannot be undone from outside, since the port is closed: use "abort").
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from collections import Counter
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from aiohttp import web

from localcluster.servers import free_port

EFFECTS_PATH = "/effects"


class CRMMode(StrEnum):
    UP = "up"
    UNAVAILABLE = "503"  # answers 503 Service Unavailable, applies nothing
    ABORT = "abort"  # accepts the connection and drops it without an answer
    REFUSE = "refuse"  # the port is closed: connection refused
    LOST_RESPONSE = "lost_response"  # applies the effect, then answers 503 (answer lost)


@dataclass(frozen=True)
class Received:
    key: str
    status: int
    at: float  # time.time() when answered


class FakeCRM:
    """A CRM API on ``127.0.0.1``. ``dedupe=False`` makes it apply every request, like an
    API without idempotency support, so duplicates show up in :meth:`duplicates`."""

    def __init__(self, *, port: int = 0, dedupe: bool = True, delay_s: float = 0.0) -> None:
        self.port = port or free_port()
        self.dedupe = dedupe
        self.delay_s = delay_s
        self.mode = CRMMode.UP
        self.reject_keys: set[str] = set()
        self.requests = 0
        self.received: list[Received] = []
        self.applied: Counter[str] = Counter()
        self.bodies: dict[str, dict[str, Any]] = {}
        self.headers: dict[str, dict[str, str]] = {}
        self.first_applied_at: dict[str, float] = {}
        self._fail_next = 0
        self._changed = asyncio.Condition()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    @property
    def url(self) -> str:
        """The webhook URL to configure a WebhookSink with."""
        return f"http://127.0.0.1:{self.port}{EFFECTS_PATH}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post(EFFECTS_PATH, self._handle)
        app.router.add_post(EFFECTS_PATH + "/{tail:.*}", self._handle)
        app.router.add_post("/_control/mode", self._control)
        app.router.add_get("/_stats", self._stats)
        app.router.add_get("/_applied", self._applied)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await self._listen()

    async def _listen(self) -> None:
        if self._runner is None:
            raise RuntimeError("FakeCRM is not started")
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await self._site.start()

    async def aclose(self) -> None:
        runner, self._runner, self._site = self._runner, None, None
        # Requests still sleeping in delay_s: end them now rather than leak their tasks.
        for task in self._handlers:
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if runner is not None:
            await asyncio.shield(runner.cleanup())

    async def __aenter__(self) -> FakeCRM:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def go_down(self, mode: CRMMode | str = CRMMode.UNAVAILABLE) -> None:
        """Start an outage: "503", "abort", "refuse" or "lost_response"."""
        mode = CRMMode(mode)
        if mode is CRMMode.REFUSE and self._site is not None:
            await self._site.stop()
            self._site = None
        self.mode = mode

    async def go_up(self) -> None:
        """End the outage (re-opens the port after "refuse")."""
        if self._site is None and self._runner is not None:
            await self._listen()
        self.mode = CRMMode.UP

    def fail_next(self, n: int) -> None:
        """Answer the next ``n`` requests with 503, whatever the mode."""
        self._fail_next = n

    def duplicates(self) -> dict[str, int]:
        """Keys applied more than once, with their application counts."""
        return {k: n for k, n in self.applied.items() if n > 1}

    def applications(self) -> dict[str, dict[str, float]]:
        """Every applied key: how often it was applied and when first (``time.time()``)."""
        return {
            key: {"applied": n, "first_applied_at": self.first_applied_at[key]}
            for key, n in self.applied.items()
        }

    def stats(self) -> dict[str, Any]:
        statuses = Counter(r.status for r in self.received)
        return {
            "mode": self.mode.value,
            "requests": self.requests,
            "applied": len(self.applied),
            "duplicates": len(self.duplicates()),
            "statuses": {str(k): v for k, v in statuses.items()},
        }

    async def wait_applied(self, n: int, timeout_s: float = 10.0) -> None:
        """Wait until ``n`` distinct keys were applied (raises TimeoutError after timeout)."""
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(lambda: len(self.applied) >= n)

    async def wait_requests(self, n: int, timeout_s: float = 10.0) -> None:
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(lambda: self.requests >= n)

    async def _answer(self, key: str, status: int, body: dict[str, Any]) -> web.Response:
        self.received.append(Received(key, status, time.time()))
        async with self._changed:
            self._changed.notify_all()
        return web.json_response(body, status=status)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        if task is None:  # aiohttp always runs handlers in a task; nothing to track otherwise
            return await self._apply(request)
        self._handlers.add(task)
        try:
            return await self._apply(request)
        finally:
            self._handlers.discard(task)

    async def _apply(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        key = request.headers.get("Idempotency-Key", "")
        async with self._changed:
            self._changed.notify_all()
        try:
            body = await request.json()
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
        except ConnectionResetError:
            return web.Response(status=499)  # the client gave up (its timeout): nothing applied
        if self.mode in (CRMMode.ABORT, CRMMode.REFUSE):
            # REFUSE closed the port for new connections; a pooled keep-alive connection
            # that is still open gets dropped instead, as a real outage would.
            self.received.append(Received(key, 0, time.time()))
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=500)  # never sent: the connection is gone
        if self._fail_next > 0 or self.mode is CRMMode.UNAVAILABLE:
            self._fail_next = max(0, self._fail_next - 1)
            return await self._answer(key, 503, {"error": "unavailable"})
        if key in self.reject_keys:
            return await self._answer(key, 422, {"error": "unprocessable"})
        if self.dedupe and key and key in self.applied:
            return await self._answer(key, 409, {"status": "already_applied"})
        self.applied[key] += 1
        self.bodies[key] = body
        self.headers[key] = dict(request.headers)
        self.first_applied_at.setdefault(key, time.time())
        if self.mode is CRMMode.LOST_RESPONSE:
            return await self._answer(key, 503, {"error": "applied, but the answer is lost"})
        return await self._answer(key, 201, {"status": "applied"})

    async def _control(self, request: web.Request) -> web.Response:
        mode = CRMMode((await request.json())["mode"])
        await (self.go_up() if mode is CRMMode.UP else self.go_down(mode))
        return web.json_response(self.stats())

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _applied(self, request: web.Request) -> web.Response:
        return web.json_response(self.applications())

    def __repr__(self) -> str:
        return (
            f"<FakeCRM {self.mode.value} [requests: {self.requests}, "
            f"applied: {len(self.applied)}, duplicates: {len(self.duplicates())}]>"
        )


async def _serve(port: int, dedupe: bool) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # SIGTERM is how the benchmark ends it: close the listener cleanly and exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with FakeCRM(port=port, dedupe=dedupe) as crm:
        print(f"fake CRM listening on {crm.url} (dedupe={dedupe})", flush=True)
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="A fake CRM API for effect delivery tests")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--no-dedupe", action="store_true", help="apply repeated keys again")
    args = parser.parse_args()
    asyncio.run(_serve(args.port, not args.no_dedupe))


if __name__ == "__main__":
    main()
