"""One client call through the router: placement, the node link, and failover.

The client's connection lives here for the whole call; the link to the owner node may be
replaced underneath it. What makes a replacement invisible to the caller (invariant 5):

- inbound frames are kept until the node acknowledges them (``ack`` after its checkpoint)
  and replayed, in order, to a new owner, which skips what its checkpoint already applied;
- reply frames of a turn not yet acknowledged are remembered by ``(turn, n)``: a re-answer
  that says the same thing is not sent twice; one that says something else is preceded by
  ``clear`` so the caller drops the dead node's partial reply first.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import WSMsgType, web

from callmesh.protocol import (
    REPLY_TYPES,
    CloseCode,
    Ctl,
    ErrorCode,
    In,
    Inbound,
    Out,
    ProtocolError,
    encode,
    error_frame,
    parse_inbound,
)
from router.ring import NoNodeAvailable
from state_store.errors import StateStoreError

if TYPE_CHECKING:
    from router.app import Router

log = logging.getLogger("callmesh.router.proxy")


class Outcome(StrEnum):
    ENDED = "ended"  # the call ended (hangup → call_ended)
    HANDOFF = "handoff"  # the node drains: move the call
    LOST = "lost"  # the link dropped: suspect the node
    DEAD = "dead"  # membership declared the node dead
    CLIENT_GONE = "client_gone"


class ProxySession:
    def __init__(self, router: Router, call_id: str, client: web.WebSocketResponse) -> None:
        self._r = router
        self.call_id = call_id
        self.client = client
        self.tenant = ""
        self.start: Inbound | None = None
        self.node_id: str | None = None
        self.upstream: aiohttp.ClientWebSocketResponse | None = None
        self.unacked: deque[Inbound] = deque()
        self.last_client_seq = 0
        # Highest turn whose ``turn_metrics`` the client received: that reply is complete.
        # -1: not even turn 0 (the greeting) is complete yet.
        self.completed_turn = -1
        self.delivered: dict[tuple[int, int], int] = {}
        self._held: list[str] = []  # duplicate frames of the in-flight turn, held back
        self._ready_sent = False
        self._ended = False
        self._client_gone = asyncio.Event()
        self._node_dead = asyncio.Event()
        self.failovers = 0

    def __repr__(self) -> str:
        return (
            f"<ProxySession {self.tenant}/{self.call_id} node={self.node_id} "
            f"unacked={len(self.unacked)} turn={self.completed_turn} failovers={self.failovers}>"
        )

    # ------------------------------------------------------------------ client side

    async def send_client(self, frame: str) -> None:
        if not self.client.closed:
            try:
                await self.client.send_str(frame)
            except (ConnectionError, RuntimeError):
                self._client_gone.set()

    async def wait_start(self) -> bool:
        """Read client frames until a valid ``start``; errors for anything before it."""
        async for msg in self.client:
            if msg.type is not WSMsgType.TEXT:
                if msg.type is WSMsgType.BINARY:
                    await self.send_client(error_frame(ErrorCode.BAD_MESSAGE, "use text frames"))
                    continue
                return False
            inbound = await self._parse(msg.data)
            if inbound is None:
                continue
            if inbound.type is not In.START:
                await self.send_client(
                    error_frame(
                        ErrorCode.NOT_STARTED, "send 'start' before anything else", seq=inbound.seq
                    )
                )
                continue
            self.start = inbound
            self.tenant = inbound.body["tenant"]
            self.last_client_seq = inbound.seq
            return True
        return False

    async def _parse(self, data: str) -> Inbound | None:
        try:
            return parse_inbound(data, self._r.config.max_frame_bytes)
        except ProtocolError as exc:
            self._r.metrics.inc(f"client_errors_{exc.code.value}")
            await self.send_client(error_frame(exc.code, exc.message, seq=exc.seq))
            return None

    async def read_client(self) -> None:
        """Client → node: validate, keep until acknowledged, forward if a link is up."""
        try:
            async for msg in self.client:
                if msg.type is WSMsgType.BINARY:
                    await self.send_client(error_frame(ErrorCode.BAD_MESSAGE, "use text frames"))
                    continue
                if msg.type is not WSMsgType.TEXT:
                    break
                inbound = await self._parse(msg.data)
                if inbound is None:
                    continue
                if inbound.seq <= self.last_client_seq:
                    await self.send_client(
                        error_frame(
                            ErrorCode.BAD_SEQ,
                            f"seq must increase (last was {self.last_client_seq})",
                            seq=inbound.seq,
                        )
                    )
                    continue
                if inbound.type is In.START:
                    await self.send_client(
                        error_frame(
                            ErrorCode.ALREADY_STARTED, "call already started", seq=inbound.seq
                        )
                    )
                    continue
                if len(self.unacked) >= self._r.config.max_unacked_frames:
                    await self.send_client(
                        error_frame(
                            ErrorCode.UNAVAILABLE,
                            "too many unacknowledged frames; slow down",
                            seq=inbound.seq,
                        )
                    )
                    continue
                self.last_client_seq = inbound.seq
                self.unacked.append(inbound)
                up = self.upstream
                if up is not None and not up.closed:
                    try:
                        await up.send_str(inbound.raw)
                    except (ConnectionError, RuntimeError):
                        pass  # the link is failing; the frame is replayed to the next owner
        finally:
            self._client_gone.set()
            up = self.upstream
            if up is not None and not self._ended:
                await up.close()

    # ------------------------------------------------------------------ node side

    async def attach(self, node_id: str, reason: str) -> bool:
        """Open a link to ``node_id`` and replay the start and unacknowledged frames."""
        if self.start is None:
            raise RuntimeError("attach before start")
        url = self._r.membership.url(node_id)
        if url is None:
            return False
        try:
            ws = await self._r.http.ws_connect(
                f"{url}/v1/node/calls/{self.call_id}",
                timeout=aiohttp.ClientWSTimeout(ws_close=1.0),
                max_msg_size=self._r.config.max_frame_bytes * 4,
                autoping=True,
            )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.info("node link failed", extra={"fields": {"node": node_id, "error": str(exc)}})
            return False
        self.node_id = node_id
        self._node_dead.clear()
        self.upstream = ws
        # A new owner learns what the caller already has: a turn it restores as committed
        # but whose reply the caller never fully received is spoken again (de-duplicated).
        # (A new client connection is not a relink: nothing is known of what it heard.)
        start = (
            self.start.body
            if reason == "start"
            else {**self.start.body, "resume": reason, "delivered_turn": self.completed_turn}
        )
        try:
            await ws.send_str(self.start.raw if reason == "start" else encode(start))
            # Copy: the client reader may append while we replay; appended frames are
            # forwarded by it directly because ``self.upstream`` is already set.
            for frame in list(self.unacked):
                await ws.send_str(frame.raw)
        except (ConnectionError, RuntimeError):
            return False
        return True

    async def pump_upstream(self) -> Outcome:
        """Node → client until the link ends; returns why it ended."""
        ws = self.upstream
        if ws is None:
            return Outcome.LOST
        async for msg in ws:
            if msg.type is not WSMsgType.TEXT:
                break
            try:
                frame = json.loads(msg.data)
            except ValueError:
                log.error("node sent invalid JSON", extra={"fields": {"node": self.node_id}})
                continue
            kind = frame.get("type")
            if kind == Ctl.ACK:
                self._on_ack(int(frame.get("seq", 0)))
            elif kind == Ctl.HANDOFF:
                return Outcome.HANDOFF
            elif kind == Out.READY:
                if not self._ready_sent:
                    self._ready_sent = True
                    await self.send_client(msg.data)
            elif kind in REPLY_TYPES:
                await self._forward_reply(frame, msg.data)
            elif kind == Out.TURN_METRICS:
                turn = int(frame.get("turn", 0))
                if turn > self.completed_turn:
                    self._complete(turn)
                    await self.send_client(msg.data)
            elif kind == Out.CALL_ENDED:
                self._ended = True
                await self.send_client(msg.data)
                return Outcome.ENDED
            else:
                if kind == Out.ERROR and frame.get("code") == ErrorCode.CALL_ENDED:
                    self._ended = True
                    await self.send_client(msg.data)
                    return Outcome.ENDED
                await self.send_client(msg.data)
        if self._client_gone.is_set():
            return Outcome.CLIENT_GONE
        return Outcome.LOST

    def _on_ack(self, seq: int) -> None:
        while self.unacked and self.unacked[0].seq <= seq:
            self.unacked.popleft()

    def _complete(self, turn: int) -> None:
        self.completed_turn = turn
        self.delivered = {k: v for k, v in self.delivered.items() if k[0] > turn}
        self._held.clear()

    async def _forward_reply(self, frame: dict[str, Any], raw: str) -> None:
        turn, n = int(frame.get("turn", 0)), int(frame.get("n", 0))
        if turn <= self.completed_turn:
            return  # the caller has this turn's whole reply already
        digest = hash(frame.get("text") or frame.get("data") or "")
        key = (turn, n)
        seen = self.delivered.get(key)
        if seen is None:
            self.delivered[key] = digest
            await self.send_client(raw)
        elif seen == digest:
            self._held.append(raw)  # the caller has this already
            self._r.metrics.inc("replies_deduplicated")
        else:
            # The new owner says something else: the caller drops the partial reply first,
            # then hears the new one from its start.
            await self.send_client(
                encode({"type": Out.CLEAR.value, "turn": turn, "reason": "failover"})
            )
            self._r.metrics.inc("replies_cleared")
            self.delivered = {k: v for k, v in self.delivered.items() if k[0] != turn}
            held, self._held = self._held, []
            for h in held:
                await self.send_client(h)
            self.delivered[key] = digest
            await self.send_client(raw)

    def node_died(self) -> None:
        """Membership declared our node dead (e.g. it is paused): abandon the link now."""
        self._node_dead.set()

    async def _pump_or_death(self) -> Outcome:
        """Pump the link, unless the node is declared dead first: then stop reading at once
        (a paused node would hold a graceful close for seconds) and close in background."""
        pump = asyncio.create_task(self.pump_upstream(), name=f"pump:{self.call_id}")
        dead = asyncio.create_task(self._node_dead.wait(), name=f"death:{self.call_id}")
        try:
            await asyncio.wait({pump, dead}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            dead.cancel()
            if not pump.done():
                pump.cancel()
            await asyncio.gather(pump, dead, return_exceptions=True)
        if pump.cancelled() or pump.exception() is not None:
            if self.upstream is not None:
                self._r.close_in_background(self.upstream)
            return Outcome.DEAD
        return pump.result()

    # ------------------------------------------------------------------ the call

    async def run(self) -> None:
        """Drive a started call (``wait_start`` returned True) until it ends."""
        reader = asyncio.create_task(self.read_client(), name=f"client:{self.call_id}")
        try:
            await self._drive()
        except StateStoreError as exc:
            await self.send_client(error_frame(ErrorCode.UNAVAILABLE, f"state store: {exc}"))
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            if self.upstream is not None and not self.upstream.closed:
                await asyncio.shield(self.upstream.close())
            if self._ended and self.node_id:
                await self._r.forget_pin(self.tenant, self.call_id, self.node_id)

    async def _drive(self) -> None:
        reason = "start"
        node: str | None
        try:
            node = await self._r.place(self.tenant, self.call_id, prefer_pin=True)
        except NoNodeAvailable:
            node = None
        deadline = time.monotonic() + self._r.config.connect_timeout_ms / 1000
        gap_started: float | None = None
        while True:
            if node is not None and await self.attach(node, reason):
                if gap_started is not None:
                    self._r.observe_failover(time.monotonic() - gap_started)
                    gap_started = None
                deadline = time.monotonic() + self._r.config.connect_timeout_ms / 1000
                self._r.track(self, node)
                outcome = await self._pump_or_death()
                self._r.untrack(self, node)
                if outcome in (Outcome.ENDED, Outcome.CLIENT_GONE) or self._client_gone.is_set():
                    return
                gap_started = time.monotonic()
                self.failovers += 1
                self._r.metrics.inc(f"relinks_{outcome.value}")
                log.info(
                    "call relinking",
                    extra={
                        "fields": {"call_id": self.call_id, "node": node, "outcome": outcome.value}
                    },
                )
                reason, node = await self._after(outcome, node)
                continue
            if node is not None:
                self._r.membership.suspect(node)
            if time.monotonic() > deadline:
                await self.send_client(
                    error_frame(ErrorCode.UNAVAILABLE, "no conversation node available")
                )
                await self.client.close(code=CloseCode.UNAVAILABLE)
                return
            await asyncio.sleep(0.05)
            try:
                node = await self._r.place(self.tenant, self.call_id, prefer_pin=False)
            except NoNodeAvailable:
                node = None
            reason = "failover" if self._ready_sent else "start"

    async def _after(self, outcome: Outcome, node: str) -> tuple[str, str | None]:
        """Where the call goes after its link ended: the same node if it is confirmed
        alive (the link broke, not the node), otherwise a new owner."""
        if outcome is Outcome.LOST and await self._r.confirm_alive(node):
            return "reconnect", node
        if outcome is not Outcome.HANDOFF:
            self._r.membership.suspect(node)
        try:
            new = await self._r.place(self.tenant, self.call_id, prefer_pin=False, exclude=node)
        except NoNodeAvailable:
            return "failover", None
        return ("handoff" if outcome is Outcome.HANDOFF else "failover"), new
