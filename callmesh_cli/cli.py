"""The ``callmesh`` command: every process and tool of the cluster.

callmesh up [--nodes 2] [--routers 1] [--port 8080]   run a local cluster in the foreground
callmesh router | node                   run one process
callmesh call [--router URL]             an interactive text-mode caller
callmesh status [--router URL] [--json]  nodes and their live calls
callmesh effects-worker                  deliver side effects to the CRM
callmesh replay CALL_ID --tenant T       rebuild and show what a call saw
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
import uuid
from typing import Any

# Set before numpy loads: the audio path multiplies tiny matrices (a 20 ms frame at a time),
# where OpenBLAS worker threads only spin; one thread per process cut a node's CPU at 25
# streaming calls from 0.86 to 0.26 cores in the capacity benchmark.
for _blas in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_blas, "1")

from callmesh import config as cfg  # noqa: E402 (after the thread settings)
from callmesh import gc_tuning, heap_probe  # noqa: E402
from callmesh.settings import flags as settings_flags  # noqa: E402
from callmesh.settings import mask_url  # noqa: E402
from callmesh.telemetry import setup_logging  # noqa: E402

# ---------------------------------------------------------------------- processes


def cmd_router(args: argparse.Namespace) -> int:
    from callmesh.runner import install_uvloop, serve
    from router.app import Router

    config = cfg.from_values(cfg.RouterConfig, args.settings)

    async def main() -> None:
        router = Router(config)
        await router.start()
        gc_tuning.tune(router.metrics, config.gc_gen0_threshold)
        try:
            await serve(router.app(), config.host, config.port, on_signal=router.drain)
        finally:
            await router.aclose()

    install_uvloop()
    asyncio.run(main())
    return 0


def cmd_node(args: argparse.Namespace) -> int:
    from callmesh.runner import install_uvloop, serve
    from conversation_node.app import ConversationNode

    config = cfg.from_values(cfg.NodeConfig, args.settings)

    async def main() -> None:
        node = ConversationNode(config)
        await node.start()
        gc_tuning.tune(node.services.metrics, config.gc_gen0_threshold)
        try:
            await serve(node.app(), config.host, config.port, on_signal=node.drain)
        finally:
            await node.aclose()

    install_uvloop()
    asyncio.run(main())
    return 0


def _node_speech(speech: str) -> str:
    """What the local cluster's nodes will use (their environment plus CALLMESH_SPEECH),
    shown at start; a ConfigError when the offline speech is chosen and not installed,
    rather than every node failing on it."""
    from conversation_node.providers.registry import ProviderSettings, offline_missing

    chosen = ProviderSettings.from_env({**os.environ, "CALLMESH_SPEECH": speech})
    if missing := offline_missing(chosen):
        raise cfg.ConfigError(
            f"the offline speech needs the [speech] extra (missing: {missing}): "
            "pip install -e '.[speech]' (make up installs it), or use simulated speech "
            "(callmesh up --speech simulated, or CALLMESH_SPEECH=simulated)"
        )
    vad = f" ({chosen.vad} VAD)" if chosen.stt == "pocketsphinx" else ""
    return f"stt {chosen.stt}{vad} · tts {chosen.tts} · llm {chosen.llm}"


UP_READY_TIMEOUT_S = 120.0


def cmd_up(args: argparse.Namespace) -> int:
    from callmesh.auth.dev import write_dev_secret
    from localcluster.cluster import LocalCluster

    # A person talks to this cluster: real offline speech unless asked otherwise.
    speech = args.speech or "offline"
    providers = _node_speech(speech)
    hint = "   (--speech simulated: tones)" if speech == "offline" else ""
    stop = {"sig": 0}

    def on_signal(signum: int, _frame: Any) -> None:
        stop["sig"] = signum

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    print(
        f"callmesh: starting Redis, NATS, {args.routers} router(s) and",
        args.nodes,
        "nodes ...",
        flush=True,
    )
    # Development mode: console tokens and the console's kill button (localcluster/devcontrol.py).
    with LocalCluster(
        nodes=args.nodes,
        routers=args.routers,
        router_port=args.port,
        dev=True,
        speech=speech,
        # A first start loads the offline speech models from a cold disk cache, possibly
        # on a busy machine: tests start in seconds, a person's first start may not.
        ready_timeout_s=UP_READY_TIMEOUT_S,
    ) as cluster:
        secret_file = write_dev_secret(cluster.auth_secret)
        print(
            f"\n  console    {cluster.console_url}   (open it in a browser and talk)\n"
            f"  router     {', '.join(cluster.router_urls)}"
            f"   (WebSocket: {cluster.router_url.replace('http', 'ws')}/v1/calls/CALL_ID)\n"
            f"  redis      {mask_url(cluster.redis_url)}\n"
            f"  nats       {mask_url(cluster.nats_url)}\n"
            f"  nodes      {', '.join(f'{n.name} {n.url}' for n in cluster.nodes)}\n"
            f"  speech     {providers}{hint}\n"
            f"  logs       {cluster.log_dir}\n"
            f"  auth       call tokens are required; the development secret is in {secret_file}\n"
            "             (callmesh call and the load tests mint their tokens with it)\n\n"
            f"Place a call:   .venv/bin/callmesh call --router {cluster.router_url}\n"
            f"Cluster state:  .venv/bin/callmesh status --router {cluster.router_url}\n"
            "Ctrl-C stops everything.\n",
            flush=True,
        )
        while not stop["sig"]:
            for p in [cluster.router, *cluster.routers, *cluster.nodes]:
                if p is not None and p.popen is not None and p.popen.poll() is not None:
                    print(
                        f"callmesh: {p.name} exited with {p.popen.returncode}; see {p.log_path}",
                        file=sys.stderr,
                        flush=True,
                    )
                    p.popen = None
            time.sleep(0.2)
        print("\ncallmesh: stopping ...", flush=True)
    print("callmesh: stopped.", flush=True)
    return 0


# ---------------------------------------------------------------------- tools


def cmd_status(args: argparse.Namespace) -> int:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{args.router.rstrip('/')}/v1/status", timeout=3) as resp:
            data = json.loads(resp.read())
    except OSError as exc:
        print(f"callmesh: cannot reach router at {args.router}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(
        f"router {data['router']}  live calls {data['calls']}  "
        f"redis {'ok' if data['redis'] else 'DOWN'}"
    )
    print(f"{'node':<16}{'state':<10}{'alive':<7}{'calls':>6}  url")
    for n in data["nodes"]:
        alive = "yes" if n["alive"] and not n["suspect"] else ("suspect" if n["alive"] else "no")
        print(f"{n['node']:<16}{n['state']:<10}{alive:<7}{n['calls']:>6}  {n['url']}")
    return 0


def cmd_call(args: argparse.Namespace) -> int:
    from callmesh_client.client import CallClient, CallError

    async def main() -> int:
        call_id = args.call_id or f"call-{uuid.uuid4().hex[:10]}"
        # Without --token: minted from CALLMESH_AUTH_SECRET or the secret of callmesh up.
        async with CallClient(args.router, call_id, token=args.token) as client:
            try:
                ready = await client.start(args.tenant, args.caller)
            except CallError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            print(
                f"call {call_id} on {ready['node']} (epoch {ready['epoch']}). "
                "Type a line and press Enter; an empty line or Ctrl-D hangs up."
            )
            try:
                print(f"agent> {await asyncio.wait_for(client.wait_greeting(), 5)}")
            except TimeoutError:
                pass  # a node that does not greet: the caller speaks first
            loop = asyncio.get_running_loop()
            while True:
                line = await loop.run_in_executor(None, sys.stdin.readline)
                if not line.strip():
                    break
                try:
                    reply = await client.say(line.strip())
                except CallError as exc:
                    print(f"  ! {exc}")
                    continue
                m = reply.metrics
                print(f"agent> {reply.text}")
                print(
                    f"  turn {reply.turn} · {reply.latency_ms:.0f} ms to first audio · "
                    f"llm {m.get('llm_first_token_ms', 0):.0f} ms · "
                    f"tts {m.get('tts_first_chunk_ms', 0):.0f} ms · "
                    f"overhead {m.get('overhead_ms', 0):.1f} ms · intent {m.get('intent')} · "
                    f"node {m.get('node')}"
                    + (f" · fallbacks {m['fallbacks']}" if m.get("fallbacks") else "")
                )
            await client.hangup()
            print("call ended.")
        return 0

    return asyncio.run(main())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="callmesh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    settings_flags.add_top_level_flags(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("up", help="run a local cluster in the foreground")
    settings_flags.add_flags(p, "up")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("router", help="run a session router")
    settings_flags.add_flags(p, "router")
    p.set_defaults(func=cmd_router)

    p = sub.add_parser("node", help="run a conversation node")
    settings_flags.add_flags(p, "node")
    p.set_defaults(func=cmd_node)

    p = sub.add_parser("call", help="interactive text-mode caller")
    settings_flags.add_flags(p, "call")
    p.add_argument("--tenant", default="demo")
    p.add_argument("--caller", default="cli-caller")
    p.add_argument("--call-id", default=None)
    p.add_argument(
        "--token",
        default=os.environ.get("CALLMESH_TOKEN"),
        help="call token to present (env CALLMESH_TOKEN; unset: minted with the "
        "development secret of callmesh up / CALLMESH_AUTH_SECRET)",
    )
    p.set_defaults(func=cmd_call)

    p = sub.add_parser("status", help="nodes and their live calls")
    settings_flags.add_flags(p, "status")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    from events import cli as events_cli

    events_cli.add_effects_worker_parser(sub)
    events_cli.add_replay_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings_flags.resolve(args)  # the process's settings, read once: flag, env, default
        services = ("router", "node", "effects-worker")
        setup_logging(args.log_level, json_logs=args.command in services)
        if args.command in services:
            heap_probe.install_from_settings(args.settings, args.command)
        result = args.func(args)
        if asyncio.iscoroutine(result):
            from callmesh.runner import install_uvloop

            install_uvloop()
            result = asyncio.run(result)
        return int(result or 0)
    except cfg.ConfigError as exc:
        print(f"callmesh: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
