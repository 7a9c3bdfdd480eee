"""The ``callmesh effects-worker`` and ``callmesh replay`` subcommands.

``callmesh_cli/cli.py`` registers them with :func:`add_effects_worker_parser` and
:func:`add_replay_parser`; each sets ``func`` to a coroutine function taking the parsed
arguments and returning the exit status. Their settings (``NATS_URL``, ``REDIS_URL``,
``CALLMESH_WEBHOOK_URL``...) are declared in :mod:`callmesh.settings.table`: flags
override environment variables, which override defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats
from aiohttp import web

from callmesh import metric_names as names
from callmesh.settings import flags as settings_flags
from callmesh.settings import mask_url
from callmesh.settings.table import REPLAY, WORKER
from callmesh.telemetry import Metrics
from events.connection import server_urls
from events.errors import EventsError
from events.replay import build_report, list_calls, read_records
from events.replay_text import format_text
from events.sinks import LogSink, Sink, WebhookSink
from events.worker import EffectsWorker, WorkerState
from events.worker_config import add_worker_flags, worker_config

log = logging.getLogger(__name__)

# Exit statuses of ``callmesh replay``.
EXIT_OK, EXIT_DIVERGED, EXIT_NOT_FOUND, EXIT_UNAVAILABLE = 0, 1, 2, 3


def add_effects_worker_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``effects-worker`` on an argparse subparsers object."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "effects-worker",
        help="deliver side effects (CRM writes) from JetStream to a webhook",
        description="Run one effects worker. Run several with the same --durable to share "
        "the work. Without a webhook URL effects are only logged. SIGTERM drains.",
    )
    settings_flags.add_flags(p, WORKER)
    p.add_argument(
        "--webhook-header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="extra header for every request, e.g. 'Authorization: Bearer ...'",
    )
    p.add_argument("--webhook-timeout-s", type=float, default=10.0, help="(default: 10.0)")
    p.add_argument(
        "--name",
        default=f"effects-worker-{os.getpid()}",
        help="this worker's name in logs and NATS (default: effects-worker-PID)",
    )
    add_worker_flags(p)
    p.set_defaults(func=run_effects_worker)
    return p


def add_replay_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``replay`` on an argparse subparsers object."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "replay",
        help="rebuild and show what a call saw, turn by turn",
        description="Rebuild a call from its event log, print its timeline and verify the "
        "rebuilt state against the last checkpoint. Exit status: 0 ok, 1 diverged, "
        "2 no such call for this tenant, 3 NATS unavailable.",
    )
    p.add_argument("call_id", nargs="?", metavar="CALL_ID")
    p.add_argument("--tenant", required=True, help="the tenant the call belongs to")
    p.add_argument("--at", type=int, metavar="TURN", help="show the state as of this turn")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--html", metavar="PATH", help="also write a self-contained HTML page")
    p.add_argument("--list", action="store_true", help="list the tenant's calls with logs")
    settings_flags.add_flags(p, REPLAY)
    p.set_defaults(func=run_replay)
    return p


def make_sink(args: argparse.Namespace) -> Sink:
    settings_flags.resolved(args)
    if not args.webhook_url:
        log.warning("no webhook URL configured: effects are logged, not delivered")
        return LogSink()
    headers = {}
    for item in args.webhook_header:
        name, sep, value = item.partition(":")
        if not sep:
            raise ValueError(f"--webhook-header must be 'NAME: VALUE', got {item!r}")
        headers[name.strip()] = value.strip()
    return WebhookSink(args.webhook_url, timeout_s=args.webhook_timeout_s, headers=headers)


# The worker's counts (events.delivery.WorkerMetrics) as metrics: every outcome of a
# delivery attempt is one label value of EFFECT_DELIVERIES.
_OUTCOMES = ("delivered", "already_applied", "retried", "dead_lettered", "rejected", "malformed")


def metrics_text(worker: EffectsWorker, nats_up: bool = True) -> str:
    """Prometheus text exposition of the worker's counters and gauges."""
    counts = worker.snapshot()
    m = Metrics("callmesh_effects")
    for outcome in _OUTCOMES:
        m.inc(names.DELIVERIES, counts.get(outcome, 0), outcome=outcome)
    m.inc(names.DEAD_LETTERS, counts.get("dead_lettered", 0))
    m.set(names.IN_FLIGHT, counts.get("in_flight", 0))
    m.set(names.NATS_UP, float(nats_up))
    m.set(names.DRAINING, float(worker.state is not WorkerState.RUNNING))
    return m.render()


