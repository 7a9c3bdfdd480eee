"""The effects side of a local cluster for benchmarks: the fake CRM as its own process and
``callmesh effects-worker`` processes delivering to it, and the switch that takes the CRM
down and up. Used by ``loadtest effects`` and by ``loadtest chaos --fault crm-outage``.
"""

from __future__ import annotations

import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import aiohttp

from events.worker_config import DEFAULT_DURABLE
from loadtest.fake_crm import EFFECTS_PATH
from localcluster.cluster import LocalCluster, Proc
from localcluster.servers import ServerError, free_port


def wait_http(proc: Proc, path: str, timeout_s: float = 20.0) -> None:
    """Until ``proc`` answers ``path`` with a 2xx (it is listening and ready)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            tail = proc.log_path.read_text(errors="replace")[-2000:]
            raise ServerError(f"{proc.name} exited before it was ready:\n{tail}")
        try:
            with urllib.request.urlopen(proc.url + path, timeout=0.5):
                return
        except (OSError, urllib.error.URLError):
            time.sleep(0.05)
    raise ServerError(f"{proc.name} not ready after {timeout_s}s; log {proc.log_path}")


@contextmanager
def process(proc: Proc, ready_path: str) -> Iterator[Proc]:
    proc.start()
    try:
        wait_http(proc, ready_path)
        yield proc
    finally:
        proc.stop()


def start_crm_and_workers(
    stack: ExitStack, cluster: LocalCluster, workers: int, *, nats_cluster: bool = False
) -> tuple[Proc, list[Proc]]:
    """The fake CRM (applying every request: no de-duplication, so an effect applied twice
    is counted, not hidden behind a 409) and ``workers`` effects workers with their default
    delivery policy pointed at it; each is stopped when ``stack`` closes."""
    logs = cluster.log_dir
    if logs is None:
        raise RuntimeError("the local cluster has no log directory")
    proc_env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if nats_cluster:
        # The workers create the streams too: with the nodes' replicas, or they would
        # scale them back down.
        proc_env["CALLMESH_JETSTREAM_REPLICAS"] = "3"
    crm_port = free_port()
    crm = Proc(
        "fake-crm",
        [sys.executable, "-m", "loadtest.fake_crm", "--port", str(crm_port), "--no-dedupe"],
        crm_port,
        logs / "fake-crm.log",
        proc_env,
    )
    stack.enter_context(process(crm, "/_stats"))
    started = []
    for i in range(1, workers + 1):
        port = free_port()
        argv = [sys.executable, "-m", "callmesh", "--log-level", "INFO", "effects-worker"]
        argv += ["--nats", cluster.nats_url, "--webhook-url", crm.url + EFFECTS_PATH]
        argv += ["--name", f"effects-worker-{i}", "--host", "127.0.0.1", "--port", str(port)]
        # Named, not from the environment: the audit reads this consumer's backlog.
        argv += ["--durable", DEFAULT_DURABLE]
        worker = Proc(f"effects-worker-{i}", argv, port, logs / f"worker-{i}.log", proc_env)
        started.append(stack.enter_context(process(worker, "/healthz")))
    return crm, started


async def set_crm_mode(http: aiohttp.ClientSession, crm_url: str, mode: str) -> None:
    """Switch the fake CRM process: ``up``, or an outage mode (``503``, ``abort``)."""
    async with http.post(f"{crm_url}/_control/mode", json={"mode": mode}) as resp:
        resp.raise_for_status()
