"""A TCP proxy between the routers and the nodes of a local cluster that delays what it
carries on demand: link latency and jitter for chaos runs.

Each node gets a listening port of its own that forwards to the node's port; the node
advertises the proxy's port (``--advertise-url``), so every router link, health check and
relink to it crosses the proxy. With ``delay`` and ``jitter`` set, each chunk read is
written ``delay +- jitter`` (uniform) later, but never before the chunk read before it in
the same direction: bytes keep their order, as on a TCP connection. Zero delay forwards
at once.

It runs as its own process (``python -m localcluster.link_proxy --control-port P``), so
the delays are not at the mercy of the load generator's event loop. A line protocol on
the control port (localhost only) drives it: ``add TARGET_PORT`` -> ``ok LISTEN_PORT``;
``set DELAY_MS JITTER_MS`` -> ``ok``. :class:`LinkProxy` is the supervisor's side.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from localcluster.servers import ServerError, die_with_parent, free_port, wait_port

HOST = "127.0.0.1"
CHUNK = 64 * 1024
# Chunks in flight per direction and connection: back-pressure beyond this.
QUEUE_CHUNKS = 256
MAX_DELAY_MS = 5000.0
MAX_PORTS = 1000
_LINE = 100  # bytes of a control command, at most


class Delays:
    """The delay now in force, shared by every connection."""

    def __init__(self, seed: int = 0) -> None:
        self.delay_s = 0.0
        self.jitter_s = 0.0
        self._rng = random.Random(seed)

    def set(self, delay_ms: float, jitter_ms: float) -> None:
        if not (0 <= delay_ms <= MAX_DELAY_MS and 0 <= jitter_ms <= MAX_DELAY_MS):
            raise ValueError(f"delay and jitter are 0..{MAX_DELAY_MS:g} ms")
        self.delay_s, self.jitter_s = delay_ms / 1000, jitter_ms / 1000

    def sample(self) -> float:
        if not self.delay_s and not self.jitter_s:
            return 0.0
        return max(0.0, self.delay_s + self._rng.uniform(-self.jitter_s, self.jitter_s))


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, d: Delays) -> None:
    """One direction: read chunks, write each when its delay is over, in order."""
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUE_CHUNKS)

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    sender = asyncio.create_task(deliver(), name="link-proxy-deliver")
    last_due = 0.0
    try:
        while True:
            data = await reader.read(CHUNK)
            last_due = max(last_due, time.monotonic() + d.sample())
            await queue.put((last_due, data))
            if not data:
                break
        await sender
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)


class ProxyServer:
    """The proxy's listeners and its control port, in one event loop."""

    def __init__(self) -> None:
        self.delays = Delays()
        self._servers: list[asyncio.Server] = []
        self._conns: set[asyncio.Task[None]] = set()

    async def add(self, target_port: int) -> int:
        if len(self._servers) >= MAX_PORTS:
            raise ValueError(f"at most {MAX_PORTS} proxied ports")

        async def connect(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            if task is not None:
                self._conns.add(task)
            try:
                tr, tw = await asyncio.open_connection(HOST, target_port)
            except OSError:
                w.close()
                return
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(_pump(r, tw, self.delays), name="link-proxy-out")
                    tg.create_task(_pump(tr, w, self.delays), name="link-proxy-back")
            except* OSError:
                pass  # either end went away: close both
            finally:
                for side in (w, tw):
                    side.close()
                if task is not None:
                    self._conns.discard(task)
                for side in (w, tw):
                    with contextlib.suppress(OSError):
                        await asyncio.shield(side.wait_closed())

        server = await asyncio.start_server(connect, HOST, 0)
        self._servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def control(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while line := await r.readline():
                w.write(
                    (await self._command(line[:_LINE].decode(errors="replace")) + "\n").encode()
                )
                await w.drain()
        except (OSError, ValueError):
            pass
        finally:
            w.close()

    async def _command(self, line: str) -> str:
        words = line.split()
        try:
            if len(words) == 2 and words[0] == "add":
                port = int(words[1])
                if not 0 < port < 65536:
                    raise ValueError("not a port")
                return f"ok {await self.add(port)}"
            if len(words) == 3 and words[0] == "set":
                self.delays.set(float(words[1]), float(words[2]))
                return "ok"
        except ValueError as exc:
            return f"error {exc}"
        return "error commands: add TARGET_PORT | set DELAY_MS JITTER_MS"

    async def serve(self, control_port: int) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        control = await asyncio.start_server(self.control, HOST, control_port)
        try:
            await stop.wait()
        finally:
            control.close()
            await self.aclose()

    async def aclose(self) -> None:
        """Stop listening and end every connection carried."""
        for server in self._servers:
            server.close()
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()


class LinkProxy:
    """The supervisor's handle on a proxy process: start, add a node, set the delay."""

    def __init__(self, log_path: Path) -> None:
        self.control_port = free_port()
        self._log_path = log_path
        self._popen: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None

    def start(self) -> None:
        with open(self._log_path, "ab") as log:
            argv = [sys.executable, "-m", "localcluster.link_proxy"]
            self._popen = subprocess.Popen(
                [*argv, "--control-port", str(self.control_port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        wait_port(self.control_port, proc=self._popen)
        self._sock = socket.create_connection((HOST, self.control_port), timeout=5)

    def _ask(self, line: str) -> str:
        if self._sock is None:
            raise ServerError("the link proxy is not started")
        self._sock.sendall(line.encode() + b"\n")
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = self._sock.recv(256)
            if not chunk:
                raise ServerError("the link proxy closed its control connection")
            answer += chunk
        text = answer.decode().strip()
        if not text.startswith("ok"):
            raise ServerError(f"link proxy: {text}")
        return text

    def add(self, target_port: int) -> int:
        """A port that forwards to ``target_port`` through the delays."""
        return int(self._ask(f"add {target_port}").split()[1])

    def set(self, delay_ms: float, jitter_ms: float = 0.0) -> None:
        """Delay everything carried from now on by ``delay_ms +- jitter_ms``."""
        self._ask(f"set {delay_ms:g} {jitter_ms:g}")

    def stop(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
        if self._popen is not None and self._popen.poll() is None:
            self._popen.send_signal(signal.SIGTERM)
            try:
                self._popen.wait(5)
            except subprocess.TimeoutExpired:
                self._popen.kill()
                self._popen.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="delaying TCP proxy for local chaos runs")
    parser.add_argument("--control-port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(ProxyServer().serve(args.control_port))


if __name__ == "__main__":
    main()
