"""Router cost per media frame: microbenchmarks of the per-frame steps, then the whole
router process over real sockets. Prints one JSON object.

    .venv/bin/python bench/router_frames.py [--calls 200] [--seconds 10] [--floor]

The process test runs the real router app (placement stubbed: no Redis) in this process
and, in a child process, a fake node plus ``--calls`` Twilio callers
(:class:`callmesh_client.voice_client.VoiceCaller`) each streaming 50 frames/s. Each caller has
its own WebSocket to the router; router and node talk over ONE multiplexed link
(:mod:`callmesh.mux`, ``LINK_PATH``), every call a channel on it, each side holding
what it sends for 2 ms (``link_flush_ms``, the default) so that many frames share a
write. The fake node acknowledges every 25th frame and answers every 5th with 100 ms of
agent audio (a mark after every 10th chunk), so the router also does its outbound work:
agent audio at 10 chunks/s per call, a realistic ceiling for a call that is spoken to
half the time. The figure is the router process's CPU time (user + system, so socket I/O
included) divided by the caller frames it forwarded. ``--floor`` runs the same load
through a bare aiohttp WebSocket relay with one node WebSocket per call (no parsing, no
bookkeeping, no batching): what any Python router paid before the link, the baseline the
multiplexed link is measured against.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
from aiohttp import web

from callmesh.audio.format import AudioEncoding
from callmesh.config import LINK_FLUSH_MS, RouterConfig
from callmesh.mux import LINK_PATH, MAX_MESSAGE_BYTES, Channel, Mux
from callmesh.protocol import Ctl, In, Out, encode, parse_inbound
from callmesh.telemetry import Metrics
from localcluster.servers import free_port
from router.app import Router
from router.node_links import NodeLinks
from router.placement import Placement
from router.ring import BoundedLoadRing
from router.twilio import TwilioLink

PAYLOAD = base64.b64encode(bytes(range(160))).decode()
AGENT_AUDIO = base64.b64encode(b"\x7f" * 800).decode()
# The fake node holds what it sends on a link as long as the real node does by default.
LINK_FLUSH_S = LINK_FLUSH_MS / 1000


def micro(n: int = 200_000) -> dict[str, float]:
    """µs per call of the per-frame steps, in isolation."""

    class _Metrics:
        def inc(self, name: str, value: float = 1.0) -> None:
            pass

    link = TwilioLink(None, _Metrics(), 256 * 1024)  # type: ignore[arg-type]
    link.translate(
        json.dumps(
            {
                "event": "start",
                "streamSid": "MZ1",
                "start": {"callSid": "CA1", "customParameters": {"tenant": "demo"}},
            }
        )
    )
    media = (
        '{"event":"media","sequenceNumber":"3","media":{"track":"inbound","chunk":"1",'
        f'"timestamp":"160","payload":"{PAYLOAD}"}},"streamSid":"MZ1"}}'
    )
    native = f'{{"type":"{In.AUDIO.value}","seq":5,"data":"{PAYLOAD}","ts":160}}'
    out: dict[str, float] = {}
    t = time.perf_counter()
    for _ in range(n):
        link.translate(media)
    out["twilio_media_to_native_us"] = (time.perf_counter() - t) / n * 1e6
    t = time.perf_counter()
    for _ in range(n):
        parse_inbound(native)
    out["native_audio_validate_us"] = (time.perf_counter() - t) / n * 1e6
    frame = {
        "type": Out.AGENT_AUDIO.value,
        "turn": 1,
        "n": 3,
        "encoding": AudioEncoding.MULAW.value,
        "data": AGENT_AUDIO,
    }
    raw = encode(frame)
    t = time.perf_counter()
    for _ in range(n):
        f = json.loads(raw)
        link._media_prefix + f["data"] + '"}}'
    out["agent_audio_to_twilio_us"] = (time.perf_counter() - t) / n * 1e6
    return {k: round(v, 3) for k, v in out.items()}


# ---------------------------------------------------------------------- the router process


class _Pins:
    async def get(self, tenant: str, call_id: str) -> str | None:
        return "node-1"

    async def set(self, tenant: str, call_id: str, node: str) -> None:
        pass

    async def clear(self, tenant: str, call_id: str, node: str) -> None:
        pass


async def _healthy(url: str) -> bool:
    return True


class _Membership:
    redis_ok = True
    nodes: dict[str, Any] = {}

    def __init__(self, url: str) -> None:
        self._url = url

    def url(self, node: str) -> str:
        return self._url

    def routable(self) -> list[str]:
        return ["node-1"]

    def loads(self) -> dict[str, int]:
        return {"node-1": 0}

    def suspect(self, node: str) -> None:
        pass

    async def aclose(self) -> None:
        pass


def relay_app(node_url: str, http: aiohttp.ClientSession) -> web.Application:
    """The floor: a bare WebSocket relay (no parsing, no translation, no bookkeeping)."""

    async def media(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(compress=False)
        await ws.prepare(request)
        up = await http.ws_connect(f"{node_url}/v1/node/calls/x", compress=0)

        async def down() -> None:
            async for msg in up:
                await ws.send_str(msg.data)
            await ws.close()  # the node ended the call

        task = asyncio.create_task(down())
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                await up.send_str(msg.data)
        await up.close()
        task.cancel()
        return ws

    app = web.Application()
    app.router.add_get("/v1/twilio/media", media)
    return app


async def router_process(calls: int, seconds: float, *, relay: bool = False) -> dict[str, Any]:
    node_port, router_port = free_port(), free_port()
    # The per-frame path is what is measured: authentication (at start only) is off.
    router = Router(RouterConfig(port=router_port, auth_disabled=1))
    membership = _Membership(f"http://127.0.0.1:{node_port}")
    router._membership = membership  # type: ignore[assignment]
    router._placement = Placement(membership, _Pins(), _healthy, BoundedLoadRing())
    router._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    router._node_links = NodeLinks(
        router._http, router.metrics, router.config.router_id, router.config.link_flush_ms / 1000
    )
    app = relay_app(f"http://127.0.0.1:{node_port}", router.http) if relay else router.app()
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", router_port).start()
    try:
        peer = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--peer",
            str(router_port),
            str(node_port),
            str(calls),
            str(seconds),
            stdout=asyncio.subprocess.PIPE,
        )
        cpu0, wall0 = os.times(), time.monotonic()
        stdout, _ = await peer.communicate()
        cpu1, wall = os.times(), time.monotonic() - wall0
    finally:
        await router.aclose()
        await runner.cleanup()
    cpu_s = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    result = json.loads(stdout)
    frames = result["node_audio_frames"]
    us = cpu_s / frames * 1e6 if frames else float("nan")
    return {
        "calls": calls,
        "seconds": seconds,
        "caller_frames_sent": result["frames_sent"],
        "frames_at_node": frames,
        "agent_audio_chunks": result["agent_chunks"],
        "router_cpu_s": round(cpu_s, 3),
        "router_cpu_share": round(cpu_s / wall, 3),
        "router_us_per_caller_frame": round(us, 2),
        "router_calls_per_core_at_50fps": int(1e6 / (50 * us)) if frames else 0,
        "caller_max_send_lag_ms": result["max_lag_ms"],
    }


Send = Callable[[str], Awaitable[None]]
Receive = Callable[[], Awaitable[str | None]]


def _kind(text: str) -> str:
    """The first value of a frame without parsing it: ``type`` for the native frames the
    router sends, ``event`` for the Twilio messages the floor relays as they are (with or
    without a space after the colon: the callers write both)."""
    at = text.find('"', text.find(":") + 1) + 1
    return text[at : text.find('"', at)]


_START, _AUDIO, _HANGUP = In.START.value, In.AUDIO.value, In.HANGUP.value


async def serve_call(receive: Receive, send: Send, counts: dict[str, int]) -> None:
    """One call at the fake node, whatever carries it: ready on ``start``, an ack every
    25th audio frame, 100 ms of agent audio every 5th (a mark after every 10th chunk),
    ``call_ended`` on hangup, and then the call is over (the floor's relay closes the
    caller's socket when the node's closes: its callers cannot read ``call_ended``)."""
    n = 0
    while (text := await receive()) is not None:
        kind = _kind(text)
        if kind == _START:
            await send(encode({"type": Out.READY.value, "turn": 0, "last_seq": 0}))
        elif kind == _AUDIO or kind == "media":  # media: relayed by the floor as is
            n += 1
            counts["audio"] += 1
            if n % 25 == 0:
                seq = json.loads(text).get("seq", 0)
                await send(encode({"type": Ctl.ACK.value, "seq": seq, "turn": 0}))
            if n % 5 == 0:
                chunk = n // 5
                audio = {"type": Out.AGENT_AUDIO.value, "turn": 1, "n": chunk, "data": AGENT_AUDIO}
                await send(encode(audio))
                counts["chunks"] += 1
                if chunk % 10 == 0:
                    mark = {"type": Out.MARK.value, "turn": 1, "n": chunk, "name": f"1.{chunk}"}
                    await send(encode(mark))
        elif kind == _HANGUP or kind == "stop":
            await send(encode({"type": Out.CALL_ENDED.value, "turn": 1}))
            return  # the call is over: its channel (or socket) closes


class FakeNode:
    """The node end of the router's link (``LINK_PATH``: every call a channel of one
    multiplexed WebSocket, as the real node serves it) and, for the floor's bare relay,
    of one WebSocket per call (``/v1/node/calls/{call_id}``, what the link replaced)."""

    def __init__(self) -> None:
        self.counts = {"audio": 0, "chunks": 0}
        self._muxes: set[Mux] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.app = web.Application()
        self.app.router.add_get(LINK_PATH, self._link)
        self.app.router.add_get("/v1/node/calls/{call_id}", self._call_socket)

    async def _link(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE_BYTES)
        await ws.prepare(request)
        mux = Mux(ws, "fake-node", Metrics("fake"), on_open=self._open, flush_delay_s=LINK_FLUSH_S)
        self._muxes.add(mux)
        try:
            await mux.serve()
        finally:
            self._muxes.discard(mux)
        return ws

    def _open(self, channel: Channel) -> None:
        task = asyncio.get_running_loop().create_task(self._channel(channel))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _channel(self, channel: Channel) -> None:
        try:
            await serve_call(channel.receive, channel.send_str, self.counts)
        except ConnectionError:
            pass  # the link is gone
        finally:
            await channel.close()

    async def _call_socket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)

        async def receive() -> str | None:
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    return str(msg.data)
            return None

        await serve_call(receive, ws.send_str, self.counts)
        return ws

    async def aclose(self) -> None:
        """End the links (the router keeps its link open until it closes)."""
        for mux in list(self._muxes):
            await mux.aclose()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def peer(router_port: int, node_port: int, calls: int, seconds: float) -> None:
    from callmesh_client.voice_client import VoiceCaller

    node = FakeNode()
    runner = web.AppRunner(node.app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", node_port).start()

    async def one(i: int) -> VoiceCaller:
        url = f"http://127.0.0.1:{router_port}"
        params = {"tenant": "demo", "caller": f"c{i}"}  # the router runs without auth
        async with VoiceCaller(
            url, f"bench-{i}", "demo", f"c{i}", transport="twilio", twilio_parameters=params
        ) as c:
            await asyncio.sleep(seconds)
            await c.hangup()
        return c

    callers = await asyncio.gather(*(one(i) for i in range(calls)))
    await node.aclose()
    await runner.cleanup()
    print(
        json.dumps(
            {
                "frames_sent": sum(c.stats.frames for c in callers),
                "node_audio_frames": node.counts["audio"],
                "agent_chunks": node.counts["chunks"],
                "max_lag_ms": round(max(c.stats.max_lag_ms for c in callers), 1),
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--floor", action="store_true", help="also measure a bare relay")
    ap.add_argument("--peer", nargs=4, metavar=("ROUTER", "NODE", "CALLS", "SECONDS"))
    args = ap.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if args.peer:
        r, n, c, s = args.peer
        asyncio.run(peer(int(r), int(n), int(c), float(s)))
        return
    out: dict[str, Any] = {"micro_us": micro()}
    out["router_process"] = asyncio.run(router_process(args.calls, args.seconds))
    if args.floor:
        out["bare_relay_floor"] = asyncio.run(router_process(args.calls, args.seconds, relay=True))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
