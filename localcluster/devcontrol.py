"""The local cluster's development control: what lets the browser console kill a node.

The router owns no process; the supervisor that started the cluster (``callmesh up``,
:class:`localcluster.cluster.LocalCluster` with ``dev=True``) does. So the supervisor
serves this control on a loopback port, and only the router knows where and with what
secret (``CALLMESH_DEV_CONTROL_URL``, ``CALLMESH_DEV_SECRET``: in the router's environment
alone). Nothing else can use it:

- it listens on 127.0.0.1 only, and exists only while a development cluster runs;
- every request needs ``Authorization: Bearer <secret>`` (32 random bytes per start);
- it knows one verb: ``POST /v1/dev/nodes/{node}/kill``: SIGKILL that node of this cluster
  (as a crash would), then start a fresh node in its place so the cluster keeps its size.
"""

from __future__ import annotations

import hmac
import json
import re
import secrets
import signal
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_KILL = re.compile(r"^/v1/dev/nodes/([A-Za-z0-9_-]{1,64})/kill$")


def new_secret() -> str:
    return secrets.token_urlsafe(32)


class DevControl:
    """``with DevControl(secret, kill=...) as ctl: ctl.url``: serves in a daemon thread."""

    def __init__(self, secret: str, kill: Callable[[str], dict[str, Any] | None]) -> None:
        self.secret = secret
        self._kill = kill
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="dev-control", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> DevControl:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        control = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass  # the supervisor's terminal is the user's: say nothing per request

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._answer(405, {"message": "POST only"})

            def do_POST(self) -> None:
                scheme, _, given = self.headers.get("Authorization", "").partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(
                    given.encode(), control.secret.encode()
                ):
                    self._answer(401, {"message": "bad or missing secret"})
                    return
                match = _KILL.match(self.path)
                if match is None:
                    self._answer(404, {"message": "unknown control"})
                    return
                killed = control._kill(match[1])
                if killed is None:
                    self._answer(404, {"message": f"no running node {match[1]} in this cluster"})
                    return
                self._answer(200, killed)

        return Handler


KILL_SIGNAL = signal.SIGKILL
