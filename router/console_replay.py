"""The call inspector's data: a call's replay report (events.replay), as JSON for the page.

The router has no NATS connection of its own; this one is opened on the first inspection
and kept (with a Redis client for the checkpoint) until the router stops. Reading,
rebuilding and verifying are the replay library's (the same as ``callmesh replay``); what
is added here is only for display: each record's one-line description and the state the
log rebuilds after each turn.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import nats
from nats.aio.client import Client as NATS

from callmesh.config import Backends
from events.errors import EventsError
from events.eventlog import EventType
from events.replay import build_report, list_calls, read_records
from events.replay_state import rebuild
from events.replay_text import LATENCY_PARTS, describe
from state_store.client import connect as redis_connect
from state_store.errors import StateStoreError
from state_store.store import StateStore

# A turn-by-turn rebuild is quadratic in the log; past this many turns the page shows
# the final state only.
MAX_TURN_STATES = 200


class ReplayUnavailable(Exception):
    """The event log cannot be read now (NATS down or unreachable)."""


class ReplayReader:
    def __init__(self, backends: Backends) -> None:
        self._backends = backends
        self._nc: NATS | None = None
        self._redis: Any = None
        self._lock = asyncio.Lock()

    async def _connection(self) -> NATS:
        async with self._lock:
            if self._nc is None or self._nc.is_closed:
                try:
                    self._nc = await nats.connect(
                        self._backends.nats_url,
                        name="router-console",
                        connect_timeout=2,
                        max_reconnect_attempts=-1,
                        allow_reconnect=True,
                    )
                except Exception as exc:  # nats raises its own and OS errors alike
                    raise ReplayUnavailable(f"event log unreachable: {exc}") from None
            if self._redis is None:
                self._redis = redis_connect(self._backends.redis_url, timeout_s=2.0)
            return self._nc

    async def calls(self, tenant: str) -> dict[str, int]:
        js = (await self._connection()).jetstream()
        try:
            return await list_calls(js, tenant)
        except EventsError as exc:
            raise ReplayUnavailable(str(exc)) from None

    async def report(self, tenant: str, call_id: str) -> dict[str, Any] | None:
        """The replay of one call of ``tenant`` for the inspector page; None if unknown."""
        js = (await self._connection()).jetstream()
        try:
            records = await read_records(js, tenant, call_id)
        except EventsError as exc:
            raise ReplayUnavailable(str(exc)) from None
        warning = ""
        try:
            ckpt = await StateStore(self._redis).load(tenant, call_id)
        except StateStoreError as exc:
            ckpt, warning = None, f"checkpoint could not be read: {exc}"
        report = build_report(tenant, call_id, records, ckpt)
        if warning:
            report.warnings.insert(0, warning)
        if not report.found:
            return None
        out = report.to_dict()
        for group in out["turns"]:
            for rec in group["records"]:
                rec["_text"] = describe(rec)
        out["latency_parts"] = list(LATENCY_PARTS)
        turns = [t for t, _ in report.turns()]
        if len(turns) <= MAX_TURN_STATES:
            out["state_by_turn"] = {
                str(t): _turn_state(rebuild(tenant, call_id, report.records, at=t).to_dict())
                for t in turns
            }
        out["metrics"] = [
            {"turn": int(r.get("turn", 0)), **(r.get("metrics") or {})}
            for r in report.records
            if r.get("type") == EventType.TURN_METRICS
        ]
        return out

    async def aclose(self) -> None:
        nc, self._nc = self._nc, None
        if nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(nc.close())
        redis, self._redis = self._redis, None
        if redis is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(redis.aclose())


def _turn_state(state: dict[str, Any]) -> dict[str, Any]:
    """What the page shows of the state after a turn (effects are shown per turn)."""
    return {k: state[k] for k in ("facts", "working", "node", "epoch", "last_seq", "status")}
