"""The processes that read settings, and value kinds several of their settings share."""

from __future__ import annotations

from callmesh.settings.kinds import Number, Text

ROUTER, NODE, WORKER = "router", "node", "effects-worker"
UP, CALL, STATUS, REPLAY = "up", "call", "status", "replay"
PROCESSES = (ROUTER, NODE, WORKER, UP, CALL, STATUS, REPLAY)
SERVICES = (ROUTER, NODE)

ID = Text(r"[A-Za-z0-9_-]{1,64}", "an id matching [A-Za-z0-9_-]{1,64}")
HTTP = ("http", "https")
PORT = Number(int, ge=0, le=65535)
