"""A local cluster of real processes: Redis + NATS, N routers, M conversation nodes.

Used by ``callmesh up``, the cluster tests and the load/chaos benchmarks, so all three run
exactly the same processes. Children are started in their own session (a Ctrl-C reaches
only the supervisor, which stops them in order) and die with the supervisor (PDEATHSIG).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from callmesh.auth.dev import AUTH_SECRET_ENV, LINK_SECRET_ENV
from localcluster.backends import EmbeddedBackends
from localcluster.devcontrol import KILL_SIGNAL, DevControl, new_secret
from localcluster.link_proxy import LinkProxy
from localcluster.servers import ServerError, die_with_parent, free_port

SPEECH_ENV = "CALLMESH_SPEECH"  # offline or simulated (callmesh/settings/node_table.py)
# The simulated model's slow-down control (callmesh/settings/node_providers_table.py).
SIM_LLM_CONTROL_ENV = "CALLMESH_SIM_LLM_CONTROL_FILE"


def ensure_dev_secrets(extra_env: dict[str, str]) -> dict[str, str]:
    """The call-token and link secrets of a local cluster: given ones are kept; missing
    ones are generated once per process and put in this process's environment, so its
    own clients (the tests, the load generators) mint tokens the cluster accepts."""
    found: dict[str, str] = {}
    for name in (AUTH_SECRET_ENV, LINK_SECRET_ENV):
        value = extra_env.get(name) or os.environ.get(name)
        if not value:
            value = os.environ[name] = new_secret()
        found[name] = value
    return found


@dataclass
class Proc:
    name: str
    argv: list[str]
    port: int
    log_path: Path
    env: dict[str, str]
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.popen.pid if self.popen else 0

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive() and self.popen is not None:
            self.popen.send_signal(sig)

    def stop(self, timeout_s: float = 10.0) -> int | None:
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


def _get_json(url: str, timeout: float = 0.5) -> dict[str, object] | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            data = json.loads(resp.read())
            return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _alive_nodes(status: dict[str, object] | None) -> set[str]:
    nodes = status.get("nodes") if status is not None else None
    return {
        str(n["node"])
        for n in (nodes if isinstance(nodes, list) else [])
        if isinstance(n, dict) and n.get("alive") and n.get("state") == "active"
    }


class LocalCluster:
    """``with LocalCluster(nodes=2) as c: c.router_url ...``"""

    def __init__(
        self,
        nodes: int = 2,
        *,
        routers: int = 1,
        router_port: int | None = None,
        env: dict[str, str] | None = None,
        force_embedded: bool = False,
        log_dir: Path | None = None,
        dev: bool = False,
        redis_cluster: bool = False,
        nats_cluster: bool = False,
        speech: str = "simulated",
        link_proxy: bool = False,
        llm_control: bool = False,
        ready_timeout_s: float = 30.0,
    ) -> None:
        self.n_nodes = nodes
        self.n_routers = routers
        self._router_port = router_port
        self._extra_env = env or {}
        self._force_embedded = force_embedded
        # Clustered backends (localcluster.server_clusters) instead of one server each.
        self._redis_cluster = redis_cluster
        self._nats_cluster = nats_cluster
        # The nodes' speech (CALLMESH_SPEECH): simulated (tones) unless asked, whatever the
        # caller's shell says, since the tests' and load tests' callers speak in tones;
        # ``callmesh up`` asks for offline (a person talks to it). ``env`` overrides it.
        self.speech = speech
        # How long ``start`` waits for every process to be ready: a first start on a fresh
        # machine (cold caches, offline speech models loading) takes longer than tests do.
        self._ready_timeout_s = ready_timeout_s
        # The log directory this cluster made for itself (no ``log_dir`` given), removed
        # when it stops, unless it failed to start: its errors name the logs.
        self._own_log_dir: Path | None = None
        self.log_dir = log_dir
        self.backends: EmbeddedBackends | None = None
        self.router: Proc | None = None
        self.nodes: list[Proc] = []
        self.routers: list[Proc] = []  # router instances after the first
        self._env: dict[str, str] = {}
        # Development mode (callmesh up): the routers get a secret for console tokens and
        # the control that lets the console kill a node (localcluster/devcontrol.py).
        self.dev = dev
        self.dev_control: DevControl | None = None
        self._router_env: dict[str, str] = {}
        self._lock = threading.Lock()
        # CALLMESH_AUTH_SECRET and CALLMESH_LINK_SECRET of the cluster's processes.
        self.secrets: dict[str, str] = {}
        # Chaos controls: routers reach the nodes through a delaying proxy (link latency);
        # each node's simulated model reads its slow-down from a file of its own.
        self._want_link_proxy = link_proxy
        self.link_proxy: LinkProxy | None = None
        self._llm_control = llm_control
        self.llm_control_files: dict[str, Path] = {}

    @property
    def router_url(self) -> str:
        if self.router is None:
            raise RuntimeError("cluster not started")
        return self.router.url

    @property
    def console_url(self) -> str:
        return f"{self.router_url}/console"

    @property
    def router_urls(self) -> list[str]:
        """Every router, the first one first: what a client's router list holds."""
        return [p.url for p in self.all_routers]

    @property
    def all_routers(self) -> list[Proc]:
        return [p for p in [self.router, *self.routers] if p is not None]

    @property
    def auth_secret(self) -> str:
        """The secret call tokens of this cluster are minted with (mint_dev_token)."""
        return self.secrets[AUTH_SECRET_ENV]

    @property
    def redis_url(self) -> str:
        return self._env["REDIS_URL"]

    @property
    def nats_url(self) -> str:
        return self._env["NATS_URL"]

    def __enter__(self) -> LocalCluster:
        try:
            self.start()
        except BaseException:
            self._own_log_dir = None  # kept: the error says where the logs are
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        if self.log_dir is None:
            self.log_dir = self._own_log_dir = Path(tempfile.mkdtemp(prefix="callmesh-logs-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.backends = EmbeddedBackends(
            force_embedded=self._force_embedded,
            redis_cluster=self._redis_cluster,
            nats_cluster=self._nats_cluster,
        ).__enter__()
        self.secrets = ensure_dev_secrets(self._extra_env)
        self._env = {
            **os.environ,
            **self.secrets,
            SPEECH_ENV: self.speech,
            **self._extra_env,
            "REDIS_URL": self.backends.redis_url,
            "NATS_URL": self.backends.nats_url,
            "PYTHONUNBUFFERED": "1",
        }
        if self._nats_cluster:
            # One copy of each stream per server: losing one loses nothing.
            self._env.setdefault("CALLMESH_JETSTREAM_REPLICAS", "3")
        self._router_env = dict(self._env)
        if self._want_link_proxy:
            self.link_proxy = LinkProxy(self.log_dir / "link-proxy.log")
            self.link_proxy.start()
        if self.dev:
            self.dev_control = DevControl(new_secret(), self._kill_node).__enter__()
            self._router_env["CALLMESH_DEV_SECRET"] = self.dev_control.secret
            self._router_env["CALLMESH_DEV_CONTROL_URL"] = self.dev_control.url
        port = self._router_port or free_port()
        self.router = Proc(
            "router",
            [sys.executable, "-m", "callmesh", "router", "--port", str(port)],
            port,
            self.log_dir / "router.log",
            self._router_env,
        )
        self.router.start()
        for _ in range(self.n_routers - 1):
            self.add_router(wait=False)
        for _ in range(self.n_nodes):
            self.add_node(wait=False)
        self.wait_ready(self._ready_timeout_s)
        dead = [p.name for p in self.all_routers if not p.alive()]
        if dead:
            raise ServerError(f"{', '.join(dead)} exited at start; logs in {self.log_dir}")

    def _kill_node(self, name: str) -> dict[str, object] | None:
        """The development control's kill: SIGKILL a node (a crash, no drain), then start
        a fresh one in its place so the cluster keeps its size."""
        with self._lock:
            node = next((n for n in self.nodes if n.name == name and n.alive()), None)
            if node is None or node.popen is None:
                return None
            pid = node.pid
            node.signal(KILL_SIGNAL)
            node.popen.wait()
            replacement = self.add_node(wait=False)
        return {"node": name, "pid": pid, "replacement": replacement.name}

    def add_node(self, *, wait: bool = True) -> Proc:
        index = len(self.nodes) + 1
        port = free_port()
        argv = [sys.executable, "-m", "callmesh", "node", "--port", str(port)]
        argv += ["--node-id", f"node-{index}"]
        env = self._env
        if self.link_proxy is not None:
            argv += ["--advertise-url", f"http://127.0.0.1:{self.link_proxy.add(port)}"]
        if self._llm_control and self.log_dir is not None:
            control = self.llm_control_files[f"node-{index}"] = (
                self.log_dir / f"node-{index}.llm-control"
            )
            control.unlink(missing_ok=True)
            env = {**env, SIM_LLM_CONTROL_ENV: str(control)}
        node = Proc(
            f"node-{index}",
            argv,
            port,
            self.log_dir / f"node-{index}.log" if self.log_dir else Path(os.devnull),
            env,
        )
        node.start()
        self.nodes.append(node)
        if wait:
            self.wait_ready()
        return node

    def add_router(self, *, wait: bool = True) -> Proc:
        """Another router instance on the same backends (routers share pins in Redis)."""
        port = free_port()
        index = len(self.routers) + 2
        proc = Proc(
            f"router-{index}",
            [sys.executable, "-m", "callmesh", "router", "--port", str(port)],
            port,
            (self.log_dir or Path(os.devnull)) / f"router-{index}.log",
            self._router_env,
        )
        proc.start()
        self.routers.append(proc)
        if wait:
            self.wait_ready()
        return proc

    def slow_llm(self, extra_ms: float) -> None:
        """Add ``extra_ms`` to every node's simulated model's first token (0: as
        configured). Needs ``llm_control=True``."""
        if not self._llm_control:
            raise RuntimeError("the cluster was started without llm_control")
        for path in self.llm_control_files.values():
            # Whole or not at all: a node never reads a half-written number.
            tmp = path.with_suffix(".tmp")
            tmp.write_text(f"{extra_ms:g}\n")
            tmp.replace(path)

    def status(self, router: Proc | None = None) -> dict[str, object] | None:
        """A router's /v1/status: the given one, else the first live one."""
        if router is None:
            router = next((p for p in self.all_routers if p.alive()), self.router)
        if router is None:
            return None
        return _get_json(f"{router.url}/v1/status")

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Until every live router answers and sees every live node of ours as alive."""
        deadline = time.monotonic() + timeout_s
        want = {n.name for n in self.nodes if n.alive()}
        routers = [p for p in self.all_routers if p.alive()]
        expected = want | {p.name for p in routers}
        while time.monotonic() < deadline:
            for p in [*routers, *self.nodes]:
                if p.popen is not None and p.popen.poll() is not None and p.name in expected:
                    tail = (
                        p.log_path.read_text(errors="replace")[-3000:]
                        if p.log_path.exists()
                        else ""
                    )
                    raise ServerError(f"{p.name} exited with {p.popen.returncode}:\n{tail}")
            if all(want <= _alive_nodes(self.status(p)) for p in routers):
                return
            time.sleep(0.05)
        raise ServerError(f"cluster not ready after {timeout_s}s; logs in {self.log_dir}")

    def stop(self) -> None:
        # Router first (no new calls), then nodes (they drain), then the servers.
        for proc in [self.router, *self.routers]:
            if proc is not None:
                proc.stop()
        if self.dev_control is not None:
            self.dev_control.close()
            self.dev_control = None
        for node in self.nodes:
            node.stop()
        if self.link_proxy is not None:
            self.link_proxy.stop()
            self.link_proxy = None
        if self.backends is not None:
            self.backends.__exit__(None, None, None)
            self.backends = None
        if self._own_log_dir is not None:
            shutil.rmtree(self._own_log_dir, ignore_errors=True)
            self._own_log_dir = None
