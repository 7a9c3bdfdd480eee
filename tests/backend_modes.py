"""Running a scenario on single servers and on clustered backends (issue 16, item 5/6).

``single``: one Valkey, one NATS (the default everywhere). ``clustered``: three Valkey
masters with a replica each (callmesh talks to it through a ``redis+cluster://`` URL) and
three NATS servers with JetStream streams at three replicas. Clustered runs are skipped only
when the binaries cannot run in cluster mode here, and the skip says why.
"""

from __future__ import annotations

import functools
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from localcluster.servers import ServerError, find_nats, find_redis, free_port, wait_port

SINGLE = "single"
CLUSTERED = "clustered"
MODES = [SINGLE, CLUSTERED]


@functools.cache
def cluster_unavailable() -> str | None:
    """Why clustered backends cannot run here, or None when they can: valkey-server must
    start in cluster mode, and nats-server must exist."""
    try:
        binary = find_redis()
        find_nats()
    except ServerError as exc:
        return f"cluster-mode binaries not found: {exc}"
    with tempfile.TemporaryDirectory(prefix="callmesh-probe-") as tmp:
        port, bus = free_port(), free_port()
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", tmp, "--save", ""]
        argv += ["--cluster-enabled", "yes", "--cluster-port", str(bus)]
        log = Path(tmp) / "probe.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_port(port, timeout_s=10, proc=proc)
        except ServerError as exc:
            tail = log.read_text(errors="replace")[-500:]
            return f"{binary} cannot start in cluster mode: {exc}: {tail}"
        finally:
            proc.kill()
            proc.wait()
    return None


def cluster_kwargs(mode: str) -> dict[str, Any]:
    """LocalCluster / EmbeddedBackends arguments for ``mode`` (skips if it cannot run)."""
    if mode == SINGLE:
        return {}
    reason = cluster_unavailable()
    if reason is not None:
        pytest.skip(reason)
    return {"redis_cluster": True, "nats_cluster": True}


# For tests whose ``cluster`` fixture reads the ``backend_mode`` fixture (tests/conftest.py).
both_backends = pytest.mark.parametrize("backend_mode", MODES, indirect=True)