def metrics_app(worker: EffectsWorker, is_connected: Callable[[], bool]) -> web.Application:
    """``/metrics``, ``/livez`` (``/healthz``: 200 while the process serves) and
    ``/readyz`` (200 while running and connected to NATS, else 503)."""

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=metrics_text(worker, is_connected()), content_type="text/plain")

    def body() -> dict[str, object]:
        return {"state": worker.state.value, "nats": is_connected(), **worker.snapshot()}

    async def livez(_: web.Request) -> web.Response:
        return web.json_response(body())

    async def readyz(_: web.Request) -> web.Response:
        ok = worker.state is WorkerState.RUNNING and is_connected()
        return web.json_response(body(), status=200 if ok else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/livez", livez)
    app.router.add_get("/healthz", livez)  # the liveness probe's older name
    app.router.add_get("/readyz", readyz)
    return app


async def run_effects_worker(args: argparse.Namespace) -> int:
    """Run one worker until SIGTERM/SIGINT, then drain (bounded by --drain-timeout-s)."""
    from callmesh.runner import serve
    from events.streams import ensure_streams

    try:
        config, sink = worker_config(args), make_sink(args)
    except ValueError as exc:
        print(f"callmesh effects-worker: {exc}", file=sys.stderr)
        return 2
    nc = await nats.connect(server_urls(args.nats_url), name=args.name, max_reconnect_attempts=-1)
    try:
        js = nc.jetstream()
        await ensure_streams(js, args.events_max_age_s)
        worker = EffectsWorker(js, sink, config, name=args.name)
        await worker.start()
        log.info(
            "effects worker %s consuming %s as %s into %s",
            args.name,
            config.filter_subject,
            config.durable,
            mask_url(args.webhook_url) if args.webhook_url else "the log",
        )
        try:
            await serve(
                metrics_app(worker, lambda: nc.is_connected),
                args.host,
                args.port,
                on_signal=worker.aclose,
                ready=lambda port: log.info("metrics on :%d/metrics", port),
            )
        finally:
            await worker.aclose()
    finally:
        await sink.aclose()
        await nc.drain()
    return 0


async def run_replay(args: argparse.Namespace) -> int:
    """Print a call's timeline (text or JSON), optionally write HTML; see the exit codes."""
    from callmesh.protocol import valid_id
    from events.replay_html import render_html
    from state_store.client import connect
    from state_store.errors import StateStoreError
    from state_store.store import StateStore

    settings_flags.resolved(args)
    if not valid_id(args.tenant) or (args.call_id and not valid_id(args.call_id)):
        print("callmesh replay: tenant and CALL_ID must match [A-Za-z0-9_-]{1,64}", file=sys.stderr)
        return EXIT_NOT_FOUND
    try:
        nc = await nats.connect(
            server_urls(args.nats_url), max_reconnect_attempts=2, connect_timeout=3
        )
    except Exception as exc:
        print(f"callmesh replay: NATS unavailable: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    try:
        js = nc.jetstream()
        if args.list or not args.call_id:
            calls = await list_calls(js, args.tenant)
            print(
                json.dumps(calls, indent=2)
                if args.json
                else "\n".join(f"{c}\t{n} messages" for c, n in calls.items()) or "no calls"
            )
            return EXIT_OK
        records = await read_records(js, args.tenant, args.call_id)
    except EventsError as exc:
        print(f"callmesh replay: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    finally:
        await nc.close()
    redis = connect(args.redis_url, timeout_s=3.0)
    ckpt_error = ""
    try:
        ckpt = await StateStore(redis).load(args.tenant, args.call_id)
    except StateStoreError as exc:
        ckpt, ckpt_error = None, f"checkpoint could not be read: {exc}"
    finally:
        await redis.aclose()
    report = build_report(args.tenant, args.call_id, records, ckpt, at=args.at)
    if ckpt_error:
        report.warnings.insert(0, ckpt_error)
    if not report.found:
        print(f"callmesh replay: no call {args.call_id} for tenant {args.tenant}", file=sys.stderr)
        return EXIT_NOT_FOUND
    print(
        json.dumps(report.to_dict(), indent=2, ensure_ascii=False, default=str)
        if args.json
        else format_text(report)
    )
    if args.html:
        page = render_html(report)
        await asyncio.to_thread(Path(args.html).write_text, page, encoding="utf-8")
        print(f"wrote {args.html}", file=sys.stderr)
    return EXIT_DIVERGED if report.verified is False else EXIT_OK
